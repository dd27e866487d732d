"""The ``ghostsolve`` command line: prune, eval, diagnose, demo, select, convert-llama2c.

Every command prints its results table on stdout, progress bars and log messages on stderr. Errors are a
single line ``ghostsolve: error: ...`` on stderr with exit status 2 (``--traceback`` shows the full
traceback instead). ``main(argv)`` runs in-process and returns the exit status.

``prune``, ``demo``, ``select`` and ``diagnose`` also run under ``torchrun`` (data-parallel calibration,
:mod:`ghostsolve.pipeline.distributed`): every rank holds the model and the same calibration windows
(computed on rank 0 and broadcast), captures statistics on its shard of the batches, and rank 0 alone
samples, selects, evaluates, prints and writes.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ghostsolve.errors import GhostsolveError

__all__ = ["build_parser", "main", "parse_layers"]

logger = logging.getLogger("ghostsolve.cli")

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "demo_model"
DEFAULT_DEMO_OUT = "ghostsolve-demo-out"
DEMO_SAVED_METHOD = "ghost"
_EXIT_ERROR = 2

# Demo sizes: the bundled model has hidden size 128 and 256 positions. 32 calibration sequences of 128
# tokens give 4,064 rows per boundary (32x the hidden size: every family is well determined), and the
# same again for evaluation keeps self-sampling (one batch, 127 decoding steps) and a dozen evaluations
# around a minute on 2 CPU cores.
DEMO_NUM_CALIB = 32
DEMO_NUM_EVAL = 32
DEMO_SEQ_LEN = 128
DEMO_NUM_DROP = 2
# The demo's selection rule: the block whose ghost fit leaves the smallest residual. On the bundled model it
# costs one capture pass (under a second on 1 thread for 32x128 tokens, as the cosine rule), and it picks the
# block that the recovery it demonstrates can best replace.
DEMO_STRATEGY = "recoverable"
# Self-sampled evaluation sets when no --eval-text is given (prune/eval).
DEFAULT_SELF_EVAL = 16


# ---------------------------------------------------------------------------------------------
# argument helpers
# ---------------------------------------------------------------------------------------------
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
    duplicates = sorted({i for i in layers if layers.count(i) > 1})
    if duplicates:
        raise GhostsolveError(f"layer list {spec!r} names layers {duplicates} more than once")
    return layers


def _ints(*texts: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(t) for t in texts)
    except ValueError:
        return None


def _methods(spec: str) -> list[str]:
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


def _demo_methods(methods: Sequence[str]) -> list[str]:
    """Every method once: ``full`` is dropped when ``ghost`` (the same unconstrained fit) is present."""
    return [m for m in methods if not (m == "full" and "ghost" in methods)]


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return number


# ---------------------------------------------------------------------------------------------
# shared option groups
# ---------------------------------------------------------------------------------------------
def _add_runtime(
    parser: argparse.ArgumentParser, *, batch_size: int | None = 8, threads: int | None = None
) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--device",
        default=None,
        help="where to run: cpu, cuda, cuda:N, or auto (cuda when available, else cpu). Default: auto; "
        "under torchrun, the rank's own device (cuda:LOCAL_RANK with NCCL, cpu with gloo)",
    )
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="model weight dtype; auto keeps the checkpoint's dtype. Statistics are fp64 regardless",
    )
    group.add_argument(
        "--batch-size",
        type=_positive,
        default=batch_size,
        help="sequences per forward pass and per sampling batch (default: "
        + (
            f"{batch_size})"
            if batch_size is not None
            else "--num-calib, one batch; under torchrun, --num-calib divided by the number of processes)"
        ),
    )
    group.add_argument(
        "--seed", type=int, default=0, help="seed of window selection and self-sampling (default: 0)"
    )
    group.add_argument(
        "--threads",
        type=_positive,
        default=threads,
        help="CPU threads for torch during this command (default: "
        + (
            "torch's own choice)"
            if threads is None
            else f"{threads}: the demo model's matrices are small, and one thread avoids the "
            "synchronisation cost that dominates them, above all on a busy machine)"
        ),
    )
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")
    group.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    group.add_argument(
        "--traceback", action="store_true", help="on error, show the full traceback instead of one line"
    )


def _add_calibration(parser: argparse.ArgumentParser, *, required: bool) -> None:
    group = parser.add_argument_group("calibration data")
    source = group.add_mutually_exclusive_group(required=required)
    source.add_argument(
        "--calib-text",
        nargs="+",
        metavar="FILE",
        help="text file(s) for calibration, tokenized once and cut into windows of --seq-len tokens",
    )
    source.add_argument(
        "--calib",
        choices=["self"],
        help="'self': data-free calibration on sequences sampled from the dense model itself (seeded)",
    )
    group.add_argument(
        "--num-calib",
        type=_positive,
        default=32,
        help="calibration sequences (windows drawn at random, seeded, from the text; default: 32)",
    )
    group.add_argument(
        "--skip-first-token",
        action="store_true",
        help="exclude each window's first token (BOS / attention sink) from the calibration statistics",
    )


def _add_evaluation(
    parser: argparse.ArgumentParser,
    *,
    num_eval_default: int | None,
    seq_len_default: int | None = None,
    self_source: str = "the dense model (a seed stream disjoint from calibration's)",
) -> None:
    group = parser.add_argument_group("evaluation data")
    group.add_argument(
        "--eval-text",
        nargs="+",
        metavar="FILE",
        help="text file(s) for perplexity: non-overlapping windows of --seq-len tokens, BOS first in each "
        "window where the tokenizer has one, exp of the mean NLL over all predicted tokens. Without it, "
        f"perplexity is measured on sequences sampled from {self_source}",
    )
    group.add_argument(
        "--num-eval",
        type=_positive,
        default=num_eval_default,
        help="evaluation windows: the first N of the text, or N self-sampled sequences (default: "
        + (
            f"all windows of the text, {DEFAULT_SELF_EVAL} when self-sampled"
            if num_eval_default is None
            else str(num_eval_default)
        )
        + ")",
    )
    group.add_argument(
        "--seq-len",
        type=_positive,
        default=seq_len_default,
        help="tokens per window for calibration and evaluation (default: "
        + (
            "min(2048, the model's maximum positions))"
            if seq_len_default is None
            else f"{seq_len_default}, a short context that keeps the demo fast; the model has 256)"
        ),
    )


def _add_output(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", metavar="DIR", help="write the checkpoint here (atomically)")
    group.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    group.add_argument(
        "--report",
        metavar="FILE.json",
        help="write the JSON report: model, removed, seq_len, dense.perplexity and per method "
        "perplexity, relative_residual, fit_seconds; saved",
    )


# ---------------------------------------------------------------------------------------------
# selection (issue 5): the `select` command and `prune --select S --num-drop N`. `prune` puts --drop
# and --select in one mutually exclusive group; `_resolve_drop` is the one place where a removal set
# is decided from the arguments.
# ---------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """An argument parser whose epilog can be built when help is shown.

    The strategy list lives in :mod:`ghostsolve.pipeline.select`, which imports torch; building it only for
    ``--help`` keeps ``ghostsolve --version`` and usage errors fast.
    """

    epilog_factory: Callable[[], str] | None = None

    def format_help(self) -> str:
        if self.epilog_factory is not None:
            self.epilog = self.epilog_factory()
        return super().format_help()


def _strategy_epilog() -> str:
    from ghostsolve.pipeline.select_report import strategy_help

    return strategy_help()


def _add_strategy_options(parser: argparse.ArgumentParser) -> None:
    """Options of individual strategies; each applies only to the strategies named in its help."""
    group = parser.add_argument_group("selection strategy options (each applies to the strategies named)")
    group.add_argument(
        "--last-token",
        action="store_true",
        default=None,
        help="angular: use only each sequence's last token, as Gromov et al. do",
    )
    group.add_argument(
        "--top-k", type=_positive, default=None, help="recoverable-ppl: blocks re-ranked (default: 3)"
    )
    group.add_argument("--keep-first", type=int, default=None, help="taylor: never remove the first N layers")
    group.add_argument("--keep-last", type=int, default=None, help="taylor: never remove the last N layers")
    group.add_argument(
        "--normalize",
        choices=["stream", "block"],
        default=None,
        help="recoverable rules: divide the fit residual by the stream energy (default) or by the block's "
        "own change",
    )


def _add_selection_commands(subparsers: Any, prune_parser: argparse.ArgumentParser, drop_group: Any) -> None:
    """Add ``select`` to ``subparsers`` and ``--select`` (with ``--num-drop``) to ``prune``."""
    drop_group.add_argument(
        "--select",
        metavar="STRATEGY",
        help="choose the layers to remove with a selection strategy (see `ghostsolve select --help`); "
        "needs --num-drop",
    )
    prune_parser.add_argument(
        "--num-drop", type=_positive, default=None, help="with --select: how many layers to remove"
    )
    _add_strategy_options(prune_parser)

    sel = subparsers.add_parser(
        "select",
        help="score the layers with a selection strategy and choose the ones to remove",
        description="Score every decoder layer (or every block of --num-drop contiguous layers) of MODEL "
        "on calibration data with a selection strategy, print the scores and the chosen 0-based layer "
        "indices, and optionally write a JSON report and a PNG plot of the scores. Under torchrun, rank 0 "
        "does the scoring and writing.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sel.epilog_factory = _strategy_epilog
    sel.add_argument("model", metavar="MODEL", help="a local model directory (or a hub id)")
    sel.add_argument("--strategy", required=True, metavar="S", help="selection strategy (listed below)")
    sel.add_argument("--num-drop", type=_positive, required=True, help="how many layers to remove")
    sel.add_argument(
        "--report",
        metavar="FILE.json",
        help='write {"strategy", "num_drop", "scores", "selected" (0-based), "unit", "score_name", '
        '"removes", "details"} as JSON',
    )
    sel.add_argument("--plot", metavar="FILE.png", help="write a bar plot of the scores, chosen ones marked")
    sel.add_argument(
        "--seq-len", type=_positive, default=None, help="tokens per calibration window (default: model's)"
    )
    _add_calibration(sel, required=True)
    _add_strategy_options(sel)
    _add_runtime(sel)
    sel.set_defaults(func=_cmd_select)


def _selection_options(args: argparse.Namespace, strategy: str) -> dict[str, Any]:
    """The strategy options set on the command line (validated against ``strategy``)."""
    from ghostsolve.pipeline.select_report import options_from_args

    return options_from_args(
        strategy,
        last_token=getattr(args, "last_token", None),
        skip_first_token=getattr(args, "skip_first_token", None),
        top_k=getattr(args, "top_k", None),
        keep_first=getattr(args, "keep_first", None),
        keep_last=getattr(args, "keep_last", None),
        normalize=getattr(args, "normalize", None),
    )


def _check_drop_args(args: argparse.Namespace) -> dict[str, Any]:
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
                "recoverable), or give the layers with --drop"
            )
        raise GhostsolveError(
            "no layers to remove: give --drop, e.g. --drop 5-7 or --drop 3,9, or --num-drop N "
            "--select STRATEGY"
        )
    if num_drop is None:
        raise GhostsolveError(f"--select {strategy} needs --num-drop N: how many layers to remove")
    return _selection_options(args, strategy)


def _resolve_drop(
    args: argparse.Namespace, model: Any, batches: Sequence[Mapping[str, Any]]
) -> tuple[list[int], Any]:
    """The layers to remove, from ``--drop`` or from ``--select`` on the full calibration ``batches``.

    Returns the layer list and the :class:`~ghostsolve.pipeline.select.Selection` (None with ``--drop``).
    Under torchrun the selection runs on rank 0 and is sent to the others, so every rank removes the same
    layers.
    """
    from ghostsolve.pipeline.select import select_layers

    options = _check_drop_args(args)
    if args.drop:
        return parse_layers(args.drop), None
    selection = _shared(args, select_layers, model, batches, args.select, args.num_drop, **options)
    return list(selection.selected), selection


# ---------------------------------------------------------------------------------------------
# torchrun (issue 6): every rank loads the model and holds the same calibration windows; each captures
# statistics on its own shard of the batches, which pipeline.recover sums across ranks. Rank 0 alone
# samples, selects, evaluates, prints and writes; the others wait for it at a collective, and learn
# if it failed (so none waits for the 60-minute collective timeout).
# ---------------------------------------------------------------------------------------------
_DISTRIBUTED_COMMANDS = frozenset({"prune", "demo", "select", "diagnose"})


def _world_size(args: argparse.Namespace) -> int:
    ctx = getattr(args, "dist", None)
    return 1 if ctx is None else int(ctx.world_size)


def _shared(args: argparse.Namespace, fn: Callable[..., Any], *fn_args: Any, **fn_kwargs: Any) -> Any:
    """``fn(*fn_args, **fn_kwargs)``, computed on rank 0 and sent to every rank (plain call without torchrun).

    Self-sampled windows depend on floating-point sampling, which need not agree bit for bit between
    processes; computing them once and broadcasting makes every rank's calibration set identical.

    Raises
    ------
    GhostsolveError
        On the other ranks, when ``fn`` failed on rank 0 (rank 0 raises the original exception).
    """
    if _world_size(args) == 1:
        return fn(*fn_args, **fn_kwargs)
    import torch.distributed as dist

    payload: list[Any] = [None, None]
    error: Exception | None = None
    if args.dist.is_main:
        try:
            payload[0] = fn(*fn_args, **fn_kwargs)
        except Exception as exc:
            error = exc
            payload = [None, f"{type(exc).__name__}: {exc}"]
    dist.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    if payload[1] is not None:
        raise GhostsolveError(f"rank 0 failed in {getattr(fn, '__name__', fn)!s}: {payload[1]}")
    return payload[0]


def _on_main(args: argparse.Namespace, fn: Callable[..., Any], *fn_args: Any, **fn_kwargs: Any) -> Any:
    """``fn`` on rank 0 only (None elsewhere); the other ranks wait until it is done."""
    from ghostsolve.pipeline.distributed import run_on_main

    if _world_size(args) == 1:
        return fn(*fn_args, **fn_kwargs)
    return run_on_main(fn, *fn_args, **fn_kwargs)


def _my_batches(args: argparse.Namespace, batches: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """This rank's shard of the calibration batches (all of them outside torchrun)."""
    from ghostsolve.pipeline.distributed import shard_batches

    ctx = getattr(args, "dist", None)
    if ctx is None or ctx.world_size == 1:
        return list(batches)
    return shard_batches(batches, ctx.rank, ctx.world_size)


