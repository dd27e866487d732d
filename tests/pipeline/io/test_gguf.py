"""GGUF input: detection, header checks, loading and conversion, on tiny GGUF files written here.

Each file is written with ``gguf.GGUFWriter`` from a seeded random 2-layer Llama (hidden size 32, 4
query / 2 key-value heads). What transformers needs to read one back (found by trying; nothing else is
written):

* ``general.architecture`` and the ``llama.*`` hyper-parameters: ``block_count``, ``context_length``,
  ``embedding_length``, ``feed_forward_length``, ``attention.head_count``, ``attention.head_count_kv``,
  ``attention.layer_norm_rms_epsilon``, ``rope.freq_base``;
* a tokenizer: ``tokenizer.ggml.model = "gpt2"`` (byte-level BPE), ``tokens``, ``merges``, ``token_type``
  (so the special tokens are added whole) and the BOS/EOS ids — taken here from the byte-level BPE of
  ``tests/pipeline/_tiny.py``, whose special tokens are renamed so that transformers' default unknown
  token ``<|endoftext|>`` is one of them (otherwise it appends it, one past the model's vocabulary);
* the tensors under llama.cpp's names, ``q_proj``/``k_proj`` rows permuted per head from rotate-half to
  interleaved pairs (llama.cpp's layout; transformers permutes them back), no ``output.weight`` for
  tied embeddings.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ghostsolve.errors import GhostsolveError

gguf = pytest.importorskip("gguf", reason="the GGUF tests need gguf: pip install 'ghostsolve[gguf]'")
transformers = pytest.importorskip("transformers")

from ghostsolve.pipeline.io.gguf import (  # noqa: E402  (after the skips: it is only usable with gguf)
    INSTALL_HINT,
    check_gguf,
    convert_gguf,
    dequantizable_types,
    inspect_gguf,
    is_gguf_file,
    load_gguf,
)
from tests.pipeline._tiny import TEXT, tiny_tokenizer  # noqa: E402

LAYERS, HIDDEN, HEADS, KV_HEADS, FFN = 2, 32, 4, 2, 64
IDS = torch.tensor([[5, 17, 80, 200, 3, 42, 7, 99], [1, 2, 3, 4, 5, 6, 7, 8]])
CONTROL = 3  # llama.cpp's token type of a special (control) token
SPECIALS = ("<|endoftext|>", "<|im_end|>")  # renamed "<s>", "</s>" of the tiny tokenizer


# ---------------------------------------------------------------------------------------------
# writing tiny GGUF files
# ---------------------------------------------------------------------------------------------
def _vocabulary() -> tuple[list[str], list[str]]:
    tok = tiny_tokenizer(bos=False, vocab_size=300)
    spec = json.loads(tok.backend_tokenizer.to_str())
    tokens = [""] * len(spec["model"]["vocab"])
    for piece, index in spec["model"]["vocab"].items():
        tokens[index] = piece
    tokens[0], tokens[1] = SPECIALS
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, merges


def _halves_to_interleaved(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of each head from rotate-half order (j, j + h/2) to interleaved pairs (2j, 2j + 1)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def source_model(*, tied: bool = True, seed: int = 0) -> Any:
    tokens, _ = _vocabulary()
    config = transformers.LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        initializer_range=0.1,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def write_gguf(
    path: Path,
    model: Any,
    *,
    architecture: str = "llama",
    qtype: Any = None,
    tensor_dtype: Any = None,
    drop: tuple[str, ...] = (),
    tokenizer: bool = True,
) -> Path:
    """Write ``model`` as a GGUF file: F32 tensors, or ``qtype`` (e.g. Q8_0) for the 2-D weights.

    ``tensor_dtype`` stores the norm weights with that numpy dtype instead (float64 gives an F64 tensor);
    ``drop`` leaves out tensors by GGUF name.
    """
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    if tokenizer:
        tokens, merges = _vocabulary()
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_merges(merges)
        writer.add_token_types([CONTROL if t in SPECIALS else 1 for t in tokens])
        writer.add_bos_token_id(0)
        writer.add_eos_token_id(1)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, LAYERS)
    tied = model.config.tie_word_embeddings
    for key, tensor in model.state_dict().items():
        if key == "lm_head.weight" and tied:
            continue
        base, suffix = key.rsplit(".", 1)
        name = f"{names.get_name(base)}.{suffix}"
        if name in drop:
            continue
        array = tensor.detach().float().numpy()
        if "q_proj" in key:
            array = _halves_to_interleaved(array, HEADS)
        elif "k_proj" in key:
            array = _halves_to_interleaved(array, KV_HEADS)
        array = np.ascontiguousarray(array)
        if array.ndim == 2 and qtype is not None:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        elif array.ndim == 1 and tensor_dtype is not None:
            writer.add_tensor(name, array.astype(tensor_dtype))
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def logits(model: Any, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def source() -> Any:
    return source_model()


@pytest.fixture(scope="module")
def f32_file(tmp_path_factory: pytest.TempPathFactory, source: Any) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", source)


@pytest.fixture(scope="module")
def q8_file(tmp_path_factory: pytest.TempPathFactory, source: Any) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-q8.gguf"
    return write_gguf(path, source, qtype=gguf.GGMLQuantizationType.Q8_0)


@pytest.fixture(scope="module")
def q8_converted(tmp_path_factory: pytest.TempPathFactory, q8_file: Path) -> Path:
    return convert_gguf(q8_file, tmp_path_factory.mktemp("conv") / "tiny-q8-hf")


# ---------------------------------------------------------------------------------------------
# detection and header
# ---------------------------------------------------------------------------------------------
def test_detection_reads_the_magic_bytes_not_the_name(tmp_path: Path, f32_file: Path) -> None:
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(f32_file.read_bytes())
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert is_gguf_file(f32_file) and is_gguf_file(str(renamed))
    assert not is_gguf_file(fake)
    assert not is_gguf_file(empty)
    assert not is_gguf_file(tmp_path)  # a directory
    assert not is_gguf_file(tmp_path / "missing.gguf")


def test_header_inspection(f32_file: Path, q8_file: Path) -> None:
    info = inspect_gguf(f32_file)
    assert (info.architecture, info.model_type, info.name) == ("llama", "llama", "tiny llama")
    assert info.version == 3
    assert info.tensor_count == 2 + 9 * LAYERS  # embedding, final norm, 9 tensors per layer (tied head)
    assert info.tensor_types == {"F32": info.tensor_count}
    assert (info.block_count, info.hidden_size, info.has_tokenizer) == (LAYERS, HIDDEN, True)
    q8 = inspect_gguf(q8_file)
    assert q8.tensor_types == {"Q8_0": 1 + 7 * LAYERS, "F32": 1 + 2 * LAYERS}  # 2-D weights quantized


def test_the_file_type_list_matches_what_gguf_dequantizes() -> None:
    supported = dequantizable_types("llama")
    assert {"F32", "F16", "Q8_0", "Q4_1", "Q4_K", "Q6_K"} <= set(supported)
    assert "F64" not in supported  # a type with no dequantizer in gguf-py
    for name in supported:  # each listed type really dequantizes one block
        qtype = gguf.GGMLQuantizationType[name]
        block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
        gguf.quants.dequantize(np.zeros(block_bytes, dtype=np.uint8), qtype)


# ---------------------------------------------------------------------------------------------
# loading and conversion
# ---------------------------------------------------------------------------------------------
def test_f32_file_loads_as_the_model_it_was_written_from(f32_file: Path, source: Any) -> None:
    # F32 storage and a pure row permutation of q/k: nothing rounds, so the logits are bit-identical.
    model, tokenizer = load_gguf(f32_file)
    assert type(model) is transformers.LlamaForCausalLM
    assert model.dtype == torch.float32 and not model.training
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied embeddings survive the rebuild
    assert torch.equal(logits(model), logits(source))
    assert tokenizer.convert_ids_to_tokens([0, 1]) == list(SPECIALS)


def test_untied_model_keeps_its_own_head(tmp_path: Path) -> None:
    untied = source_model(tied=False, seed=1)
    model, _ = load_gguf(write_gguf(tmp_path / "untied.gguf", untied))
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(logits(model), logits(untied))


def test_conversion_round_trip_is_exact(q8_file: Path, q8_converted: Path, source: Any) -> None:
    # Both sides hold the same dequantized float32 tensors (safetensors stores them bit for bit) and run
    # the same transformers code, so the float32 logits are identical, not merely close.
    direct, direct_tok = load_gguf(q8_file)
    converted = transformers.AutoModelForCausalLM.from_pretrained(q8_converted)
    converted_tok = transformers.AutoTokenizer.from_pretrained(q8_converted)
    assert torch.equal(logits(direct), logits(converted))
    assert converted.lm_head.weight is converted.model.embed_tokens.weight
    assert converted_tok(TEXT)["input_ids"] == direct_tok(TEXT)["input_ids"]
    assert converted_tok.decode(converted_tok(TEXT)["input_ids"]) == TEXT
    # Q8_0 is lossy (one scale per 32 weights): close to the source model, not equal to it.
    error = (logits(converted) - logits(source)).abs().max()
    assert 0 < error < 0.05 * logits(source).abs().max()


def test_converted_directory_is_plain(q8_converted: Path) -> None:
    names = {p.name for p in q8_converted.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert not any(name.endswith(".gguf") for name in names)
    config = json.loads((q8_converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert config["tie_word_embeddings"] is True
    assert json.loads((q8_converted / "generation_config.json").read_text())["eos_token_id"] == 1
    from safetensors import safe_open

    with safe_open(str(q8_converted / "model.safetensors"), "pt") as handle:
        assert all(handle.get_tensor(k).dtype == torch.float32 for k in handle.keys())


def test_converted_directory_loads_without_gguf(q8_converted: Path) -> None:
    code = textwrap.dedent(
        f"""
        import sys
        sys.modules["gguf"] = None  # any import of gguf now fails
        import transformers
        model = transformers.AutoModelForCausalLM.from_pretrained({str(q8_converted)!r})
        tokenizer = transformers.AutoTokenizer.from_pretrained({str(q8_converted)!r})
        print(type(model).__name__, len(tokenizer))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["LlamaForCausalLM", str(len(_vocabulary()[0]))]


