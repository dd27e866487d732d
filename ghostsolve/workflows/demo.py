"""The demo workflow: the whole job on the bundled demo model, with every method — ``ghostsolve demo``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.data import calibration_windows, evaluation_windows
from ghostsolve.pipeline.distributed import DistributedContext, broadcast_from_main, run_on_main
from ghostsolve.pipeline.io.atomic import atomic_directory, refuse_existing
from ghostsolve.pipeline.io.checkpoint import load, load_tokenizer, save
from ghostsolve.pipeline.recover import METHODS
from ghostsolve.workflows.prune import prune
from ghostsolve.workflows.results import PruneResult

__all__ = [
    "DEFAULT_DEMO_OUT",
    "DEMO_MODEL_DIR",
    "DEMO_NUM_CALIB",
    "DEMO_NUM_DROP",
    "DEMO_NUM_EVAL",
    "DEMO_SAVED_METHOD",
    "DEMO_SEQ_LEN",
    "DEMO_STRATEGY",
    "demo",
    "demo_methods",
]

DEMO_MODEL_DIR = Path(__file__).resolve().parents[1] / "demo_model"
DEFAULT_DEMO_OUT = "ghostsolve-demo-out"
DEMO_SAVED_METHOD = "ghost"
# The bundled model has hidden size 128 and 256 positions. 32 calibration sequences of 128 tokens give 4,064
# rows per boundary (32x the hidden size: every family is well determined), and the same again for evaluation
# keeps self-sampling and a dozen evaluations around a minute on 2 CPU cores.
DEMO_NUM_CALIB = 32
DEMO_NUM_EVAL = 32
DEMO_SEQ_LEN = 128
DEMO_NUM_DROP = 2
# The block whose ghost fit leaves the smallest residual: one capture pass, and the block that the recovery it
# demonstrates can best replace.
DEMO_STRATEGY = "recoverable"


def demo_methods(methods: Sequence[str] = METHODS) -> list[str]:
    """Every method once: ``full`` is dropped when ``ghost`` (the same unconstrained fit) is present."""
    return [m for m in methods if not (m == "full" and "ghost" in methods)]


def demo(
    out: str | Path = DEFAULT_DEMO_OUT,
    *,
    overwrite: bool = False,
    drop: Sequence[int] | None = None,
    select: str = DEMO_STRATEGY,
    num_drop: int = DEMO_NUM_DROP,
    select_options: dict[str, Any] | None = None,
    methods: Sequence[str] | None = None,
    order: str = "independent",
    calibration: Sequence[str | Path] | Literal["self"] = "self",
    num_calib: int = DEMO_NUM_CALIB,
    evaluation: Sequence[str | Path] | Literal["self"] = "self",
    num_eval: int = DEMO_NUM_EVAL,
    seq_len: int = DEMO_SEQ_LEN,
    seed: int = 0,
    batch_size: int | None = None,
    skip_first_token: bool = False,
    progress: bool = True,
    model_dir: str | Path | None = None,
    distributed: DistributedContext | None = None,
) -> PruneResult:
    """Run :func:`~ghostsolve.workflows.prune` on the bundled demo model and write ``out``.

    ``out`` receives ``model/`` (the ghost-recovered checkpoint), ``perplexity.png`` and ``report.json``,
    written together atomically. Calibration and evaluation text are sampled from the dense model itself
    (seeded, disjoint streams) unless text files are given. ``batch_size`` defaults to one batch per rank.

    Raises
    ------
    GhostsolveError
        A missing demo model, an existing ``out`` without ``overwrite``, a method list without ``ghost``; as
        :func:`~ghostsolve.workflows.prune`.
    """
    start = time.perf_counter()
    folder = Path(model_dir) if model_dir is not None else DEMO_MODEL_DIR
    if not (folder / "config.json").is_file():
        raise GhostsolveError(
            f"the demo model is missing ({folder} has no config.json); reinstall ghostsolve, or run "
            "scripts/train_demo_model.py in a source checkout"
        )
    refuse_existing(Path(out).absolute(), overwrite)
    methods = list(methods) if methods is not None else demo_methods()
    if DEMO_SAVED_METHOD not in methods:
        raise GhostsolveError(f"the demo saves the {DEMO_SAVED_METHOD!r} model; keep it in the methods")
    world = 1 if distributed is None else distributed.world_size
    batch_size = batch_size or max(1, num_calib // world)
    model, tokenizer = load(folder), load_tokenizer(folder)
    calib = broadcast_from_main(calibration_windows, model, tokenizer, calibration, n_windows=num_calib,
                                seq_len=seq_len, seed=seed, batch_size=batch_size,
                                progress=progress)  # fmt: skip
    evalw = run_on_main(evaluation_windows, model, tokenizer, evaluation, n_windows=num_eval, seq_len=seq_len,
                        seed=seed, batch_size=batch_size, progress=progress)  # fmt: skip
    result = prune(
        model, tokenizer, calibration=calib, evaluation=evalw, drop=drop, select=None if drop else select,
        num_drop=None if drop else num_drop, select_options=select_options, methods=methods, order=order,
        skip_first_token=skip_first_token, batch_size=batch_size, save_method=DEMO_SAVED_METHOD,
        model_name="ghostsolve-demo", progress=progress, distributed=distributed,
        extra={"demo_model": str(folder), "seed": seed, "order": order,
               "calibration": _describe(calibration, calib), "evaluation": _describe(evaluation, evalw)},
    )  # fmt: skip
    result.saved = DEMO_SAVED_METHOD
    run_on_main(_write_demo_folder, result, Path(out), overwrite, tokenizer, start)
    return result


def _describe(source: Any, windows: Any) -> dict[str, Any]:
    shape = (0, 0) if windows is None else tuple(windows.shape)
    text = source != "self"
    return {"source": "text" if text else "self", "files": [str(p) for p in source] if text else [],
            "sequences": int(shape[0]), "seq_len": int(shape[1])}  # fmt: skip


def _write_demo_folder(result: PruneResult, out: Path, overwrite: bool, tokenizer: Any, start: float) -> None:
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save(result.recovery, tmp / "model", tokenizer=tokenizer, original_model="ghostsolve-demo")
        result.plot(tmp / "perplexity.png")
        result.timings["total"] = round(time.perf_counter() - start, 3)
        result.write_report(tmp / "report.json")