def _check_shardable(args: argparse.Namespace) -> None:
    """Fail before any sampling when the calibration batches cannot give every rank one."""
    world = _world_size(args)
    batches = -(-args.num_calib // args.batch_size)
    if world > 1 and batches < world:
        raise GhostsolveError(
            f"--num-calib {args.num_calib} in batches of --batch-size {args.batch_size} makes {batches} "
            f"batch(es), fewer than the {world} processes; every rank needs at least one: use a batch size "
            f"of at most {args.num_calib // world}, more calibration sequences, or fewer processes"
        )


# ---------------------------------------------------------------------------------------------
# shared work
# ---------------------------------------------------------------------------------------------
def _device(name: str | None, ctx: Any = None) -> str:
    """The device of ``--device NAME``; without one, the torchrun rank's device, else ``auto``."""
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


def _capture_options(args: argparse.Namespace) -> dict[str, Any]:
    """``capture``/``device`` for the recovery: layer by layer on the execution device with --layerwise."""
    if not getattr(args, "layerwise", False):
        return {}
    return {"capture": "layerwise", "device": _device(args.device, getattr(args, "dist", None))}


def _load_model(path: str, args: argparse.Namespace) -> tuple[Any, Any]:
    import torch
    from transformers import AutoTokenizer

    from ghostsolve.pipeline.checkpoint import load

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    # --layerwise keeps the model in host memory; capture onloads one decoder layer at a time.
    device = "cpu" if getattr(args, "layerwise", False) else _device(args.device, getattr(args, "dist", None))
    model = load(path, device=device, dtype=dtype)
    try:
        # A ghosted checkpoint's config names remote code for the *model*; the tokenizer needs none.
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise GhostsolveError(f"cannot load a tokenizer from {path!r} ({exc}); the model needs one") from exc
    return model, tokenizer


def _calibration_windows(args: argparse.Namespace, model: Any, tokenizer: Any, seq_len: int) -> Any:
    from ghostsolve.pipeline import data

    progress = not args.no_progress
    if args.calib_text:
        windows = data.text_windows(data.read_texts(args.calib_text), tokenizer, seq_len)
        return data.select_windows(windows, args.num_calib, seed=args.seed)
    return data.sample_windows(
        model,
        tokenizer,
        args.num_calib,
        seq_len,
        seed=data.self_sampling_seed(args.seed, "calibration"),
        batch_size=args.batch_size,
        progress=progress,
        desc="sampling calibration",
    )


def _evaluation_windows(args: argparse.Namespace, model: Any, tokenizer: Any, seq_len: int) -> Any:
    from ghostsolve.pipeline import data

    if args.eval_text:
        return data.text_windows(
            data.read_texts(args.eval_text), tokenizer, seq_len, max_windows=args.num_eval
        )
    return data.sample_windows(
        model,
        tokenizer,
        args.num_eval or DEFAULT_SELF_EVAL,
        seq_len,
        seed=data.self_sampling_seed(args.seed, "evaluation"),
        batch_size=args.batch_size,
        progress=not args.no_progress,
        desc="sampling evaluation",
    )


def _seq_len(args: argparse.Namespace, model: Any) -> int:
    from ghostsolve.pipeline.evaluate import default_seq_len

    limit = default_seq_len(model)
    if args.seq_len is None:
        return limit
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions is not None and args.seq_len > max_positions:
        raise GhostsolveError(
            f"--seq-len {args.seq_len} exceeds the model's {max_positions} positions; "
            f"use at most {max_positions}"
        )
    return int(args.seq_len)


def _mean_residual(values: Any) -> tuple[float | None, dict[str, float | None]]:
    """Average of per-interval relative residuals (``None`` when the method reports none)."""
    if values is None:
        return None, {}
    items = list(values.items()) if isinstance(values, Mapping) else list(enumerate(values))
    per: dict[str, float | None] = {}
    for key, value in items:
        label = f"{key[0]}-{key[1]}" if isinstance(key, tuple) else str(key)
        per[label] = None if value is None else float(value)
    finite = [v for v in per.values() if v is not None]
    return (sum(finite) / len(finite) if finite else None), per


def _run_methods(
    args: argparse.Namespace,
    *,
    model: Any,
    model_name: str,
    drop: list[int],
    methods: list[str],
    calib_windows: Any,
    eval_windows: Any,
    dense_ppl: float | None,
    save_method: str | None,
    out_dir: Path | None,
) -> tuple[Any, Any]:
    """Fit every method from one shared capture and evaluate each, holding one recovered model at a time.

    Returns the :class:`~ghostsolve.pipeline.report.RunResult` and the Recovery of ``save_method`` (None
    when it is not among ``methods``). Under torchrun each rank captures its shard of the batches, rank 0
    evaluates, and the other ranks return ``(None, None)``.
    """
    from ghostsolve.pipeline.data import batches_from_windows
    from ghostsolve.pipeline.evaluate import perplexity
    from ghostsolve.pipeline.recover import iter_recoveries
    from ghostsolve.pipeline.report import MethodResult, RunResult

    progress = not args.no_progress
    batches = _my_batches(args, batches_from_windows(calib_windows, args.batch_size))
    results: dict[str, MethodResult] = {}
    kept = None
    t0 = time.perf_counter()
    for name, rec in iter_recoveries(
        model,
        drop,
        batches,
        methods,
        order=args.order,
        skip_first_token=args.skip_first_token,
        progress=progress,
        **_capture_options(args),
    ):
        ppl = _on_main(
            args,
            perplexity,
            rec.model,
            eval_windows,
            batch_size=args.batch_size,
            progress=progress,
            desc=name,
        )
        if ppl is None:  # not rank 0
            continue
        mean, per = _mean_residual(rec.relative_residuals)
        results[name] = MethodResult(
            perplexity=ppl.perplexity,
            relative_residual=mean,
            fit_seconds=float(rec.fit_seconds),
            relative_residuals=per,
        )
        logger.info("%s: perplexity %.4f, relative residual %s", name, ppl.perplexity, mean)
        if name == save_method:
            kept = rec
    logger.info("recovered and evaluated %d methods in %.1f s", len(methods), time.perf_counter() - t0)
    if not results or dense_ppl is None:  # not rank 0
        return None, None
    run = RunResult(
        model=model_name,
        removed=sorted(drop),
        seq_len=int(eval_windows.shape[1]),
        dense_perplexity=dense_ppl,
        methods=results,
        saved=save_method if out_dir is not None else None,
    )
    return run, kept


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.INFO if getattr(args, "verbose", False) else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("ghostsolve: %(message)s"))
    root = logging.getLogger("ghostsolve")
    root.handlers = [handler]
    root.setLevel(level)
    root.propagate = False
    try:
        from transformers.utils import logging as hf_logging

        # The CLI is an application: transformers' per-load bars and advisories would drown the table.
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def _check_outputs(args: argparse.Namespace, out: Path | None = None) -> None:
    """Fail before any work if a file or directory the command will write cannot be written.

    Covers ``--report`` and ``--plot`` (their folder must exist) and, when given, the ``--out`` directory
    (refused if it exists without ``--overwrite``): a typo should not cost a whole run.
    """
    from ghostsolve.pipeline.atomic import check_destination, refuse_existing

    for label in ("report", "plot"):
        path = getattr(args, label, None)
        if path:
            check_destination(path, what=f"the {label}")
    if out is not None:
        refuse_existing(out.absolute(), bool(getattr(args, "overwrite", False)))


