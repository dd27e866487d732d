"""The ``ghostsolve`` command line, run in-process on tiny models."""

from __future__ import annotations

import json
import re

import pytest
from transformers import AutoModelForCausalLM

import ghostsolve
from ghostsolve.cli import build_parser, main, parse_layers
from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.io.checkpoint import checkpoint_info
from ghostsolve.workflows.demo import DEMO_MODEL_DIR
from tests.conftest import require_shared
from tests.pipeline._tiny import text_file, tiny_model_dir

QUIET = ["--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", layers=6)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return text_file(tmp_path_factory.mktemp("text") / "sonnet.txt")


def _check_contract(report: dict, methods: list[str], saved: str | None) -> None:
    assert isinstance(report["model"], str)
    assert isinstance(report["removed"], list) and all(isinstance(i, int) for i in report["removed"])
    assert isinstance(report["seq_len"], int)
    assert isinstance(report["dense"]["perplexity"], float)
    assert list(report["methods"]) == methods
    for entry in report["methods"].values():
        assert isinstance(entry["perplexity"], float) and entry["perplexity"] > 1
        assert entry["relative_residual"] is None or isinstance(entry["relative_residual"], float)
        assert isinstance(entry["fit_seconds"], float) and entry["fit_seconds"] >= 0
    assert report["saved"] == saved


@pytest.mark.slow
def test_prune_end_to_end(tmp_path, model_dir, text, capsys):
    out, report_path = tmp_path / "out", tmp_path / "report.json"
    rc = main(
        [
            "prune", str(model_dir), "--drop", "2-3", "--recover", "ghost,identity,scalar,replaceme",
            "--calib-text", str(text), "--num-calib", "16", "--eval-text", str(text), "--seq-len", "32",
            "--out", str(out), "--report", str(report_path), "--plot", str(tmp_path / "p.png"), *QUIET,
        ]
    )  # fmt: skip
    assert rc == 0
    stdout = capsys.readouterr().out
    for name in ("dense", "ghost *", "identity (plain pruned)", "scalar", "replaceme"):
        assert name in stdout
    report = json.loads(report_path.read_text())
    _check_contract(report, ["ghost", "identity", "scalar", "replaceme"], "ghost")
    assert report["removed"] == [2, 3]
    assert report["seq_len"] == 32
    assert report["methods"]["identity"]["relative_residual"] == pytest.approx(1.0)
    assert report["methods"]["ghost"]["relative_residual"] < 1.0
    assert report["calibration"] == {"source": "text", "files": [str(text)], "sequences": 16, "seq_len": 32}
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    info = checkpoint_info(out)
    assert info is not None
    assert info["method"] == "ghost" and info["removed"] == [2, 3]
    assert info["original_model"] == str(model_dir)
    # The saved model reproduces the perplexity the table reports for it.
    rc = main(
        ["eval", str(out), "--eval-text", str(text), "--seq-len", "32", "--report", str(tmp_path / "e.json")]
    )
    assert rc == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())
    assert evaluated["perplexity"] == pytest.approx(report["methods"]["ghost"]["perplexity"], rel=1e-6)
    assert evaluated["seq_len"] == 32


@pytest.mark.parametrize("order", ["independent", "sequential"])
def test_prune_layerwise_equals_hooks(tmp_path, model_dir, text, order):
    """--layerwise (one layer on the device at a time) reports what whole-model capture reports."""
    reports = {}
    for mode in ("hooks", "layerwise"):
        path = tmp_path / f"{mode}.json"
        rc = main(
            [
                "prune", str(model_dir), "--drop", "1,3-4", "--recover", "ghost,diagonal", "--order", order,
                "--calib-text", str(text), "--num-calib", "8", "--eval-text", str(text), "--seq-len", "32",
                "--report", str(path), *QUIET, *(["--layerwise"] if mode == "layerwise" else []),
            ]
        )  # fmt: skip
        assert rc == 0
        reports[mode] = json.loads(path.read_text())["methods"]
    for method in ("ghost", "diagonal"):
        hooks, layerwise = reports["hooks"][method], reports["layerwise"][method]
        assert layerwise["relative_residual"] == pytest.approx(hooks["relative_residual"], rel=1e-9)
        assert layerwise["perplexity"] == pytest.approx(hooks["perplexity"], rel=1e-5)


def test_prune_layerwise_serves_replaceme_like_hooks(tmp_path, model_dir, text, capsys):
    # One engine interface: the layer-by-layer engine delivers ReplaceMe's MLP outputs too.
    args = ["prune", str(model_dir), "--drop", "2", "--recover", "replaceme", "--calib-text", str(text),
            "--num-calib", "4", "--seq-len", "32", *QUIET]  # fmt: skip
    assert main([*args, "--report", str(tmp_path / "hooks.json")]) == 0
    assert main([*args, "--layerwise", "--report", str(tmp_path / "layerwise.json")]) == 0
    hooks = json.loads((tmp_path / "hooks.json").read_text())["methods"]["replaceme"]
    layerwise = json.loads((tmp_path / "layerwise.json").read_text())["methods"]["replaceme"]
    assert layerwise["perplexity"] == pytest.approx(hooks["perplexity"], rel=1e-5)


