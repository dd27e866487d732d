"""The workflows from Python on requests that must be refused or flagged (issue 13)."""

from __future__ import annotations

import importlib

import pytest
import torch

import ghostsolve
from ghostsolve import GhostsolveError
from tests.pipeline._tiny import tiny_model_dir

WINDOWS = torch.randint(3, 97, (4, 16), generator=torch.Generator().manual_seed(2))


def _tree(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# item 3 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("relative", [".", "sub", ".."])
def test_prune_from_python_refuses_an_output_overlapping_the_loaded_model(tmp_path, relative):
    source = tiny_model_dir(tmp_path / "models" / "m", layers=4)
    before = _tree(tmp_path / "models")
    model = ghostsolve.load(source)
    out = (source / relative) if relative != "." else source
    with pytest.raises(GhostsolveError, match=r"the input .* outside it"):
        ghostsolve.prune(model, calibration=WINDOWS, drop=[1], methods=["ghost"], out=out, overwrite=True,
                         progress=False)  # fmt: skip
    assert _tree(tmp_path / "models") == before


def test_save_refuses_to_replace_the_directory_the_model_came_from(tmp_path):
    source = tiny_model_dir(tmp_path / "m", layers=4)
    before = _tree(source)
    model = ghostsolve.load(source)
    with pytest.raises(GhostsolveError, match="is the input"):
        ghostsolve.save(model, source, overwrite=True)
    assert _tree(source) == before


# item 12 ------------------------------------------------------------------------------------------------
def _result(ghost: float, identity: float, saved: str = "ghost"):
    from ghostsolve.workflows.results import MethodResult, PruneResult

    methods = {"ghost": MethodResult(ghost, 0.5, 0.1), "identity": MethodResult(identity, 1.0, 0.0),
               "scalar": MethodResult(identity - 1.0, 0.9, 0.0)}  # fmt: skip
    return PruneResult("m", [1], 16, 10.0, methods, saved=saved)


def test_a_saved_method_worse_than_plain_pruning_is_flagged_in_the_table_and_the_report():
    result = _result(ghost=30.0, identity=20.0)
    table = result.format_table()
    assert "warning: the saved method ghost has a worse held-out perplexity (30) than plain pruning " in table
    assert "(identity, 20)" in table and "save scalar instead" in table
    (warning,) = result.to_report()["warnings"]
    assert "ghost" in warning and "identity" in warning


@pytest.mark.parametrize(("ghost", "identity", "saved"), [(15.0, 20.0, "ghost"), (20.0, 20.0, "ghost"),
                                                          (30.0, 20.0, "identity"), (30.0, 20.0, None)])
def test_no_warning_when_the_saved_method_does_not_lose(ghost, identity, saved):
    result = _result(ghost=ghost, identity=identity, saved=saved)
    assert result.warnings() == [] and "warning" not in result.format_table()
    assert result.to_report()["warnings"] == []


def test_the_prune_workflow_says_so_when_it_saves(tmp_path, monkeypatch, caplog):
    import logging
    from types import SimpleNamespace

    from tests.model_factories import tiny_model

    prune_module = importlib.import_module("ghostsolve.workflows.prune")  # the module, not the function

    levels = {"dense": 10.0, "ghost": 30.0, "identity": 20.0}
    monkeypatch.setattr(prune_module, "_evaluate",
                        lambda _m, _w, _b, _p, desc: SimpleNamespace(perplexity=levels[desc]))  # fmt: skip
    model = tiny_model("llama", num_layers=4)
    with caplog.at_level(logging.WARNING, logger="ghostsolve"):
        result = ghostsolve.prune(model, calibration=WINDOWS, evaluation=WINDOWS, drop=[1],
                                  methods=["ghost", "identity"], out=tmp_path / "o",
                                  progress=False)  # fmt: skip
    assert result.saved == "ghost" and (tmp_path / "o").is_dir()
    assert "the saved method ghost has a worse held-out perplexity (30)" in caplog.text
    assert result.to_report()["warnings"] == result.warnings() != []
