"""The llm-compressor modifier's own work, without llm-compressor: calibration batches from a dataloader, the
in-place prune and recovery, and keeping llm-compressor's save from restoring the dense config."""

from __future__ import annotations

import copy
import importlib.util
import json

import pytest
import torch

import ghostsolve
from ghostsolve.errors import GhostsolveError
from ghostsolve.integrations import llmcompressor as bridge
from ghostsolve.integrations.llmcompressor import calibration_batches, detach_original_config
from ghostsolve.pipeline.model.operators import ghost_of
from ghostsolve.pipeline.recover import recover
from tests.model_factories import random_batches, tiny_model


def _rows(n: int = 6, seq: int = 12) -> list[dict[str, torch.Tensor]]:
    """What llm-compressor's calibration dataloader yields (batch size 1, with extra keys)."""
    return [{**b, "labels": b["input_ids"].clone()} for b in random_batches(n_batches=n, batch_size=1,
                                                                             seq_len=seq)]  # fmt: skip


def test_calibration_batches_keep_the_ids_and_the_mask() -> None:
    rows = _rows()
    batches = calibration_batches(rows, max_batches=4)
    assert len(batches) == 4
    for got, row in zip(batches, rows[:4], strict=True):
        assert set(got) == {"input_ids", "attention_mask"}
        assert got["input_ids"] is row["input_ids"]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (None, r"needs calibration data.*pass dataset= .* to oneshot"),
        ([], "yielded no batch"),
        ([{"pixel_values": torch.zeros(1)}], r"mapping with 'input_ids'; got \['pixel_values'\]"),
    ],
)
def test_calibration_batches_refuse_what_cannot_calibrate(data, match: str) -> None:
    with pytest.raises(GhostsolveError, match=match):
        calibration_batches(data)


@pytest.mark.parametrize("method", ["ghost", "prune-comp"])
def test_prune_and_recover_is_recover_in_place(method: str) -> None:
    model = tiny_model("llama", num_layers=5)
    reference = recover(model, [1, 2], random_batches(), method=method, progress=False)
    in_place = copy.deepcopy(model)
    rec = bridge.prune_and_recover(in_place, calibration_batches(random_batches()), [1, 2], method=method)
    assert rec.model is in_place and type(in_place) is type(reference.model)
    assert len(in_place.model.layers) == 3
    want = reference.model.state_dict()
    got = in_place.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    ids = torch.tensor([[1, 5, 9, 33, 2]])
    with torch.no_grad():
        assert torch.equal(in_place(ids).logits, reference.model(ids).logits)
    assert (ghost_of(in_place.model.layers[1]) is not None) == (method == "ghost")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "magic"}, "unknown method 'magic'; choose one of"),
        ({"compute_dtype": "int8"}, r"compute_dtype must be one of \['bfloat16', 'float16', 'float32'\]"),
        ({"drop": [9]}, "9"),
    ],
)
def test_prune_and_recover_refuses_before_changing_the_model(kwargs: dict, match: str) -> None:
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    drop = kwargs.pop("drop", [1])
    with pytest.raises(GhostsolveError, match=match):
        bridge.prune_and_recover(model, random_batches(), drop, **kwargs)
    assert len(model.model.layers) == 4
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_detached_config_saves_the_pruned_model_and_remembers_the_original(tmp_path) -> None:
    model = tiny_model("llama")
    model.config._name_or_path = "org/dense-model"
    rec = bridge.prune_and_recover(model, random_batches(), [1, 2])
    assert detach_original_config(model) == "org/dense-model"
    assert model.config._name_or_path == ""
    out = ghostsolve.save(rec, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["model_type"] == "ghostsolve_llama"
    assert config["ghostsolve"]["original_model"] == "org/dense-model"
    assert config["ghostsolve"]["removed"] == [1, 2]


@pytest.mark.skipif(importlib.util.find_spec("llmcompressor") is not None, reason="llm-compressor installed")
def test_the_modifier_without_llmcompressor_says_so() -> None:
    with pytest.raises(ImportError, match="llmcompressor"):
        bridge.GhostsolveModifier  # noqa: B018 - the attribute access is what imports llm-compressor
