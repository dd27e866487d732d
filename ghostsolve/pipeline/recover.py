"""Recovery: remove layers, fit one operator per removed interval, insert or fold it.

For a removal set (0-based, contiguous or not) split into maximal intervals ``(start, end)``, each
interval gets one linear map fitted on calibration statistics (``Y ≈ X W``, ``W = I + M``, row
vectors; ``X`` the stream entering ``start``, ``Y`` the stream entering ``end``):

* ``"identity"``: plain pruning, nothing inserted.
* ``"ghost"`` (alias ``"full"``) and every other family of the core (``"scalar"``, ``"diagonal"``,
  ``"hadamard"``, their ``"-magnitude"`` variants, ``"lowrank"``, ``"symmetric"``): a
  :class:`~ghostsolve.pipeline.surgery.GhostOperator` inserted where the stream enters the first kept
  layer after the interval (the final norm for an interval reaching the end).
* ``"prune-comp"``: Prune&Comp's scalar ``α = mean|Y| / mean|X|`` folded into the embedding and every
  o_proj/down_proj before the cut (pre-norm models only).
* ``"replaceme"``: ReplaceMe-LS, a least-squares map on the MLP output of the last kept layer before
  the cut, folded into its down_proj (pre-norm models, intervals not starting at layer 0).

Orders: ``"independent"`` fits every interval on the dense model's activations (one capture pass
for all intervals); ``"sequential"`` fits interval ``k`` with ``X`` taken from the model already
pruned and recovered up to interval ``k-1`` and ``Y`` from the dense model, so the later operators
also correct the error left by the earlier ones (two partial forwards per batch per extra interval).

Captures: ``"hooks"`` runs the whole model where it sits and reads the streams with hooks;
``"layerwise"`` (:func:`~ghostsolve.pipeline.offload.capture_stats_layerwise`) onloads one decoder
layer at a time to an execution device, for models larger than it. Layer by layer, the sequential
order is the single pass of its ``on_interval`` (each fitted operator applied to the carried pruned
stream); ReplaceMe (MLP-output statistics) and sequential Prune&Comp (a scale folded into every layer
before the cut) are hooks-only.
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
from ghostsolve.families import FAMILIES
from ghostsolve.fit import Fit, fit
from ghostsolve.pipeline.capture import Interval, _capture_cross, _capture_dense
from ghostsolve.pipeline.distributed import all_reduce_stats
from ghostsolve.pipeline.fold import fold_prune_comp, fold_replaceme, require_pre_norm
from ghostsolve.pipeline.offload import capture_stats_layerwise
from ghostsolve.pipeline.surgery import (
    FINAL_NORM,
    GhostOperator,
    ghost_layout,
    insert_ghost,
    intervals_of,
    removal_set,
    remove_layers,
)
from ghostsolve.stats import Stats

__all__ = [
    "CAPTURES",
    "FOLDED_METHODS",
    "METHODS",
    "ORDERS",
    "Recovery",
    "default_rank",
    "family_of",
    "iter_recoveries",
    "recover",
    "recover_all",
    "validate_method",
]

logger = logging.getLogger(__name__)

#: Methods folded into existing weights instead of inserting a module.
FOLDED_METHODS: tuple[str, ...] = ("prune-comp", "replaceme")
#: Every method name :func:`recover` accepts, plain pruning first.
METHODS: tuple[str, ...] = (
    "identity",
    "ghost",
    *(f for f in FAMILIES if f != "identity"),
    *FOLDED_METHODS,
)
#: Fitting orders for several intervals.
ORDERS: tuple[str, ...] = ("independent", "sequential")
#: Ways to capture the calibration statistics: hooks on the whole model, or layer by layer.
CAPTURES: tuple[str, ...] = ("hooks", "layerwise")


def family_of(method: str) -> str | None:
    """The core family fitted by ``method`` (None for plain pruning).

    ``"ghost"`` is the unconstrained ``"full"`` family; Prune&Comp fits ``"scalar-magnitude"``;
    ReplaceMe fits ``"full"`` on the MLP-output statistics.
    """
    if method == "identity":
        return None
    if method in ("ghost", "replaceme"):
        return "full"
    if method == "prune-comp":
        return "scalar-magnitude"
    return method


def validate_method(method: str, adapter: ModelAdapter, intervals: Sequence[Interval]) -> None:
    """Check that ``method`` exists and applies to this architecture and these intervals.

    Raises
    ------
    GhostsolveError
        Unknown method (the message lists :data:`METHODS`); a fold on a post-norm model; ReplaceMe
        for an interval starting at layer 0 (no kept layer before the cut to fold into).
    """
    if method not in METHODS:
        raise GhostsolveError(f"unknown recovery method {method!r}; choose one of {', '.join(METHODS)}")
    if method in FOLDED_METHODS:
        require_pre_norm(adapter, "Prune&Comp" if method == "prune-comp" else "ReplaceMe")
    if method == "replaceme" and any(start == 0 for start, _ in intervals):
        raise GhostsolveError(
            "ReplaceMe folds its map into the down_proj of the last kept layer before the cut, but the "
            "removed interval starting at layer 0 has no layer before it; keep layer 0 or use another "
            "method (e.g. 'ghost')"
        )


@dataclass
class Recovery:
    """A pruned and recovered model and how it was obtained.

    Attributes
    ----------
    model : nn.Module
        The pruned, recovered model (a deep copy of the input unless ``inplace=True``); a normal
        transformers model whose ghost operators are submodules (see :func:`ghost_layout`).
    removed : tuple of int
        Removed layer indices in the original numbering, sorted.
    intervals : list of (start, end)
        Maximal removed intervals, ``end`` exclusive, original numbering.
    fits : dict
        ``(start, end) -> Fit`` of the fitted map (``W = αI`` for Prune&Comp, ``T`` for ReplaceMe —
        those are folded, so no ghost module holds them), or None for plain pruning.
    method, order : str
    relative_residuals : dict
        ``(start, end) -> ‖X_eff W − Y‖² / ‖Y − X‖²`` on the calibration tokens: the boundary
        residual the inserted (or folded) map leaves, relative to plain pruning's (so 1 for
        ``identity``), as :attr:`ghostsolve.Fit.relative_residual` defines it.
    fit_seconds : float
        Wall time spent in the solver(s).
    capture_seconds : float
        Wall time of the capture passes used by this recovery (in :func:`recover_all` the shared
        dense pass is counted for every method).
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

    @property
    def layout(self) -> list[dict[str, Any]]:
        """Where the ghost operators sit in :attr:`model` (see :func:`ghost_layout`)."""
        return ghost_layout(self.model)


