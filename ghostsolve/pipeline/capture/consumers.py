"""What a capture computes from the taps an engine delivers (see :mod:`ghostsolve.pipeline.capture.plan`).

* :class:`IntervalStats` — :class:`ghostsolve.Stats` of ``Y ≈ X W`` per interval ``(start, end)``: ``X`` the
  stream entering ``start`` (dense, or the pruned stream of the sequential order), ``Y`` the dense stream
  entering ``end``. Intervals may overlap (the candidate blocks of a selection rule).
* :class:`ReplaceMeStats` — ReplaceMe's statistics on the MLP output of the last kept layer before a cut.
* :class:`RawRows` — the boundary rows themselves, for analyses that refit from rows (precision tables).
* :class:`CosineSums` — per-token cosines and angles between boundaries, for the selection rules.

Each one selects its rows with the one token rule
(:meth:`~ghostsolve.pipeline.model.batches.CalibrationBatch.keep`) and feeds :meth:`ghostsolve.Stats.update`
in chunks of at most :data:`CHUNK_ROWS` rows, whichever engine delivers them, so peak memory does not depend
on the engine.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ghostsolve.crossval import FoldedStats
from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.capture.plan import Consumer, Event, Tap, describe_boundary
from ghostsolve.pipeline.model.batches import CalibrationBatch
from ghostsolve.pipeline.model.surgery import Interval
from ghostsolve.stats import Stats

__all__ = [
    "CHUNK_ROWS",
    "BoundaryStats",
    "CosineSums",
    "IntervalStats",
    "RawRows",
    "ReplaceMeStats",
    "StatsSpec",
]

# Stats.update upcasts a chunk to fp64 ([X | Y - X]: 2·d·8 bytes a row); 4096 rows cap that at 0.5 GiB for
# d = 8192 while keeping the GEMMs large enough to run at full speed.
CHUNK_ROWS = 4096

BoundaryStats = Stats | FoldedStats
"""The statistics of one interval: one ``Stats``, or one per cross-validation fold (fitted as their sum)."""



@dataclass(frozen=True)
class StatsSpec:
    """How a consumer creates the statistics of one interval.

    Attributes
    ----------
    dtype : torch.dtype
        Accumulation dtype (fp64 by default).
    product_dtype : torch.dtype, optional
        Per-chunk product precision (see :class:`ghostsolve.Stats`); None = ``dtype``.
    options : mapping
        Further keyword arguments of :class:`ghostsolve.Stats` (which optional sums to keep).
    folds : int, optional
        Keep one ``Stats`` per cross-validation fold; each calibration sequence goes whole to fold
        ``sequence_index mod folds`` (its position in the calibration set; the order seen when unknown).
    """

    dtype: torch.dtype = torch.float64
    product_dtype: torch.dtype | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    folds: int | None = None

    def new(self, dim: int, device: torch.device) -> BoundaryStats:
        """``Stats``, or with ``folds`` a :class:`~ghostsolve.crossval.FoldedStats` of that many folds."""
        kwargs = {"dtype": self.dtype, "device": device, "product_dtype": self.product_dtype, **self.options}
        if self.folds is not None:
            return FoldedStats(dim, n_folds=self.folds, **{k: v for k, v in kwargs.items() if k != "qr"})
        return Stats(dim, **kwargs)


def _rows(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])[keep.reshape(-1).to(x.device)]


class _StatsTable:
    """Lazily created statistics per key, fed in chunks, every error naming the interval."""

    def __init__(self, spec: StatsSpec, num_layers: int, what: str) -> None:
        self.spec, self.num_layers, self.what = spec, num_layers, what
        self.stats: dict[Any, BoundaryStats] = {}
        self.seen: dict[Any, int] = {}

    def folds_of(self, key: Interval, batch: CalibrationBatch) -> torch.Tensor | None:
        """Each row's fold (whole sequences), or None without folds; unnumbered rows count per key."""
        if self.spec.folds is None:
            return None
        rows = batch.shape[0]
        index = batch.sequence_index
        if index is None:
            index = torch.arange(self.seen.get(key, 0), self.seen.get(key, 0) + rows)
        self.seen[key] = self.seen.get(key, 0) + rows
        return torch.as_tensor(index).long().cpu() % self.spec.folds

    def update(self, key: Interval, X: torch.Tensor, Y: torch.Tensor, fold: int | None = None) -> None:
        if X.device != Y.device:  # a model split over devices: the interval spans two of them
            X = X.to(Y.device)
        stats = self.stats.get(key)
        if stats is None:
            stats = self.stats[key] = self.spec.new(int(X.shape[-1]), Y.device)
        try:
            for first in range(0, X.shape[0], CHUNK_ROWS):
                chunk = (X[first : first + CHUNK_ROWS], Y[first : first + CHUNK_ROWS])
                if isinstance(stats, FoldedStats):
                    stats.update(*chunk, fold=int(fold or 0))
                else:
                    stats.update(*chunk)
        except GhostsolveError as err:
            start, end = key
            raise GhostsolveError(
                f"calibration statistics of interval {key}{self.what} (from "
                f"{describe_boundary(start, self.num_layers)} to {describe_boundary(end, self.num_layers)}) "
                f"failed: {err}. If the model runs in fp16/bf16, capture in fp32 (e.g. model.float()) or "
                "with fewer tokens per batch"
            ) from err

    def add(self, key: Interval, batch: CalibrationBatch, keep: torch.Tensor, x: torch.Tensor,
            y: torch.Tensor) -> None:  # fmt: skip
        """Rows ``keep`` of one batch's ``(batch, seq, d)`` tensors, sequence by sequence into their folds."""
        folds = self.folds_of(key, batch)
        if folds is None:
            self.update(key, _rows(x, keep), _rows(y, keep))
            return
        for fold in sorted(set(folds.tolist())):
            rows = (folds == fold).to(keep.device)
            self.update(key, _rows(x[rows], keep[rows]), _rows(y[rows], keep[rows]), fold)

    def check(self, keys: Iterable[Interval]) -> None:
        for key in keys:
            stats = self.stats.get(key)
            if stats is None or stats.n_rows <= 0:
                raise GhostsolveError(
                    f"interval {key}{self.what} saw no calibration tokens (every position was padding or the "
                    "skipped first token); pass longer or more sequences"
                )