def _write_run_report(run: Any, report_path: str | None, extra: Mapping[str, Any]) -> None:
    from ghostsolve.pipeline.report import build_report, write_report

    run.extra.update(extra)
    if report_path:
        write_report(build_report(run), report_path)
        print(f"report: {report_path}")


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
def _cmd_prune(args: argparse.Namespace) -> int:
    from ghostsolve.pipeline.data import batches_from_windows
    from ghostsolve.pipeline.evaluate import perplexity
    from ghostsolve.pipeline.surgery import removal_set

    methods = _methods(args.recover)
    _check_drop_args(args)
    out = Path(args.out) if args.out else None
    _check_outputs(args, out)
    _check_shardable(args)
    model, tokenizer = _load_model(args.model, args)
    seq_len = _seq_len(args, model)
    if args.drop:  # fail on a bad removal set before any sampling or capture
        removal_set(parse_layers(args.drop), int(model.config.num_hidden_layers))
    calib = _shared(args, _calibration_windows, args, model, tokenizer, seq_len)
    drop, selection = _resolve_drop(args, model, batches_from_windows(calib, args.batch_size))
    evalw = _on_main(args, _evaluation_windows, args, model, tokenizer, seq_len)
    dense = _on_main(
        args,
        perplexity,
        model,
        evalw,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        desc="dense",
    )
    run, saved = _run_methods(
        args,
        model=model,
        model_name=args.model,
        drop=drop,
        methods=methods,
        calib_windows=calib,
        eval_windows=evalw,
        dense_ppl=None if dense is None else dense.perplexity,
        save_method=methods[0],
        out_dir=out,
    )

    def finish() -> None:
        from ghostsolve.pipeline.checkpoint import save
        from ghostsolve.pipeline.report import format_table, plot_perplexities

        extra = _extra(args, calib, evalw, dense)
        if selection is not None:
            print(_selection_line(selection))
            extra["selection"] = selection.to_report()
        print(format_table(run))
        if out is not None:
            save(
                saved,
                out,
                overwrite=args.overwrite,
                tokenizer=tokenizer,
                original_model=args.model,
            )
            print(f"saved {methods[0]}: {out}")
        if args.plot:
            plot_perplexities(run, args.plot)
            print(f"plot: {args.plot}")
        _write_run_report(run, args.report, extra)

    _on_main(args, finish)
    return 0