# ---------------------------------------------------------------------------------------------
# internals
# ---------------------------------------------------------------------------------------------
@dataclass
class _Settings:
    ridge: float | None
    solver: str
    rank: int | None
    skip_first_token: bool
    compute_dtype: torch.dtype | None
    progress: bool
    dtype: torch.dtype
    product_dtype: torch.dtype | None


def _fit(stats: Stats, family: str, settings: _Settings) -> Fit:
    kwargs: dict[str, Any] = {"family": family, "solver": settings.solver}
    if settings.ridge is not None:
        kwargs["ridge"] = settings.ridge
    if family == "lowrank":
        kwargs["rank"] = settings.rank if settings.rank is not None else default_rank(stats.dim)
    return fit(stats, **kwargs)


def default_rank(dim: int) -> int:
    """Rank of the ``"lowrank"`` family when none is given: ``max(1, d // 4)``.

    A quarter of the hidden size stores half the parameters of the full operator as two factors,
    the middle ground the published low-rank patches use.
    """
    return max(1, dim // 4)


def _relative_residual(res: Stats, fitted: Fit | None, method: str) -> float:
    """Boundary residual relative to plain pruning: ``‖X_eff W − Y‖² / ‖Y − X‖²`` (1 for identity).

    The core's :attr:`Fit.relative_residual` for operators fitted on the boundary statistics; for
    ReplaceMe the fit's objective ``‖m T − (y − r)‖² = ‖r + m T − y‖²`` over the boundary ``‖Y − X‖²``.
    """
    if fitted is None:
        return 1.0
    if method != "replaceme":
        return float(fitted.relative_residual)
    dtd = float(res.dtd)
    return float(fitted.objective) / dtd if dtd > 0 else float("nan")


def _is_one_shot(batches: Iterable[Any]) -> bool:
    try:
        return iter(batches) is batches
    except TypeError:
        return True


@dataclass
class _Plan:
    adapter: ModelAdapter
    removed: tuple[int, ...]
    intervals: list[Interval]
    num_layers: int


def _plan(
    model: nn.Module,
    drop: Iterable[int],
    methods: Sequence[str],
    order: str,
    rank: int | None,
    capture: str = "hooks",
    device: torch.device | str | None = None,
) -> _Plan:
    adapter = get_adapter(model)
    num_layers = len(adapter.layers(model))
    removed = removal_set(drop, num_layers)
    intervals = intervals_of(removed)
    if order not in ORDERS:
        raise GhostsolveError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 0):
        raise GhostsolveError(f"rank must be a nonnegative int (for the 'lowrank' family), got {rank!r}")
    if not methods:
        raise GhostsolveError(f"no recovery methods given; choose from {', '.join(METHODS)}")
    for method in methods:
        validate_method(method, adapter, intervals)
    _check_capture(capture, device, methods, order, intervals)
    return _Plan(adapter, removed, intervals, num_layers)


