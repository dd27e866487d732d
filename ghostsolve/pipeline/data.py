"""Text and token data for calibration and evaluation.

Two sources feed the same downstream code (capture, perplexity):

* **text files** – read, tokenized once, and cut into non-overlapping windows of ``seq_len`` tokens
  (:func:`text_windows`), the convention of the perplexity peers (SliceGPT, ShortGPT, the Ghosted
  Layers reference code);
* **the model itself** (data-free, ``--calib self``) – sequences sampled from the dense model with a
  seeded generator (:func:`sample_windows`); calibration and evaluation draw from disjoint seed streams
  (:func:`self_sampling_seed`), so the two sets are independent samples.

Both produce a ``(n_windows, seq_len)`` ``torch.long`` tensor of token ids, turned into model batches by
:func:`batches_from_windows`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from ghostsolve.errors import GhostsolveError

__all__ = [
    "Batch",
    "batches_from_windows",
    "bos_token_for_windows",
    "calibration_windows",
    "count_tokens",
    "evaluation_windows",
    "read_texts",
    "sample_windows",
    "select_windows",
    "self_sampling_seed",
    "text_windows",
    "tokenize_text",
]

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
"""A model batch: ``input_ids`` ``(batch, seq_len)`` long, ``attention_mask`` ``(batch, seq_len)`` long."""

_STREAMS = {"calibration": 0, "evaluation": 1}


def read_texts(paths: str | Path | Sequence[str | Path], *, encoding: str = "utf-8") -> str:
    """Read one or several text files and join them with a blank line.

    Parameters
    ----------
    paths : path or sequence of paths
        Text files. Several files are joined with ``"\\n\\n"`` (the Hugging Face WikiText convention).
    encoding : str
        Text encoding of the files.

    Returns
    -------
    str
        The concatenated text.

    Raises
    ------
    GhostsolveError
        If no path is given, a path is missing or is not a file, a file cannot be decoded, or the text is
        empty.
    """
    items = [paths] if isinstance(paths, str | Path) else list(paths)
    if not items:
        raise GhostsolveError("no text file given; pass at least one path to a UTF-8 text file")
    parts = []
    for item in items:
        path = Path(item)
        if not path.is_file():
            raise GhostsolveError(f"text file {str(path)!r} does not exist or is not a file; check the path")
        try:
            parts.append(path.read_text(encoding=encoding))
        except UnicodeDecodeError as exc:
            raise GhostsolveError(
                f"text file {str(path)!r} is not valid {encoding} ({exc.reason} at byte {exc.start}); "
                "convert it to UTF-8 (e.g. iconv -f LATIN1 -t UTF-8 FILE > FILE.utf8), or from Python pass "
                "read_texts(..., encoding=...)"
            ) from exc
    text = "\n\n".join(parts)
    if not text.strip():
        raise GhostsolveError(f"the text in {[str(p) for p in items]} is empty; give files that hold text")
    return text


def bos_token_for_windows(tokenizer: Any) -> int | None:
    """The BOS id to put at the start of every window, or ``None`` when the tokenizer has no BOS.

    A tokenizer "has" a BOS when it defines ``bos_token_id`` **and** prepends it when encoding with special
    tokens (Llama, Qwen-chat style, the demo model). GPT-2 style tokenizers define ``<|endoftext|>`` as
    BOS but never prepend it; their models were trained without one, so their windows get none.

    Parameters
    ----------
    tokenizer : transformers tokenizer
        Any tokenizer with ``bos_token_id`` and ``__call__``.

    Returns
    -------
    int or None
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return int(bos) if len(ids) > 0 and ids[0] == bos else None


