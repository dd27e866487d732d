"""The reference real LLM, SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI, dequantized to float32).

Skipped with a reason when the cache is absent (``nox -s realmodel`` makes it). About a minute on 2 CPU
cores, most of it the direct GGUF load (dequantizing 135M parameters).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.conftest import require_shared

pytestmark = pytest.mark.realmodel

PROMPT = "The capital of France is"
# WikiText-2 test, first windows: 4 x 512 tokens (2044 predicted) keeps the test to a few seconds.
SEQ_LEN, N_WINDOWS, TEXT_CHARS = 512, 4, 40_000
# A sane range from the model's known quality, not from a run of this code. Token-level perplexity on
# WikiText-2 of models with a ~50k BPE vocabulary (SmolLM2's is 49k): GPT-2 small (124M) about 30 and
# GPT-2 XL (1.5B) about 17-18 (Radford et al. 2019, zero-shot, 1024-token context). SmolLM2-135M is a
# stronger model than GPT-2 small on the benchmarks its card lists, but here instruction tuning, 4-bit
# weights (Q4_1) and short non-overlapping 512-token windows (a mean context of 256 tokens) push it up,
# so the same order as GPT-2 small is expected: above 40 is a damaged model. A 135M model cannot beat a
# 1.5B one by a wide margin: below 10 means a counting or leakage error. Checked by breaking the model:
# q/k rows left in llama.cpp's interleaved order give about 590; a RoPE base of 1e4 instead of 1e5 only
# about 33, which this range cannot tell from a sound model.
PPL_RANGE = (10.0, 40.0)


def test_converted_model_is_smollm2_135m(smollm2: tuple[Any, Any]) -> None:
    from ghostsolve.adapters import get_adapter

    model, tokenizer = smollm2
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(config, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # tied head counted once
    assert len(get_adapter(model).layers(model)) == 30
    assert len(tokenizer) == 49152 and tokenizer.model_max_length == 8192
    assert tokenizer.eos_token == "<|im_end|>"


def test_greedy_answer_names_paris(smollm2: tuple[Any, Any]) -> None:
    # Plain text, no chat template: the instruct model continues the sentence ("Paris.").
    model, tokenizer = smollm2
    batch = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_wikitext2_perplexity_is_sane(smollm2: tuple[Any, Any]) -> None:
    from ghostsolve.pipeline.data import text_windows
    from ghostsolve.pipeline.evaluate import perplexity

    model, tokenizer = smollm2
    raw = require_shared("wikitext-2/wiki.test.raw").read_text(encoding="utf-8")
    windows = text_windows(raw[:TEXT_CHARS], tokenizer, SEQ_LEN, max_windows=N_WINDOWS)
    assert windows.shape == (N_WINDOWS, SEQ_LEN)
    result = perplexity(model, windows, batch_size=2, progress=False)
    assert result.n_tokens == N_WINDOWS * (SEQ_LEN - 1)  # SmolLM2 has no BOS: every window is text
    assert PPL_RANGE[0] < result.perplexity < PPL_RANGE[1], result


@pytest.mark.slow
def test_gguf_file_loads_directly_with_the_same_logits(
    reference_model: Any, smollm2: tuple[Any, Any]
) -> None:
    # Both are the same dequantized float32 tensors under the same transformers code: bit-identical.
    from ghostsolve.pipeline.io.gguf import load_gguf

    model, tokenizer = smollm2
    direct, direct_tokenizer = load_gguf(reference_model.gguf)
    ids = tokenizer(f"{PROMPT} Paris. It lies on the Seine.", return_tensors="pt")["input_ids"]
    assert direct_tokenizer(f"{PROMPT} Paris.")["input_ids"] == tokenizer(f"{PROMPT} Paris.")["input_ids"]
    with torch.no_grad():
        expected, got = model(input_ids=ids).logits, direct(input_ids=ids).logits
    versions = reference_model.manifest.get("converted_with", {})
    assert torch.equal(got, expected), (
        f"max |diff| {float((got - expected).abs().max()):.3g}; the cache was converted with {versions} "
        "- rebuild it with `python scripts/get_reference_model.py --force` after an upgrade"
    )