def _check_capture(
    capture: str,
    device: torch.device | str | None,
    methods: Sequence[str],
    order: str,
    intervals: Sequence[Interval],
) -> None:
    if capture not in CAPTURES:
        raise GhostsolveError(f"unknown capture {capture!r}; choose one of {', '.join(CAPTURES)}")
    if capture == "hooks":
        if device is not None:
            raise GhostsolveError(
                f"device={str(device)!r} is the execution device of capture='layerwise'; capture='hooks' "
                "runs the model where it sits, so move the model there or pass capture='layerwise'"
            )
        return
    for method in methods:
        if method == "replaceme":
            raise GhostsolveError(
                "method 'replaceme' fits the MLP output of the last kept layer, which capture='layerwise' "
                "does not record (it carries the residual stream only); use capture='hooks'"
            )
        if method == "prune-comp" and order == "sequential" and len(intervals) > 1:
            raise GhostsolveError(
                "method 'prune-comp' in 'sequential' order folds each scale into every layer before its "
                "cut, which capture='layerwise' cannot replay exactly in its single pass; use "
                "capture='hooks' or order='independent'"
            )


def _apply_interval(
    target: nn.Module,
    adapter: ModelAdapter,
    method: str,
    interval: Interval,
    offset: int,
    current_layers: int,
    fitted: Fit | None,
    settings: _Settings,
) -> None:
    """Remove ``interval`` (shifted by ``offset`` already-removed layers) and insert/fold its map."""
    start, end = interval[0] - offset, interval[1] - offset
    reaches_end = end == current_layers
    remove_layers(target, range(start, end), adapter=adapter)
    cut = start  # index, after removal, of the first kept layer after the interval
    if fitted is None:
        return
    if method == "prune-comp":
        alpha = 1.0 + float(torch.diagonal(fitted.delta).mean())
        fold_prune_comp(target, cut, alpha, adapter=adapter)
    elif method == "replaceme":
        fold_replaceme(target, start - 1, fitted.weight, adapter=adapter)
    else:
        ghost = GhostOperator(fitted.delta, compute_dtype=settings.compute_dtype)
        insert_ghost(target, FINAL_NORM if reaches_end else cut, ghost, adapter=adapter)


