"""Calibration capture: engines deliver hidden states, consumers turn them into statistics.

Two engines, one interface (``engine.run(model, adapter, batches, consumers, pruned=...)``):

* ``"hooks"`` (:class:`~ghostsolve.pipeline.capture.hooks.HookEngine`): one whole-model forward per batch
  where the model sits, hooks read the taps; nothing is held beyond one batch.
* ``"layerwise"`` (:class:`~ghostsolve.pipeline.capture.layerwise.LayerwiseEngine`): one decoder layer on the
  execution device at a time, every batch's activations carried on an offload device, for models larger
  than the accelerator.

Both serve the sequential fitting order with the same two-stream pass (a
:class:`~ghostsolve.pipeline.capture.plan.PrunedStream`). What is computed is a consumer
(:mod:`ghostsolve.pipeline.capture.consumers`); a new statistic is a new consumer, a new execution strategy a
new engine, and neither touches the other. :func:`capture_stats` and :func:`capture_rows` are the common
cases in one call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from ghostsolve.adapters import ModelAdapter, get_adapter
from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.capture.consumers import (
    CHUNK_ROWS,
    BoundaryStats,
    CosineSums,
    IntervalStats,
    RawRows,
    ReplaceMeStats,
    StatsSpec,
)
from ghostsolve.pipeline.capture.hooks import HookEngine
from ghostsolve.pipeline.capture.layerwise import LayerwiseEngine
from ghostsolve.pipeline.capture.plan import Consumer, Event, PrunedStream, StreamMap, Tap
from ghostsolve.pipeline.model.batches import CalibrationBatch, as_batches
from ghostsolve.pipeline.model.surgery import Interval, check_intervals

__all__ = [
    "CAPTURES",
    "CHUNK_ROWS",
    "BoundaryStats",
    "Consumer",
    "CosineSums",
    "Engine",
    "Event",
    "HookEngine",
    "IntervalStats",
    "LayerwiseEngine",
    "PrunedStream",
    "RawRows",
    "ReplaceMeStats",
    "StatsSpec",
    "StreamMap",
    "Tap",
    "capture_rows",
    "capture_stats",
    "capture_stats_layerwise",
    "make_engine",
    "run_capture",
]

#: Ways to run a capture: hooks on the whole model, or layer by layer.
CAPTURES: tuple[str, ...] = ("hooks", "layerwise")


class Engine(Protocol):
    """What every capture engine offers."""

    name: str

    def run(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        batches: Sequence[CalibrationBatch],
        consumers: Sequence[Consumer],
        *,
        progress: bool = True,
        pruned: PrunedStream | None = None,
    ) -> None: ...


def make_engine(
    capture: str = "hooks",
    *,
    device: torch.device | str | None = None,
    offload_device: torch.device | str = "cpu",
) -> Engine:
    """The engine of ``capture`` (``"hooks"`` or ``"layerwise"``).

    ``device`` and ``offload_device`` are the execution and offload devices of ``"layerwise"``; with
    ``"hooks"`` the model runs where it sits and ``device`` must stay None.

    Raises
    ------
    GhostsolveError
        An unknown capture, a ``device`` with ``"hooks"``, or a device that does not exist.
    """
    if capture not in CAPTURES:
        raise GhostsolveError(f"unknown capture {capture!r}; choose one of {', '.join(CAPTURES)}")
    if capture == "hooks":
        if device is not None:
            raise GhostsolveError(
                f"device={str(device)!r} is the execution device of capture='layerwise'; capture='hooks' "
                "runs "
                "the model where it sits, so move the model there or pass capture='layerwise'"
            )
        return HookEngine()
    return LayerwiseEngine(device=device, offload_device=offload_device)


def run_capture(
    model: nn.Module,
    batches: Iterable[Any],
    consumers: Sequence[Consumer],
    *,
    engine: Engine | None = None,
    adapter: ModelAdapter | None = None,
    progress: bool = True,
    pruned: PrunedStream | None = None,
) -> None:
    """Run ``engine`` (default: hooks) over the calibration batches for ``consumers``.

    The model is not modified: hooks are removed, modules moved back and training flags restored on every
    exit, including errors.

    Raises
    ------
    GhostsolveError
        Malformed or no batches; as the engine and the consumers.
    """
    adapter = adapter if adapter is not None else get_adapter(model)
    engine = engine if engine is not None else HookEngine()
    engine.run(model, adapter, as_batches(batches), consumers, progress=progress, pruned=pruned)


def capture_stats(
    model: nn.Module,
    batches: Iterable[Any],
    intervals: Iterable[Interval],
    *,
    skip_first_token: bool = False,
    progress: bool = True,
    dtype: torch.dtype = torch.float64,
    product_dtype: torch.dtype | None = None,
    adapter: ModelAdapter | None = None,
    capture: str = "hooks",
    device: torch.device | str | None = None,
    offload_device: torch.device | str = "cpu",
    stats_options: dict[str, Any] | None = None,
) -> dict[Interval, BoundaryStats]:
    """Boundary statistics of every interval, from one capture pass over the calibration batches.

    Parameters
    ----------
    model : transformers PreTrainedModel
        A causal LM with an adapter, on any device and in any dtype; not modified.
    batches : iterable of dict or tensor
        ``{"input_ids": (batch, seq), "attention_mask": (batch, seq), optional}`` or ``(batch, seq)`` ids.
        Padding (mask 0) contributes no rows.
    intervals : iterable of (start, end)
        ``end`` exclusive, in the model's current layer numbering; they may not overlap (use
        :class:`IntervalStats` directly for overlapping candidates).
    skip_first_token : bool
        Exclude each row's first real token (BOS / attention sink) from the statistics.
    progress : bool
        Show a progress bar.
    dtype, product_dtype : torch.dtype
        Accumulation and per-chunk product precision of :class:`ghostsolve.Stats`; activations are cast
        inside :meth:`Stats.update`, never in the model.
    adapter : ModelAdapter, optional
        Defaults to ``get_adapter(model)``.
    capture, device, offload_device
        The engine (see :func:`make_engine`).
    stats_options : dict, optional
        Further keyword arguments of :class:`ghostsolve.Stats`.

    Returns
    -------
    dict
        ``(start, end) -> Stats`` with rows ``X`` = stream entering ``start``, ``Y`` = stream entering ``end``
        (or the final norm), each ``(n_tokens, d)``; ``Y ≈ X W``, ``W = I + M``.

    Raises
    ------
    GhostsolveError
        Invalid intervals or batches; a hook that never fired; an interval with no unmasked token; NaN/Inf
        in the hidden states (the message names the interval and suggests fp32 capture).

    Examples
    --------
    >>> stats = capture_stats(model, [{"input_ids": ids}], [(1, 3)])  # doctest: +SKIP
    """
    adapter = adapter if adapter is not None else get_adapter(model)
    checked = check_intervals(intervals, len(adapter.layers(model)))
    spec = StatsSpec(dtype, product_dtype, dict(stats_options or {}))
    consumer = IntervalStats(checked, num_layers=len(adapter.layers(model)),
                             skip_first_token=skip_first_token, spec=spec)  # fmt: skip
    engine = make_engine(capture, device=device, offload_device=offload_device)
    run_capture(model, batches, [consumer], engine=engine, adapter=adapter, progress=progress)
    return consumer.stats


def capture_rows(
    model: nn.Module,
    batches: Iterable[Any],
    interval: Interval,
    *,
    max_rows: int,
    skip_first_token: bool = False,
    adapter: ModelAdapter | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw boundary rows ``X`` and ``Y`` of one interval, for analyses that need rows, not statistics.

    :func:`ghostsolve.compare_precisions` refits in each precision from raw rows, which accumulated statistics
    cannot do. The rows follow the rules of :func:`capture_stats`, and the passes stop early: each forward
    ends at the input of layer ``end``, and no further batch runs once ``max_rows`` rows are held.

    Returns
    -------
    X, Y : (n_tokens, d) tensors on the CPU, ``n_tokens <= max_rows``
        In the model's stream dtype, unchanged (callers choose their own precision).

    Raises
    ------
    GhostsolveError
        An invalid interval, ``max_rows`` or batch; a hook that never fired; no batches; no unmasked token.
    """
    adapter = adapter if adapter is not None else get_adapter(model)
    ((start, end),) = check_intervals([interval], len(adapter.layers(model)))
    consumer = RawRows((start, end), max_rows=max_rows, skip_first_token=skip_first_token)
    run_capture(model, batches, [consumer], adapter=adapter, progress=progress)
    return consumer.rows()


