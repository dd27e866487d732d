"""Recovery: remove layers, fit one map per removed interval, insert or fold it.

A removal set (0-based, contiguous or not) is split into maximal intervals ``(start, end)``; each gets one map
fitted on calibration statistics (``Y ≈ X W``, ``W = I + M``, row vectors; ``X`` the stream entering
``start``, ``Y`` the stream entering ``end``) by a method of :mod:`ghostsolve.pipeline.recover.methods`.

Orders. ``"independent"`` fits every interval on the dense model's activations: one capture for every
interval and every method. ``"sequential"`` fits interval ``k`` with ``X`` read from the model already pruned
and recovered up to interval ``k − 1`` and ``Y`` from the dense model, so later maps also correct the error
left by earlier ones: the two-stream pass (:class:`~ghostsolve.pipeline.capture.plan.PrunedStream`), one per
method, at most two passes of the model each whatever the number of intervals.

Captures. ``"hooks"`` runs the model where it sits; ``"layerwise"`` onloads one decoder layer at a time to an
execution device. Every method works in every order with either.

Torchrun. Statistics are summed across ranks only when a
:class:`~ghostsolve.pipeline.distributed.DistributedContext` is passed (then every rank passes its own shard
of the batches); without one no collective runs, even inside a process group.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ghostsolve.adapters import ModelAdapter, get_adapter
from ghostsolve.errors import GhostsolveError
from ghostsolve.families import stats_features
from ghostsolve.fit import Fit
from ghostsolve.pipeline.capture import (
    CAPTURES,
    BoundaryStats,
    Consumer,
    Engine,
    IntervalStats,
    PrunedStream,
    ReplaceMeStats,
    StatsSpec,
    StreamMap,
    make_engine,
    run_capture,
)
from ghostsolve.pipeline.distributed import DistributedContext, all_reduce_stats
from ghostsolve.pipeline.model.batches import CalibrationBatch, as_batches
from ghostsolve.pipeline.model.ghosted import make_ghosted
from ghostsolve.pipeline.model.surgery import Interval, ghost_layout, intervals_of, removal_set, remove_layers
from ghostsolve.pipeline.recover.methods import (
    METHODS,
    ORDERS,
    Cut,
    FitSettings,
    Method,
    check_calibration_size,
    get_method,
    validate_method,
)

__all__ = ["CAPTURES", "Recovery", "iter_recoveries", "recover", "recover_all", "stats_spec"]

logger = logging.getLogger(__name__)


@dataclass
class Recovery:
    """A pruned and recovered model and how it was obtained.

    Attributes
    ----------
    model : nn.Module
        The pruned, recovered model (a deep copy of the input unless ``inplace=True``). With ghost operators
        it is a ``Ghostsolve<Base>ForCausalLM`` (a subclass of the input's class; see
        :mod:`ghostsolve.pipeline.model.ghosted`) whose operators are submodules (see :func:`ghost_layout`).
    removed : tuple of int
        Removed layer indices in the original numbering, sorted.
    intervals : list of (start, end)
        Maximal removed intervals, ``end`` exclusive, original numbering.
    fits : dict
        ``(start, end) -> Fit`` of the fitted map (``W = αI`` for Prune&Comp, ``T`` for ReplaceMe — those are
        folded, so no ghost module holds them), or None for plain pruning.
    method, order : str
    relative_residuals : dict
        ``(start, end) -> ‖X_eff W − Y‖² / ‖Y − X‖²`` on the calibration tokens: the boundary residual the
        inserted (or folded) map leaves, relative to plain pruning's (so 1 for ``identity``).
    fit_seconds : float
        Wall time spent in the solver(s).
    capture_seconds : float
        Wall time of the capture passes this recovery used.
    shared_capture : bool
        Whether that was the dense pass shared by every method fitted in independent order (so its time is
        counted in each of them).
    warnings : list of str
        What the fits warned of (e.g. a calibration set too small for the operator), also issued as
        :class:`~ghostsolve.errors.CalibrationWarning`.
    """

    model: nn.Module
    removed: tuple[int, ...]
    intervals: list[Interval]
    fits: dict[Interval, Fit | None]
    method: str
    order: str
    relative_residuals: dict[Interval, float] = field(default_factory=dict)
    fit_seconds: float = 0.0
    capture_seconds: float = 0.0
    shared_capture: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def layout(self) -> list[dict[str, Any]]:
        """Where the ghost operators sit in :attr:`model` (see :func:`ghost_layout`)."""
        return ghost_layout(self.model)


@dataclass
class _Job:
    """Everything validated before any work: the plan of one call of :func:`iter_recoveries`."""

    model: nn.Module
    adapter: ModelAdapter
    removed: tuple[int, ...]
    intervals: list[Interval]
    methods: list[Method]
    order: str
    batches: list[CalibrationBatch]
    engine: Engine
    settings: FitSettings
    spec: StatsSpec
    skip_first_token: bool
    progress: bool
    distributed: DistributedContext | None
    given: Mapping[Interval, BoundaryStats]

    @property
    def num_layers(self) -> int:
        return len(self.adapter.layers(self.model))

    def sequential(self, method: Method) -> bool:
        return self.order == "sequential" and method.family is not None and len(self.intervals) > 1

    def reduce(self, stats: Mapping[Interval, BoundaryStats]) -> None:
        """Sum every rank's statistics (explicit: only with a distributed context)."""
        if self.distributed is not None and self.distributed.world_size > 1:
            all_reduce_stats(stats)