def _selection_line(selection: Any) -> str:
    return (
        f"selection: layers {selection.selected}, strategy {selection.strategy} "
        f"({selection.score_name}, removes the {selection.removes})"
    )


def _extra(args: argparse.Namespace, calib: Any, evalw: Any, dense: Any) -> dict[str, Any]:
    return {
        "order": getattr(args, "order", "independent"),
        "calibration": {
            "source": "text" if args.calib_text else "self",
            "files": list(args.calib_text or []),
            "sequences": int(calib.shape[0]),
            "seq_len": int(calib.shape[1]),
        },
        "evaluation": {
            "source": "text" if args.eval_text else "self",
            "files": list(args.eval_text or []),
            "windows": int(evalw.shape[0]),
            "predicted_tokens": int(dense.n_tokens),
        },
        "seed": int(args.seed),
    }


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from ghostsolve.pipeline.evaluate import lm_eval_tasks, perplexity
    from ghostsolve.pipeline.report import write_report

    _check_outputs(args)
    model, tokenizer = _load_model(args.model, args)
    report: dict[str, Any] = {"model": args.model}
    if args.tasks:
        results = lm_eval_tasks(
            model,
            tokenizer,
            [t for t in args.tasks.split(",") if t.strip()],
            batch_size=args.batch_size,
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            include_path=args.include_path,
        )
        report["tasks"] = results
        for task, metrics in results.items():
            shown = {
                k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
            }
            print(f"{task}: {json.dumps(shown, sort_keys=True)}")
    if args.eval_text or not args.tasks:
        seq_len = _seq_len(args, model)
        windows = _evaluation_windows(args, model, tokenizer, seq_len)
        ppl = perplexity(model, windows, batch_size=args.batch_size, progress=not args.no_progress)
        report.update(
            {
                "seq_len": ppl.seq_len,
                "perplexity": ppl.perplexity,
                "nll": ppl.nll,
                "windows": ppl.n_windows,
                "predicted_tokens": ppl.n_tokens,
                "source": "text" if args.eval_text else "self",
            }
        )
        print(
            f"perplexity {ppl.perplexity:.4f}  (mean NLL {ppl.nll:.5f} over {ppl.n_tokens} tokens, "
            f"{ppl.n_windows} windows of {ppl.seq_len})"
        )
    if args.report:
        write_report(report, args.report)
        print(f"report: {args.report}")
    return 0