def test_dtype_and_device(f32_file: Path, source: Any) -> None:
    model, _ = load_gguf(f32_file, dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16
    expected = source.model.embed_tokens.weight.to(torch.bfloat16)
    assert torch.equal(model.model.embed_tokens.weight, expected)
    with pytest.raises(GhostsolveError, match="dtype 'int8' is not a torch floating-point type"):
        load_gguf(f32_file, dtype="int8")


def test_existing_output_is_refused_then_replaced(tmp_path: Path, f32_file: Path, source: Any) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(GhostsolveError, match="already exists; choose another --out or pass --overwrite"):
        convert_gguf(f32_file, out)
    assert (out / "keep.txt").read_text() == "old"
    convert_gguf(f32_file, out, overwrite=True)
    assert not (out / "keep.txt").exists()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits(reloaded), logits(source))


def test_a_failed_conversion_leaves_nothing(
    tmp_path: Path, f32_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = tmp_path / "parent"
    parent.mkdir()

    def broken_save(self: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", broken_save)
    with pytest.raises(GhostsolveError, match="disk full"):
        convert_gguf(f32_file, parent / "out")
    assert list(parent.iterdir()) == []  # neither the output nor a temporary directory


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def test_not_a_gguf_file_names_its_first_bytes(tmp_path: Path) -> None:
    wheel = tmp_path / "model.gguf"
    wheel.write_bytes(b"PK\x03\x04\x14\x00rest of a zip")
    with pytest.raises(GhostsolveError, match=r"is not a GGUF file: it starts with b'PK\\x03\\x04.*wheel"):
        check_gguf(wheel)
    text = tmp_path / "notes.gguf"
    text.write_bytes(b"hello world")
    with pytest.raises(GhostsolveError, match=r"starts with b'hello wo', a GGUF file starts with b'GGUF'"):
        load_gguf(text)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(GhostsolveError, match="is not a GGUF file: it is empty"):
        convert_gguf(empty, tmp_path / "out")
    with pytest.raises(GhostsolveError, match="does not exist; check the path"):
        inspect_gguf(tmp_path / "missing.gguf")
    with pytest.raises(GhostsolveError, match=r"is not a file; give the path of the \.gguf file"):
        inspect_gguf(tmp_path)
    assert not (tmp_path / "out").exists()


def test_damaged_header(tmp_path: Path, f32_file: Path) -> None:
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(f32_file.read_bytes()[:200])
    with pytest.raises(GhostsolveError, match=r"cannot read the GGUF header of .*truncated or damaged"):
        inspect_gguf(cut)


def test_architecture_without_an_adapter(tmp_path: Path, source: Any) -> None:
    path = write_gguf(tmp_path / "gpt2.gguf", source, architecture="gpt2")
    with pytest.raises(
        GhostsolveError,
        match=r"GGUF architecture 'gpt2', which has no ghostsolve adapter \(known model types: .*llama",
    ):
        load_gguf(path)


def test_adapter_architecture_transformers_cannot_read(tmp_path: Path, source: Any) -> None:
    path = write_gguf(tmp_path / "olmo2.gguf", source, architecture="olmo2")
    cannot = r"architecture 'olmo2', which transformers .* cannot load from GGUF"
    with pytest.raises(GhostsolveError, match=cannot):
        check_gguf(path)


def test_tensor_type_transformers_cannot_dequantize(tmp_path: Path, source: Any) -> None:
    path = write_gguf(tmp_path / "f64.gguf", source, tensor_dtype=np.float64)
    assert "F64" in inspect_gguf(path).tensor_types
    with pytest.raises(
        GhostsolveError, match=r"tensors of type F64 \(5 tensors\), which transformers .* cannot dequantize; "
        r"it can: F32, F16, .*Q4_1"
    ):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_tensor_is_an_error_not_a_random_weight(tmp_path: Path, source: Any) -> None:
    path = write_gguf(tmp_path / "holey.gguf", source, drop=("blk.1.ffn_up.weight",))
    with pytest.raises(
        GhostsolveError,
        match=r"does not give a complete model .*missing weights \['model\.layers\.1\.mlp\.up_proj",
    ):
        load_gguf(path)


def test_file_without_tokenizer(tmp_path: Path, source: Any) -> None:
    path = write_gguf(tmp_path / "bare.gguf", source, tokenizer=False)
    assert not inspect_gguf(path).has_tokenizer
    with pytest.raises(GhostsolveError, match=r"holds no tokenizer \(no tokenizer.ggml.tokens"):
        load_gguf(path)


def test_gguf_not_installed(f32_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` raises ImportError
    assert is_gguf_file(f32_file)  # detection needs no gguf
    missing = rf"needs the gguf package, which is not installed .*{re.escape(INSTALL_HINT)}"
    with pytest.raises(GhostsolveError, match=missing):
        inspect_gguf(f32_file)
    with pytest.raises(GhostsolveError, match="pip install 'ghostsolve\\[gguf\\]'"):
        convert_gguf(f32_file, f32_file.parent / "never")
    assert not (f32_file.parent / "never").exists()