def test_prune_with_self_calibration_and_no_output(tmp_path, model_dir, capsys):
    report_path = tmp_path / "r.json"
    rc = main(
        [
            "prune", str(model_dir), "--drop", "1,4", "--calib", "self", "--num-calib", "8",
            "--num-eval", "4", "--seq-len", "24", "--order", "sequential",
            "--report", str(report_path), *QUIET,
        ]
    )  # fmt: skip
    assert rc == 0
    report = json.loads(report_path.read_text())
    _check_contract(report, ["ghost", "identity"], None)
    assert report["calibration"]["source"] == "self" and report["evaluation"]["source"] == "self"
    assert report["evaluation"]["windows"] == 4
    assert report["order"] == "sequential"
    assert set(report["methods"]["ghost"]["relative_residuals"]) == {"1", "4"}  # layers, as --drop names them


def test_eval_on_self_samples_and_plain_model(model_dir, capsys):
    assert main(["eval", str(model_dir), "--num-eval", "2", "--seq-len", "16", *QUIET]) == 0
    # Self-sampled perplexity is not a text perplexity, and the line says so.
    out = capsys.readouterr().out
    assert "perplexity" in out and "sampled from this model itself" in out and "not text" in out


def test_eval_tasks_without_text_say_that_perplexity_was_skipped(tmp_path, model_dir, capsys, monkeypatch):
    import ghostsolve.cli.commands as commands

    monkeypatch.setattr(commands, "_lm_eval", lambda *args: {"some_task": {"acc": 0.5}})
    report = tmp_path / "r.json"
    assert main(["eval", str(model_dir), "--tasks", "some_task", "--report", str(report), *QUIET]) == 0
    assert "perplexity: skipped (no --eval-text" in capsys.readouterr().out
    saved = json.loads(report.read_text())
    assert saved["perplexity"] is None and "no --eval-text" in saved["perplexity_skipped"]


def test_reports_say_how_to_reproduce_them(tmp_path, model_dir, text):
    import hashlib

    import torch
    import transformers

    report = tmp_path / "r.json"
    argv = ["prune", str(model_dir), "--drop", "2", "--calib-text", str(text), "--num-calib", "4",
            "--seq-len", "24", "--recover", "ghost,identity", "--out", str(tmp_path / "ckpt"),
            "--report", str(report), *QUIET]  # fmt: skip
    assert main(argv) == 0
    origin = json.loads(report.read_text())["provenance"]
    assert origin["command"] == ["ghostsolve", *argv]
    assert origin["versions"]["torch"] == torch.__version__
    assert origin["versions"]["transformers"] == transformers.__version__
    assert origin["files"] == [{"path": str(text), "bytes": text.stat().st_size,
                                "sha256": hashlib.sha256(text.read_bytes()).hexdigest()}]  # fmt: skip
    assert origin["time_utc"].endswith("+00:00")
    section = json.loads((tmp_path / "ckpt" / "config.json").read_text())["ghostsolve"]
    assert section["provenance"]["command"] == origin["command"]


def test_diagnose(tmp_path, model_dir, text, capsys):
    rc = main(
        [
            "diagnose", str(model_dir), "--drop", "2-3", "--calib-text", str(text), "--seq-len", "32",
            "--max-rows", "512", "--report", str(tmp_path / "d.json"), *QUIET,
        ]
    )  # fmt: skip
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "boundary 2->4" in stdout and "cond(X" in stdout and "float32" in stdout
    report = json.loads((tmp_path / "d.json").read_text())
    entry = report["intervals"]["2-3"]  # layers 2 and 3, as --drop 2-3 names them
    assert entry["precision_rows"] == 512
    assert entry["conditioning"]["dim"] == 32
    assert {row["dtype"] for row in entry["precisions"]} == {"float32", "float64"}


