"""llama2.c → Hugging Face conversion: the real stories260K model, the file formats, and bad input."""

from __future__ import annotations

import json
import os
import stat
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.io.convert_llama2c import (
    convert_llama2c,
    interleaved_to_halves,
    llama2c_decode,
    llama2c_encode,
    load_llama2c,
    read_llama2c_checkpoint,
    read_llama2c_tokenizer,
)
from tests.conftest import require_shared

transformers = pytest.importorskip("transformers")

EXPECTED = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park"
CKPT = "models/stories260K/stories260K.bin"
TOK = "models/stories260K/tok512.bin"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ckpt, tok = require_shared(CKPT), require_shared(TOK)
    return convert_llama2c(ckpt, tok, tmp_path_factory.mktemp("conv") / "stories260K")


@pytest.fixture(scope="module")
def vocab():
    return read_llama2c_tokenizer(require_shared(TOK), 512)


# --- the real model -------------------------------------------------------------------------------


def test_greedy_generation_from_bos_writes_the_known_story(converted: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(converted)
    tok = transformers.AutoTokenizer.from_pretrained(converted)
    ids = torch.tensor([[tok.bos_token_id]])
    out = model.generate(ids, max_new_tokens=30, do_sample=False)
    text = tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith(EXPECTED), text


def test_converted_config_facts(converted: Path) -> None:
    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 5
    assert cfg["hidden_size"] == 64
    assert cfg["intermediate_size"] == 172
    assert cfg["num_attention_heads"] == 8
    assert cfg["num_key_value_heads"] == 4
    assert cfg["vocab_size"] == 512
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rms_norm_eps"] == pytest.approx(1e-5)
    from safetensors import safe_open

    with safe_open(str(converted / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys  # tied: stored once, as the embedding
    assert "model.embed_tokens.weight" in keys
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (converted / name).is_file()


def test_saved_directory_matches_in_memory_model(converted: Path) -> None:
    mem_model, _ = load_llama2c(require_shared(CKPT), require_shared(TOK))
    disk_model = transformers.AutoModelForCausalLM.from_pretrained(converted)
    assert disk_model.lm_head.weight.data_ptr() == disk_model.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(disk_model(ids).logits, mem_model(ids).logits, rtol=0, atol=0)


SENTENCES = [
    "Once upon a time, there was a little girl named Lily.",
    "Tom and Sue went to the park. They saw a big dog!",
    "",
    "  two leading spaces and trailing ",
    "tabs\tand\nnewlines\n\n",
    "naïve café, 日本語, emoji 🙂 (byte fallback)",
    "aaaa aaaa the the the theeee",
]


@pytest.mark.parametrize("text", SENTENCES)
def test_hf_tokenizer_encodes_like_llama2c(converted: Path, vocab, text: str) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(converted)
    assert tok(text)["input_ids"] == llama2c_encode(vocab, text)


@pytest.mark.parametrize("text", SENTENCES)
def test_hf_tokenizer_decodes_like_llama2c(converted: Path, vocab, text: str) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(converted)
    ids = llama2c_encode(vocab, text)
    assert tok.decode(ids, skip_special_tokens=True) == llama2c_decode(vocab, ids) == text


@settings(max_examples=60)
@given(st.text(alphabet=st.sampled_from(list("abehilnorstwy ,.!'\nAÉé")), max_size=40))
def test_hf_tokenizer_encoding_property(converted: Path, vocab, text: str) -> None:
    tok = transformers.AutoTokenizer.from_pretrained(converted)
    assert tok(text)["input_ids"] == llama2c_encode(vocab, text)


def test_reference_encoder_on_known_pieces(vocab) -> None:
    # From the file itself: " the" is one token, "he" another; BOS first, a space prepended.
    the = vocab.pieces.index(b" the")
    assert llama2c_encode(vocab, "the") == [1, the]
    assert llama2c_encode(vocab, "the", bos=False, eos=True) == [the, 2]
    # A character outside the vocabulary falls back to its UTF-8 bytes (tokens 3 + byte).
    assert "日".encode() not in vocab.pieces
    ids = llama2c_encode(vocab, "日", bos=False)
    assert ids[-3:] == [3 + b for b in "日".encode()]


# --- the RoPE permutation -------------------------------------------------------------------------


def _rope_interleaved(x: torch.Tensor, pos: int) -> torch.Tensor:
    """llama2.c: rotate pairs (2j, 2j+1) by angle pos * theta^(-2j/h)."""
    h = x.shape[-1]
    j = torch.arange(h // 2, dtype=torch.float64)
    ang = pos * 10000.0 ** (-2 * j / h)
    a, b = x[..., 0::2], x[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = a * torch.cos(ang) - b * torch.sin(ang)
    out[..., 1::2] = a * torch.sin(ang) + b * torch.cos(ang)
    return out


def _rope_halves(x: torch.Tensor, pos: int) -> torch.Tensor:
    """Hugging Face Llama: rotate element j with element j + h/2 by the same angles."""
    h = x.shape[-1]
    j = torch.arange(h // 2, dtype=torch.float64)
    ang = pos * 10000.0 ** (-2 * j / h)
    a, b = x[..., : h // 2], x[..., h // 2 :]
    return torch.cat([a * torch.cos(ang) - b * torch.sin(ang), a * torch.sin(ang) + b * torch.cos(ang)], -1)


@settings(max_examples=25)
@given(
    n_heads=st.integers(1, 4),
    half=st.integers(1, 4),
    d_in=st.integers(1, 6),
    pos_q=st.integers(0, 50),
    pos_k=st.integers(0, 50),
    seed=st.integers(0, 2**16),
)
def test_permutation_preserves_rotary_attention_scores(n_heads, half, d_in, pos_q, pos_k, seed) -> None:
    head = 2 * half
    g = torch.Generator().manual_seed(seed)
    wq = torch.randn(n_heads * head, d_in, generator=g, dtype=torch.float64)
    wk = torch.randn(n_heads * head, d_in, generator=g, dtype=torch.float64)
    x, y = (
        torch.randn(d_in, generator=g, dtype=torch.float64),
        torch.randn(d_in, generator=g, dtype=torch.float64),
    )

    def scores(q_w, k_w, rope):
        q = rope((q_w @ x).reshape(n_heads, head), pos_q)
        k = rope((k_w @ y).reshape(n_heads, head), pos_k)
        return (q * k).sum(-1)

    ref = scores(wq, wk, _rope_interleaved)
    got = scores(interleaved_to_halves(wq, n_heads), interleaved_to_halves(wk, n_heads), _rope_halves)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_permutation_is_a_row_permutation_per_head() -> None:
    w = torch.arange(16.0).reshape(8, 2)  # 2 heads of 4 rows
    got = interleaved_to_halves(w, 2)
    assert got[:, 0].tolist() == [0, 4, 2, 6, 8, 12, 10, 14]


# --- file formats, written here from random arrays --------------------------------------------------

DIM, HID, L, H, KV, V, S = 8, 12, 2, 2, 1, 10, 6


def _random_arrays(seed: int, tied: bool) -> dict[str, np.ndarray]:
    r = np.random.default_rng(seed)
    kv = DIM // H * KV
    a = {
        "tok": (V, DIM),
        "rms_att": (L, DIM),
        "wq": (L, DIM, DIM),
        "wk": (L, kv, DIM),
        "wv": (L, kv, DIM),
        "wo": (L, DIM, DIM),
        "rms_ffn": (L, DIM),
        "w1": (L, HID, DIM),
        "w2": (L, DIM, HID),
        "w3": (L, HID, DIM),
        "norm": (DIM,),
    }
    out = {k: r.standard_normal(s).astype("<f4") for k, s in a.items()}
    if not tied:
        out["cls"] = r.standard_normal((V, DIM)).astype("<f4")
    return out


def _write_v0(path: Path, a: dict[str, np.ndarray], tied: bool) -> None:
    header = struct.pack("<7i", DIM, HID, L, H, KV, V if tied else -V, S)
    order = ["tok", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "norm"]
    body = b"".join(a[k].tobytes() for k in order)
    body += np.zeros(2 * S * (DIM // H // 2), "<f4").tobytes()
    if not tied:
        body += a["cls"].tobytes()
    path.write_bytes(header + body)


def _write_v1(path: Path, a: dict[str, np.ndarray], tied: bool, version: int = 1) -> None:
    header = struct.pack("<Ii7iB", 0x616B3432, version, DIM, HID, L, H, KV, V, S, int(tied))
    header += b"\0" * (256 - len(header))
    order = ["rms_att", "rms_ffn", "norm", "tok", "wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    body = b"".join(a[k].tobytes() for k in order) + (b"" if tied else a["cls"].tobytes())
    path.write_bytes(header + body)


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("tied", [True, False])
def test_reader_maps_every_array(tmp_path: Path, version: int, tied: bool) -> None:
    a = _random_arrays(version * 2 + tied, tied)
    path = tmp_path / "m.bin"
    (_write_v0 if version == 0 else _write_v1)(path, a, tied)
    cfg, sd = read_llama2c_checkpoint(path)
    assert (cfg.version, cfg.shared_classifier, cfg.vocab_size, cfg.n_kv_heads) == (version, tied, V, KV)
    t = {k: torch.from_numpy(v.copy()) for k, v in a.items()}
    assert torch.equal(sd["model.embed_tokens.weight"], t["tok"])
    assert torch.equal(sd["model.norm.weight"], t["norm"])
    for i in range(L):
        p = f"model.layers.{i}."
        assert torch.equal(sd[p + "input_layernorm.weight"], t["rms_att"][i])
        assert torch.equal(sd[p + "post_attention_layernorm.weight"], t["rms_ffn"][i])
        assert torch.equal(sd[p + "self_attn.q_proj.weight"], interleaved_to_halves(t["wq"][i], H))
        assert torch.equal(sd[p + "self_attn.k_proj.weight"], interleaved_to_halves(t["wk"][i], KV))
        assert torch.equal(sd[p + "self_attn.v_proj.weight"], t["wv"][i])
        assert torch.equal(sd[p + "self_attn.o_proj.weight"], t["wo"][i])
        assert torch.equal(sd[p + "mlp.gate_proj.weight"], t["w1"][i])
        assert torch.equal(sd[p + "mlp.down_proj.weight"], t["w2"][i])
        assert torch.equal(sd[p + "mlp.up_proj.weight"], t["w3"][i])
    if tied:
        assert "lm_head.weight" not in sd
    else:
        assert torch.equal(sd["lm_head.weight"], t["cls"])


def _write_tokenizer(path: Path, pieces: list[bytes]) -> None:
    out = struct.pack("<i", max(len(p) for p in pieces))
    for i, p in enumerate(pieces):
        out += struct.pack("<fi", -float(i), len(p)) + p
    path.write_bytes(out)


def test_untied_model_converts_and_loads(tmp_path: Path) -> None:
    a = _random_arrays(7, tied=False)
    _write_v0(tmp_path / "m.bin", a, tied=False)
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"x%d" % i for i in range(V - 3)]
    _write_tokenizer(tmp_path / "t.bin", pieces)
    old_mask = os.umask(0o022)
    try:
        out = convert_llama2c(tmp_path / "m.bin", tmp_path / "t.bin", tmp_path / "hf")
    finally:
        os.umask(old_mask)
    # Readable by others as a plain mkdir/open would make it, not owner-only like tempfile's.
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings is False
    assert torch.equal(model.lm_head.weight, torch.from_numpy(a["cls"].copy()))


# --- bad input --------------------------------------------------------------------------------------


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(GhostsolveError, match="does not exist"):
        read_llama2c_checkpoint(tmp_path / "nope.bin")


def test_truncated_checkpoint(tmp_path: Path) -> None:
    a = _random_arrays(0, tied=True)
    path = tmp_path / "m.bin"
    _write_v0(path, a, tied=True)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(GhostsolveError, match=r"implies \d+ bytes.*truncated"):
        read_llama2c_checkpoint(path)


def test_short_file(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    path.write_bytes(b"\0" * 10)
    with pytest.raises(GhostsolveError, match=r"shorter than a llama2.c header"):
        read_llama2c_checkpoint(path)


def test_invalid_header(tmp_path: Path) -> None:
    path = tmp_path / "m.bin"
    path.write_bytes(struct.pack("<7i", 10, 12, 2, 3, 1, 10, 6) + b"\0" * 64)  # 10 % 3 != 0
    with pytest.raises(GhostsolveError, match=r"valid llama2.c header"):
        read_llama2c_checkpoint(path)


def test_int8_export_is_refused(tmp_path: Path) -> None:
    a = _random_arrays(0, tied=True)
    path = tmp_path / "m.bin"
    _write_v1(path, a, tied=True, version=2)
    with pytest.raises(GhostsolveError, match=r"version 2.*int8"):
        read_llama2c_checkpoint(path)


def test_tokenizer_of_another_size(tmp_path: Path) -> None:
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n", b"a", b"b"]
    _write_tokenizer(tmp_path / "t.bin", pieces)
    with pytest.raises(GhostsolveError, match="ended before 9 tokens"):
        read_llama2c_tokenizer(tmp_path / "t.bin", 9)
    with pytest.raises(GhostsolveError, match="bytes left after 3 tokens"):
        read_llama2c_tokenizer(tmp_path / "t.bin", 3)
    with pytest.raises(GhostsolveError, match="does not exist"):
        read_llama2c_tokenizer(tmp_path / "missing.bin", 3)


def test_duplicate_pieces_are_refused(tmp_path: Path) -> None:
    a = _random_arrays(1, tied=True)
    _write_v0(tmp_path / "m.bin", a, tied=True)
    _write_tokenizer(tmp_path / "t.bin", [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"dup"] * (V - 3))
    with pytest.raises(GhostsolveError, match="both b'dup'"):
        load_llama2c(tmp_path / "m.bin", tmp_path / "t.bin")


def test_existing_output_is_refused_then_replaced(tmp_path: Path) -> None:
    a = _random_arrays(3, tied=True)
    _write_v0(tmp_path / "m.bin", a, tied=True)
    _write_tokenizer(
        tmp_path / "t.bin", [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [b"p%d" % i for i in range(V - 3)]
    )
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(GhostsolveError, match=r"already exists.*overwrite"):
        convert_llama2c(tmp_path / "m.bin", tmp_path / "t.bin", out)
    assert (out / "keep.txt").exists()
    convert_llama2c(tmp_path / "m.bin", tmp_path / "t.bin", out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.bin", "t.bin"]  # no temporaries left
