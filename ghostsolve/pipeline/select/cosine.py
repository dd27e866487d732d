"""Cosine rules, all from one capture pass: block influence (ShortGPT), angular distance (Gromov et al.),
LLM-Streamline."""

from __future__ import annotations

from ghostsolve.pipeline.capture import Consumer, CosineSums, IntervalStats, run_capture
from ghostsolve.pipeline.select.base import RuleResult, SelectionContext, argsort, block

__all__ = ["run_angular", "run_block_influence", "run_streamline"]


def _cosines(
    ctx: SelectionContext, offset: int, *, last_token: bool = False, skip_first_token: bool = False,
    blocks: bool = False,
) -> tuple[list[float], list[float], int, IntervalStats | None]:  # fmt: skip
    """Mean per-token cosine and angle between boundaries ``offset`` apart, per start; tokens counted.

    With ``blocks`` (a block rule) and ``ctx.keep_stats``, the same pass also captures every candidate block's
    boundary statistics, so that the recovery of the chosen one needs no capture of its own.
    """
    pairs = [(a, a + offset) for a in range(ctx.num_layers + 1 - offset)]
    sums = CosineSums(pairs, skip_first_token=skip_first_token, last_token=last_token)
    consumers: list[Consumer] = [sums]
    candidates = None
    if blocks and ctx.keep_stats is not None and not last_token and ctx.affordable(len(pairs)):
        candidates = IntervalStats(pairs, num_layers=ctx.num_layers, skip_first_token=skip_first_token,
                                   spec=ctx.keep_stats)  # fmt: skip
        consumers.append(candidates)
    run_capture(ctx.model, ctx.batches, consumers, adapter=ctx.adapter, progress=False)
    n = sums.n_tokens[pairs[0]]
    return [sums.cos[p] / n for p in pairs], [sums.angle[p] / n for p in pairs], n, candidates


def _keep(ctx: SelectionContext, candidates: IntervalStats | None, start: int, num_drop: int) -> None:
    if candidates is not None:
        interval = (start, start + num_drop)
        ctx.captured[interval] = candidates.stats[interval]


def run_block_influence(
    ctx: SelectionContext, num_drop: int, *, skip_first_token: bool = False
) -> RuleResult:
    cos, _, n, _ = _cosines(ctx, 1, skip_first_token=skip_first_token)
    scores = [1.0 - c for c in cos]
    return scores, sorted(argsort(scores)[:num_drop]), {"n_tokens": n}


def run_angular(
    ctx: SelectionContext, num_drop: int, *, last_token: bool = False, skip_first_token: bool = False
) -> RuleResult:
    _, scores, n, candidates = _cosines(ctx, num_drop, last_token=last_token,
                                        skip_first_token=skip_first_token, blocks=True)  # fmt: skip
    start = argsort(scores)[0]
    _keep(ctx, candidates, start, num_drop)
    return scores, block(start, num_drop), {"n_tokens": n, "last_token": last_token}


def run_streamline(ctx: SelectionContext, num_drop: int, *, skip_first_token: bool = False) -> RuleResult:
    scores, _, n, candidates = _cosines(ctx, num_drop, skip_first_token=skip_first_token, blocks=True)
    start = argsort(scores, descending=True)[0]
    _keep(ctx, candidates, start, num_drop)
    return scores, block(start, num_drop), {"n_tokens": n}