def test_demo_on_a_tiny_model(tmp_path, model_dir, capsys):
    out = tmp_path / "demo"
    rc = main(
        [
            "demo", "--model", str(model_dir), "--out", str(out), "--num-calib", "8", "--num-eval", "4",
            "--seq-len", "24", "--recover", "ghost,identity,diagonal", "--report", str(tmp_path / "r.json"),
            *QUIET,
        ]
    )  # fmt: skip
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "identity (plain pruned)" in stdout and "wall time" in stdout
    # The demo's default removal, the last third of the layers (4 and 5 of the tiny model's 6), named in
    # its output.
    assert "selection: layers [4, 5], the last third of the layers (the demo's default)" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["model", "perplexity.png", "report.json"]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report == json.loads((out / "report.json").read_text())
    _check_contract(report, ["ghost", "identity", "diagonal"], "ghost")
    assert len(report["removed"]) == 2 and report["removed"][1] == report["removed"][0] + 1
    assert report["removed"] == [4, 5]
    assert report["removal"] == "the last third of the layers (the demo's default)"
    assert report["calibration"]["source"] == "self"
    loaded = ghostsolve.load(out / "model")
    assert loaded.config.num_hidden_layers == 4
    # An existing --out is refused, and left as it was.
    assert main(["demo", "--model", str(model_dir), "--out", str(out), *QUIET]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_defaults_on_the_bundled_model(tmp_path, monkeypatch, capsys):
    if not (DEMO_MODEL_DIR / "config.json").is_file():
        pytest.skip(f"the bundled demo model is not built yet ({DEMO_MODEL_DIR} has no config.json)")
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--no-progress"]) == 0
    report = json.loads((tmp_path / "ghostsolve-demo-out" / "report.json").read_text())
    methods = report["methods"]
    _check_contract(report, list(methods), "ghost")
    assert {"ghost", "identity", "prune-comp", "replaceme"} <= set(methods)
    # On a real trained model the unconstrained operator recovers more than plain pruning.
    assert methods["ghost"]["perplexity"] < methods["identity"]["perplexity"]
    assert methods["ghost"]["relative_residual"] < 1.0
    remote = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ghostsolve-demo-out" / "model", trust_remote_code=True
    )
    dense_layers = json.loads((DEMO_MODEL_DIR / "config.json").read_text())["num_hidden_layers"]
    assert remote.config.num_hidden_layers == dense_layers - len(report["removed"])


def test_convert_llama2c(tmp_path, capsys):
    checkpoint = require_shared("models/stories260K/stories260K.bin")
    tokenizer = require_shared("models/stories260K/tok512.bin")
    out = tmp_path / "stories"
    assert main(["convert-llama2c", str(checkpoint), str(tokenizer), "--out", str(out)]) == 0
    assert (out / "config.json").is_file()
    assert main(["convert-llama2c", str(checkpoint), str(tokenizer), "--out", str(out)]) == 2


# ---------------------------------------------------------------------------------------------
# errors and help
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--drop", "9"], "out of range"),
        (["--drop", "3-1"], "runs backwards"),
        (["--drop", "a"], "neither an integer nor a range"),
        (["--drop", "2", "--recover", "ghost,magic"], "unknown recovery method"),
        (["--recover", "ghost"], "give --drop"),
        (["--drop", "2", "--seq-len", "999"], "exceeds the model's 64 positions"),
    ],
)
def test_errors_are_one_line_with_status_2(model_dir, text, capsys, argv, message):
    rc = main(["prune", str(model_dir), "--calib-text", str(text), *argv, *QUIET])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ghostsolve: error:") and message in err[0]


@pytest.mark.parametrize(
    ("argv", "label"),
    [
        (["prune", "--drop", "1", "--report", "{bad}"], "report"),
        (["prune", "--drop", "1", "--plot", "{bad}"], "plot"),
        (["prune", "--drop", "1", "--report", "{bad}", "--out", "{out}"], "report"),
        (["select", "--strategy", "angular", "--num-drop", "1", "--report", "{bad}"], "report"),
        (["diagnose", "--drop", "1", "--report", "{bad}"], "report"),
        (["eval", "--report", "{bad}"], "report"),
    ],
)
def test_unwritable_outputs_fail_before_the_model_is_loaded(
    tmp_path, model_dir, text, capsys, monkeypatch, argv, label
):
    import ghostsolve.cli.commands as cli

    def no_load(*_a, **_k):
        raise AssertionError("the model was loaded before the output paths were checked")

    monkeypatch.setattr(cli, "_load_model", no_load)
    bad = str(tmp_path / "missing" / "f")
    command, *rest = [a.format(bad=bad, out=tmp_path / "ckpt") for a in argv]
    calib = [] if command == "eval" else ["--calib-text", str(text)]
    assert main([command, str(model_dir), *calib, *rest, *QUIET]) == 2
    err = capsys.readouterr().err
    assert f"cannot write the {label} to {bad!r}: folder" in err and "does not exist" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_demo_checks_its_report_before_the_model_is_loaded(tmp_path, model_dir, capsys, monkeypatch):
    import ghostsolve.cli.commands as cli

    monkeypatch.setattr(cli, "_load_model", lambda *_a, **_k: pytest.fail("model loaded"))
    bad = tmp_path / "missing" / "r.json"
    argv = ["demo", "--model", str(model_dir), "--out", str(tmp_path / "o"), "--report", str(bad), *QUIET]
    assert main(argv) == 2
    assert re.search(r"cannot write the report to .*r\.json'.* does not exist", capsys.readouterr().err)