def _run_method(
    model: nn.Module,
    plan: _Plan,
    method: str,
    order: str,
    batches: Iterable[Any],
    dense_res: dict[Interval, Stats],
    dense_mlp: dict[Interval, Stats],
    dense_capture_seconds: float,
    settings: _Settings,
    inplace: bool,
    capture: str = "hooks",
    device: torch.device | str | None = None,
) -> Recovery:
    adapter = plan.adapter
    family = family_of(method)
    sequential = order == "sequential" and family is not None and len(plan.intervals) > 1
    fit_seconds = 0.0
    capture_seconds = dense_capture_seconds
    # Layer by layer, the sequential fits come out of one pass before any model is touched, so they
    # are applied like independent ones; with hooks each interval is applied before the next capture.
    presolved: dict[Interval, Fit] = {}
    if sequential and capture == "layerwise":
        assert family is not None
        dense_res, presolved, fit_seconds, capture_seconds = _sequential_layerwise(
            model, plan, family, batches, settings, device
        )
        sequential = False
    # Independent order fits everything before touching a model, so that a failing fit leaves even an
    # ``inplace`` model unmodified; sequential order needs each interval applied before the next
    # capture and works on a copy (inplace is refused there).
    target = model if inplace else (copy.deepcopy(model) if sequential else None)
    fits: dict[Interval, Fit | None] = {}
    relres: dict[Interval, float] = {}
    pending: list[tuple[Interval, int, int, Fit | None]] = []
    offset = 0
    current_layers = plan.num_layers
    for k, interval in enumerate(plan.intervals):
        res: Stats | None = dense_res.get(interval)
        mlp: Stats | None = dense_mlp.get(interval)
        if sequential and k > 0:
            assert target is not None
            tic = time.perf_counter()
            x_start = interval[0] - offset
            res, mlp = _capture_cross(
                target, adapter, x_start, model, adapter, interval[1], batches,
                mlp=method == "replaceme", key=interval, **_capture_kwargs(settings),
            )  # fmt: skip
            # Under torchrun each rank saw a shard of the batches: sum them (a no-op in one process).
            all_reduce_stats({interval: res})
            if mlp is not None:
                all_reduce_stats({interval: mlp})
            capture_seconds += time.perf_counter() - tic
        fitted: Fit | None = presolved.get(interval)
        if family is not None and fitted is None:
            source = mlp if method == "replaceme" else res
            assert source is not None, "fitted methods always have statistics"
            tic = time.perf_counter()
            fitted = _fit(source, family, settings)
            fit_seconds += time.perf_counter() - tic
        fits[interval] = fitted
        # Plain pruning alone captures nothing; its residual is 1 by definition anyway.
        relres[interval] = 1.0 if res is None else _relative_residual(res, fitted, method)
        if sequential:
            assert target is not None
            _apply_interval(target, adapter, method, interval, offset, current_layers, fitted, settings)
        else:
            pending.append((interval, offset, current_layers, fitted))
        removed_here = interval[1] - interval[0]
        offset += removed_here
        current_layers -= removed_here
    if target is None:
        target = copy.deepcopy(model)
    for interval, shift, layers_then, fitted in pending:
        _apply_interval(target, adapter, method, interval, shift, layers_then, fitted, settings)
    return Recovery(
        model=target,
        removed=plan.removed,
        intervals=list(plan.intervals),
        fits=fits,
        method=method,
        order=order,
        relative_residuals=relres,
        fit_seconds=fit_seconds,
        capture_seconds=capture_seconds,
    )


def _sequential_layerwise(
    model: nn.Module,
    plan: _Plan,
    family: str,
    batches: Iterable[Any],
    settings: _Settings,
    device: torch.device | str | None,
) -> tuple[dict[Interval, Stats], dict[Interval, Fit], float, float]:
    """Sequential order in one layer-by-layer pass: statistics, fits, fit and capture seconds.

    Each interval is fitted as soon as its statistics are complete, and the same ghost operator that
    :func:`_apply_interval` inserts is handed back to the pass, which carries it into ``X`` of the
    later intervals.
    """
    fits: dict[Interval, Fit] = {}
    fit_seconds = 0.0

    def refit(interval: Interval, stats: Stats) -> GhostOperator:
        nonlocal fit_seconds
        # Under torchrun each rank saw a shard of the batches: sum them before fitting (every rank
        # reaches each interval in the same order; a no-op in one process).
        all_reduce_stats({interval: stats})
        tic = time.perf_counter()
        fits[interval] = _fit(stats, family, settings)
        fit_seconds += time.perf_counter() - tic
        return GhostOperator(fits[interval].delta, compute_dtype=settings.compute_dtype)

    tic = time.perf_counter()
    res = capture_stats_layerwise(
        model, batches, plan.intervals, device=device, adapter=plan.adapter, on_interval=refit,
        **_capture_kwargs(settings),
    )  # fmt: skip
    return res, fits, fit_seconds, time.perf_counter() - tic - fit_seconds