class IntervalStats(Consumer):
    """Boundary statistics of intervals (see the module docstring).

    Parameters
    ----------
    intervals : sequence of (start, end)
        ``end`` exclusive, in the model's current numbering; may overlap.
    num_layers : int
        Layers of the model (names the final norm in messages).
    x_stream : {"dense", "pruned"}
        Which stream ``X`` is read from; ``Y`` is always the dense stream.
    skip_first_token : bool
        Exclude each row's first real token (BOS / attention sink).
    spec : StatsSpec, optional
        How the statistics are made (default: fp64 with every optional sum).

    Attributes
    ----------
    stats : dict
        ``(start, end) -> Stats``, on the device of ``Y``.
    """

    def __init__(
        self,
        intervals: Sequence[Interval],
        *,
        num_layers: int,
        x_stream: str = "dense",
        skip_first_token: bool = False,
        spec: StatsSpec | None = None,
    ) -> None:
        self.intervals = [(int(s), int(e)) for s, e in intervals]
        self.x_stream = x_stream
        self.skip_first_token = skip_first_token
        self._table = _StatsTable(spec or StatsSpec(), num_layers, "")

    @property
    def stats(self) -> dict[Interval, BoundaryStats]:
        return {iv: self._table.stats[iv] for iv in self.intervals if iv in self._table.stats}

    def adopt(self, stats: Mapping[Interval, BoundaryStats]) -> None:
        """Take statistics of these intervals captured elsewhere (on the same rows) as this consumer's."""
        self._table.stats.update(stats)

    def events(self) -> Sequence[Event]:
        return [
            (iv, (Tap.boundary(iv[0], self.x_stream), Tap.boundary(iv[1], "dense")))  # type: ignore[arg-type]
            for iv in self.intervals
        ]

    def consume(
        self, key: Hashable, tensors: Sequence[torch.Tensor], batch: CalibrationBatch, index: int
    ) -> None:
        x, y = tensors
        keep = batch.keep(skip_first_token=self.skip_first_token)
        self._table.add(key, batch, keep, x, y)  # type: ignore[arg-type]

    def finish(self) -> None:
        self._table.check(self.intervals)


