"""Recoverability-aware rules (ghostsolve's own): rank removals by how well a ghost operator repairs them.

* ``recoverable``: the ghost-fit residual of every contiguous block from one capture of overlapping
  candidate statistics; removes the smallest.
* ``recoverable-ppl``: the ``top_k`` best ``recoverable`` blocks, re-ranked by calibration perplexity after
  ghost recovery (fitted on the statistics already captured: no further capture).
* ``recoverable-greedy``: SLEB's greedy search with each candidate removal ghost-recovered first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ghostsolve.errors import GhostsolveError
from ghostsolve.fit import fit
from ghostsolve.pipeline.capture import BoundaryStats, IntervalStats, run_capture
from ghostsolve.pipeline.model.surgery import Interval
from ghostsolve.pipeline.progress import progress_bar
from ghostsolve.pipeline.recover import recover
from ghostsolve.pipeline.select.base import RuleResult, SelectionContext, argsort, block, ppl_of
from ghostsolve.pipeline.select.removal import greedy

__all__ = ["DEFAULT_MAX_STATS_BYTES", "run_recoverable", "run_recoverable_greedy", "run_recoverable_ppl"]

logger = logging.getLogger(__name__)

# fp64 statistics of one block hold two d x d matrices (X^T X and X^T (Y - X)); beyond this budget the
# candidate blocks are split into groups, one calibration pass per group.
DEFAULT_MAX_STATS_BYTES = 8 * 2**30


def _stats_bytes(dim: int) -> int:
    return 2 * dim * dim * 8


def _residual(stats: BoundaryStats, ridge: float, normalize: str) -> float:
    """``min_W Σ‖x W − y‖²`` over ``Σ‖y‖²`` (``"stream"``) or over ``Σ‖y − x‖²`` (``"block"``)."""
    ghost = fit(stats, family="full", ridge=ridge)
    if normalize == "block":
        # A block that leaves the stream exactly unchanged has 0/0 here: perfectly recoverable.
        dtd = float(stats.dtd)
        return ghost.objective / dtd if dtd > 0 else 0.0
    return ghost.objective / float(stats.yty)


def _candidate_residuals(
    ctx: SelectionContext, num_drop: int, *, skip_first_token: bool, ridge: float, max_stats_bytes: int,
    normalize: str, keep: int,
) -> tuple[list[float], dict[Interval, BoundaryStats], dict[str, Any]]:  # fmt: skip
    """Ghost-fit relative residual of every contiguous block ``(l, l + num_drop)``, and the statistics of the
    ``keep`` best ones.

    ``normalize="stream"``: ``min_W Σ‖x W − y‖² / Σ‖y‖²``, the error left after recovery relative to the
    residual stream it perturbs. ``normalize="block"``: ``min_W Σ‖x W − y‖² / Σ‖y − x‖²``
    (:attr:`ghostsolve.Fit.relative_residual`), the share of the block's own contribution that no linear map
    explains; it calls a block that barely changes the stream unrecoverable when that small change is
    nonlinear, so it is not the default. Groups of candidates that fit ``max_stats_bytes`` share a pass.
    """
    if normalize not in ("stream", "block"):
        raise GhostsolveError(
            "normalize must be 'stream' (error / stream energy) or 'block' (error / the block's own change), "
            f"got {normalize!r}"
        )
    starts = list(range(ctx.num_layers - num_drop + 1))
    dim = int(getattr(ctx.model.config, "hidden_size"))  # noqa: B009 - nn.Module attributes type as Tensor
    per_group = max(1, max_stats_bytes // _stats_bytes(dim))
    groups = [starts[i : i + per_group] for i in range(0, len(starts), per_group)]
    if len(groups) > 1:
        logger.info("recoverable: %d candidate blocks need %.1f GiB of fp64 statistics; %d passes of <= %d",
                    len(starts), len(starts) * _stats_bytes(dim) / 2**30, len(groups), per_group)  # fmt: skip
    residuals: dict[int, float] = {}
    best: dict[Interval, BoundaryStats] = {}
    for group in groups:
        consumer = IntervalStats([(l, l + num_drop) for l in group], num_layers=ctx.num_layers,
                                 skip_first_token=skip_first_token, spec=ctx.keep_stats)  # fmt: skip
        run_capture(ctx.model, ctx.batches, [consumer], adapter=ctx.adapter, progress=False)
        for interval, stats in consumer.stats.items():
            residuals[interval[0]] = _residual(stats, ridge, normalize)
            best[interval] = stats
        # Only the statistics of the best candidates so far stay in memory.
        ranked = sorted(best, key=lambda iv: (residuals[iv[0]], iv[0]))
        best = {iv: best[iv] for iv in ranked[:keep]}
    details = {"passes": len(groups), "ridge": ridge, "normalize": normalize}
    return [residuals[l] for l in starts], best, details


def run_recoverable(
    ctx: SelectionContext, num_drop: int, *, skip_first_token: bool = False, ridge: float = 0.0,
    max_stats_bytes: int = DEFAULT_MAX_STATS_BYTES, normalize: str = "stream",
) -> RuleResult:  # fmt: skip
    scores, kept, details = _candidate_residuals(
        ctx, num_drop, skip_first_token=skip_first_token, ridge=ridge, max_stats_bytes=max_stats_bytes,
        normalize=normalize, keep=1,
    )  # fmt: skip
    start = argsort(scores)[0]
    ctx.captured.update(kept)
    return scores, block(start, num_drop), details


def _ghost_recovered_ppl(
    ctx: SelectionContext, removed: Sequence[int], *, ridge: float, skip_first_token: bool,
    stats: Mapping[Interval, BoundaryStats] | None = None,
) -> float:  # fmt: skip
    """Calibration perplexity of a copy of the model with ``removed`` removed and ghost-recovered."""
    recovery = recover(ctx.model, sorted(removed), ctx.batches, method="ghost", ridge=ridge,
                       skip_first_token=skip_first_token, progress=False, stats=stats)  # fmt: skip
    return ppl_of(recovery.model, ctx.batches)


def run_recoverable_ppl(
    ctx: SelectionContext, num_drop: int, *, top_k: int = 3, skip_first_token: bool = False,
    ridge: float = 0.0, max_stats_bytes: int = DEFAULT_MAX_STATS_BYTES, normalize: str = "stream",
) -> RuleResult:  # fmt: skip
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise GhostsolveError(f"top_k must be a positive int, got {top_k!r}")
    residuals, kept, details = _candidate_residuals(
        ctx, num_drop, skip_first_token=skip_first_token, ridge=ridge, max_stats_bytes=max_stats_bytes,
        normalize=normalize, keep=top_k,
    )  # fmt: skip
    shortlist = argsort(residuals)[:top_k]
    scores = [math.nan] * len(residuals)
    for start in progress_bar(shortlist, None, "recoverable-ppl: ghost recovery", unit="block"):
        interval = (start, start + num_drop)
        scores[start] = _ghost_recovered_ppl(ctx, block(start, num_drop), ridge=ridge,
                                             skip_first_token=skip_first_token,
                                             stats={interval: kept[interval]})  # fmt: skip
    best = min(shortlist, key=lambda s: (scores[s], s))
    ctx.captured[(best, best + num_drop)] = kept[(best, best + num_drop)]
    details.update({"relative_residuals": residuals, "shortlist": shortlist, "top_k": top_k})
    return scores, block(best, num_drop), details


def run_recoverable_greedy(
    ctx: SelectionContext, num_drop: int, *, ridge: float = 0.0, skip_first_token: bool = False
) -> RuleResult:
    def removal_ppl(removed: list[int]) -> float:
        return _ghost_recovered_ppl(ctx, removed, ridge=ridge, skip_first_token=skip_first_token)

    return greedy(ctx, num_drop, removal_ppl, "recoverable-greedy")