def tokenize_text(text: str, tokenizer: Any) -> torch.Tensor:
    """Tokenize ``text`` once, without special tokens.

    Parameters
    ----------
    text : str
    tokenizer : transformers tokenizer

    Returns
    -------
    ids : (n_tokens,) torch.long
    """
    # verbose=False: the whole text is longer than model_max_length on purpose; windows are cut afterwards.
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def text_windows(
    text: str,
    tokenizer: Any,
    seq_len: int,
    *,
    bos: int | Literal["auto"] | None = "auto",
    max_windows: int | None = None,
) -> torch.Tensor:
    """Cut a text into non-overlapping windows of ``seq_len`` tokens.

    The text is tokenized once (no special tokens). With a BOS token, each window is ``[BOS]`` followed by
    the next ``seq_len - 1`` text tokens; without one, each window is the next ``seq_len`` text tokens.
    The trailing partial window is dropped, as the peers do. Every window has ``seq_len`` positions, so it
    fits the model's maximum positions whenever ``seq_len`` does.

    Parameters
    ----------
    text : str
    tokenizer : transformers tokenizer
    seq_len : int
        Tokens per window, BOS included; at least 2.
    bos : int, None or "auto"
        BOS id to prepend; ``"auto"`` uses :func:`bos_token_for_windows`, ``None`` prepends nothing.
    max_windows : int, optional
        Keep only the first ``max_windows`` windows (the text is still tokenized whole).

    Returns
    -------
    windows : (n_windows, seq_len) torch.long

    Raises
    ------
    GhostsolveError
        If ``seq_len < 2``, ``max_windows < 1``, the text is too short for one window, or the
        tokenizer turns it into no tokens.
    """
    if seq_len < 2:
        raise GhostsolveError(f"seq_len is {seq_len}; a window needs at least 2 tokens (one to predict)")
    if max_windows is not None and max_windows < 1:
        raise GhostsolveError(f"max_windows is {max_windows}; give a positive number of windows or None")
    bos_id = bos_token_for_windows(tokenizer) if bos == "auto" else bos
    ids = tokenize_text(text, tokenizer)
    body = seq_len - 1 if bos_id is not None else seq_len
    n_windows = ids.numel() // body
    if ids.numel() == 0 and text.strip():
        raise GhostsolveError(
            f"the tokenizer turned {len(text)} characters of text into no tokens: its vocabulary is empty or "
            "it is not this model's tokenizer; check the tokenizer files beside the model (tokenizer.json, "
            "tokenizer.model)"
        )
    if n_windows == 0:
        raise GhostsolveError(
            f"the text has {ids.numel()} tokens, fewer than one window of {body} text tokens "
            f"(seq_len={seq_len}); give more text or a smaller --seq-len"
        )
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = ids[: n_windows * body].view(n_windows, body)
    if bos_id is not None:
        windows = torch.cat([torch.full((n_windows, 1), bos_id, dtype=torch.long), windows], dim=1)
    return windows


def select_windows(windows: torch.Tensor, n: int | None, *, seed: int = 0) -> torch.Tensor:
    """Pick ``n`` distinct windows at random (seeded), keeping their original order.

    Parameters
    ----------
    windows : (n_windows, seq_len) torch.long
    n : int or None
        Number to keep; ``None`` or ``n >= n_windows`` keeps all.
    seed : int
        Seed of a private generator (the global RNG is not touched).

    Returns
    -------
    (min(n, n_windows), seq_len) torch.long

    Raises
    ------
    GhostsolveError
        If ``n < 1``.
    """
    if n is None or n >= windows.shape[0]:
        return windows
    if n < 1:
        raise GhostsolveError(f"asked for {n} windows; give a positive number")
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(windows.shape[0], generator=generator)[:n].sort().values
    return windows[keep]