class ReplaceMeStats(Consumer):
    """ReplaceMe's statistics: rows ``X = m`` and ``Y = y_e − x_s + m`` per interval ``(s, e)``.

    ``m`` is the MLP output of layer ``s − 1`` (the last kept layer before the cut), ``x_s = r + m`` the
    stream entering ``s`` (``r`` the stream after that layer's attention) and ``y_e`` the dense stream
    entering ``e``: ``Y`` is the target ``y_e − r`` of a map ``T`` with ``r + m T ≈ y_e``, which folds into
    that layer's down_proj. With ``keep_mlp_outputs`` the ``m`` of every batch is kept (on the CPU) for the
    two-stream pass, whose map for the interval is ``x_s ↦ x_s + m (T − I)``.

    Attributes
    ----------
    stats : dict
        ``(start, end) -> Stats``.
    mlp_outputs : dict
        ``(start, end) -> list of m per batch`` (with ``keep_mlp_outputs``).
    """

    def __init__(
        self,
        intervals: Sequence[Interval],
        *,
        num_layers: int,
        x_stream: str = "dense",
        skip_first_token: bool = False,
        spec: StatsSpec | None = None,
        keep_mlp_outputs: bool = False,
    ) -> None:
        self.intervals = [(int(s), int(e)) for s, e in intervals]
        for start, _ in self.intervals:
            if start == 0:
                raise GhostsolveError("an MLP-output interval needs a layer before it; (0, e) has none")
        self.x_stream = x_stream
        self.skip_first_token = skip_first_token
        self._table = _StatsTable(spec or StatsSpec(), num_layers, " (ReplaceMe MLP output)")
        self.keep_mlp_outputs = keep_mlp_outputs
        self.mlp_outputs: dict[Interval, list[torch.Tensor]] = {iv: [] for iv in self.intervals}

    @property
    def stats(self) -> dict[Interval, BoundaryStats]:
        return {iv: self._table.stats[iv] for iv in self.intervals if iv in self._table.stats}

    def events(self) -> Sequence[Event]:
        taps = []
        for s, e in self.intervals:
            stream = self.x_stream
            taps.append(((s, e), (Tap.mlp(s - 1, stream), Tap.boundary(s, stream), Tap.boundary(e))))  # type: ignore[arg-type]
        return taps

    def consume(
        self, key: Hashable, tensors: Sequence[torch.Tensor], batch: CalibrationBatch, index: int
    ) -> None:
        m, x, y = tensors
        if self.keep_mlp_outputs:
            self.mlp_outputs[key].append(m.detach().to("cpu", copy=True))  # type: ignore[index]
        dtype = self._table.spec.dtype
        keep = batch.keep(skip_first_token=self.skip_first_token)
        # The difference y − x cancels most digits in half precision: form it in the statistics' dtype.
        m = m.to(device=y.device, dtype=dtype)
        target = (y.to(dtype) - x.to(device=y.device, dtype=dtype)) + m
        self._table.add(key, batch, keep, m, target)  # type: ignore[arg-type]

    def finish(self) -> None:
        self._table.check(self.intervals)


