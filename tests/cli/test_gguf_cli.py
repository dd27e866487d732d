"""The command line takes GGUF files: ``convert-gguf``, and a ``.gguf`` file wherever a MODEL is asked for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf", reason="the GGUF tests need gguf: pip install 'ghostsolve[gguf]'")

from ghostsolve.cli import main
from ghostsolve.pipeline.io.gguf import load_gguf
from tests.pipeline.io.test_gguf import logits, source_model, write_gguf

QUIET = ["--no-progress"]


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", source_model())


def test_convert_gguf_writes_a_directory_with_the_same_model(tmp_path, gguf_file, capsys) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "hf"
    assert main(["convert-gguf", str(gguf_file), "--out", str(out)]) == 0
    assert f"converted: {out}" in capsys.readouterr().out
    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    direct, _ = load_gguf(gguf_file)
    assert torch.equal(logits(converted), logits(direct))
    assert main(["convert-gguf", str(gguf_file), "--out", str(out)]) == 2  # an existing output is refused
    assert "already exists" in capsys.readouterr().err


def test_prune_takes_a_gguf_file_as_model(tmp_path, gguf_file) -> None:
    report = tmp_path / "r.json"
    rc = main(["prune", str(gguf_file), "--drop", "1", "--calib", "self", "--num-calib", "4",
               "--seq-len", "16", "--num-eval", "2", "--recover", "ghost,identity",
               "--out", str(tmp_path / "ckpt"), "--report", str(report), *QUIET])  # fmt: skip
    assert rc == 0
    methods = json.loads(report.read_text())["methods"]
    assert set(methods) == {"ghost", "identity"}
    assert (tmp_path / "ckpt" / "config.json").is_file()


def test_a_gguf_name_on_another_file_says_what_it_is(tmp_path, capsys) -> None:
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file at all")
    assert main(["eval", str(fake), *QUIET]) == 2
    err = capsys.readouterr().err
    assert "ghostsolve: error:" in err and "not a GGUF file" in err and "zip" in err
