"""GhostsolveModifier in a real llm-compressor ``oneshot``: prune + recover, quantize, save, load.

Runs where llm-compressor is installed; skips otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("llmcompressor")

import ghostsolve
from ghostsolve.pipeline.model.operators import ghost_of
from ghostsolve.pipeline.recover import recover
from tests.model_factories import tiny_model
from tests.pipeline._tiny import tiny_tokenizer

pytestmark = pytest.mark.slow

DROP = [2, 3]
# Hidden size 128: the W8A16 preset quantizes in groups of 128 input features.
HIDDEN = 128


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    # oneshot reads the model's config back from config._name_or_path: the model must come from a directory.
    out = tmp_path_factory.mktemp("dense") / "model"
    tok = tiny_tokenizer()
    tiny_model("llama", num_layers=6, hidden_size=HIDDEN, vocab_size=len(tok), seed=1).save_pretrained(out)
    tok.save_pretrained(out)  # oneshot wants a processor beside a dataset
    return out


def _dataset(n: int = 24, seq: int = 32) -> tuple[object, list[dict[str, torch.Tensor]]]:
    from datasets import Dataset

    ids = torch.randint(3, 300, (n, seq), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 1
    rows = [{"input_ids": r[None], "attention_mask": torch.ones(1, seq, dtype=torch.long)} for r in ids]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    return dataset, rows


def _oneshot(dense_dir: Path, recipe) -> torch.nn.Module:
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(dense_dir)
    dataset, _ = _dataset()
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=len(dataset),
            shuffle_calibration_samples=False, processor=tiny_tokenizer())  # fmt: skip
    return model


def _quantizer(name: str):
    if name == "gptq":  # calibrated: llm-compressor's sequential pipeline runs through the operators
        from llmcompressor.modifiers.gptq import GPTQModifier

        return GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"])
    from llmcompressor.modifiers.quantization import QuantizationModifier  # data-free

    return QuantizationModifier(targets="Linear", scheme="W8A16", ignore=["lm_head"])


@pytest.mark.parametrize("quantizer", ["w8a16", "gptq"])
def test_prune_recover_then_quantize_in_one_oneshot(dense_dir: Path, tmp_path: Path, quantizer: str) -> None:
    from ghostsolve.integrations.llmcompressor import GhostsolveModifier

    ghost = GhostsolveModifier(drop=DROP, method="ghost")
    model = _oneshot(dense_dir, [ghost, _quantizer(quantizer)])
    # Pruned and recovered in place, with the operators ghostsolve fits on the same batches by itself.
    assert type(model).__name__ == "GhostsolveLlamaForCausalLM" and len(model.model.layers) == 4
    from transformers import AutoModelForCausalLM

    _, rows = _dataset()
    reference = recover(AutoModelForCausalLM.from_pretrained(dense_dir), DROP, rows, method="ghost",
                        progress=False)  # fmt: skip
    got, want = ghost_of(model.model.layers[2]), ghost_of(reference.model.model.layers[2])
    assert got is not None and want is not None
    torch.testing.assert_close(got.delta, want.delta, rtol=1e-5, atol=1e-6)
    # Quantization came after: it covers the kept layers' Linear modules and leaves the operator alone.
    assert all(hasattr(m, "quantization_scheme") for m in model.model.layers[2].modules()
               if isinstance(m, torch.nn.Linear))  # fmt: skip
    assert not hasattr(got, "quantization_scheme") and got.delta.dtype == torch.float32

    ids = torch.tensor([[1, 17, 42, 8, 9, 33, 61, 5]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    # llm-compressor's own habit: its save_pretrained would rewrite config.json from the dense original's.
    model.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved["model_type"] == "ghostsolve_llama" and saved["num_hidden_layers"] == 4
    with torch.no_grad():
        torch.testing.assert_close(ghostsolve.load(tmp_path / "saved")(input_ids=ids).logits, expected,
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
    out = ghostsolve.save(ghost.recovery, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "ghostsolve_llama" and config["num_hidden_layers"] == 4
    assert config["ghostsolve"]["removed"] == DROP
    assert config["ghostsolve"]["original_model"] == str(dense_dir)
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.2.ghost.delta").dtype == torch.float32
    assert "model.layers.2.self_attn.q_proj.weight_scale" in names  # the Linear weights are compressed
    loaded = ghostsolve.load(out)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_the_modifier_is_found_by_name_in_a_yaml_recipe(dense_dir: Path) -> None:
    from ghostsolve.integrations.llmcompressor import GhostsolveModifier  # registers the name

    recipe = """
default_stage:
  default_modifiers:
    GhostsolveModifier:
      drop: [2, 3]
      method: prune-comp
"""
    model = _oneshot(dense_dir, recipe)
    assert len(model.model.layers) == 4 and type(model).__name__ == "LlamaForCausalLM"  # folded: plain
    assert GhostsolveModifier.__name__ == "GhostsolveModifier"
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(dense_dir)  # Prune&Comp's scale went into the embedding
    assert not torch.equal(model.model.embed_tokens.weight, dense.model.embed_tokens.weight)
