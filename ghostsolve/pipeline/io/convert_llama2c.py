"""Convert a llama2.c checkpoint and tokenizer into a Hugging Face Llama directory.

llama2.c (Karpathy) stores a Llama-architecture model as one flat float32 file and its SentencePiece-style
vocabulary as a second binary file. This module reads both, writes a directory that
``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` load without custom code, and offers an
in-memory loader for tests.

Two facts make the conversion non-trivial:

* llama2.c applies rotary embeddings to interleaved pairs ``(0, 1), (2, 3), ...`` of each head, while
  Hugging Face Llama rotates the two halves of a head against each other. The rows of ``wq`` and ``wk``
  are therefore permuted per head (:func:`interleaved_to_halves`); ``wv``, ``wo`` and the MLP are copied
  unchanged. Without it the converted model writes noise.
* llama2.c encodes text by prepending a space and then repeatedly merging the adjacent pair whose merged
  string has the highest score (byte fallback for characters outside the vocabulary). A ``tokenizers``
  BPE whose merge ranks follow those scores reproduces that; :func:`llama2c_encode` is the reference
  implementation of the original algorithm, used to check it.

Checkpoint formats read: the legacy header-only format (version 0, what ``run.c`` reads; a negative
vocabulary size there means an untied classifier stored after the RoPE tables) and the float32
``version 1`` export (magic ``ak42``). The int8 ``version 2`` export is refused.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.io.atomic import atomic_directory, refuse_existing

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

__all__ = [
    "Llama2cConfig",
    "Llama2cVocab",
    "convert_llama2c",
    "interleaved_to_halves",
    "llama2c_decode",
    "llama2c_encode",
    "load_llama2c",
    "read_llama2c_checkpoint",
    "read_llama2c_tokenizer",
]

LOG = logging.getLogger(__name__)

_MAGIC_V1 = 0x616B3432  # "ak42" read as a little-endian uint32, written by llama2.c's export.py
_V1_HEADER_BYTES = 256
_V0_HEADER_BYTES = 7 * 4
# llama2.c hard-codes these; they are not stored in the checkpoint.
_RMS_EPS = 1e-5
_ROPE_THETA = 10000.0
_UNK, _BOS, _EOS = 0, 1, 2
_BYTE_OFFSET = 3  # tokens 3..258 are the byte fallbacks <0x00>..<0xFF>
_SPACE = "\u2581"  # SentencePiece's visible space, as Hugging Face Llama tokenizers spell it


@dataclass(frozen=True)
class Llama2cConfig:
    """Hyper-parameters read from a llama2.c checkpoint header.

    Attributes
    ----------
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len : int
        As in llama2.c's ``Config``; ``vocab_size`` is always positive here.
    shared_classifier : bool
        Whether the output classifier is the token embedding (tied).
    version : int
        0 for the legacy header-only format, 1 for the float32 ``ak42`` export.
    """

    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    shared_classifier: bool
    version: int

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_kv_heads

    def to_hf(self) -> LlamaConfig:
        """The equivalent :class:`transformers.LlamaConfig`."""
        from transformers import LlamaConfig

        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.dim,
            intermediate_size=self.hidden_dim,
            num_hidden_layers=self.n_layers,
            num_attention_heads=self.n_heads,
            num_key_value_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.seq_len,
            rms_norm_eps=_RMS_EPS,
            rope_parameters={"rope_type": "default", "rope_theta": _ROPE_THETA},
            tie_word_embeddings=self.shared_classifier,
            bos_token_id=_BOS,
            eos_token_id=_EOS,
            hidden_act="silu",
            attention_bias=False,
            mlp_bias=False,
        )


@dataclass(frozen=True)
class Llama2cVocab:
    """A llama2.c tokenizer file: one byte string and one merge score per token id.

    Attributes
    ----------
    pieces : list of bytes
        ``pieces[i]`` is token ``i`` as llama2.c stores it (spaces as plain ``b" "``; token 1 and 2 are
        ``b"\\n<s>\\n"`` and ``b"\\n</s>\\n"``; 3..258 are ``b"<0x00>"``..``b"<0xFF>"``).
    scores : list of float
        Merge priority of each token: a higher score merges first.
    max_token_length : int
        The longest piece in bytes, as recorded in the file.
    """

    pieces: list[bytes]
    scores: list[float]
    max_token_length: int


def _check_header(values: tuple[int, ...], path: Path) -> None:
    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len = values
    names = "dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len"
    bad = (
        min(dim, hidden_dim, n_layers, n_heads, n_kv_heads, seq_len) <= 0
        or vocab_size == 0
        or dim % n_heads != 0
        or n_heads % n_kv_heads != 0
        or (dim // n_heads) % 2 != 0
    )
    if bad:
        raise GhostsolveError(
            f"{path} does not start with a valid llama2.c header: ({names}) = {values}; expected positive "
            "sizes with dim divisible by n_heads into an even head size and n_heads divisible by "
            "n_kv_heads. Is this a llama2.c model file (run.c's .bin), not a tokenizer or a PyTorch .pt?"
        )


def read_llama2c_checkpoint(checkpoint: Path | str) -> tuple[Llama2cConfig, dict[str, torch.Tensor]]:
    """Read a llama2.c checkpoint into a Hugging Face Llama state dict.

    Parameters
    ----------
    checkpoint : path
        A llama2.c model file (legacy version 0 or the float32 version 1 export).

    Returns
    -------
    config : Llama2cConfig
    state_dict : dict of str to torch.Tensor
        float32 tensors named as in :class:`transformers.LlamaForCausalLM`, weights in ``nn.Linear``
        layout ``(out_features, in_features)``; ``q_proj``/``k_proj`` rows already permuted to the
        rotate-half convention. ``lm_head.weight`` is present only when the classifier is untied.

    Raises
    ------
    GhostsolveError
        The file is missing, has an invalid header, is an int8 (version 2) export, or its size does not
        match the sizes in its header.
    """
    path = Path(checkpoint)
    if not path.is_file():
        raise GhostsolveError(f"llama2.c checkpoint {path} does not exist or is not a file")
    raw = path.read_bytes()
    cfg, offset = _read_header(raw, path)
    shapes = _tensor_layout(cfg)
    expected = offset + 4 * sum(int(np.prod(s)) for _, s in shapes)
    if len(raw) != expected:
        c = cfg
        header = (c.dim, c.hidden_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.seq_len)
        raise GhostsolveError(
            f"{path} is {len(raw)} bytes but its header (dim, hidden_dim, n_layers, n_heads, n_kv_heads, "
            f"vocab_size, seq_len) = {header} (format version {cfg.version}, "
            f"{'tied' if cfg.shared_classifier else 'untied'} classifier) implies {expected} "
            "bytes of float32 weights; the file is truncated or not a float32 llama2.c checkpoint"
        )
    arrays: dict[str, torch.Tensor] = {}
    for name, shape in shapes:
        count = int(np.prod(shape))
        values_f32 = np.frombuffer(raw, dtype="<f4", count=count, offset=offset)
        arrays[name] = torch.from_numpy(values_f32.astype(np.float32).reshape(shape))
        offset += 4 * count
    return cfg, _hf_state_dict(cfg, arrays)


def _read_header(raw: bytes, path: Path) -> tuple[Llama2cConfig, int]:
    """The checkpoint's config and the byte offset of its first weight."""
    if len(raw) < _V0_HEADER_BYTES:
        raise GhostsolveError(
            f"{path} is {len(raw)} bytes, shorter than a llama2.c header ({_V0_HEADER_BYTES} bytes)"
        )
    (magic,) = struct.unpack_from("<I", raw, 0)
    if magic == _MAGIC_V1:
        (version,) = struct.unpack_from("<i", raw, 4)
        if version != 1:
            raise GhostsolveError(
                f"{path} is a llama2.c export of version {version}; only the legacy format (version 0) and "
                "the float32 version 1 export are supported (version 2 is int8-quantized: re-export it with "
                "llama2.c's `export.py --version 1`)"
            )
        values = struct.unpack_from("<7i", raw, 8)
        _check_header(values, path)
        shared = bool(raw[8 + 28])
        offset = _V1_HEADER_BYTES
    else:
        version = 0
        values = struct.unpack_from("<7i", raw, 0)
        _check_header(values, path)
        shared = values[5] > 0
        offset = _V0_HEADER_BYTES
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = values
    cfg = Llama2cConfig(dim, hidden, n_layers, n_heads, n_kv_heads, abs(vocab), seq_len, shared, version)
    return cfg, offset


