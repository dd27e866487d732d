"""The command line on bad input and faults (issue 13): one line, exit status 2, nothing half-written."""

from __future__ import annotations

import pytest
import torch

from ghostsolve.cli import main
from tests.pipeline._tiny import text_file, tiny_llama, tiny_model_dir, tiny_tokenizer

QUIET = ["--no-progress"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", layers=4)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return text_file(tmp_path_factory.mktemp("text") / "sonnet.txt")


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("ghostsolve: error")]
    assert len(errors) == 1, err
    assert "Traceback" not in "\n".join(err)
    return errors[0]


# item 1 -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def overflowing_dir(tmp_path_factory):
    """A tiny Llama saved in float16 whose layer 2 overflows the float16 range."""
    path = tmp_path_factory.mktemp("fp16") / "model"
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer), layers=4)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(1e8)
    model.half().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("command", ["select", "prune"])
def test_select_and_prune_refuse_non_finite_scores(tmp_path, overflowing_dir, text, capsys, command):
    common = ["--num-drop", "1", "--calib-text", str(text), "--num-calib", "4", "--seq-len", "32",
              "--dtype", "float16", *QUIET]  # fmt: skip
    if command == "select":
        argv = ["select", str(overflowing_dir), "--strategy", "block-influence", *common]
    else:
        argv = ["prune", str(overflowing_dir), "--select", "block-influence", "--out", str(tmp_path / "o"),
                "--eval-text", str(text), *common]  # fmt: skip
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "non-finite score" in line and "layer 2" in line and "--dtype float32" in line
    assert not (tmp_path / "o").exists()


# item 3 -------------------------------------------------------------------------------------------------
def _tree(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["same", "inside", "parent", "symlink"])
def test_prune_refuses_an_output_that_overlaps_the_input_model(tmp_path, text, capsys, where):
    model = tiny_model_dir(tmp_path / "models" / "m", layers=4)
    before = _tree(tmp_path / "models")
    out = {"same": model, "inside": model / "pruned", "parent": tmp_path / "models",
           "symlink": tmp_path / "link"}[where]  # fmt: skip
    if where == "symlink":
        out.symlink_to(model, target_is_directory=True)
    argv = ["prune", str(model), "--drop", "1", "--calib-text", str(text), "--num-calib", "4", "--seq-len",
            "16", "--out", str(out), "--overwrite", *QUIET]  # fmt: skip
    assert main(argv) == 2
    line = _error_line(capsys)
    assert "the input" in line and "outside it" in line
    assert _tree(tmp_path / "models") == before


def test_demo_refuses_to_write_into_its_model(tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "m", layers=4)
    before = _tree(model)
    assert main(["demo", "--model", str(model), "--out", str(model), "--overwrite", *QUIET]) == 2
    assert "is the input" in _error_line(capsys)
    assert _tree(model) == before


def test_a_report_may_not_replace_the_calibration_text(tmp_path, model_dir, capsys):
    calib = text_file(tmp_path / "calib.txt")
    before = calib.read_bytes()
    argv = ["prune", str(model_dir), "--drop", "1", "--calib-text", str(calib), "--num-calib", "4",
            "--seq-len", "16", "--report", str(calib), *QUIET]  # fmt: skip
    assert main(argv) == 2
    assert "is the input" in _error_line(capsys)
    assert calib.read_bytes() == before


# item 9 -------------------------------------------------------------------------------------------------
@pytest.fixture
def read_only(tmp_path):
    """A folder this process cannot write to (skips where permissions do not bind, e.g. as root)."""
    import os

    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):
        folder.chmod(0o755)
        pytest.skip("chmod does not stop this user from writing (running as root?)")
    yield folder
    folder.chmod(0o755)


@pytest.mark.parametrize(
    ("argv", "label", "target"),
    [
        (["prune", "--drop", "1", "--out", "{ro}/ckpt"], "output", "ckpt"),
        (["prune", "--drop", "1", "--out", "{ro}/deeper/ckpt"], "output", "deeper/ckpt"),
        (["prune", "--drop", "1", "--out", "{ok}/ckpt", "--report", "{ro}/r.json"], "report", "r.json"),
        (["prune", "--drop", "1", "--plot", "{ro}/p.png"], "plot", "p.png"),
        (["select", "--strategy", "angular", "--num-drop", "1", "--report", "{ro}/r.json"], "report",
         "r.json"),
        (["diagnose", "--drop", "1", "--report", "{ro}/r.json"], "report", "r.json"),
        (["eval", "--report", "{ro}/r.json"], "report", "r.json"),
    ],
)
def test_unwritable_folders_fail_before_any_work(
    tmp_path, read_only, model_dir, text, capsys, monkeypatch, argv, label, target
):
    import ghostsolve.cli.commands as cli

    monkeypatch.setattr(cli, "_load_model", lambda *_a, **_k: pytest.fail("the model was loaded"))
    ok = tmp_path / "ok"
    ok.mkdir()
    command, *rest = [a.format(ro=read_only, ok=ok) for a in argv]
    calib = [] if command == "eval" else ["--calib-text", str(text)]
    assert main([command, str(model_dir), *calib, *rest, *QUIET]) == 2
    line = _error_line(capsys)
    assert f"cannot write the {label} to {str(read_only / target)!r}" in line
    assert f"folder {str(read_only)!r} is not writable" in line
    assert list(ok.iterdir()) == [] and list(read_only.iterdir()) == []


def test_demo_checks_that_its_out_can_be_written(tmp_path, read_only, capsys):
    assert main(["demo", "--out", str(read_only / "o"), *QUIET]) == 2
    assert "is not writable" in _error_line(capsys)


# item 4 -------------------------------------------------------------------------------------------------
def test_a_truncated_checkpoint_is_one_line_and_status_2(tmp_path, capsys):
    model = tiny_model_dir(tmp_path / "m", layers=4)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["eval", str(model), "--seq-len", "16", "--num-eval", "2", *QUIET]) == 2
    assert "weights file is truncated or corrupt" in _error_line(capsys)


def test_a_full_disk_during_prune_is_one_line_and_status_2(tmp_path, model_dir, text, capsys, monkeypatch):
    import errno

    import transformers.modeling_utils

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)
    out = tmp_path / "out"
    argv = ["prune", str(model_dir), "--drop", "1", "--calib-text", str(text), "--num-calib", "4",
            "--seq-len", "16", "--out", str(out), *QUIET]  # fmt: skip
    assert main(argv) == 2
    assert "the disk is full" in _error_line(capsys)
    assert list(tmp_path.iterdir()) == []