def _plan(model: nn.Module, drop: Iterable[int], methods: Sequence[str], batches: Iterable[Any],
          **options: Any) -> _Job:  # fmt: skip
    adapter = get_adapter(model)
    num_layers = len(adapter.layers(model))
    removed = removal_set(drop, num_layers)
    intervals = intervals_of(removed)
    order, rank = options["order"], options["rank"]
    if order not in ORDERS:
        raise GhostsolveError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
    integer = isinstance(rank, int) and not isinstance(rank, bool)
    valid_rank = rank is None or rank == "cv" or (integer and rank >= 0)
    if not valid_rank:
        raise GhostsolveError(
            f"rank must be a nonnegative int or 'cv' (for the 'lowrank' family), got {rank!r}"
        )
    if "cv" in (options["ridge"], rank) and options["solver"] in ("qr", "svd"):
        raise GhostsolveError(
            f"ridge/rank='cv' fits from the Gram statistics of each fold; solver={options['solver']!r} needs "
            "the TSQR factor instead: use solver='auto', 'cholesky' or 'eigh' with cross-validation"
        )
    names = list(dict.fromkeys(methods))
    if not names:
        raise GhostsolveError(f"no recovery methods given; choose from {', '.join(METHODS)}")
    for name in names:
        validate_method(name, adapter, intervals)
    engine = make_engine(options["capture"], device=options["device"])
    settings = FitSettings(options["ridge"], options["solver"], rank, options["compute_dtype"])
    return _Job(
        model, adapter, removed, intervals, [get_method(n) for n in names], order, as_batches(batches),
        engine,
        settings, StatsSpec(options["dtype"], options["product_dtype"]), options["skip_first_token"],
        options["progress"], options["distributed"], dict(options["stats"] or {}),
    )  # fmt: skip


def stats_spec(
    methods: Sequence[str | Method],
    settings: FitSettings,
    *,
    dtype: torch.dtype = torch.float64,
    product_dtype: torch.dtype | None = None,
) -> StatsSpec:
    """The statistics these methods' fits need: only the optional sums their families and the solver use, and
    the cross-validation folds when ``ridge``/``rank`` is ``"cv"``. A selection rule that captures with this
    spec (``select_layers(..., keep_stats=...)``) hands on statistics :func:`recover` can use as they are.
    """
    resolved = [get_method(m) if isinstance(m, str) else m for m in methods]
    families = [m.family for m in resolved if m.family is not None]
    options = stats_features(families, [settings.solver])
    return StatsSpec(dtype, product_dtype, options, folds=settings.folds)


def _spec(job: _Job, methods: Sequence[Method]) -> StatsSpec:
    return stats_spec(methods, job.settings, dtype=job.spec.dtype, product_dtype=job.spec.product_dtype)


def _covers(given: BoundaryStats, spec: StatsSpec) -> bool:
    """Whether statistics captured elsewhere hold every optional sum ``spec`` asks for (and its folds)."""
    if spec.folds is not None and getattr(given, "n_folds", None) != spec.folds:
        return False
    return all(getattr(given, flag, False) or not wanted for flag, wanted in spec.options.items())


def _consumers(
    job: _Job, methods: Sequence[Method], x_stream: str
) -> tuple[IntervalStats, ReplaceMeStats | None]:
    """The consumers of one capture: boundary statistics, and ReplaceMe's when a method needs them."""
    spec = _spec(job, methods)
    residual = IntervalStats(job.intervals, num_layers=job.num_layers, x_stream=x_stream,
                             skip_first_token=job.skip_first_token, spec=spec)  # fmt: skip
    mlp = None
    if any(m.statistics == "mlp" for m in methods):
        mlp = ReplaceMeStats(job.intervals, num_layers=job.num_layers, x_stream=x_stream,
                             skip_first_token=job.skip_first_token, spec=spec,
                             keep_mlp_outputs=x_stream == "pruned")  # fmt: skip
    return residual, mlp


