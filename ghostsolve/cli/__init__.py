"""The ``ghostsolve`` command line: prune, eval, diagnose, demo, select, convert-gguf, convert-llama2c.

Every command prints its results table on stdout, progress bars and log messages on stderr. Errors are a
single line ``ghostsolve: error: ...`` on stderr with exit status 2 (``--traceback`` shows the full traceback
instead). ``main(argv)`` runs in-process and returns the exit status.

``prune``, ``demo``, ``select`` and ``diagnose`` also run under ``torchrun`` (data-parallel calibration,
:mod:`ghostsolve.pipeline.distributed`): every rank holds the model and the same calibration windows (computed
on rank 0 and broadcast), captures statistics on its shard of the batches, and rank 0 alone samples, selects,
evaluates, prints and writes.

The package is three modules: :mod:`.args` (reading values), :mod:`.parser` (flags and help) and
:mod:`.commands` (one thin function per command, calling :mod:`ghostsolve.workflows`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from ghostsolve.cli.args import parse_layers
from ghostsolve.cli.parser import build_parser
from ghostsolve.errors import GhostsolveError

__all__ = ["build_parser", "main", "parse_layers"]

_EXIT_ERROR = 2
_DISTRIBUTED_COMMANDS = frozenset({"prune", "demo", "select", "diagnose"})
_MODEL_EXTRA = {"transformers", "safetensors", "tokenizers", "accelerate", "matplotlib"}


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


def _show_warning(message: Warning | str, category: type[Warning], *_args: Any, **_kwargs: Any) -> None:
    # An application's warnings: one line each, like its errors, not a source location and a traceback line.
    print(f"ghostsolve: warning: {' '.join(str(message).split())}", file=sys.stderr)


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
    """Join torchrun's process group (a single-process context without torchrun) and keep every rank but 0
    quiet: no stdout, no progress bars, log lines marked with the rank."""
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
    # The command line as typed, for the reports' provenance.
    args.argv = ["ghostsolve", *(sys.argv[1:] if argv is None else list(argv))]
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
            stack.enter_context(warnings.catch_warnings())
            warnings.showwarning = _show_warning
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
