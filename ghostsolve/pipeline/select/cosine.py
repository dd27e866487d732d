"""Cosine rules, all from one capture pass: block influence (ShortGPT), angular distance (Gromov et al.),
LLM-Streamline."""

from __future__ import annotations

from ghostsolve.pipeline.capture import CosineSums, run_capture
from ghostsolve.pipeline.select.base import RuleResult, SelectionContext, argsort, block

__all__ = ["run_angular", "run_block_influence", "run_streamline"]


def _cosines(
    ctx: SelectionContext, offset: int, *, last_token: bool = False, skip_first_token: bool = False
) -> tuple[list[float], list[float], int]:
    """Mean per-token cosine and angle between boundaries ``offset`` apart, per start; tokens counted."""
    pairs = [(a, a + offset) for a in range(ctx.num_layers + 1 - offset)]
    sums = CosineSums(pairs, skip_first_token=skip_first_token, last_token=last_token)
    run_capture(ctx.model, ctx.batches, [sums], adapter=ctx.adapter, progress=False)
    n = sums.n_tokens[pairs[0]]
    return [sums.cos[p] / n for p in pairs], [sums.angle[p] / n for p in pairs], n


def run_block_influence(
    ctx: SelectionContext, num_drop: int, *, skip_first_token: bool = False
) -> RuleResult:
    cos, _, n = _cosines(ctx, 1, skip_first_token=skip_first_token)
    scores = [1.0 - c for c in cos]
    return scores, sorted(argsort(scores)[:num_drop]), {"n_tokens": n}


def run_angular(
    ctx: SelectionContext, num_drop: int, *, last_token: bool = False, skip_first_token: bool = False
) -> RuleResult:
    _, scores, n = _cosines(ctx, num_drop, last_token=last_token, skip_first_token=skip_first_token)
    return scores, block(argsort(scores)[0], num_drop), {"n_tokens": n, "last_token": last_token}


def run_streamline(ctx: SelectionContext, num_drop: int, *, skip_first_token: bool = False) -> RuleResult:
    scores, _, n = _cosines(ctx, num_drop, skip_first_token=skip_first_token)
    return scores, block(argsort(scores, descending=True)[0], num_drop), {"n_tokens": n}