def _relative_residual(res: BoundaryStats, fitted: Fit | None, method: Method) -> float:
    """Boundary residual relative to plain pruning: ``‖X_eff W − Y‖² / ‖Y − X‖²`` (1 for identity).

    :attr:`Fit.relative_residual` for maps fitted on the boundary statistics; for ReplaceMe the fit's
    objective ``‖m T − (y − r)‖² = ‖r + m T − y‖²`` over the boundary ``‖Y − X‖²``.
    """
    if fitted is None:
        return 1.0
    if method.statistics != "mlp":
        return float(fitted.relative_residual)
    dtd = float(res.dtd)
    return float(fitted.objective) / dtd if dtd > 0 else float("nan")


def _source(
    method: Method, interval: Interval, residual: IntervalStats, mlp: ReplaceMeStats | None
) -> BoundaryStats:
    """The statistics ``method`` is fitted on: ReplaceMe's MLP statistics, else the boundary statistics."""
    if method.statistics == "mlp" and mlp is not None:
        return mlp.stats[interval]
    return residual.stats[interval]


@dataclass
class _Fitted:
    fits: dict[Interval, Fit | None]
    relres: dict[Interval, float]
    fit_seconds: float
    capture_seconds: float
    shared_capture: bool = False
    warnings: list[str] = field(default_factory=list)


def _fit_all(job: _Job, method: Method, residual: IntervalStats, mlp: ReplaceMeStats | None,
             capture_seconds: float) -> _Fitted:  # fmt: skip
    """Fit every interval of ``method`` from statistics captured already (independent order)."""
    fits: dict[Interval, Fit | None] = {}
    relres: dict[Interval, float] = {}
    notes: list[str] = []
    seconds = 0.0
    for interval in job.intervals:
        fitted = None
        if method.family is not None:
            source = _source(method, interval, residual, mlp)
            notes.append(check_calibration_size(source, method, interval, job.settings))
            tic = time.perf_counter()
            fitted = job.settings.fit(source, method.family)
            seconds += time.perf_counter() - tic
        fits[interval] = fitted
        # Plain pruning alone captures nothing; its residual is 1 by definition anyway.
        res = residual.stats.get(interval)
        relres[interval] = 1.0 if res is None else _relative_residual(res, fitted, method)
    return _Fitted(fits, relres, seconds, capture_seconds, shared_capture=method.family is not None,
                   warnings=[n for n in notes if n])  # fmt: skip


def _fit_sequential(job: _Job, method: Method) -> _Fitted:
    """The two-stream pass of ``method``: each interval fitted as soon as its statistics are complete."""
    residual, mlp = _consumers(job, [method], "pruned")
    fits: dict[Interval, Fit | None] = {}
    relres: dict[Interval, float] = {}
    notes: list[str] = []
    seconds = 0.0

    def on_interval(interval: Interval) -> StreamMap | None:
        nonlocal seconds
        job.reduce({interval: residual.stats[interval]})
        if mlp is not None:
            job.reduce({interval: mlp.stats[interval]})
        source = _source(method, interval, residual, mlp)
        notes.append(check_calibration_size(source, method, interval, job.settings))
        tic = time.perf_counter()
        assert method.family is not None
        fits[interval] = fitted = job.settings.fit(source, method.family)
        seconds += time.perf_counter() - tic
        relres[interval] = _relative_residual(residual.stats[interval], fitted, method)
        outputs = mlp.mlp_outputs[interval] if mlp is not None else ()
        return method.stream_map(fitted, job.settings, outputs)

    consumers: list[Consumer] = [residual] if mlp is None else [residual, mlp]
    tic = time.perf_counter()
    run_capture(job.model, job.batches, consumers, engine=job.engine, adapter=job.adapter,
                progress=job.progress, pruned=PrunedStream(job.intervals, on_interval))  # fmt: skip
    captured = time.perf_counter() - tic - seconds
    return _Fitted(fits, relres, seconds, captured, warnings=[n for n in notes if n])