def _cmd_diagnose(args: argparse.Namespace) -> int:
    from ghostsolve.pipeline.capture import capture_rows, capture_stats
    from ghostsolve.pipeline.data import batches_from_windows
    from ghostsolve.pipeline.distributed import all_reduce_stats
    from ghostsolve.pipeline.surgery import intervals_of, removal_set

    _check_drop_args(args)
    _check_outputs(args)
    _check_shardable(args)
    model, tokenizer = _load_model(args.model, args)
    seq_len = _seq_len(args, model)
    calib = _shared(args, _calibration_windows, args, model, tokenizer, seq_len)
    batches = batches_from_windows(calib, args.batch_size)
    chosen, selection = _resolve_drop(args, model, batches)
    drop = removal_set(chosen, int(model.config.num_hidden_layers))
    intervals = intervals_of(drop)
    progress = not args.no_progress
    stats = capture_stats(
        model,
        _my_batches(args, batches),
        intervals,
        skip_first_token=args.skip_first_token,
        progress=progress,
    )
    all_reduce_stats(stats)  # a no-op outside torchrun

    def finish() -> None:
        # Raw rows for compare_precisions; each pass stops early, so one per interval costs little.
        rows = {
            iv: capture_rows(
                model, batches, iv, max_rows=args.max_rows, skip_first_token=args.skip_first_token
            )
            for iv in intervals
        }
        report: dict[str, Any] = {"model": args.model, "removed": list(drop), "intervals": {}}
        if selection is not None:
            print(_selection_line(selection))
            report["selection"] = selection.to_report()
        for interval in intervals:
            text, entry = _diagnose_interval(stats[interval], *rows[interval], interval)
            print(text)
            report["intervals"][f"{interval[0]}-{interval[1]}"] = entry
        if args.report:
            from ghostsolve.pipeline.checkpoint import _jsonable
            from ghostsolve.pipeline.report import write_report

            write_report(_jsonable(report), args.report)
            print(f"report: {args.report}")

    _on_main(args, finish)
    return 0