def batches_from_windows(windows: torch.Tensor, batch_size: int) -> list[Batch]:
    """Split windows into model batches with an all-ones attention mask.

    Parameters
    ----------
    windows : (n_windows, seq_len) torch.long
    batch_size : int
        Windows per batch (the last batch may be smaller).

    Returns
    -------
    list of dict
        ``{"input_ids": (b, seq_len) long, "attention_mask": (b, seq_len) long, "sequence_index": (b,) long}``
        — each window's position in ``windows`` travels with it (cross-validation folds follow it).

    Raises
    ------
    GhostsolveError
        If ``batch_size < 1`` or ``windows`` is not a non-empty 2-D tensor.
    """
    if batch_size < 1:
        raise GhostsolveError(f"batch_size is {batch_size}; give a positive number")
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise GhostsolveError(
            f"windows have shape {tuple(windows.shape)}; expected a non-empty (n_windows, seq_len) tensor"
        )
    positions = torch.arange(windows.shape[0]).split(batch_size)
    return [
        {"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "sequence_index": index}
        for chunk, index in zip(windows.split(batch_size, dim=0), positions, strict=True)
    ]


def self_sampling_seed(seed: int, purpose: Literal["calibration", "evaluation"]) -> int:
    """Seed of the sampling stream for ``purpose``: ``2 * seed`` for calibration, ``2 * seed + 1`` for
    evaluation.

    Interleaving the two streams keeps them disjoint for every pair of user seeds (no calibration seed can
    equal any evaluation seed), so calibration and evaluation samples are independent draws.

    Raises
    ------
    GhostsolveError
        If ``purpose`` is unknown or ``seed`` is negative.
    """
    if purpose not in _STREAMS:
        raise GhostsolveError(f"purpose is {purpose!r}; expected one of {sorted(_STREAMS)}")
    if seed < 0:
        raise GhostsolveError(f"seed is {seed}; give a non-negative integer")
    return 2 * seed + _STREAMS[purpose]


def _start_token(tokenizer: Any) -> int:
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise GhostsolveError(
        "the tokenizer has neither a BOS nor an EOS token to start self-sampled sequences from; "
        "give calibration text instead of --calib self"
    )


@torch.no_grad()
def sample_windows(
    model: Any,
    tokenizer: Any,
    n_sequences: int,
    seq_len: int,
    *,
    seed: int,
    batch_size: int = 16,
    temperature: float = 1.0,
    progress: bool = True,
    desc: str = "sampling",
) -> torch.Tensor:
    """Sample sequences from the model itself: the data-free calibration/evaluation source.

    Each sequence starts with the tokenizer's BOS (or EOS when it has no BOS) and continues with
    ``seq_len - 1`` tokens drawn by ancestral sampling at ``temperature`` with a KV cache. A private
    ``torch.Generator`` seeded with ``seed`` drives the draws (the global RNG is untouched), so the same
    seed, model and batch size give the same tokens. Use :func:`self_sampling_seed` to get disjoint seeds
    for calibration and evaluation.

    Parameters
    ----------
    model : transformers causal LM
        Called as ``model(input_ids=..., use_cache=True, cache=...)`` (``past_key_values=`` before
        transformers 5.2x); left in its train/eval mode.
    tokenizer : transformers tokenizer
    n_sequences : int
        Number of sequences.
    seq_len : int
        Tokens per sequence, start token included; at least 2.
    seed : int
    batch_size : int
        Sequences sampled together.
    temperature : float
        Softmax temperature (> 0); 1.0 samples the model's own distribution.
    progress : bool
        Show a tqdm bar.
    desc : str
        Progress bar label.

    Returns
    -------
    windows : (n_sequences, seq_len) torch.long, on CPU

    Raises
    ------
    GhostsolveError
        If a count is not positive, ``seq_len < 2``, ``temperature <= 0``, ``seq_len`` exceeds the model's
        maximum positions, or the tokenizer has no start token; or the model gives non-finite logits (a
        float16 model that overflows).
    """
    if n_sequences < 1 or batch_size < 1:
        raise GhostsolveError(
            f"n_sequences={n_sequences}, batch_size={batch_size}; both must be positive integers"
        )
    if seq_len < 2:
        raise GhostsolveError(f"seq_len is {seq_len}; a sampled sequence needs at least 2 tokens")
    if not temperature > 0:
        raise GhostsolveError(f"temperature is {temperature}; it must be positive")
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_positions is not None and seq_len > max_positions:
        raise GhostsolveError(
            f"seq_len {seq_len} exceeds the model's max_position_embeddings {max_positions}; "
            "use a smaller --seq-len"
        )
    start = _start_token(tokenizer)
    device = next(model.parameters()).device
    # transformers 5.2x renamed the KV-cache argument and output from past_key_values to cache.
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    generator = torch.Generator(device="cpu").manual_seed(seed)
    was_training = model.training
    model.eval()
    out = []
    try:
        total = n_sequences * (seq_len - 1)
        with tqdm(total=total, desc=desc, unit="tok", disable=not progress, leave=False) as bar:
            for first in range(0, n_sequences, batch_size):
                b = min(batch_size, n_sequences - first)
                tokens = torch.full((b, 1), start, dtype=torch.long)
                step_input = tokens.to(device)
                past = None
                for _ in range(seq_len - 1):
                    result = model(input_ids=step_input, use_cache=True, **{cache_arg: past})
                    past = getattr(result, cache_arg)
                    logits = result.logits[:, -1, :].float().cpu() / temperature
                    if not torch.isfinite(logits).all():
                        raise GhostsolveError(_sampling_overflow(model, tokens.shape[1]))
                    probs = torch.softmax(logits, dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=generator)
                    tokens = torch.cat([tokens, nxt], dim=1)
                    step_input = nxt.to(device)
                    bar.update(b)
                out.append(tokens)
    finally:
        model.train(was_training)
    return torch.cat(out, dim=0)


def _sampling_overflow(model: Any, position: int) -> str:
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return (
        f"sampling text from the model gave non-finite logits at position {position} (the model runs in "
        f"{dtype} and overflows or holds NaN): load it in float32 (--dtype float32), or give text files "
        "(--calib-text, --eval-text) instead of sampling"
    )


def count_tokens(batches: Iterable[Batch]) -> int:
    """Number of unmasked tokens in ``batches``."""
    total = 0
    for batch in batches:
        mask = batch.get("attention_mask")
        total += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
    return total


#: Self-sampled evaluation windows when no evaluation text is given.
DEFAULT_SELF_EVAL = 16


def calibration_windows(
    model: Any,
    tokenizer: Any,
    source: Sequence[str | Path] | Literal["self"],
    *,
    n_windows: int,
    seq_len: int,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> torch.Tensor:
    """Calibration windows ``(n, seq_len)``: ``n_windows`` drawn at random (seeded) from text files, or
    sampled from the model itself with ``source="self"`` (the calibration seed stream of
    :func:`self_sampling_seed`).

    Raises
    ------
    GhostsolveError
        As :func:`read_texts`, :func:`text_windows` and :func:`sample_windows`.
    """
    if source == "self":
        seed = self_sampling_seed(seed, "calibration")
        return sample_windows(model, tokenizer, n_windows, seq_len, seed=seed,
                              batch_size=batch_size, progress=progress,
                              desc="sampling calibration")  # fmt: skip
    windows = text_windows(read_texts(source), tokenizer, seq_len)
    if windows.shape[0] < n_windows:
        logger.warning("the calibration text holds %d windows of %d tokens; using all of them, not %d",
                       windows.shape[0], seq_len, n_windows)  # fmt: skip
    return select_windows(windows, n_windows, seed=seed)


def evaluation_windows(
    model: Any,
    tokenizer: Any,
    source: Sequence[str | Path] | Literal["self"],
    *,
    n_windows: int | None,
    seq_len: int,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> torch.Tensor:
    """Evaluation windows: the first ``n_windows`` (None: all) windows of text files, or with
    ``source="self"`` ``n_windows`` (default :data:`DEFAULT_SELF_EVAL`) sequences sampled from the model on
    the evaluation seed stream, disjoint from calibration's.

    Raises
    ------
    GhostsolveError
        As :func:`read_texts`, :func:`text_windows` and :func:`sample_windows`.
    """
    if source == "self":
        return sample_windows(model, tokenizer, n_windows or DEFAULT_SELF_EVAL, seq_len,
                              seed=self_sampling_seed(seed, "evaluation"), batch_size=batch_size,
                              progress=progress, desc="sampling evaluation")  # fmt: skip
    return text_windows(read_texts(source), tokenizer, seq_len, max_windows=n_windows)