def _build(job: _Job, method: Method, fitted: _Fitted, inplace: bool) -> Recovery:
    """Remove the intervals and insert or fold every fitted map, on a copy unless ``inplace``."""
    target = job.model if inplace else copy.deepcopy(job.model)
    offset = 0
    current_layers = job.num_layers
    for interval in job.intervals:
        start, end = interval[0] - offset, interval[1] - offset
        remove_layers(target, range(start, end), adapter=job.adapter)
        cut = Cut(start, reaches_end=end == current_layers)
        method.apply(target, job.adapter, cut, fitted.fits[interval], job.settings)
        offset += end - start
        current_layers -= end - start
    if ghost_layout(target, adapter=job.adapter):
        # A model with ghost operators is a Ghostsolve<Base>ForCausalLM: its save_pretrained loads back.
        make_ghosted(target, layers_path=job.adapter.layers_path, final_norm_path=job.adapter.final_norm_path)
    return Recovery(
        model=target, removed=job.removed, intervals=list(job.intervals), fits=fitted.fits,
        method=method.name,
        order=job.order, relative_residuals=fitted.relres, fit_seconds=fitted.fit_seconds,
        capture_seconds=fitted.capture_seconds, shared_capture=fitted.shared_capture,
        warnings=fitted.warnings,
    )  # fmt: skip


def iter_recoveries(
    model: nn.Module,
    drop: Iterable[int],
    batches: Iterable[Any],
    methods: Sequence[str] = METHODS,
    *,
    order: str = "independent",
    ridge: float | str | None = None,
    solver: str = "auto",
    rank: int | str | None = None,
    skip_first_token: bool = False,
    compute_dtype: torch.dtype | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float64,
    product_dtype: torch.dtype | None = None,
    inplace: bool = False,
    capture: str = "hooks",
    device: torch.device | str | None = None,
    distributed: DistributedContext | None = None,
    stats: Mapping[Interval, BoundaryStats] | None = None,
) -> Iterator[tuple[str, Recovery]]:
    """Capture the dense statistics once, then yield ``(method, Recovery)`` for each method in turn.

    Holding one recovered model at a time, this is the memory-friendly form of :func:`recover_all`.
    Everything is validated (removal set, methods, order, capture, batches) before any capture. Parameters
    are those of :func:`recover`; ``inplace=True`` is only allowed for a single method in ``independent``
    order.
    """
    job = _plan(model, drop, methods, batches, order=order, ridge=ridge, solver=solver, rank=rank,
                skip_first_token=skip_first_token, compute_dtype=compute_dtype, progress=progress,
                dtype=dtype,
                product_dtype=product_dtype, capture=capture, device=device, distributed=distributed,
                stats=stats)  # fmt: skip
    if inplace and (len(job.methods) > 1 or order == "sequential"):
        raise GhostsolveError(
            "inplace=True needs the dense model only once: it works for a single method in 'independent' "
            "order; "
            "the sequential order keeps the dense model beside the pruned one, so pass inplace=False"
        )
    shared = [m for m in job.methods if m.family is not None and not job.sequential(m)]
    residual, mlp = _consumers(job, shared, "dense")
    capture_seconds = 0.0
    spec = _spec(job, shared)
    reusable = all(iv in job.given and _covers(job.given[iv], spec) for iv in job.intervals)
    if shared and mlp is None and reusable:
        # Statistics a selection rule already captured on these batches: no second pass.
        residual.adopt({iv: job.given[iv] for iv in job.intervals})
    elif shared:
        tic = time.perf_counter()
        consumers: list[Consumer] = [residual] if mlp is None else [residual, mlp]
        run_capture(job.model, job.batches, consumers, engine=job.engine, adapter=job.adapter,
                    progress=job.progress)  # fmt: skip
        job.reduce(residual.stats)
        if mlp is not None:
            job.reduce(mlp.stats)
        capture_seconds = time.perf_counter() - tic
    for method in job.methods:
        if job.sequential(method):
            fitted = _fit_sequential(job, method)
        else:
            fitted = _fit_all(job, method, residual, mlp, capture_seconds if method.family else 0.0)
        yield method.name, _build(job, method, fitted, inplace)