def _capture_kwargs(settings: _Settings) -> dict[str, Any]:
    return {
        "skip_first_token": settings.skip_first_token,
        "progress": settings.progress,
        "dtype": settings.dtype,
        "product_dtype": settings.product_dtype,
    }


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def iter_recoveries(
    model: nn.Module,
    drop: Iterable[int],
    batches: Iterable[Mapping[str, torch.Tensor]],
    methods: Sequence[str] = METHODS,
    *,
    order: str = "independent",
    ridge: float | None = None,
    solver: str = "auto",
    rank: int | None = None,
    skip_first_token: bool = False,
    compute_dtype: torch.dtype | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float64,
    product_dtype: torch.dtype | None = None,
    inplace: bool = False,
    capture: str = "hooks",
    device: torch.device | str | None = None,
) -> Iterator[tuple[str, Recovery]]:
    """Capture the dense statistics once, then yield ``(method, Recovery)`` for each method in turn.

    Holding one recovered model at a time, this is the memory-friendly form of :func:`recover_all`.
    Everything is validated (removal set, methods, order, batches) before the capture pass.
    Parameters are those of :func:`recover`; ``inplace=True`` is only allowed for a single method
    in ``independent`` order.
    """
    methods = list(dict.fromkeys(methods))
    plan = _plan(model, drop, methods, order, rank, capture, device)
    if inplace and (len(methods) > 1 or order == "sequential"):
        raise GhostsolveError(
            "inplace=True needs the dense model only once: it works for a single method in "
            "'independent' order; the sequential order keeps the dense model beside the pruned one, "
            "so pass inplace=False"
        )
    needs_extra_passes = order == "sequential" and len(plan.intervals) > 1
    layerwise = capture == "layerwise"
    if layerwise:
        # The layer-by-layer pass materializes the batches anyway; a list serves every method's pass.
        batches = list(batches)
    elif needs_extra_passes and _is_one_shot(batches):
        raise GhostsolveError(
            "the sequential order iterates over the calibration batches once per interval; pass a list or "
            "a DataLoader, not a one-shot iterator or generator"
        )
    settings = _Settings(ridge, solver, rank, skip_first_token, compute_dtype, progress, dtype, product_dtype)
    fitted_methods = [m for m in methods if family_of(m) is not None]
    dense_res: dict[Interval, Stats] = {}
    dense_mlp: dict[Interval, Stats] = {}
    capture_seconds = 0.0
    # Layer by layer, the sequential order makes its own pass per method: no dense pass is needed.
    if fitted_methods and not (layerwise and needs_extra_passes):
        tic = time.perf_counter()
        mlp_intervals = plan.intervals if "replaceme" in methods else []
        if layerwise:
            dense_res = capture_stats_layerwise(
                model, batches, plan.intervals, device=device, adapter=plan.adapter,
                **_capture_kwargs(settings),
            )  # fmt: skip
        else:
            dense_res, dense_mlp = _capture_dense(
                model, batches, plan.intervals, mlp_intervals, adapter=plan.adapter,
                **_capture_kwargs(settings),
            )  # fmt: skip
        # Under torchrun each rank saw a shard of the batches: sum them (a no-op in one process).
        all_reduce_stats(dense_res)
        all_reduce_stats(dense_mlp)
        capture_seconds = time.perf_counter() - tic
    for method in methods:
        recovery = _run_method(
            model, plan, method, order, batches, dense_res, dense_mlp, capture_seconds, settings, inplace,
            capture, device,
        )  # fmt: skip
        yield method, recovery


