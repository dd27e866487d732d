"""Reading the command line's values: layer lists, method lists, strategy options, devices, lengths.

Each function turns what the user typed into what a workflow takes, or raises a :class:`GhostsolveError` that
says what was wrong in the user's own terms (flag names, not parameter names).
"""

from __future__ import annotations

import argparse
import collections
from typing import Any

from ghostsolve.errors import GhostsolveError

__all__ = [
    "check_drop_args",
    "drop_of",
    "loading_kwargs",
    "methods_of",
    "model_args_of",
    "parse_layers",
    "positive",
    "rank_of",
    "resolve_cli_device",
    "ridge_of",
    "selection_options",
    "seq_len_of",
]


def parse_layers(spec: str) -> list[int]:
    """Parse a layer list: ``"5-7"`` (inclusive: 5, 6, 7), ``"3,9"``, ``"3,5-7"``.

    Raises
    ------
    GhostsolveError
        If a part is not an integer or an ``a-b`` range with ``a <= b``, or a layer appears twice.
    """
    layers: list[int] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        first, dash, last = part.partition("-")
        bounds = _ints(first, last) if dash else _ints(part)
        if bounds is None:
            raise GhostsolveError(
                f"cannot read layer list {spec!r}: {part!r} is neither an integer nor a range like 5-7"
            )
        if any(b > _MAX_LAYER for b in bounds):
            raise GhostsolveError(
                f"layer list {spec!r}: {part!r} names a layer above {_MAX_LAYER}; no model has that many "
                "layers (a typo?)"
            )
        if dash:
            lo, hi = bounds
            if lo > hi:
                raise GhostsolveError(
                    f"layer range {part!r} runs backwards; write it as {hi}-{lo} (both ends included)"
                )
            layers.extend(range(lo, hi + 1))
        else:
            layers.append(bounds[0])
    if not layers:
        raise GhostsolveError(f"layer list {spec!r} is empty; give indices such as 5-7 or 3,9")
    counts = collections.Counter(layers)
    duplicates = sorted(i for i, n in counts.items() if n > 1)
    if duplicates:
        raise GhostsolveError(f"layer list {spec!r} names layers {duplicates} more than once")
    return layers


# Far above any decoder's depth, and small enough that a typo like 0-99999999999 cannot build a huge list.
_MAX_LAYER = 100_000


def _ints(*texts: str) -> tuple[int, ...] | None:
    """Non-negative decimal integers, or None (``int()`` alone would also take ``+3``, ``1_0``, ``٣``)."""
    if not all(t.strip().isascii() and t.strip().isdigit() for t in texts):
        return None
    return tuple(int(t) for t in texts)


def methods_of(spec: str) -> list[str]:
    """The methods of ``--recover a,b,c``: known names, each once.

    Raises
    ------
    GhostsolveError
        An empty list, a name given twice, or an unknown name (the message lists the known ones).
    """
    names = [m.strip() for m in spec.split(",") if m.strip()]
    if not names:
        raise GhostsolveError("--recover is empty; give method names such as ghost,identity")
    duplicates = sorted({m for m in names if names.count(m) > 1})
    if duplicates:
        raise GhostsolveError(f"--recover lists {duplicates} more than once")
    from ghostsolve.pipeline.recover import METHODS

    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise GhostsolveError(f"unknown recovery method(s) {unknown}; choose from {', '.join(METHODS)}")
    return names