OnInterval = Callable[[Interval, BoundaryStats], Callable[[torch.Tensor], torch.Tensor] | None]
"""``on_interval((start, end), stats) -> map or None``: see :func:`capture_stats_layerwise`."""


def capture_stats_layerwise(
    model: nn.Module,
    batches: Iterable[Any],
    intervals: Iterable[Interval],
    *,
    device: torch.device | str | None = None,
    offload_device: torch.device | str = "cpu",
    stats_device: torch.device | str | None = None,
    skip_first_token: bool = False,
    progress: bool = True,
    dtype: torch.dtype = torch.float64,
    product_dtype: torch.dtype | None = None,
    adapter: ModelAdapter | None = None,
    on_interval: OnInterval | None = None,
) -> dict[Interval, BoundaryStats]:
    """Boundary statistics computed one decoder layer at a time (:class:`LayerwiseEngine`).

    The same statistics as :func:`capture_stats` up to the rounding of the fp64 sums. ``device`` is the
    execution device (default: CUDA if any, else the CPU), ``offload_device`` where activations wait,
    ``stats_device`` where the returned statistics live (default: ``device``).

    ``on_interval((start, end), stats)`` gives the sequential order in the same pass: called in model order
    as soon as an interval's statistics are complete, it returns the map that replaces the interval in the
    pruned model (e.g. the GhostOperator built from ``ghostsolve.fit(stats)``) or None for plain pruning;
    ``X`` of every later interval is then read from the stream of the model pruned and recovered so far.

    Raises
    ------
    GhostsolveError
        As :func:`capture_stats`; a module with weights on several devices or on the meta device; a map that
        does not preserve the shape of the hidden states.
    """
    adapter = adapter if adapter is not None else get_adapter(model)
    num_layers = len(adapter.layers(model))
    checked = check_intervals(intervals, num_layers)
    engine = LayerwiseEngine(device=device, offload_device=offload_device)
    consumer = IntervalStats(
        checked, num_layers=num_layers, x_stream="dense" if on_interval is None else "pruned",
        skip_first_token=skip_first_token, spec=StatsSpec(dtype, product_dtype),
    )  # fmt: skip
    pruned = None
    if on_interval is not None:
        callback = on_interval

        def step(interval: Interval) -> StreamMap | None:
            op = callback(interval, consumer.stats[interval])
            if op is None:
                return None
            modules = (op,) if isinstance(op, nn.Module) else ()
            return StreamMap(lambda h, index: op(h), modules)

        pruned = PrunedStream(checked, step)
    run_capture(model, batches, [consumer], engine=engine, adapter=adapter, progress=progress, pruned=pruned)
    where = torch.device(stats_device) if stats_device is not None else (engine.device or torch.device("cpu"))
    return {iv: s if s.device == where else s.to(where) for iv, s in consumer.stats.items()}
