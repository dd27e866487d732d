"""``ghostsolve select`` and ``ghostsolve prune --select``, on a tiny model with a planted redundant block."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch

from ghostsolve.cli import main
from ghostsolve.errors import GhostsolveError
from tests.pipeline._tiny import text_file, tiny_llama, tiny_tokenizer

QUIET = ["--no-progress"]
PLANTED = [2, 3]  # layers whose sublayer outputs are scaled by 1e-3: nearly pass-through


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    """A 6-layer tiny Llama whose layers 2 and 3 barely change the residual stream.

    Their attention and MLP output projections are scaled down (not zeroed: an exactly empty block makes
    plain pruning's residual zero, and every relative residual undefined).
    """
    path = tmp_path_factory.mktemp("planted") / "model"
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer), layers=6)
    with torch.no_grad():
        for i in PLANTED:
            model.model.layers[i].self_attn.o_proj.weight.mul_(1e-3)
            model.model.layers[i].mlp.down_proj.weight.mul_(1e-3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return text_file(tmp_path_factory.mktemp("text") / "sonnet.txt")


def _calib(text) -> list[str]:
    return ["--calib-text", str(text), "--num-calib", "8", "--seq-len", "32", "--batch-size", "4"]


@pytest.mark.parametrize(("strategy", "unit_rows"), [("angular", 6 - 2 + 1), ("block-influence", 6)])
def test_select_finds_the_planted_block(tmp_path, planted_dir, text, capsys, strategy, unit_rows):
    report_path, plot_path = tmp_path / "sel.json", tmp_path / "sel.png"
    rc = main(
        [
            "select", str(planted_dir), "--strategy", strategy, "--num-drop", "2", *_calib(text),
            "--report", str(report_path), "--plot", str(plot_path), *QUIET,
        ]
    )  # fmt: skip
    assert rc == 0
    stdout = capsys.readouterr().out
    assert f"strategy {strategy}" in stdout
    assert f"remove layers (0-based): {PLANTED}" in stdout
    report = json.loads(report_path.read_text())
    assert {"strategy", "num_drop", "scores", "selected"} <= set(report)
    assert report["strategy"] == strategy and report["num_drop"] == 2
    assert report["selected"] == PLANTED
    assert len(report["scores"]) == unit_rows
    assert all(isinstance(s, float) for s in report["scores"])
    assert plot_path.read_bytes()[:4] == b"\x89PNG"


def test_prune_with_select_removes_the_planted_block(tmp_path, planted_dir, text, capsys):
    report_path, out = tmp_path / "r.json", tmp_path / "out"
    rc = main(
        [
            "prune", str(planted_dir), "--select", "recoverable", "--num-drop", "2", *_calib(text),
            "--eval-text", str(text), "--out", str(out), "--report", str(report_path), *QUIET,
        ]
    )  # fmt: skip
    assert rc == 0
    stdout = capsys.readouterr().out
    assert f"selection: layers {PLANTED}, strategy recoverable" in stdout
    report = json.loads(report_path.read_text())
    assert report["removed"] == PLANTED
    assert report["selection"]["strategy"] == "recoverable"
    assert report["selection"]["selected"] == PLANTED
    # The planted block is nearly the identity, so the ghost fit leaves little of plain pruning's residual.
    assert report["methods"]["ghost"]["relative_residual"] < 0.5
    assert (out / "config.json").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prune", "--num-drop", "2"], r"--num-drop 2 needs --select STRATEGY"),
        (["prune", "--select", "angular"], r"--select angular needs --num-drop N"),
        (["prune", "--drop", "2", "--num-drop", "2"], r"--num-drop 2 goes with --select, not --drop 2"),
        (["prune", "--select", "magic", "--num-drop", "2"], r"unknown selection strategy 'magic'"),
        (["prune", "--select", "angular", "--num-drop", "2", "--top-k", "3"], r"--top-k does not apply"),
        (["select", "--strategy", "magic", "--num-drop", "2"], r"unknown selection strategy 'magic'; choose"),
        (["select", "--strategy", "taylor", "--num-drop", "2", "--last-token"], r"--last-token does not"),
        (["select", "--strategy", "angular", "--num-drop", "6"], r"num_drop must be an int with 1"),
        (["select", "--strategy", "angular", "--num-drop", "2", "--plot", "/no/such/dir/p.png"],
         r"cannot write the plot to '/no/such/dir/p.png': folder '/no/such/dir' does not exist"),
    ],
)  # fmt: skip
def test_selection_errors_are_one_line(planted_dir, text, capsys, argv, message):
    command, *rest = argv
    rc = main([command, str(planted_dir), *_calib(text), *rest, *QUIET])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ghostsolve: error:")
    assert re.search(message, err[0]), err[0]


def test_drop_and_select_are_mutually_exclusive(planted_dir, text, capsys):
    rc = main(["prune", str(planted_dir), *_calib(text), "--drop", "2", "--select", "angular", *QUIET])
    assert rc == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_select_help_lists_every_strategy(capsys):
    from ghostsolve.pipeline.select import STRATEGIES

    assert main(["select", "--help"]) == 0
    text = capsys.readouterr().out
    for name in STRATEGIES:
        assert f"  {name} " in text
    for flag in ("--strategy", "--num-drop", "--calib-text", "--calib", "--report", "--plot", "--top-k"):
        assert flag in text
    assert main(["prune", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--select" in text and "--num-drop" in text


def test_demo_selects_with_the_strategy_asked_for(tmp_path, planted_dir, capsys):
    rc = main(
        [
            "demo", "--model", str(planted_dir), "--out", str(tmp_path / "demo"), "--select", "angular",
            "--num-drop", "2",
            "--num-calib", "8", "--num-eval", "4", "--seq-len", "24", "--recover", "ghost,identity",
            "--report", str(tmp_path / "r.json"), *QUIET,
        ]
    )  # fmt: skip
    assert rc == 0
    assert f"selection: layers {PLANTED}, strategy angular" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["removed"] == PLANTED and report["selection"]["strategy"] == "angular"


def test_diagnose_with_select(tmp_path, planted_dir, text, capsys):
    rc = main(
        [
            "diagnose", str(planted_dir), "--select", "angular", "--num-drop", "2", *_calib(text),
            "--max-rows", "128", "--report", str(tmp_path / "d.json"), *QUIET,
        ]
    )  # fmt: skip
    assert rc == 0
    stdout = capsys.readouterr().out
    assert f"selection: layers {PLANTED}, strategy angular" in stdout and "boundary 2->4" in stdout
    report = json.loads((tmp_path / "d.json").read_text())
    assert report["removed"] == PLANTED and report["selection"]["selected"] == PLANTED


def test_too_few_batches_for_the_ranks_is_refused_before_any_work():
    from ghostsolve.cli.commands import _check_shardable

    args = SimpleNamespace(dist=SimpleNamespace(world_size=4), num_calib=6, batch_size=4)
    with pytest.raises(GhostsolveError, match=r"makes 2 batch\(es\), fewer than the 4 processes.*at most 1"):
        _check_shardable(args)  # type: ignore[arg-type]
    _check_shardable(SimpleNamespace(dist=SimpleNamespace(world_size=2), num_calib=6,
        batch_size=3))  # type: ignore[arg-type]