def positive(value: str) -> int:
    """argparse type of a positive integer."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return number


def selection_options(args: argparse.Namespace, strategy: str) -> dict[str, Any]:
    """The strategy options set on the command line (validated against ``strategy``)."""
    from ghostsolve.pipeline.select.report import options_from_args

    return options_from_args(
        strategy,
        last_token=getattr(args, "last_token", None),
        skip_first_token=getattr(args, "skip_first_token", None),
        top_k=getattr(args, "top_k", None),
        keep_first=getattr(args, "keep_first", None),
        keep_last=getattr(args, "keep_last", None),
        normalize=getattr(args, "normalize", None),
    )


def check_drop_args(args: argparse.Namespace) -> dict[str, Any]:
    """Check ``--drop`` / ``--select`` / ``--num-drop`` before any work; the strategy options of ``--select``.

    Raises
    ------
    GhostsolveError
        If no removal set is given, or ``--select`` and ``--num-drop`` are not given together.
    """
    strategy, num_drop = getattr(args, "select", None), getattr(args, "num_drop", None)
    if getattr(args, "drop", None):
        if num_drop is not None:
            raise GhostsolveError(
                f"--num-drop {num_drop} goes with --select, not --drop {args.drop}; give one removal rule"
            )
        return {}
    if strategy is None:
        if num_drop is not None:
            raise GhostsolveError(
                f"--num-drop {num_drop} needs --select STRATEGY to choose the layers (e.g. --select "
                "recoverable), "
                "or give the layers with --drop"
            )
        raise GhostsolveError(
            "no layers to remove: give --drop, e.g. --drop 5-7 or --drop 3,9, or --num-drop N --select "
            "STRATEGY"
        )
    if num_drop is None:
        raise GhostsolveError(f"--select {strategy} needs --num-drop N: how many layers to remove")
    return selection_options(args, strategy)


def drop_of(args: argparse.Namespace) -> list[int] | None:
    """The layers of ``--drop`` (None when a strategy chooses them)."""
    return parse_layers(args.drop) if getattr(args, "drop", None) else None


def resolve_cli_device(name: str | None, ctx: Any = None) -> str:
    """The device of ``--device NAME``; without one, the torchrun rank's device, else ``auto``.

    Raises
    ------
    GhostsolveError
        ``--device cuda...`` without a visible CUDA device.
    """
    import torch

    if name is None:
        if ctx is not None and ctx.is_distributed:
            return str(ctx.device)
        name = "auto"
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise GhostsolveError(f"--device {name} was asked but no CUDA device is available; use --device cpu")
    return name


def seq_len_of(args: argparse.Namespace, model: Any) -> int:
    """``--seq-len``, checked against the model's positions (default: ``min(2048, max positions)``).

    Raises
    ------
    GhostsolveError
        A ``--seq-len`` beyond the model's maximum positions.
    """
    from ghostsolve.pipeline.evaluate import default_seq_len

    if args.seq_len is None:
        return default_seq_len(model)
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and args.seq_len > max_positions:
        raise GhostsolveError(
            f"--seq-len {args.seq_len} exceeds the model's {max_positions} positions; use at most "
            f"{max_positions}"
        )
    return int(args.seq_len)


def ridge_of(text: str) -> float | str:
    """``--ridge``: a relative ridge ``>= 0`` (``λ = ridge · mean(diag(XᵀX))``), ``cv`` (chosen by K-fold
    cross-validation on whole calibration sequences) or ``gcv`` (generalised cross-validation)."""
    if text in ("cv", "gcv"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor cv or gcv") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a finite number >= 0 (e.g. 0, 1e-3), cv or gcv")
    return value


def rank_of(text: str) -> int | str:
    """``--rank``: the rank of the ``lowrank`` family (an integer >= 0), or ``cv`` (cross-validated)."""
    if text == "cv":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an integer nor cv") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} must be an integer >= 0, or cv")
    return value


def _typed(value: str) -> Any:
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(value)
        except ValueError:
            pass
    return value


def model_args_of(text: str | None) -> dict[str, Any]:
    """``--model-args key=value,key=value`` (lm-eval's style) as keyword arguments of ``from_pretrained``:
    ``true``/``false``/``none`` and numbers are typed, anything else stays a string.

    Raises
    ------
    GhostsolveError
        A part without ``=`` or with an empty key.
    """
    out: dict[str, Any] = {}
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise GhostsolveError(
                f"cannot read --model-args {text!r}: {part!r} is not key=value (e.g. "
                "attn_implementation=sdpa,low_cpu_mem_usage=true)"
            )
        out[key.strip()] = _typed(value.strip())
    return out


def loading_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """What ``from_pretrained`` receives beside the dtype: ``--model-args``, then ``--trust-remote-code``,
    ``--revision`` and ``--device-map`` (a flag wins over the same key in ``--model-args``)."""
    kwargs = model_args_of(getattr(args, "model_args", None))
    if getattr(args, "trust_remote_code", False):
        kwargs["trust_remote_code"] = True
    for name in ("revision", "device_map"):
        value = getattr(args, name, None)
        if value is not None:
            kwargs[name] = value
    return kwargs