class RawRows(Consumer):
    """The first ``max_rows`` boundary rows ``X`` (entering ``start``) and ``Y`` (entering ``end``) of one
    interval, on the CPU in the model's dtype; :attr:`done` once full, so the engine stops early."""

    def __init__(self, interval: Interval, *, max_rows: int, skip_first_token: bool = False) -> None:
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise GhostsolveError(f"max_rows must be a positive integer, got {max_rows!r}")
        self.interval = (int(interval[0]), int(interval[1]))
        self.max_rows = max_rows
        self.skip_first_token = skip_first_token
        self.xs: list[torch.Tensor] = []
        self.ys: list[torch.Tensor] = []
        self.total = 0

    def events(self) -> Sequence[Event]:
        return [(self.interval, (Tap.boundary(self.interval[0]), Tap.boundary(self.interval[1])))]

    def consume(
        self, key: Hashable, tensors: Sequence[torch.Tensor], batch: CalibrationBatch, index: int
    ) -> None:
        if self.done:
            return
        keep = batch.keep(skip_first_token=self.skip_first_token)
        x, y = (_rows(t, keep) for t in tensors)
        take = min(self.max_rows - self.total, x.shape[0])
        # A copy, so that no row aliases (and keeps alive) a whole activation of the model.
        self.xs.append(x[:take].to("cpu", copy=True))
        self.ys.append(y[:take].to("cpu", copy=True))
        self.total += take

    @property
    def done(self) -> bool:
        return self.total >= self.max_rows

    def finish(self) -> None:
        if self.total == 0:
            raise GhostsolveError(
                f"interval {self.interval} saw no calibration tokens (every position was padding or the "
                "skipped first token); pass longer or more sequences"
            )

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(X, Y)``, each ``(n_tokens, d)``, ``n_tokens <= max_rows``."""
        return torch.cat(self.xs), torch.cat(self.ys)


class CosineSums(Consumer):
    """Sums over tokens of ``cos(h_a, h_b)`` and of the angle ``arccos(cos) / π`` for boundary pairs.

    Cosines are per token over the hidden dimension, in fp64, over the tokens the rule keeps
    (``skip_first_token``, or ``last_token``: each row's last real token only).

    Attributes
    ----------
    cos, angle : dict
        ``(a, b) -> float`` sums; ``n_tokens`` : dict ``(a, b) -> int``.
    """

    def __init__(
        self, pairs: Sequence[tuple[int, int]], *, skip_first_token: bool = False, last_token: bool = False
    ) -> None:
        self.pairs = [(int(a), int(b)) for a, b in pairs]
        self.skip_first_token, self.last_token = skip_first_token, last_token
        self.cos = dict.fromkeys(self.pairs, 0.0)
        self.angle = dict.fromkeys(self.pairs, 0.0)
        self.n_tokens = dict.fromkeys(self.pairs, 0)

    def events(self) -> Sequence[Event]:
        return [((a, b), (Tap.boundary(a), Tap.boundary(b))) for a, b in self.pairs]

    def consume(
        self, key: Hashable, tensors: Sequence[torch.Tensor], batch: CalibrationBatch, index: int
    ) -> None:
        keep = batch.keep(skip_first_token=self.skip_first_token, last_token=self.last_token)
        h_a, h_b = (_rows(t, keep) for t in tensors)
        u = torch.nn.functional.normalize(h_a.to(device=h_b.device, dtype=torch.float64), dim=-1)
        v = torch.nn.functional.normalize(h_b.to(torch.float64), dim=-1)
        # Rounding can push |cos| a hair above 1, where arccos is NaN.
        cos = (u * v).sum(dim=-1).clamp(-1.0, 1.0)
        self.cos[key] += float(cos.sum())  # type: ignore[index]
        self.angle[key] += float((torch.arccos(cos) / math.pi).sum())  # type: ignore[index]
        self.n_tokens[key] += int(cos.numel())  # type: ignore[index]

    def finish(self) -> None:
        if any(n == 0 for n in self.n_tokens.values()):
            raise GhostsolveError(
                "the calibration batches contain no unmasked tokens; check the attention masks "
                "(and skip_first_token with one-token sequences)"
            )