def recover(
    model: nn.Module,
    drop: Iterable[int],
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    method: str = "ghost",
    order: str = "independent",
    ridge: float | None = None,
    solver: str = "auto",
    rank: int | None = None,
    skip_first_token: bool = False,
    compute_dtype: torch.dtype | None = None,
    inplace: bool = False,
    progress: bool = True,
    dtype: torch.dtype = torch.float64,
    product_dtype: torch.dtype | None = None,
    capture: str = "hooks",
    device: torch.device | str | None = None,
) -> Recovery:
    """Remove layers ``drop`` from ``model`` and recover them with ``method``.

    Parameters
    ----------
    model : transformers PreTrainedModel
        A causal LM of a family with an adapter (see :func:`ghostsolve.adapters.get_adapter`), on any
        device, in any dtype. Unchanged unless ``inplace=True``.
    drop : iterable of int
        0-based layer indices to remove, contiguous or not.
    batches : iterable of dict
        Calibration batches ``{"input_ids": (batch, seq), "attention_mask": (batch, seq), optional}``.
        One pass for ``independent`` order; a re-iterable (list, DataLoader) for ``sequential``.
    method : str
        One of :data:`METHODS`.
    order : {"independent", "sequential"}
    ridge : float, optional
        Ridge passed to :func:`ghostsolve.fit` (its default when None).
    solver : str
        Solver passed to :func:`ghostsolve.fit` (``"auto"``).
    rank : int, optional
        Rank of the ``"lowrank"`` family (default :func:`default_rank`: ``d // 4``).
    skip_first_token : bool
        Exclude each sequence's first token (BOS / attention sink) from the statistics.
    compute_dtype : torch.dtype, optional
        Matmul dtype of the inserted operators (None: the model's dtype; ``torch.float32`` for an
        fp32 correction in a bf16 model).
    inplace : bool
        Modify ``model`` itself instead of a deep copy (``independent`` order only).
    progress : bool
        Show progress bars.
    dtype, product_dtype : torch.dtype
        Statistics precision (fp64) and per-chunk product precision (see :class:`ghostsolve.Stats`).
    capture : {"hooks", "layerwise"}
        ``"hooks"``: one whole-model forward per batch where the model sits. ``"layerwise"``: one decoder
        layer on ``device`` at a time (:func:`~ghostsolve.pipeline.offload.capture_stats_layerwise`),
        the same statistics up to fp64 rounding; the sequential order then takes a single pass per
        method. Not for ``"replaceme"``, nor ``"prune-comp"`` in sequential order.
    device : torch.device or str, optional
        Execution device of ``capture="layerwise"`` (default: the current CUDA device, else the CPU);
        must stay None with ``"hooks"``.

    Returns
    -------
    Recovery

    Raises
    ------
    GhostsolveError
        Invalid removal set (empty, out of range, duplicated, everything), unknown architecture,
        method or order, a fold that does not apply (post-norm model, ReplaceMe at layer 0),
        NaN/Inf in the calibration activations, or a failed fit; an unknown capture, a ``device`` with
        ``capture="hooks"``, or a method ``capture="layerwise"`` cannot serve. The input model is
        unmodified then.

    Examples
    --------
    >>> rec = recover(model, [5, 6, 7], batches, method="ghost")  # doctest: +SKIP
    >>> rec.model.generate(ids, max_new_tokens=20)  # doctest: +SKIP
    """
    for _, recovery in iter_recoveries(
        model,
        drop,
        batches,
        [method],
        order=order,
        ridge=ridge,
        solver=solver,
        rank=rank,
        skip_first_token=skip_first_token,
        compute_dtype=compute_dtype,
        progress=progress,
        dtype=dtype,
        product_dtype=product_dtype,
        inplace=inplace,
        capture=capture,
        device=device,
    ):
        return recovery
    raise AssertionError("unreachable: one method yields one recovery")  # pragma: no cover


def recover_all(
    model: nn.Module,
    drop: Iterable[int],
    batches: Iterable[Mapping[str, torch.Tensor]],
    methods: Sequence[str] = METHODS,
    **kwargs: Any,
) -> dict[str, Recovery]:
    """Recover with every method in ``methods`` from one shared capture of the dense statistics.

    Keyword arguments are those of :func:`recover` (except ``method`` and ``inplace``). Each
    recovery holds its own deep copy of the model; use :func:`iter_recoveries` to hold one at a
    time.

    Returns
    -------
    dict
        ``method -> Recovery`` in the order given.
    """
    return dict(iter_recoveries(model, drop, batches, methods, **kwargs))
