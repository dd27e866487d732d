"""What a capture reads: taps (places in the forward pass), consumers (what is computed from them), and the
plan an engine follows to deliver every tap once, in model order, holding each only while it is needed.

A **tap** is a hidden state at one place of one stream:

* ``Tap.boundary(b)``: the residual stream entering decoder layer ``b`` (the final norm's input for
  ``b == num_layers``), after any ghost operator already in front of that layer;
* ``Tap.mlp(i)``: the output of layer ``i``'s MLP (before it is added to the stream);
* ``stream="dense"`` reads the model as it is; ``stream="pruned"`` reads the second stream of the
  two-stream pass (:class:`PrunedStream`): the model with the removed intervals skipped and each one's
  map applied — the stream whose statistics the sequential fitting order needs.

A **consumer** declares *events* — a key and the taps it needs together — and is handed those tensors,
``(batch, seq, d)`` as the model produced them, once per batch, as soon as the last of them exists. It
chooses its rows with :meth:`~ghostsolve.pipeline.model.batches.CalibrationBatch.keep`. Engines know
nothing of statistics; consumers know nothing of execution.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.model.batches import CalibrationBatch
from ghostsolve.pipeline.model.surgery import Interval, check_intervals

__all__ = ["Consumer", "Event", "Plan", "PrunedStream", "StreamMap", "Tap", "describe_boundary"]

Stream = Literal["dense", "pruned"]


def describe_boundary(boundary: int, num_layers: int) -> str:
    """``"the input of layer b"`` or ``"the final norm's input"``, for messages."""
    return "the final norm's input" if boundary == num_layers else f"the input of layer {boundary}"


@dataclass(frozen=True)
class Tap:
    """A hidden state at one place of one stream (see the module docstring)."""

    kind: Literal["boundary", "mlp"]
    index: int
    stream: Stream = "dense"

    @classmethod
    def boundary(cls, b: int, stream: Stream = "dense") -> Tap:
        return cls("boundary", int(b), stream)

    @classmethod
    def mlp(cls, i: int, stream: Stream = "dense") -> Tap:
        return cls("mlp", int(i), stream)

    @property
    def order(self) -> tuple[int, int]:
        """Where the tap arises in a forward pass: layer ``i``'s MLP output comes after the stream entering
        ``i`` and before the one entering ``i + 1``; at one place the dense stream comes first."""
        position = 2 * self.index if self.kind == "boundary" else 2 * self.index + 1
        return position, 0 if self.stream == "dense" else 1

    def describe(self, num_layers: int) -> str:
        where = (
            describe_boundary(self.index, num_layers)
            if self.kind == "boundary"
            else f"the MLP output of layer {self.index}"
        )
        return where if self.stream == "dense" else f"{where} (pruned stream)"


Event = tuple[Hashable, tuple[Tap, ...]]
"""A consumer's event: a key it chooses and the taps it needs together."""


class Consumer:
    """Base class of what a capture computes; see the module docstring.

    Subclasses implement :meth:`events` and :meth:`consume`, and may override :meth:`finish` (called once
    after the last batch, to validate) and :attr:`done` (true once no further batch is needed).
    """

    def events(self) -> Sequence[Event]:
        raise NotImplementedError

    def consume(
        self, key: Hashable, tensors: Sequence[torch.Tensor], batch: CalibrationBatch, index: int
    ) -> None:
        """Called once per batch (``index`` counts the batches of this pass) for each event."""
        raise NotImplementedError

    def finish(self) -> None:
        """Called after the last batch."""

    @property
    def done(self) -> bool:
        return False


@dataclass(frozen=True)
class StreamMap:
    """The map that replaces a removed interval in the pruned stream (two-stream pass).

    ``fn(h, index)`` maps the stream ``h`` ``(batch, seq, d)`` of batch ``index`` entering the interval
    to the stream entering its first kept layer; ``modules`` are put on the execution device while it runs.
    """

    fn: Callable[[torch.Tensor, int], torch.Tensor]
    modules: tuple[nn.Module, ...] = ()


@dataclass
class PrunedStream:
    """The second stream of the two-stream pass (the sequential fitting order).

    Attributes
    ----------
    intervals : sequence of (start, end)
        The removed intervals (not overlapping), in the model's current numbering.
    on_interval : callable
        ``on_interval((start, end)) -> StreamMap or None``, called in model order as soon as every batch's
        events that end at ``end`` on the dense stream have been consumed (so an interval's statistics are
        complete); it returns the map that replaces the interval in the pruned stream (None: plain
        pruning, the stream passes unchanged).
    """

    intervals: Sequence[Interval]
    on_interval: Callable[[Interval], StreamMap | None]


@dataclass
class _Route:
    consumer: Consumer
    key: Hashable
    taps: tuple[Tap, ...]


@dataclass
class Plan:
    """The taps of all consumers in forward order, when each event completes and when a tap is released."""

    num_layers: int
    taps: list[Tap] = field(default_factory=list)
    completes: dict[Tap, list[_Route]] = field(default_factory=dict)
    releases: dict[Tap, list[Tap]] = field(default_factory=dict)

    @classmethod
    def build(cls, consumers: Sequence[Consumer], num_layers: int, pruned: PrunedStream | None) -> Plan:
        """Validate every tap against the model and the pruned stream, and order them.

        Raises
        ------
        GhostsolveError
            A tap outside the model, a pruned tap without a pruned stream or inside a removed interval,
            or no event at all.
        """
        plan = cls(num_layers)
        last_use: dict[Tap, tuple[int, int]] = {}
        for consumer in consumers:
            for key, taps in consumer.events():
                for tap in taps:
                    plan._check(tap, pruned)
                    last_use[tap] = max(last_use.get(tap, tap.order), max(t.order for t in taps))
                final = max(taps, key=lambda t: t.order)
                plan.completes.setdefault(final, []).append(_Route(consumer, key, tuple(taps)))
        if not last_use:
            raise GhostsolveError("nothing to capture: the consumers declare no events")
        plan.taps = sorted(last_use, key=lambda t: t.order)
        by_order: dict[tuple[int, int], Tap] = {t.order: t for t in plan.taps}
        for tap, until in last_use.items():
            plan.releases.setdefault(by_order[until], []).append(tap)
        return plan

    def _check(self, tap: Tap, pruned: PrunedStream | None) -> None:
        top = self.num_layers if tap.kind == "boundary" else self.num_layers - 1
        if not 0 <= tap.index <= top:
            raise GhostsolveError(f"{tap} lies outside a model of {self.num_layers} layers")
        if tap.stream == "dense":
            return
        if pruned is None:
            raise GhostsolveError(f"{tap} reads the pruned stream, but no PrunedStream was given")
        for start, end in check_intervals(pruned.intervals, self.num_layers):
            inside = start < tap.index < end or (tap.kind == "mlp" and start <= tap.index < end)
            if inside:
                raise GhostsolveError(f"{tap} lies inside the removed interval {(start, end)}")

    @property
    def needed(self) -> frozenset[Tap]:
        """Every tap some event reads."""
        return frozenset(self.taps)

    @property
    def last(self) -> Tap:
        return self.taps[-1]

    def last_layer(self) -> int:
        """The last decoder layer that must run (the forward stops after it)."""
        tap = self.last
        return tap.index if tap.kind == "mlp" else tap.index - 1