def _diagnose_interval(stats: Any, X: Any, Y: Any, interval: tuple[int, int]) -> tuple[str, dict[str, Any]]:
    """Conditioning (all calibration tokens) and the fp32/fp64 solver table (raw rows) for one boundary."""
    from ghostsolve.diagnostics import compare_precisions, diagnose
    from ghostsolve.pipeline.checkpoint import _jsonable

    head = f"boundary {interval[0]}->{interval[1]} (layers {interval[0]}..{interval[1] - 1} removed)"
    diag = diagnose(stats)
    table = compare_precisions(X, Y)
    entry = {
        "conditioning": _jsonable({k: v for k, v in diag.__dict__.items() if k != "eigenvalues"}),
        "precisions": _jsonable(table.as_dicts()),
        "precision_rows": int(X.shape[0]),
    }
    text = "\n".join(
        [
            head,
            _indent(str(diag)),
            f"  solver stability on {X.shape[0]} tokens:",
            _indent(_indent(str(table))),
        ]
    )
    return text, entry


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


def _cmd_select(args: argparse.Namespace) -> int:
    from ghostsolve.pipeline.data import batches_from_windows
    from ghostsolve.pipeline.select_report import format_selection, run_select_command

    options = _selection_options(args, args.strategy)
    _check_outputs(args)
    model, tokenizer = _load_model(args.model, args)
    seq_len = _seq_len(args, model)
    calib = _shared(args, _calibration_windows, args, model, tokenizer, seq_len)
    batches = batches_from_windows(calib, args.batch_size)

    def run() -> None:
        selection = run_select_command(
            model,
            batches,
            args.strategy,
            args.num_drop,
            report_path=args.report,
            plot_path=args.plot,
            **options,
        )
        print(format_selection(selection))
        if args.plot:
            print(f"plot: {args.plot}")
        if args.report:
            print(f"report: {args.report}")

    # Selection rules have no sharded form: rank 0 scores on every batch while the others wait.
    _on_main(args, run)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ghostsolve.pipeline.checkpoint import atomic_directory, save
    from ghostsolve.pipeline.data import batches_from_windows
    from ghostsolve.pipeline.evaluate import perplexity
    from ghostsolve.pipeline.recover import METHODS
    from ghostsolve.pipeline.report import build_report, format_table, plot_perplexities, write_report
    from ghostsolve.pipeline.select import select_layers
    from ghostsolve.pipeline.surgery import removal_set

    start = time.perf_counter()
    model_dir = Path(args.model) if args.model else DEMO_MODEL_DIR
    if not (model_dir / "config.json").is_file():
        raise GhostsolveError(
            f"the demo model is missing ({model_dir} has no config.json); reinstall ghostsolve, or run "
            "scripts/train_demo_model.py in a source checkout"
        )
    out = Path(args.out)
    _check_outputs(args, out)
    methods = _methods(args.recover) if args.recover else _demo_methods(METHODS)
    if DEMO_SAVED_METHOD not in methods:
        raise GhostsolveError(f"the demo saves the {DEMO_SAVED_METHOD!r} model; keep it in --recover")
    options = {} if args.drop else _selection_options(args, args.select)
    if args.batch_size is None:  # one calibration batch per rank
        args.batch_size = max(1, args.num_calib // _world_size(args))
    _check_shardable(args)
    model, tokenizer = _load_model(str(model_dir), args)
    seq_len = _seq_len(args, model)
    selection = None
    if args.drop:
        drop = list(removal_set(parse_layers(args.drop), int(model.config.num_hidden_layers)))
        rule = "given by --drop"
    calib = _shared(args, _calibration_windows, args, model, tokenizer, seq_len)
    evalw = _on_main(args, _evaluation_windows, args, model, tokenizer, seq_len)
    if not args.drop:
        batches = batches_from_windows(calib, args.batch_size)
        selection = _shared(args, select_layers, model, batches, args.select, args.num_drop, **options)
        drop = list(selection.selected)
        rule = f"strategy {selection.strategy} ({selection.score_name}, removes the {selection.removes})"
    progress = not args.no_progress
    dense = _on_main(
        args, perplexity, model, evalw, batch_size=args.batch_size, progress=progress, desc="dense"
    )
    run, saved = _run_methods(
        args,
        model=model,
        model_name="ghostsolve-demo",
        drop=drop,
        methods=methods,
        calib_windows=calib,
        eval_windows=evalw,
        dense_ppl=None if dense is None else dense.perplexity,
        save_method=DEMO_SAVED_METHOD,
        out_dir=out,
    )

    def finish() -> None:
        run.extra.update(_extra(args, calib, evalw, dense))
        run.extra["selection"] = rule if selection is None else selection.to_report()
        run.extra["demo_model"] = str(model_dir)
        print(f"selection: layers {drop}, {rule}")
        sampled = "sampled from the dense model"
        print(
            f"data: {calib.shape[0]} calibration sequences ({'text' if args.calib_text else sampled}), "
            f"{evalw.shape[0]} evaluation sequences ({'text' if args.eval_text else sampled}), "
            f"{seq_len} tokens each, seed {args.seed}"
        )
        print(format_table(run))
        with atomic_directory(out, overwrite=args.overwrite) as tmp:
            save(
                saved,
                tmp / "model",
                tokenizer=tokenizer,
                original_model="ghostsolve-demo",
                extra={"selection": rule},
            )
            plot_perplexities(run, tmp / "perplexity.png")
            run.extra["wall_seconds"] = round(time.perf_counter() - start, 2)
            report = build_report(run)
            write_report(report, tmp / "report.json")
        if args.report:
            write_report(report, args.report)
        print(f"checkpoint ({DEMO_SAVED_METHOD}): {out / 'model'}")
        print(f"plot: {out / 'perplexity.png'}")
        print(f"report: {args.report or out / 'report.json'}")
        print(f"wall time: {time.perf_counter() - start:.1f} s")

    _on_main(args, finish)
    return 0


def _cmd_convert_llama2c(args: argparse.Namespace) -> int:
    from ghostsolve.pipeline.convert_llama2c import convert_llama2c

    out = convert_llama2c(args.checkpoint, args.tokenizer, args.out, overwrite=args.overwrite)
    print(f"converted: {out}")
    return 0


# ---------------------------------------------------------------------------------------------
# parser
# ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``ghostsolve`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="ghostsolve",
        description="Remove decoder layers from a causal language model and recover it with closed-form "
        "linear operators fitted on a small calibration set.",
        epilog="Start with `ghostsolve demo`: it runs the whole job on a bundled model in about a minute.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    prune = sub.add_parser(
        "prune",
        help="remove layers, fit recoveries, evaluate each, save the first",
        description="Remove decoder layers from MODEL, fit every requested recovery on calibration data "
        "(one capture pass), evaluate each by perplexity, print the table, and save the first method "
        "listed in --recover to --out.",
    )
    prune.add_argument("model", metavar="MODEL", help="a local model directory (or a hub id)")
    drop_group = prune.add_mutually_exclusive_group(required=False)
    drop_group.add_argument(
        "--drop",
        metavar="LAYERS",
        help="0-based layers to remove: 5-7 (both ends included), 3,9 or 3,5-7",
    )
    prune.add_argument(
        "--recover",
        default="ghost,identity",
        metavar="METHODS",
        help="comma-separated recovery methods, the first is saved (default: ghost,identity; identity is "
        "plain pruning)",
    )
    prune.add_argument(
        "--order",
        choices=["independent", "sequential"],
        default="independent",
        help="for several removed intervals: fit each on the dense model's activations (independent) or "
        "on the already recovered model's (sequential)",
    )
    prune.add_argument(
        "--layerwise",
        action="store_true",
        help="keep the model in host memory and capture layer by layer, one decoder layer on --device at a "
        "time (for models larger than the accelerator; sampling and evaluation then run on the CPU; "
        "not for replaceme)",
    )
    prune.add_argument("--plot", metavar="FILE.png", help="also write a bar plot of perplexity per method")
    _add_calibration(prune, required=True)
    _add_evaluation(prune, num_eval_default=None)
    _add_output(prune)
    _add_runtime(prune)
    prune.set_defaults(func=_cmd_prune)

    ev = sub.add_parser(
        "eval",
        help="perplexity (and lm-eval tasks) of a model or checkpoint",
        description="Measure the perplexity of MODEL_OR_DIR (a Hugging Face model or a ghostsolve "
        "checkpoint) and optionally run lm-evaluation-harness tasks on it in memory.",
    )
    ev.add_argument("model", metavar="MODEL_OR_DIR", help="model directory, ghostsolve checkpoint or hub id")
    ev.add_argument(
        "--tasks",
        metavar="TASKS",
        help="comma-separated lm-eval tasks (e.g. arc_easy,hellaswag); needs pip install 'ghostsolve[eval]'",
    )
    ev.add_argument("--num-fewshot", type=int, default=None, help="lm-eval few-shot examples")
    ev.add_argument("--limit", type=float, default=None, help="lm-eval examples per task (quick runs)")
    ev.add_argument("--include-path", metavar="DIR", help="folder of extra (local) lm-eval task YAML files")
    ev.add_argument("--report", metavar="FILE.json", help="write the results as JSON")
    _add_evaluation(
        ev,
        num_eval_default=None,
        self_source="MODEL_OR_DIR itself (seeded; comparable only between runs on the same model)",
    )
    _add_runtime(ev)
    ev.set_defaults(func=_cmd_eval, calib_text=None)

    diag = sub.add_parser(
        "diagnose",
        help="conditioning and fp32/fp64 solver stability per removed boundary",
        description="Capture the boundary statistics of the removal set and print, per boundary, the "
        "conditioning of the calibration activations and the fp32-versus-fp64 solver comparison.",
    )
    diag.add_argument("model", metavar="MODEL", help="a local model directory (or a hub id)")
    diag_drop = diag.add_mutually_exclusive_group(required=True)
    diag_drop.add_argument("--drop", metavar="LAYERS", help="layers to remove: 5-7, 3,9 or 3,5-7")
    diag_drop.add_argument(
        "--select", metavar="STRATEGY", help="choose the layers with a selection strategy; needs --num-drop"
    )
    diag.add_argument("--num-drop", type=_positive, default=None, help="with --select: how many layers")
    _add_strategy_options(diag)
    diag.add_argument("--report", metavar="FILE.json", help="write the diagnostics as JSON")
    diag.add_argument(
        "--max-rows",
        type=_positive,
        default=4096,
        help="calibration tokens used for the fp32/fp64 solver comparison, which refits from raw rows "
        "(default: 4096; conditioning uses every calibration token)",
    )
    diag.add_argument(
        "--seq-len", type=_positive, default=None, help="tokens per calibration window (default: model's)"
    )
    _add_calibration(diag, required=True)
    _add_runtime(diag)
    diag.set_defaults(func=_cmd_diagnose)

    demo = sub.add_parser(
        "demo",
        help="the whole job on the bundled demo model (about a minute on 2 CPU cores)",
        description="Load the bundled demo model (a 12-layer Llama trained on Shakespeare), sample "
        "calibration and evaluation text from it (seeded, disjoint) unless --calib-text/--eval-text are "
        "given, remove a block of layers chosen by a selection rule, run every recovery method, print "
        "the table, and write the plot, the report and the ghost-recovered checkpoint to --out.",
    )
    demo.add_argument(
        "--out",
        default=DEFAULT_DEMO_OUT,
        metavar="DIR",
        help=f"output folder (default: ./{DEFAULT_DEMO_OUT})",
    )
    demo.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    demo.add_argument("--report", metavar="FILE.json", help="also write the JSON report here")
    demo.add_argument(
        "--num-drop",
        type=_positive,
        default=DEMO_NUM_DROP,
        help=f"layers to remove, chosen by --select (default: {DEMO_NUM_DROP})",
    )
    demo.add_argument(
        "--select",
        default=DEMO_STRATEGY,
        metavar="STRATEGY",
        help=f"selection strategy (see `ghostsolve select --help`; default: {DEMO_STRATEGY}, the block "
        "whose ghost fit leaves the smallest residual)",
    )
    demo.add_argument("--drop", metavar="LAYERS", help="remove these layers instead of selecting (e.g. 5-6)")
    demo.add_argument(
        "--recover",
        default=None,
        metavar="METHODS",
        help="comma-separated methods to run (default: every method; must include ghost)",
    )
    demo.add_argument(
        "--order", choices=["independent", "sequential"], default="independent", help="fitting order"
    )
    demo.add_argument("--model", help=argparse.SUPPRESS)  # another demo-sized model, for tests
    source = demo.add_argument_group("data").add_mutually_exclusive_group()
    source.add_argument(
        "--calib-text", nargs="+", metavar="FILE", help="calibrate on text instead of samples"
    )
    source.add_argument("--calib", choices=["self"], help="self-sampled calibration (the default)")
    demo.add_argument(
        "--num-calib",
        type=_positive,
        default=DEMO_NUM_CALIB,
        help=f"calibration sequences (default: {DEMO_NUM_CALIB})",
    )
    demo.add_argument(
        "--skip-first-token", action="store_true", help="exclude the BOS position from the statistics"
    )
    _add_evaluation(demo, num_eval_default=DEMO_NUM_EVAL, seq_len_default=DEMO_SEQ_LEN)
    _add_runtime(demo, batch_size=None, threads=1)
    demo.set_defaults(func=_cmd_demo)

    conv = sub.add_parser(
        "convert-llama2c",
        help="convert a llama2.c checkpoint and tokenizer to a Hugging Face Llama directory",
        description="Convert a llama2.c checkpoint (.bin) and its tokenizer (.bin) into a Hugging Face "
        "Llama model directory with a fast tokenizer.",
    )
    conv.add_argument("checkpoint", metavar="CHECKPOINT", help="llama2.c model file, e.g. stories260K.bin")
    conv.add_argument("tokenizer", metavar="TOKENIZER", help="llama2.c tokenizer file, e.g. tok512.bin")
    conv.add_argument("--out", required=True, metavar="DIR", help="output directory")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    conv.add_argument("--traceback", action="store_true", help="on error, show the full traceback")
    conv.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    conv.set_defaults(func=_cmd_convert_llama2c)

    _add_selection_commands(sub, prune, drop_group)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ghostsolve")
    except PackageNotFoundError:
        return "unknown"