def _tensor_layout(cfg: Llama2cConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the stored float32 tensors, in file order (it differs between versions)."""
    L, V, dim, kv, hidden = cfg.n_layers, cfg.vocab_size, cfg.dim, cfg.kv_dim, cfg.hidden_dim
    blocks = {
        "wq": (L, dim, dim),
        "wk": (L, kv, dim),
        "wv": (L, kv, dim),
        "wo": (L, dim, dim),
        "w1": (L, hidden, dim),
        "w2": (L, dim, hidden),
        "w3": (L, hidden, dim),
    }
    shapes: list[tuple[str, tuple[int, ...]]]
    if cfg.version == 0:
        shapes = [("tok", (V, dim)), ("rms_att", (L, dim))]
        shapes += [(k, blocks[k]) for k in ("wq", "wk", "wv", "wo")]
        shapes += [("rms_ffn", (L, dim))]
        shapes += [(k, blocks[k]) for k in ("w1", "w2", "w3")]
        # Two legacy RoPE tables (cos, sin) that Hugging Face recomputes.
        shapes += [("norm", (dim,)), ("rope", (2, cfg.seq_len, cfg.head_dim // 2))]
    else:
        shapes = [("rms_att", (L, dim)), ("rms_ffn", (L, dim)), ("norm", (dim,)), ("tok", (V, dim))]
        shapes += [(k, blocks[k]) for k in ("wq", "wk", "wv", "wo", "w1", "w2", "w3")]
    if not cfg.shared_classifier:
        shapes.append(("cls", (V, dim)))
    return shapes


def _hf_state_dict(cfg: Llama2cConfig, arrays: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The llama2.c tensors under Hugging Face Llama names, q/k rows in the rotate-half order."""
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": arrays["tok"].clone()}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = arrays["rms_att"][i].clone()
        sd[p + "self_attn.q_proj.weight"] = interleaved_to_halves(arrays["wq"][i], cfg.n_heads)
        sd[p + "self_attn.k_proj.weight"] = interleaved_to_halves(arrays["wk"][i], cfg.n_kv_heads)
        sd[p + "self_attn.v_proj.weight"] = arrays["wv"][i].clone()
        sd[p + "self_attn.o_proj.weight"] = arrays["wo"][i].clone()
        sd[p + "post_attention_layernorm.weight"] = arrays["rms_ffn"][i].clone()
        sd[p + "mlp.gate_proj.weight"] = arrays["w1"][i].clone()
        sd[p + "mlp.down_proj.weight"] = arrays["w2"][i].clone()
        sd[p + "mlp.up_proj.weight"] = arrays["w3"][i].clone()
    sd["model.norm.weight"] = arrays["norm"].clone()
    if not cfg.shared_classifier:
        sd["lm_head.weight"] = arrays["cls"].clone()
    return sd


def interleaved_to_halves(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Permute the output rows of a q/k projection from interleaved-pair RoPE to rotate-half RoPE.

    Within each head of size ``h``, llama2.c rotates rows ``(2j, 2j + 1)`` together; Hugging Face Llama
    rotates rows ``j`` and ``j + h/2``. Row ``2j`` moves to ``j`` and row ``2j + 1`` to ``j + h/2``, so
    ``q · k`` per head is unchanged and each rotation acts on the same pair of numbers.

    Parameters
    ----------
    weight : (n_heads * head_dim, d_in) tensor
        A projection in ``nn.Linear`` layout.
    n_heads : int
        Number of heads the rows are split into (the key/value head count for ``wk``).

    Returns
    -------
    (n_heads * head_dim, d_in) tensor
        A new tensor with the rows permuted.
    """
    rows, cols = weight.shape
    return weight.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols).clone()


def read_llama2c_tokenizer(tokenizer: Path | str, vocab_size: int) -> Llama2cVocab:
    """Read a llama2.c tokenizer file (``tokenizer.bin`` / ``tok512.bin``).

    Parameters
    ----------
    tokenizer : path
        The file: int32 ``max_token_length``, then per token a float32 score, an int32 length, the bytes.
    vocab_size : int
        Number of tokens; the file does not store it (take it from the checkpoint header).

    Raises
    ------
    GhostsolveError
        The file is missing, ends early, or has bytes left over after ``vocab_size`` tokens (a tokenizer
        for another vocabulary size).
    """
    path = Path(tokenizer)
    if not path.is_file():
        raise GhostsolveError(f"llama2.c tokenizer {path} does not exist or is not a file")
    raw = path.read_bytes()
    try:
        (max_len,) = struct.unpack_from("<i", raw, 0)
        offset = 4
        pieces, scores = [], []
        for _ in range(vocab_size):
            score, length = struct.unpack_from("<fi", raw, offset)
            offset += 8
            if length < 0 or offset + length > len(raw):
                raise struct.error("piece runs past the end of the file")
            pieces.append(raw[offset : offset + length])
            scores.append(float(score))
            offset += length
    except struct.error as exc:
        raise GhostsolveError(
            f"{path} ended before {vocab_size} tokens were read ({exc}); the tokenizer does not match the "
            f"checkpoint's vocabulary size {vocab_size}, or it is not a llama2.c tokenizer file"
        ) from None
    if offset != len(raw):
        raise GhostsolveError(
            f"{path} has {len(raw) - offset} bytes left after {vocab_size} tokens; it holds a larger "
            f"vocabulary than the checkpoint's {vocab_size} tokens (pass the tokenizer it was trained with)"
        )
    return Llama2cVocab(pieces=pieces, scores=scores, max_token_length=max_len)


def llama2c_encode(vocab: Llama2cVocab, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
    """Encode ``text`` exactly as llama2.c's ``encode()`` does (the reference for the fast tokenizer).

    A space is prepended to non-empty text; each UTF-8 character becomes its token, or one byte-fallback
    token per byte when it is not in the vocabulary; then, while possible, the adjacent pair whose
    concatenation is a token with the highest score is merged (the leftmost such pair on ties).

    Returns
    -------
    list of int
        Token ids, with BOS (1) first when ``bos`` and EOS (2) last when ``eos``.
    """
    lookup: dict[bytes, int] = {}
    for i, piece in enumerate(vocab.pieces):
        lookup.setdefault(piece, i)
    tokens: list[int] = [_BOS] if bos else []
    if text:
        text = " " + text
    for ch in text:
        encoded = ch.encode("utf-8")
        if encoded in lookup:
            tokens.append(lookup[encoded])
        else:
            tokens.extend(b + _BYTE_OFFSET for b in encoded)
    start = 1 if bos else 0
    while True:
        best_score, best_pos, best_id = -float("inf"), -1, -1
        for pos in range(start, len(tokens) - 1):
            merged = lookup.get(vocab.pieces[tokens[pos]] + vocab.pieces[tokens[pos + 1]])
            if merged is not None and vocab.scores[merged] > best_score:
                best_score, best_pos, best_id = vocab.scores[merged], pos, merged
        if best_pos < 0:
            break
        tokens[best_pos : best_pos + 2] = [best_id]
    if eos:
        tokens.append(_EOS)
    return tokens


def llama2c_decode(vocab: Llama2cVocab, ids: list[int]) -> str:
    """Decode as llama2.c prints: special tokens dropped, byte tokens joined, the dummy space removed."""
    out = bytearray()
    for i, tok in enumerate(ids):
        if tok in (_UNK, _BOS, _EOS):
            continue
        if _BYTE_OFFSET <= tok < _BYTE_OFFSET + 256:
            out.append(tok - _BYTE_OFFSET)
            continue
        piece = vocab.pieces[tok]
        # run.c strips the leading space of the piece right after BOS (the dummy prefix); with no BOS,
        # the first piece's space is the dummy prefix too.
        if piece.startswith(b" ") and (i == 0 or ids[i - 1] == _BOS) and not out:
            piece = piece[1:]
        out.extend(piece)
    return out.decode("utf-8", errors="replace")


def _hf_piece(i: int, piece: bytes) -> str:
    if i == _UNK:
        return "<unk>"
    if i == _BOS:
        return "<s>"
    if i == _EOS:
        return "</s>"
    return piece.decode("utf-8", errors="strict").replace(" ", _SPACE)


def build_hf_tokenizer(vocab: Llama2cVocab, model_max_length: int) -> PreTrainedTokenizerFast:
    """A ``tokenizers``-backed Hugging Face tokenizer that encodes and decodes like llama2.c.

    The pieces are spelled with SentencePiece's ``▁`` for spaces, as Hugging Face Llama tokenizers are;
    merges are all splits of each piece into two vocabulary pieces, ranked by the piece's score, which
    makes the BPE merge the highest-scoring adjacent pair first, as llama2.c does.

    Raises
    ------
    GhostsolveError
        Two token ids have the same piece (a BPE vocabulary cannot hold both), or a piece is not UTF-8.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    hf_vocab: dict[str, int] = {}
    for i, piece in enumerate(vocab.pieces):
        try:
            name = _hf_piece(i, piece)
        except UnicodeDecodeError:
            raise GhostsolveError(
                f"token {i} of the llama2.c vocabulary is {piece!r}, not valid UTF-8; only "
                "SentencePiece-style vocabularies (whole characters plus <0xXX> byte tokens) can be converted"
            ) from None
        if name in hf_vocab:
            raise GhostsolveError(
                f"tokens {hf_vocab[name]} and {i} of the llama2.c vocabulary are both {piece!r}; a BPE "
                "vocabulary needs unique pieces"
            )
        hf_vocab[name] = i

    ranked: list[tuple[float, int, int, str, str]] = []
    for i, piece in enumerate(vocab.pieces):
        if i < _BYTE_OFFSET + 256:
            continue
        name = _hf_piece(i, piece)
        for cut in range(1, len(name)):
            left, right = name[:cut], name[cut:]
            if left in hf_vocab and right in hf_vocab and hf_vocab[left] >= _BYTE_OFFSET + 256:
                if hf_vocab[right] >= _BYTE_OFFSET + 256:
                    ranked.append((-vocab.scores[i], i, cut, left, right))
    ranked.sort()
    merges = [(left, right) for *_, left, right in ranked]

    tok = Tokenizer(
        models.BPE(vocab=hf_vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)])
    tok.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", _BOS)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def load_llama2c(
    checkpoint: Path | str, tokenizer: Path | str
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Load a llama2.c model and tokenizer in memory as a float32 ``LlamaForCausalLM`` (eval mode).

    Parameters
    ----------
    checkpoint : path
        llama2.c model file.
    tokenizer : path
        llama2.c tokenizer file of the same vocabulary size.

    Returns
    -------
    model : transformers.LlamaForCausalLM
        float32, on CPU, in eval mode.
    tokenizer : transformers.PreTrainedTokenizerFast
        Adds BOS when encoding; decoding drops the dummy leading space.

    Raises
    ------
    GhostsolveError
        As :func:`read_llama2c_checkpoint` and :func:`read_llama2c_tokenizer`.
    """
    from transformers import LlamaForCausalLM

    cfg, sd = read_llama2c_checkpoint(checkpoint)
    vocab = read_llama2c_tokenizer(tokenizer, cfg.vocab_size)
    hf_tok = build_hf_tokenizer(vocab, cfg.seq_len)
    model = LlamaForCausalLM(cfg.to_hf())
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # A tied head is not a separate tensor in the checkpoint; anything else missing is a bug here.
    if unexpected or [k for k in missing if k != "lm_head.weight" or not cfg.shared_classifier]:
        raise RuntimeError(f"llama2.c mapping mismatch: missing {missing}, unexpected {unexpected}")
    if cfg.shared_classifier:
        model.tie_weights()
    model.eval()
    return model, hf_tok


def convert_llama2c(
    checkpoint: Path | str, tokenizer: Path | str, out_dir: Path | str, *, overwrite: bool = False
) -> Path:
    """Convert a llama2.c checkpoint and tokenizer into a Hugging Face Llama directory.

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` (float32) and the tokenizer
    files (``tokenizer.json``, ``tokenizer_config.json``), all loadable with
    ``AutoModelForCausalLM.from_pretrained(out_dir)`` and ``AutoTokenizer.from_pretrained(out_dir)``.
    The write is atomic (:func:`ghostsolve.pipeline.io.atomic.atomic_directory`): a failure leaves no partial
    directory and an overwritten ``out_dir`` as it was.

    Parameters
    ----------
    checkpoint : path
        llama2.c model file (e.g. ``stories260K.bin``).
    tokenizer : path
        llama2.c tokenizer file (e.g. ``tok512.bin``).
    out_dir : path
        Directory to create.
    overwrite : bool, default False
        Replace ``out_dir`` if it exists.

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    GhostsolveError
        ``out_dir`` exists and ``overwrite`` is false; or the inputs are invalid (see
        :func:`read_llama2c_checkpoint`, :func:`read_llama2c_tokenizer`).
    """
    out = Path(out_dir)
    refuse_existing(out, overwrite, inputs=(checkpoint, tokenizer))
    model, hf_tok = load_llama2c(checkpoint, tokenizer)
    model.config.architectures = ["LlamaForCausalLM"]
    from transformers import GenerationConfig

    with atomic_directory(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        hf_tok.save_pretrained(tmp)
        GenerationConfig(bos_token_id=_BOS, eos_token_id=_EOS).save_pretrained(tmp)
    LOG.info("converted %s to %s", checkpoint, out)
    return out
