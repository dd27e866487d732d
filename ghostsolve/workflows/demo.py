"""The demo workflow: the whole job on the bundled demo model, with every method — ``ghostsolve demo``."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from ghostsolve.adapters import get_adapter
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
    "DEMO_DROP_FRACTION",
    "DEMO_MODEL_DIR",
    "DEMO_NUM_CALIB",
    "DEMO_NUM_EVAL",
    "DEMO_SAVED_METHOD",
    "DEMO_SEQ_LEN",
    "default_demo_drop",
    "demo",
    "demo_methods",
]

logger = logging.getLogger(__name__)

DEMO_MODEL_DIR = Path(__file__).resolve().parents[1] / "demo_model"
DEFAULT_DEMO_OUT = "ghostsolve-demo-out"
DEMO_SAVED_METHOD = "ghost"
# The bundled model has hidden size 128 and 256 positions. 32 calibration sequences of 128 tokens give 4,064
# rows per boundary (32x the hidden size: every family is well determined), and the same again for evaluation
# keeps self-sampling and a dozen evaluations around a minute on 2 CPU cores.
DEMO_NUM_CALIB = 32
DEMO_NUM_EVAL = 32
DEMO_SEQ_LEN = 128
# The default removal: the last third of the layers (8-11 of the bundled model's 12). Plain pruning breaks the
# model there (about 2.8x the dense perplexity) while those layers stay close to a linear map of their input,
# so the ghost operator wins back about two thirds of the loss and is the best method of all — what the demo
# is for. Every selection rule picks middle layers of this model instead, where no method recovers more than a
# third (docs/demo_model.md has the measurements); --select and --num-drop run one anyway.
DEMO_DROP_FRACTION = 1 / 3


def demo_methods(methods: Sequence[str] = METHODS) -> list[str]:
    """Every method once: ``full`` is dropped when ``ghost`` (the same unconstrained fit) is present."""
    return [m for m in methods if not (m == "full" and "ghost" in methods)]


def default_demo_drop(num_layers: int) -> list[int]:
    """The demo's removal when none is given: the last ``⌊L · DEMO_DROP_FRACTION⌋`` layers (at least one)."""
    count = max(1, int(num_layers * DEMO_DROP_FRACTION))
    return list(range(num_layers - count, num_layers))


def demo(
    out: str | Path = DEFAULT_DEMO_OUT,
    *,
    overwrite: bool = False,
    drop: Sequence[int] | None = None,
    select: str | None = None,
    num_drop: int | None = None,
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
    **prune_options: Any,
) -> PruneResult:
    """Run :func:`~ghostsolve.workflows.prune` on the bundled demo model and write ``out``.

    The layers removed are ``drop``, or those a ``select`` strategy chooses (``num_drop`` of them), or by
    default the last third (:func:`default_demo_drop`). ``out`` receives ``model/`` (the ghost-recovered
    checkpoint), ``perplexity.png`` and ``report.json``, written together atomically. Calibration and
    evaluation text are sampled from the dense model itself (seeded, disjoint streams) unless text files are
    given. ``batch_size`` defaults to one batch per rank.

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
    refuse_existing(Path(out).absolute(), overwrite, inputs=(folder, *_files_of(calibration),
                                                             *_files_of(evaluation)))  # fmt: skip
    methods = list(methods) if methods is not None else demo_methods()
    if DEMO_SAVED_METHOD not in methods:
        raise GhostsolveError(f"the demo saves the {DEMO_SAVED_METHOD!r} model; keep it in the methods")
    world = 1 if distributed is None else distributed.world_size
    batch_size = batch_size or max(1, num_calib // world)
    model, tokenizer = load(folder), load_tokenizer(folder)
    removal = "given by --drop" if drop is not None else None
    if drop is None and select is None:
        drop = default_demo_drop(len(get_adapter(model).layers(model)))
        removal = "the last third of the layers (the demo's default)"
    calib = broadcast_from_main(calibration_windows, model, tokenizer, calibration, n_windows=num_calib,
                                seq_len=seq_len, seed=seed, batch_size=batch_size,
                                progress=progress)  # fmt: skip
    evalw = run_on_main(evaluation_windows, model, tokenizer, evaluation, n_windows=num_eval, seq_len=seq_len,
                        seed=seed, batch_size=batch_size, progress=progress)  # fmt: skip
    result = prune(
        model, tokenizer, calibration=calib, evaluation=evalw, drop=drop, select=select,
        num_drop=num_drop if select is not None else None, select_options=select_options, methods=methods,
        order=order,
        skip_first_token=skip_first_token, batch_size=batch_size, save_method=DEMO_SAVED_METHOD,
        model_name="ghostsolve-demo", progress=progress, distributed=distributed, **prune_options,
        extra={"demo_model": str(folder), "seed": seed, "order": order, "removal": removal,
               "calibration": _describe(calibration, calib), "evaluation": _describe(evaluation, evalw)},
    )  # fmt: skip
    result.saved = DEMO_SAVED_METHOD
    for text in result.warnings():
        logger.warning("%s", text)
    run_on_main(_write_demo_folder, result, Path(out), overwrite, tokenizer, start)
    return result


def _files_of(source: Any) -> list[str]:
    return [] if source == "self" else [str(p) for p in source]


def _describe(source: Any, windows: Any) -> dict[str, Any]:
    shape = (0, 0) if windows is None else tuple(windows.shape)
    text = source != "self"
    return {"source": "text" if text else "self", "files": [str(p) for p in source] if text else [],
            "sequences": int(shape[0]), "seq_len": int(shape[1])}  # fmt: skip


def _write_demo_folder(result: PruneResult, out: Path, overwrite: bool, tokenizer: Any, start: float) -> None:
    with atomic_directory(out, overwrite=overwrite) as tmp:
        save(result.recovery, tmp / "model", tokenizer=tokenizer, original_model="ghostsolve-demo",
             extra={"provenance": result.extra.get("provenance")})  # fmt: skip
        result.plot(tmp / "perplexity.png")
        result.timings["total"] = round(time.perf_counter() - start, 3)
        result.write_report(tmp / "report.json")
