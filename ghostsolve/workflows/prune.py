"""The prune workflow: select → evaluate the dense model → recover with every method → evaluate each → save.

What ``ghostsolve prune`` does, as one library call. Everything that can be checked is checked before any work
(methods, removal set or strategy, orders, capture, output directory); the calibration set is captured once
for every method (and not again after a selection rule that captured it already); one recovered model is held
at a time; the wall time of every stage is recorded.

Under torchrun pass the :class:`~ghostsolve.pipeline.distributed.DistributedContext`: every rank holds the
model and the same windows, captures statistics on its own shard of the calibration batches (summed across
ranks), and rank 0 alone selects, evaluates and saves; every rank returns the same :class:`PruneResult`
layout, with the evaluations on rank 0 only.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ghostsolve.adapters import get_adapter
from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.capture import StatsSpec, make_engine
from ghostsolve.pipeline.data import batches_from_windows
from ghostsolve.pipeline.distributed import (
    DistributedContext,
    broadcast_from_main,
    run_on_main,
    shard_batches,
)
from ghostsolve.pipeline.evaluate import perplexity
from ghostsolve.pipeline.io.atomic import refuse_existing
from ghostsolve.pipeline.io.checkpoint import save
from ghostsolve.pipeline.model.surgery import intervals_of, removal_set
from ghostsolve.pipeline.recover import (
    ORDERS,
    FitSettings,
    get_method,
    iter_recoveries,
    stats_spec,
    validate_method,
)
from ghostsolve.pipeline.select import STRATEGIES, Selection, select_layers
from ghostsolve.workflows.results import MethodResult, PruneResult, provenance

__all__ = ["check_request", "prune", "select_on_main"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class _Clock:
    """Wall seconds per stage of one workflow run."""

    started: float = dataclasses.field(default_factory=time.perf_counter)
    stages: dict[str, float] = dataclasses.field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds

    def timed(self, stage: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        tic = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.add(stage, time.perf_counter() - tic)

    def summary(self) -> dict[str, float]:
        return {**{k: round(v, 3) for k, v in self.stages.items()},
                "total": round(time.perf_counter() - self.started, 3)}  # fmt: skip


#: The workflows' ridge when none is given: cross-validated (docs/crossval.md has the measurements). The
#: library's ``recover`` and ``fit`` keep ridge 0, the exact optimum, as their default.
DEFAULT_RIDGE: str = "cv"


def check_request(
    model: nn.Module, *, methods: Sequence[str], drop: Sequence[int] | None, select: str | None,
    num_drop: int | None, order: str, out: str | Path | None, overwrite: bool, model_name: str | None = None,
) -> None:  # fmt: skip
    """Every check that needs no data, so that a bad request fails before any capture or sampling.

    Raises
    ------
    GhostsolveError
        Unknown method, order or strategy; a removal given twice or not at all; an invalid removal set; a
        method that cannot serve the removal set or the architecture; an existing output without
        ``overwrite``; an output that is, contains or lies inside the model's own directory (its
        ``_name_or_path`` or ``model_name``).
    """
    if not methods:
        raise GhostsolveError("no recovery methods given; give method names such as ghost,identity")
    for name in methods:
        get_method(name)
    if order not in ORDERS:
        raise GhostsolveError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
    adapter = get_adapter(model)
    num_layers = len(adapter.layers(model))
    if (drop is None) == (select is None):
        raise GhostsolveError(
            "give the layers to remove either as drop=[...] or as select=STRATEGY with "
            "num_drop"
        )
    if drop is not None:
        intervals = intervals_of(removal_set(drop, num_layers))
    else:
        if select not in STRATEGIES:
            raise GhostsolveError(
                f"unknown selection strategy {select!r}; choose one of "
                f"{', '.join(STRATEGIES)}"
            )
        if num_drop is None:
            raise GhostsolveError(f"select={select!r} needs num_drop: how many layers to remove")
        intervals = []
    for name in methods:
        validate_method(name, adapter, intervals)
    if out is not None:
        source = getattr(getattr(model, "config", None), "_name_or_path", None)
        refuse_existing(Path(out).absolute(), overwrite, inputs=(source, model_name))


def select_on_main(
    model: nn.Module,
    batches: list[Any],
    select: str,
    num_drop: int,
    options: Mapping[str, Any],
    distributed: DistributedContext | None,
    keep_stats: StatsSpec | None = None,
) -> Selection:
    """The selection, made on rank 0 and sent to every rank (a plain call in one process). ``keep_stats``: the
    statistics the recovery will need, captured by the selection pass where the rule can (one process only:
    the statistics are far larger than the choice, so other ranks capture their own shards instead)."""
    shared = distributed is not None and distributed.world_size > 1
    selection: Selection = broadcast_from_main(_selection_on_main, model, batches, select, num_drop,
                                               dict(options), None if shared else keep_stats)  # fmt: skip
    return selection


def _selection_on_main(model: nn.Module, batches: list[Any], select: str, num_drop: int,
                       options: dict[str, Any], keep_stats: StatsSpec | None) -> Selection:  # fmt: skip
    selection = select_layers(model, batches, select, num_drop, keep_stats=keep_stats, **options)
    # Without keep_stats (under torchrun) nothing is handed on: the statistics would travel to every rank.
    return selection if keep_stats is not None else dataclasses.replace(selection, stats={})


def _evaluate(
    model: nn.Module, windows: torch.Tensor | None, batch_size: int, progress: bool, desc: str
) -> Any:
    """Perplexity on rank 0 (None without windows). Every rank calls this: the others wait at its collective,
    also when only rank 0 holds the windows."""

    def on_main() -> Any:
        if windows is None:
            return None
        return perplexity(model, windows, batch_size=batch_size, progress=progress, desc=desc)

    return run_on_main(on_main)


def prune(
    model: nn.Module,
    tokenizer: Any = None,
    *,
    calibration: torch.Tensor,
    evaluation: torch.Tensor | None = None,
    drop: Sequence[int] | None = None,
    select: str | None = None,
    num_drop: int | None = None,
    select_options: Mapping[str, Any] | None = None,
    methods: Sequence[str] = ("ghost", "identity"),
    order: str = "independent",
    capture: str = "hooks",
    device: torch.device | str | None = None,
    ridge: float | str | None = None,
    solver: str = "auto",
    rank: int | str | None = None,
    skip_first_token: bool = False,
    compute_dtype: torch.dtype | None = None,
    product_dtype: torch.dtype | None = None,
    batch_size: int = 8,
    out: str | Path | None = None,
    overwrite: bool = False,
    save_method: str | None = None,
    model_name: str | None = None,
    extra: Mapping[str, Any] | None = None,
    command: Sequence[str] | None = None,
    data_files: Sequence[str | Path] = (),
    progress: bool = True,
    distributed: DistributedContext | None = None,
) -> PruneResult:
    """Remove layers from ``model``, recover them with every method in ``methods``, evaluate, and save one.

    Parameters
    ----------
    model : transformers PreTrainedModel
        A causal LM with an adapter; not modified (every method works on its own copy).
    tokenizer : transformers tokenizer, optional
        Saved beside the checkpoint.
    calibration : (n_windows, seq_len) torch.long
        Calibration token windows (:func:`ghostsolve.pipeline.data.calibration_windows` builds them from text
        or by sampling the model).
    evaluation : (n_windows, seq_len) torch.long, optional
        Evaluation windows; without them nothing is evaluated (perplexities are None).
    drop : sequence of int, optional
        0-based layers to remove. Exactly one of ``drop`` and ``select`` must be given.
    select, num_drop, select_options
        A selection strategy (a key of :data:`~ghostsolve.pipeline.select.STRATEGIES`), how many layers it
        removes, and its options; it scores the model on the calibration windows.
    methods : sequence of str
        Recovery methods (:data:`~ghostsolve.pipeline.recover.METHODS`), run in order; the first is saved
        unless ``save_method`` says otherwise.
    ridge : float, "cv" or "gcv", optional
        Relative ridge of the least-squares fits. Default (None): :data:`DEFAULT_RIDGE`, ``"cv"`` — 5-fold
        cross-validation over whole calibration sequences, chosen because it measured never worse than
        ridge 0 beyond seed noise and much better with few calibration tokens (docs/crossval.md); pass 0
        for the unregularised optimum of :func:`ghostsolve.pipeline.recover.recover`. With a single
        calibration window (no second fold of whole sequences) the default is ``"gcv"``.
    order, capture, device, solver, rank, skip_first_token, compute_dtype, product_dtype
        As :func:`ghostsolve.pipeline.recover.recover` (``rank="cv"`` chooses the rank by cross-validation).
    batch_size : int
        Windows per forward pass, for calibration and evaluation.
    out : path, optional
        Write the checkpoint of ``save_method`` here (atomically); ``overwrite`` replaces an existing one.
    model_name : str, optional
        Recorded as the dense model's name (default: its ``_name_or_path``).
    extra : mapping, optional
        More entries for the report.
    command, data_files
        Recorded in the report's and the checkpoint's ``provenance`` (with the versions and the time): the
        command line that ran, and the text files the windows came from (each with its sha256).
    progress : bool
        Show progress bars.
    distributed : DistributedContext, optional
        Under torchrun (see the module docstring).

    Returns
    -------
    PruneResult

    Raises
    ------
    GhostsolveError
        Any invalid request (see :func:`check_request`), before any work; as the selection, recovery,
        evaluation and save steps.
    """
    save_method = save_method or methods[0]
    if ridge is None:
        # Folds are whole sequences: one calibration window leaves no second fold, so GCV stands in.
        ridge = DEFAULT_RIDGE if len(calibration) >= 2 else "gcv"
    check_request(model, methods=methods, drop=drop, select=select, num_drop=num_drop, order=order, out=out,
                  overwrite=overwrite, model_name=model_name)  # fmt: skip
    make_engine(capture, device=device)  # an unknown capture or a device with hooks fails here
    clock = _Clock()
    batches = batches_from_windows(calibration, batch_size)
    selection = None
    if select is not None:
        assert num_drop is not None
        keep = None
        same_rows = (select_options or {}).get("skip_first_token", False) == skip_first_token
        if same_rows and "replaceme" not in methods:
            # The block rules' own pass captures what the recovery needs: it makes no second pass.
            settings = FitSettings(ridge, solver, rank, compute_dtype)
            keep = stats_spec(methods, settings, product_dtype=product_dtype)
        selection = clock.timed("selection", select_on_main, model, batches, select, num_drop,
                                select_options or {}, distributed, keep)  # fmt: skip
        drop = list(selection.selected)
    assert drop is not None
    dense = clock.timed("evaluation", _evaluate, model, evaluation, batch_size, progress, "dense")
    mine = batches if distributed is None or distributed.world_size == 1 else shard_batches(
        batches, distributed.rank, distributed.world_size)  # fmt: skip
    results, kept = _recover_and_evaluate(
        model, drop, mine, methods, clock, evaluation, batch_size, progress, save_method,
        stats=selection.stats if selection is not None else None, order=order, capture=capture, device=device,
        ridge=ridge, solver=solver, rank=rank, skip_first_token=skip_first_token, compute_dtype=compute_dtype,
        product_dtype=product_dtype, distributed=distributed,
    )  # fmt: skip
    name = model_name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or "model")
    origin = run_on_main(provenance, command, data_files) or {}
    if out is not None and kept is not None:
        clock.timed("save", run_on_main, save, kept, out, overwrite=overwrite, tokenizer=tokenizer,
                    original_model=name, extra={"provenance": origin})  # fmt: skip
    result = PruneResult(
        model=name, removed=sorted(drop), seq_len=int(evaluation.shape[1]) if evaluation is not None else 0,
        dense_perplexity=None if dense is None else dense.perplexity, methods=results,
        saved=save_method if out is not None else None, recovery=kept, selection=selection,
        timings=clock.summary(), extra={**dict(extra or {}), "provenance": origin},
    )  # fmt: skip
    for text in result.warnings():
        logger.warning("%s", text)
    return result


def _recover_and_evaluate(
    model: nn.Module, drop: Sequence[int], batches: list[Any], methods: Sequence[str], clock: _Clock,
    evaluation: torch.Tensor | None, batch_size: int, progress: bool, save_method: str, **options: Any,
) -> tuple[dict[str, MethodResult], Any]:  # fmt: skip
    """Every method from one shared capture, each evaluated as it comes; the recovery of ``save_method``."""
    results: dict[str, MethodResult] = {}
    kept = None
    shared = 0.0
    for name, recovery in iter_recoveries(model, drop, batches, methods, progress=progress, **options):
        # The shared capture pass is counted in every method that used it: count it once.
        if recovery.shared_capture:
            shared = recovery.capture_seconds
        else:
            clock.add("capture", recovery.capture_seconds)
        clock.add("fit", recovery.fit_seconds)
        ppl = clock.timed("evaluation", _evaluate, recovery.model, evaluation, batch_size, progress, name)
        results[name] = MethodResult.of(recovery, None if ppl is None else ppl.perplexity)
        if name == save_method:
            kept = recovery
        logger.info("%s: perplexity %s, relative residual %s", name, results[name].perplexity,
                    results[name].relative_residual)  # fmt: skip
    clock.add("capture", shared)
    return results, kept