def recover(
    model: nn.Module,
    drop: Iterable[int],
    batches: Iterable[Any],
    *,
    method: str = "ghost",
    order: str = "independent",
    ridge: float | str | None = None,
    solver: str = "auto",
    rank: int | str | None = None,
    skip_first_token: bool = False,
    compute_dtype: torch.dtype | None = None,
    inplace: bool = False,
    progress: bool = True,
    dtype: torch.dtype = torch.float64,
    product_dtype: torch.dtype | None = None,
    capture: str = "hooks",
    device: torch.device | str | None = None,
    distributed: DistributedContext | None = None,
    stats: Mapping[Interval, BoundaryStats] | None = None,
) -> Recovery:
    """Remove layers ``drop`` from ``model`` and recover them with ``method``.

    Parameters
    ----------
    model : transformers PreTrainedModel
        A causal LM of a family with an adapter (see :func:`ghostsolve.adapters.get_adapter`), on any device,
        in any dtype. Unchanged unless ``inplace=True``.
    drop : iterable of int
        0-based layer indices to remove, contiguous or not.
    batches : iterable of dict or tensor
        Calibration batches ``{"input_ids": (batch, seq), "attention_mask": (batch, seq), optional}``; read
        into a list once.
    method : str
        One of :data:`~ghostsolve.pipeline.recover.methods.METHODS`.
    order : {"independent", "sequential"}
        See the module docstring.
    ridge : float, "cv" or "gcv", optional
        Ridge passed to :func:`ghostsolve.fit` (its default, 0, when None). ``"cv"`` chooses it per interval
        by exact K-fold cross-validation over whole calibration sequences (the capture keeps
        :data:`~ghostsolve.pipeline.recover.methods.CV_FOLDS` fold statistics), ``"gcv"`` by generalised
        cross-validation; the chosen value is each fit's ``ridge``.
    solver : str
        Solver passed to :func:`ghostsolve.fit` (``"auto"``).
    rank : int or "cv", optional
        Rank of the ``"lowrank"`` family (default :func:`~ghostsolve.pipeline.recover.methods.default_rank`;
        ``"cv"`` chooses it by cross-validation).
    skip_first_token : bool
        Exclude each sequence's first real token (BOS / attention sink) from the statistics.
    compute_dtype : torch.dtype, optional
        Matmul dtype of the inserted operators (None: the model's dtype; ``torch.float32`` for an fp32
        correction in a bf16 model).
    inplace : bool
        Modify ``model`` itself instead of a deep copy (``independent`` order only).
    progress : bool
        Show progress bars.
    dtype, product_dtype : torch.dtype
        Statistics precision (fp64) and per-chunk product precision (see :class:`ghostsolve.Stats`).
    capture : {"hooks", "layerwise"}
        ``"hooks"``: the model runs where it sits. ``"layerwise"``: one decoder layer on ``device`` at a time.
    device : torch.device or str, optional
        Execution device of ``capture="layerwise"`` (default: the current CUDA device, else the CPU); must
        stay None with ``"hooks"``.
    distributed : DistributedContext, optional
        Under torchrun: every rank passes its own shard of the batches and the statistics are summed across
        ranks before fitting. Without it no collective runs.
    stats : mapping of (start, end) to Stats, optional
        Dense boundary statistics of the removed intervals captured already on these batches (e.g.
        :attr:`~ghostsolve.pipeline.select.Selection.stats`); used instead of a capture pass when they cover
        every interval and no method needs more (ReplaceMe's MLP statistics, the sequential order's pruned
        stream). They are not all-reduced again.

    Returns
    -------
    Recovery

    Raises
    ------
    GhostsolveError
        Invalid removal set (empty, out of range, duplicated, everything), unknown architecture, method, order
        or capture, a fold that does not apply (post-norm model, ReplaceMe at layer 0), a ``device`` with
        ``capture="hooks"``, NaN/Inf in the calibration activations, or a failed fit. The input model is
        unmodified then.

    Examples
    --------
    >>> rec = recover(model, [5, 6, 7], batches, method="ghost")  # doctest: +SKIP
    >>> rec.model.generate(ids, max_new_tokens=20)  # doctest: +SKIP
    """
    for _, recovery in iter_recoveries(
        model, drop, batches, [method], order=order, ridge=ridge, solver=solver, rank=rank,
        skip_first_token=skip_first_token, compute_dtype=compute_dtype, inplace=inplace, progress=progress,
        dtype=dtype, product_dtype=product_dtype, capture=capture, device=device, distributed=distributed,
        stats=stats,
    ):  # fmt: skip
        return recovery
    raise AssertionError("unreachable: one method yields one recovery")  # pragma: no cover


def recover_all(
    model: nn.Module, drop: Iterable[int], batches: Iterable[Any], methods: Sequence[str] = METHODS,
    **options: Any,
) -> dict[str, Recovery]:  # fmt: skip
    """Recover with every method in ``methods`` from one shared capture of the dense statistics.

    Keyword arguments are those of :func:`recover` (except ``method`` and ``inplace``). Each recovery holds
    its own deep copy of the model; use :func:`iter_recoveries` to hold one at a time.

    Returns
    -------
    dict
        ``method -> Recovery`` in the order given.
    """
    return dict(iter_recoveries(model, drop, batches, methods, **options))