_MODEL_EXTRA = {"transformers", "safetensors", "tokenizers", "accelerate", "matplotlib"}


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, ImportError) and (exc.name or "").split(".")[0] in _MODEL_EXTRA:
        return (
            f"{exc.name} is not installed; the command line needs the model extra: "
            "pip install 'ghostsolve[model]'"
        )
    text = " ".join(str(exc).split())
    if not isinstance(exc, GhostsolveError):
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text


def _join_torchrun(args: argparse.Namespace, stack: contextlib.ExitStack) -> Any:
    """Join torchrun's process group (a single-process context without torchrun) and keep every rank but
    0 quiet: no stdout, no progress bars, log lines marked with the rank."""
    from ghostsolve.pipeline.distributed import init_distributed

    ctx = init_distributed()
    args.dist = ctx
    if ctx.world_size > 1:
        for handler in logging.getLogger("ghostsolve").handlers:
            handler.setFormatter(logging.Formatter(f"ghostsolve[rank {ctx.rank}]: %(message)s"))
    if not ctx.is_main:
        args.no_progress = True
        stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
    return ctx


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``ghostsolve`` command line; returns the exit status (0 ok, 2 error, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed by argparse)
        return int(exc.code) if isinstance(exc.code, int) else _EXIT_ERROR
    _configure_logging(args)
    func: Callable[[argparse.Namespace], int] = args.func
    ctx = None
    threads = getattr(args, "threads", None)
    previous_threads = None
    if threads is not None:
        import torch

        previous_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
    try:
        with contextlib.ExitStack() as stack:
            if args.command in _DISTRIBUTED_COMMANDS:
                ctx = _join_torchrun(args, stack)
            return func(args)
    except KeyboardInterrupt:
        print("ghostsolve: interrupted", file=sys.stderr)
        return 130
    except (GhostsolveError, OSError, ValueError, RuntimeError, ImportError) as exc:
        if getattr(args, "traceback", False) or os.environ.get("GHOSTSOLVE_TRACEBACK"):
            raise
        where = f" (rank {ctx.rank})" if ctx is not None and ctx.world_size > 1 else ""
        print(f"ghostsolve: error{where}: {_one_line(exc)}", file=sys.stderr)
        return _EXIT_ERROR
    finally:
        if ctx is not None:
            from ghostsolve.pipeline.distributed import destroy_distributed

            destroy_distributed(ctx)
        if previous_threads is not None:
            import torch

            torch.set_num_threads(previous_threads)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
