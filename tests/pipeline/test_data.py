"""Text windows, calibration batches and self-sampled (data-free) sequences."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline import data
from tests.pipeline._tiny import TEXT, tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(bos=True)


@pytest.fixture(scope="module")
def tok_nobos():
    return tiny_tokenizer(bos=False)


@pytest.fixture(scope="module")
def model(tok):
    return tiny_llama(len(tok), layers=2)


# ---------------------------------------------------------------------------------------------
# reading text
# ---------------------------------------------------------------------------------------------
def test_read_texts_joins_files_with_a_blank_line(tmp_path):
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    assert data.read_texts([tmp_path / "a.txt", str(tmp_path / "b.txt")]) == "first\n\nsecond"
    assert data.read_texts(tmp_path / "a.txt") == "first"


def test_read_texts_errors(tmp_path):
    with pytest.raises(GhostsolveError, match="does not exist or is not a file"):
        data.read_texts(tmp_path / "missing.txt")
    with pytest.raises(GhostsolveError, match="no text file given"):
        data.read_texts([])
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(GhostsolveError, match="is empty"):
        data.read_texts(tmp_path / "empty.txt")
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9")
    with pytest.raises(GhostsolveError, match="is not valid utf-8"):
        data.read_texts(tmp_path / "latin.txt")


# ---------------------------------------------------------------------------------------------
# windows
# ---------------------------------------------------------------------------------------------
def test_bos_detection(tok, tok_nobos):
    assert data.bos_token_for_windows(tok) == tok.bos_token_id
    assert data.bos_token_for_windows(tok_nobos) is None


def test_windows_with_bos_are_bos_plus_consecutive_text(tok):
    text = TEXT * 3
    ids = data.tokenize_text(text, tok)
    seq_len = 17
    windows = data.text_windows(text, tok, seq_len)
    body = seq_len - 1
    assert windows.shape == (ids.numel() // body, seq_len)
    assert windows.dtype == torch.long
    assert torch.all(windows[:, 0] == tok.bos_token_id)
    # The bodies, in order, are the text's tokens without gap or overlap; the partial tail is dropped.
    assert torch.equal(windows[:, 1:].reshape(-1), ids[: windows.shape[0] * body])
    assert ids.numel() - windows.shape[0] * body < body


def test_windows_without_bos_are_plain_chunks(tok_nobos):
    text = TEXT * 3
    ids = data.tokenize_text(text, tok_nobos)
    windows = data.text_windows(text, tok_nobos, 16)
    assert torch.equal(windows.reshape(-1), ids[: windows.numel()])
    assert windows.shape[0] == ids.numel() // 16


def test_windows_explicit_bos_and_max_windows(tok):
    windows = data.text_windows(TEXT * 3, tok, 8, bos=None, max_windows=3)
    assert windows.shape == (3, 8)
    assert not torch.all(windows[:, 0] == tok.bos_token_id)
    windows = data.text_windows(TEXT, tok, 8, bos=99)
    assert torch.all(windows[:, 0] == 99)


def test_windows_errors(tok):
    with pytest.raises(GhostsolveError, match="at least 2 tokens"):
        data.text_windows(TEXT, tok, 1)
    with pytest.raises(GhostsolveError, match="fewer than one window"):
        data.text_windows("short", tok, 64)
    with pytest.raises(GhostsolveError, match="max_windows is 0"):
        data.text_windows(TEXT, tok, 8, max_windows=0)


def test_select_windows_is_seeded_distinct_and_ordered():
    windows = torch.arange(40).view(20, 2)
    a = data.select_windows(windows, 5, seed=3)
    b = data.select_windows(windows, 5, seed=3)
    c = data.select_windows(windows, 5, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    firsts = a[:, 0].tolist()
    assert firsts == sorted(set(firsts))
    assert data.select_windows(windows, None) is windows
    assert data.select_windows(windows, 50) is windows
    with pytest.raises(GhostsolveError, match="asked for 0 windows"):
        data.select_windows(windows, 0)


def test_batches_from_windows():
    windows = torch.arange(21).view(7, 3)
    batches = data.batches_from_windows(windows, 3)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 1]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), windows)
    assert all(torch.equal(b["attention_mask"], torch.ones_like(b["input_ids"])) for b in batches)
    assert data.count_tokens(batches) == 21
    with pytest.raises(GhostsolveError, match="batch_size is 0"):
        data.batches_from_windows(windows, 0)
    with pytest.raises(GhostsolveError, match="expected a non-empty"):
        data.batches_from_windows(torch.zeros(0, 3, dtype=torch.long), 2)


# ---------------------------------------------------------------------------------------------
# self-sampling
# ---------------------------------------------------------------------------------------------
@given(st.integers(0, 10**9), st.integers(0, 10**9))
def test_calibration_and_evaluation_seed_streams_never_meet(a, b):
    assert data.self_sampling_seed(a, "calibration") != data.self_sampling_seed(b, "evaluation")


def test_self_sampling_seed_errors():
    with pytest.raises(GhostsolveError, match="purpose is 'train'"):
        data.self_sampling_seed(0, "train")  # type: ignore[arg-type]
    with pytest.raises(GhostsolveError, match="seed is -1"):
        data.self_sampling_seed(-1, "calibration")


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(model, tok):
    state = torch.get_rng_state()
    a = data.sample_windows(model, tok, 3, 10, seed=5, batch_size=2, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    b = data.sample_windows(model, tok, 3, 10, seed=5, batch_size=2, progress=False)
    c = data.sample_windows(model, tok, 3, 10, seed=6, batch_size=2, progress=False)
    assert a.shape == (3, 10) and a.dtype == torch.long
    assert torch.all(a[:, 0] == tok.bos_token_id)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert int(a.max()) < len(tok)


def test_calibration_and_evaluation_samples_are_disjoint(model, tok):
    calib = data.sample_windows(
        model, tok, 4, 12, seed=data.self_sampling_seed(0, "calibration"), progress=False
    )
    evals = data.sample_windows(
        model, tok, 4, 12, seed=data.self_sampling_seed(0, "evaluation"), progress=False
    )
    assert not ({tuple(r) for r in calib.tolist()} & {tuple(r) for r in evals.tolist()})


def test_near_zero_temperature_sampling_is_greedy_decoding(model, tok):
    # With the KV cache right, sampling at a vanishing temperature must follow the model's argmax path.
    sampled = data.sample_windows(model, tok, 2, 9, seed=0, temperature=1e-6, progress=False)
    ids = sampled[:1, :1]
    for _ in range(8):
        with torch.no_grad():
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    assert torch.equal(sampled[0], ids[0])
    assert torch.equal(sampled[1], ids[0])


def test_sampling_errors(model, tok):
    with pytest.raises(GhostsolveError, match="exceeds the model's max_position_embeddings 64"):
        data.sample_windows(model, tok, 1, 65, seed=0, progress=False)
    with pytest.raises(GhostsolveError, match="temperature is 0"):
        data.sample_windows(model, tok, 1, 4, seed=0, temperature=0, progress=False)
    with pytest.raises(GhostsolveError, match="n_sequences=0"):
        data.sample_windows(model, tok, 0, 4, seed=0, progress=False)
    with pytest.raises(GhostsolveError, match="at least 2 tokens"):
        data.sample_windows(model, tok, 1, 1, seed=0, progress=False)

    class NoSpecial:
        bos_token_id = None
        eos_token_id = None

    with pytest.raises(GhostsolveError, match="neither a BOS nor an EOS"):
        data.sample_windows(model, NoSpecial(), 1, 4, seed=0, progress=False)
