"""Perplexity with layers removed: PPL (Shortened LLaMA, one shot) and SLEB (greedy, iterative).

Removal is simulated with :func:`~ghostsolve.pipeline.model.surgery.bypassed`; perplexity is the calibration
perplexity of the one NLL routine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from ghostsolve.pipeline.model.surgery import bypassed
from ghostsolve.pipeline.progress import progress_bar
from ghostsolve.pipeline.select.base import RuleResult, SelectionContext, argsort, ppl_of

__all__ = ["greedy", "ppl_without", "run_ppl", "run_sleb"]

logger = logging.getLogger(__name__)


def ppl_without(ctx: SelectionContext, removed: Iterable[int]) -> float:
    """Calibration perplexity with the layers ``removed`` bypassed."""
    with bypassed(ctx.model, removed, adapter=ctx.adapter):
        return ppl_of(ctx.model, ctx.batches)


def run_ppl(ctx: SelectionContext, num_drop: int) -> RuleResult:
    dense = ppl_of(ctx.model, ctx.batches)
    layers = progress_bar(range(ctx.num_layers), None, "ppl: one layer removed", unit="layer")
    scores = [ppl_without(ctx, [layer]) for layer in layers]
    return scores, sorted(argsort(scores)[:num_drop]), {"dense_perplexity": dense}


def greedy(
    ctx: SelectionContext, num_drop: int, removal_ppl: Callable[[list[int]], float], label: str
) -> RuleResult:
    """Remove one layer per round: the one whose removal (with those already removed) scores lowest.

    A layer once removed is never a candidate again, so the rounds remove ``num_drop`` distinct layers.
    Returns the first round's scores (every layer removed alone), the removed layers, and every round's
    scores (``None`` for layers already removed).
    """
    dense = ppl_of(ctx.model, ctx.batches)
    removed: list[int] = []
    rounds: list[list[float | None]] = []
    first_round: list[float] = []
    for r in range(num_drop):
        candidates = [layer for layer in range(ctx.num_layers) if layer not in removed]
        row: list[float | None] = [None] * ctx.num_layers
        for layer in progress_bar(candidates, None, f"{label} round {r + 1}/{num_drop}", unit="layer"):
            row[layer] = removal_ppl([*removed, layer])
        best = min(candidates, key=lambda layer: (row[layer], layer))
        removed.append(best)
        rounds.append(row)
        if r == 0:
            first_round = [float(v) for v in row]  # type: ignore[arg-type]
        logger.info("%s round %d removes layer %d (calibration ppl %.4g)", label, r + 1, best, row[best])
    details = {"dense_perplexity": dense, "removal_order": removed, "rounds": rounds}
    return first_round, sorted(removed), details


def run_sleb(ctx: SelectionContext, num_drop: int) -> RuleResult:
    return greedy(ctx, num_drop, lambda removed: ppl_without(ctx, removed), "sleb")
