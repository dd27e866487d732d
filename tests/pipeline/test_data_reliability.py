"""Calibration data on inputs that used to give misleading messages (issue 13, items 10 and 11)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline import data
from tests.pipeline._tiny import TEXT, tiny_llama, tiny_tokenizer


def test_a_tokenizer_that_yields_no_tokens_is_named_not_the_text(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tokenizer = tiny_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    spec["model"]["vocab"], spec["model"]["merges"] = {}, []  # a damaged tokenizer.json
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    empty = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    with pytest.raises(GhostsolveError, match=r"tokenizer turned \d+ characters of text into no tokens"):
        data.text_windows(TEXT, empty, 16)


def test_a_short_text_still_says_how_many_tokens_it_has():
    with pytest.raises(GhostsolveError, match=r"the text has .* tokens, fewer than one window"):
        data.text_windows("Shall I", tiny_tokenizer(), 64)


def test_float16_overflow_while_sampling_is_explained():
    tokenizer = tiny_tokenizer()
    model = tiny_llama(len(tokenizer), layers=3)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1e8)
    model.half()
    with pytest.raises(GhostsolveError, match=r"non-finite logits .*float16.*--dtype float32.*--calib-text"):
        data.sample_windows(model, tokenizer, 2, 8, seed=0, progress=False)


def test_an_undecodable_file_names_a_fix_that_exists(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait\n".encode("latin-1"))
    with pytest.raises(GhostsolveError, match=r"not valid utf-8.*iconv .*encoding=") as caught:
        data.read_texts(path)
    assert "pass another encoding" not in str(caught.value)
    assert "café" in data.read_texts(path, encoding="latin-1")


def test_num_calib_above_what_the_text_holds_is_said_with_the_numbers(tmp_path, caplog):
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    tokenizer = tiny_tokenizer()
    with caplog.at_level(logging.WARNING, logger="ghostsolve"):
        windows = data.calibration_windows(None, tokenizer, [path], n_windows=1000, seq_len=16)
    held = windows.shape[0]
    assert 0 < held < 1000
    assert f"holds {held} windows of 16 tokens; using all of them, not 1000" in caplog.text
