"""Tiny random models of every supported family, calibration batches, and the converted stories260K.

Other test modules import these; keep the signatures stable.

* :func:`tiny_config` / :func:`tiny_model`: 2-4 layers, hidden size 32, built from the transformers
  config classes, seeded, in eval mode.
* :data:`TINY_FAMILIES`: the names accepted by :func:`tiny_model` (one per adapter, plus a Llama with
  tied embeddings).
* :func:`random_batches`: seeded ``{"input_ids", "attention_mask"}`` batches, optionally right-padded.
* :func:`stories260k_dir`: converts ``../shared/data/models/stories260K`` to a Hugging Face Llama
  directory once per session (skips the calling test with a reason when the data or the converter is
  absent).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import shared_data_dir

__all__ = [
    "TINY_FAMILIES",
    "random_batches",
    "stories260k_dir",
    "tiny_config",
    "tiny_model",
]

#: Names accepted by :func:`tiny_config`; "llama-tied" ties lm_head to the embedding.
TINY_FAMILIES: tuple[str, ...] = ("llama", "llama-tied", "mistral", "qwen2", "qwen3", "olmo2", "olmo3")

VOCAB = 97


def tiny_config(
    family: str,
    *,
    num_layers: int = 4,
    hidden_size: int = 32,
    vocab_size: int = VOCAB,
    **overrides: Any,
) -> Any:
    """A tiny transformers config of ``family`` (see :data:`TINY_FAMILIES`).

    Four heads of size 8 with two key/value heads (grouped-query attention), an MLP twice as wide as
    the hidden size, and ``initializer_range=0.1`` so that random layers change the residual stream
    visibly. ``overrides`` are passed to the config class.
    """
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    class_names = {
        "llama": "LlamaConfig",
        "llama-tied": "LlamaConfig",
        "mistral": "MistralConfig",
        "qwen2": "Qwen2Config",
        "qwen3": "Qwen3Config",
        "olmo2": "Olmo2Config",
        "olmo3": "Olmo3Config",
    }
    if family not in class_names:
        raise ValueError(f"unknown tiny family {family!r}; choose from {TINY_FAMILIES}")
    config_class = getattr(transformers, class_names[family], None)
    if config_class is None:  # older transformers releases lack the newer families
        pytest.skip(f"transformers {transformers.__version__} has no {class_names[family]}")
    if family == "llama-tied":
        common["tie_word_embeddings"] = True
    if family == "qwen3":
        common["head_dim"] = hidden_size // 4
    if family == "mistral":
        common["sliding_window"] = None
    if family == "olmo3":
        # Alternate sliding and full attention, so layer removal must shorten layer_types correctly.
        common["sliding_window"] = 8
        common["layer_types"] = [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)
        ]
    common.update(overrides)
    return config_class(**common)


def tiny_model(
    family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs: Any
) -> Any:
    """A seeded random ``*ForCausalLM`` of ``family`` in eval mode (see :func:`tiny_config`)."""
    import transformers

    config = tiny_config(family, **config_kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval()


def random_batches(
    *,
    n_batches: int = 3,
    batch_size: int = 2,
    seq_len: int = 12,
    vocab_size: int = VOCAB,
    seed: int = 0,
    pad: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """Seeded calibration batches of random tokens (token 1 = BOS first).

    With ``pad=True`` the second row of every batch is right-padded (pad id 0) over its last third,
    and ``attention_mask`` marks the padding.
    """
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(3, vocab_size, (batch_size, seq_len), generator=gen)
        ids[:, 0] = 1
        mask = torch.ones_like(ids)
        if pad and batch_size > 1:
            cut = seq_len - seq_len // 3
            ids[1, cut:] = 0
            mask[1, cut:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def stories260k_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face Llama directory converted from the shared stories260K checkpoint.

    Converted once per test session into the session's temporary folder. Skips the calling test
    when the shared data or the converter (``ghostsolve.pipeline.io.convert_llama2c``) is absent.
    """
    source = shared_data_dir() / "models" / "stories260K"
    checkpoint, tokenizer = source / "stories260K.bin", source / "tok512.bin"
    if not (checkpoint.exists() and tokenizer.exists()):
        pytest.skip(
            f"needs models/stories260K from the shared data folder ({source} is absent); "
            "set GHOSTSOLVE_SHARED_DATA to a copy of it"
        )
    try:
        from ghostsolve.pipeline.io.convert_llama2c import convert_llama2c
    except ImportError as err:  # pragma: no cover - only while the converter is being written
        pytest.skip(f"the llama2.c converter is not available ({err})")
    out = tmp_path_factory.getbasetemp() / "stories260K-hf"
    if not (out / "config.json").exists():
        convert_llama2c(checkpoint, tokenizer, out)
    return out
