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