def test_missing_files_are_reported(tmp_path, model_dir, capsys):
    assert main(["prune", str(model_dir), "--drop", "1", "--calib-text", str(tmp_path / "nope.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "no-model")]) == 2
    assert "ghostsolve: error:" in capsys.readouterr().err


def test_missing_model_extra_is_explained(monkeypatch, model_dir, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)
    assert main(["eval", str(model_dir)]) == 2
    assert "pip install 'ghostsolve[model]'" in capsys.readouterr().err


def test_usage_errors_and_help(capsys):
    assert main([]) == 2
    assert main(["prune", "m", "--drop", "1"]) == 2  # no calibration source
    capsys.readouterr()
    assert main(["--help"]) == 0
    top = capsys.readouterr().out
    for command in ("prune", "eval", "diagnose", "demo", "select", "convert-llama2c"):
        assert command in top
    assert main(["prune", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ("--drop", "--recover", "--order", "--calib-text", "--calib", "--num-calib", "--seq-len",
                 "--eval-text", "--out", "--overwrite", "--report", "--device", "--dtype"):  # fmt: skip
        assert flag in text


def test_every_option_has_help_text():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    assert isinstance(subparsers, dict)
    for name, sub in subparsers.items():
        for action in sub._actions:
            if action.help != "==SUPPRESS==":
                assert action.help, f"{name} {action.option_strings or action.dest} has no help"


def test_parse_layers():
    assert parse_layers("5-7") == [5, 6, 7]
    assert parse_layers("3,9") == [3, 9]
    assert parse_layers(" 3, 5-6 ") == [3, 5, 6]
    with pytest.raises(GhostsolveError, match=r"names layers \[5\] more than once"):
        parse_layers("5,4-6")
    with pytest.raises(GhostsolveError, match="is empty"):
        parse_layers(",")


def test_fitting_flags_reach_the_fits(tmp_path, model_dir, text):
    report = tmp_path / "r.json"
    rc = main(["prune", str(model_dir), "--drop", "2-3", "--calib-text", str(text), "--num-calib", "6",
               "--seq-len", "24", "--recover", "ghost,lowrank", "--ridge", "1e-3", "--rank", "5", "--solver",
               "eigh", "--product-dtype", "float32", "--report", str(report), *QUIET])  # fmt: skip
    assert rc == 0
    methods = json.loads(report.read_text())["methods"]
    assert methods["ghost"]["ridges"] == {"2-3": 1e-3} and methods["lowrank"]["ranks"] == {"2-3": 5}
    argv = ["prune", str(model_dir), "--drop", "2", "--calib-text", str(text), "--ridge", "cv"]
    argv += ["--solver", "qr"]  # cross-validation works on Gram statistics, not on the TSQR factor
    assert main([*argv, *QUIET]) == 2


@pytest.mark.parametrize(
    ("flag", "value", "match"),
    [
        ("--ridge", "-1", r"must be a finite number >= 0 \(e\.g\. 0, 1e-3\), cv or gcv"),
        ("--ridge", "big", r"'big' is neither a number nor cv or gcv"),
        ("--rank", "1.5", r"'1\.5' is neither an integer nor cv"),
        ("--model-args", "sdpa", r"--model-args 'sdpa': 'sdpa' is not key=value"),
    ],
)
def test_bad_fitting_and_loading_flags(tmp_path, model_dir, text, capsys, flag, value, match):
    assert main(["prune", str(model_dir), "--drop", "2", "--calib-text", str(text), flag, value, *QUIET]) == 2
    assert re.search(match, capsys.readouterr().err)


def test_model_args_are_typed_like_lm_eval():
    from ghostsolve.cli.args import model_args_of

    assert model_args_of("attn_implementation=sdpa,low_cpu_mem_usage=true,max_memory=none,x=3,y=0.5") == {
        "attn_implementation": "sdpa", "low_cpu_mem_usage": True, "max_memory": None, "x": 3, "y": 0.5,
    }  # fmt: skip


def test_warnings_are_one_line_and_reach_the_report(tmp_path, model_dir, text, capsys):
    report = tmp_path / "r.json"
    # One calibration window of 24 tokens for the tiny model's 32×32 operator.
    argv = ["prune", str(model_dir), "--drop", "2", "--calib-text", str(text), "--num-calib", "1",
            "--seq-len", "24", "--recover", "ghost,identity", "--ridge", "0", "--report", str(report),
            *QUIET]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    warning = r"^ghostsolve: warning: layers 2: 24 calibration tokens for the 32×32 operator"
    assert re.search(warning, err, re.M)
    assert "warnings.warn" not in err and ".py:" not in err
    assert "24 calibration tokens" in json.loads(report.read_text())["methods"]["ghost"]["warnings"][0]
