"""What every selection rule shares: the result (:class:`Selection`), the registry entry (:class:`Strategy`),
the context a rule receives, and the small helpers of ranking."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from ghostsolve.adapters import ModelAdapter
from ghostsolve.pipeline.capture.consumers import BoundaryStats, StatsSpec
from ghostsolve.pipeline.evaluate import mean_nll
from ghostsolve.pipeline.model.batches import CalibrationBatch
from ghostsolve.pipeline.model.surgery import Interval

__all__ = ["RuleResult", "Selection", "SelectionContext", "Strategy", "Unit", "argsort", "block", "ppl_of"]

Unit = Literal["layer", "block"]

RuleResult = tuple[list[float], list[int], dict[str, Any]]
"""What a rule returns: its scores, the layers it removes, and JSON-serializable details."""


@dataclass(frozen=True)
class Selection:
    """The layers a strategy chose to remove, and why.

    Attributes
    ----------
    strategy : str
        The strategy's name, a key of :data:`~ghostsolve.pipeline.select.STRATEGIES`.
    num_drop : int
        How many layers are removed.
    scores : list of float
        Unit ``"layer"``: one score per decoder layer (length ``num_layers``). Unit ``"block"``: one score per
        contiguous block start ``l`` (length ``num_layers - num_drop + 1``; block ``l .. l+num_drop-1``).
    selected : list of int
        Sorted 0-based indices of the layers to remove (``len == num_drop``, no duplicates).
    unit : {"layer", "block"}
        What ``scores`` is indexed by.
    score_name : str
        What a score measures, for tables and plot axes.
    removes : {"lowest", "highest"}
        Which end of the score scale the rule removes.
    details : dict
        JSON-serializable extras (e.g. the dense calibration perplexity, the rounds of an iterative rule).
    stats : dict
        Boundary statistics the rule captured for the chosen removal, ``(start, end) -> Stats`` (empty when
        it captured none); recovery reuses them instead of capturing again.
    """

    strategy: str
    num_drop: int
    scores: list[float]
    selected: list[int]
    unit: Unit
    score_name: str
    removes: Literal["lowest", "highest"]
    details: dict[str, Any] = field(default_factory=dict)
    stats: Mapping[Interval, BoundaryStats] = field(default_factory=dict, compare=False, repr=False)

    def to_report(self) -> dict[str, Any]:
        """The JSON report: ``{"strategy", "num_drop", "scores", "selected"}`` plus descriptive keys.

        Non-finite scores become ``None`` (JSON has no NaN or infinity).
        """
        from ghostsolve.pipeline.io.jsonio import to_json

        return to_json({
            "strategy": self.strategy, "num_drop": self.num_drop, "scores": self.scores,
            "selected": list(self.selected), "unit": self.unit, "score_name": self.score_name,
            "removes": self.removes, "details": self.details,
        })  # fmt: skip


@dataclass
class SelectionContext:
    """What a rule receives: the model, its adapter and the parsed calibration batches.

    A rule that captures boundary statistics of candidate removals leaves those of its choice in
    ``captured`` (``(start, end) -> Stats``), and :func:`~ghostsolve.pipeline.select.select_layers` hands them
    on in :attr:`Selection.stats`. ``keep_stats`` asks the block rules to capture them in their own pass, as
    that spec says (the statistics a recovery will need), when they fit ``max_stats_bytes``.
    """

    model: nn.Module
    adapter: ModelAdapter
    batches: list[CalibrationBatch]
    captured: dict[Interval, BoundaryStats] = field(default_factory=dict)
    keep_stats: StatsSpec | None = None
    max_stats_bytes: int = 8 * 2**30

    def affordable(self, candidates: int) -> bool:
        """Whether the statistics of ``candidates`` blocks fit :attr:`max_stats_bytes` (``16 d²`` bytes each,
        times the folds)."""
        dim = int(getattr(self.model.config, "hidden_size"))  # noqa: B009 - nn.Module attributes type as Tensor
        folds = self.keep_stats.folds if self.keep_stats is not None and self.keep_stats.folds else 1
        return candidates * folds * 16 * dim * dim <= self.max_stats_bytes

    @property
    def num_layers(self) -> int:
        return len(self.adapter.layers(self.model))


@dataclass(frozen=True)
class Strategy:
    """A registered selection rule.

    Attributes
    ----------
    name : str
        Registry key.
    unit : {"layer", "block"}
        Whether scores are per layer or per contiguous block of ``num_drop`` layers.
    score_name : str
        What a score measures.
    removes : {"lowest", "highest"}
        Which end of the scale is removed.
    options : tuple of str
        Keyword options accepted by :func:`~ghostsolve.pipeline.select.select_layers` for this rule.
    reference : str
        Where the rule was published.
    run : callable
        ``run(ctx, num_drop, **options) -> (scores, selected, details)``.
    infinite_ok : bool
        Whether ``+inf`` is a meaningful score (a perplexity that overflows: that removal breaks the model and
        ranks last). NaN is never a score.
    """

    name: str
    unit: Unit
    score_name: str
    removes: Literal["lowest", "highest"]
    options: tuple[str, ...]
    reference: str
    run: Callable[..., RuleResult]
    infinite_ok: bool = False


def argsort(scores: Sequence[float], *, descending: bool = False) -> list[int]:
    """Indices of ``scores`` from best to worst; ties go to the lower index (selections are deterministic)."""
    return sorted(range(len(scores)), key=lambda i: (-scores[i] if descending else scores[i], i))


def block(start: int, num_drop: int) -> list[int]:
    """The layers ``start .. start + num_drop - 1``."""
    return list(range(start, start + num_drop))


def ppl_of(model: nn.Module, batches: Sequence[CalibrationBatch]) -> float:
    """Calibration perplexity (the one NLL routine); infinity where ``exp`` would overflow float64."""
    nll, _ = mean_nll(model, batches)
    # exp overflows float64 beyond ~709 nats per token; such a model is broken anyway, report infinity.
    return math.exp(nll) if nll < 700 else math.inf
