"""The registry of selection rules and :func:`select_layers`, the one entry point."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from torch import nn

from ghostsolve.adapters import get_adapter
from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.capture import StatsSpec
from ghostsolve.pipeline.model.batches import as_batches
from ghostsolve.pipeline.select.base import Selection, SelectionContext, Strategy
from ghostsolve.pipeline.select.cosine import run_angular, run_block_influence, run_streamline
from ghostsolve.pipeline.select.recoverable import (
    run_recoverable,
    run_recoverable_greedy,
    run_recoverable_ppl,
)
from ghostsolve.pipeline.select.removal import run_ppl, run_sleb
from ghostsolve.pipeline.select.taylor import run_taylor

__all__ = ["STRATEGIES", "select_layers"]

logger = logging.getLogger(__name__)

_RECOVERABLE_OPTIONS = ("skip_first_token", "ridge", "max_stats_bytes", "normalize")

STRATEGIES: Mapping[str, Strategy] = MappingProxyType({
    s.name: s
    for s in (
        Strategy("block-influence", "layer", "block influence 1 - mean cos(h_l, h_l+1)", "lowest",
                 ("skip_first_token",), "ShortGPT (Men et al., 2024)", run_block_influence),
        Strategy("angular", "block", "angular distance arccos(cos(h_l, h_l+n)) / pi", "lowest",
                 ("last_token", "skip_first_token"), "Gromov et al., 2024", run_angular),
        Strategy("streamline", "block", "mean cos(h_l, h_l+n)", "highest", ("skip_first_token",),
                 "LLM-Streamline (Chen et al., 2024)", run_streamline),
        Strategy("sleb", "layer", "calibration perplexity, layer removed (round 1)", "lowest", (),
                 "SLEB (Song et al., 2024)", run_sleb, infinite_ok=True),
        Strategy("ppl", "layer", "calibration perplexity, layer removed alone", "lowest", (),
                 "Shortened LLaMA, PPL (Kim et al., 2024)", run_ppl, infinite_ok=True),
        Strategy("taylor", "layer", "Taylor importance sum |w * dL/dw|", "lowest",
                 ("keep_first", "keep_last"), "Shortened LLaMA, Taylor+ (Kim et al., 2024)", run_taylor),
        Strategy("recoverable", "block", "ghost-fit residual / stream energy", "lowest", _RECOVERABLE_OPTIONS,
                 "ghostsolve", run_recoverable),
        Strategy("recoverable-ppl", "block", "calibration perplexity after ghost recovery", "lowest",
                 ("top_k", *_RECOVERABLE_OPTIONS), "ghostsolve", run_recoverable_ppl, infinite_ok=True),
        Strategy("recoverable-greedy", "layer", "calibration perplexity after ghost recovery (round 1)",
                 "lowest", ("skip_first_token", "ridge"),
                 "ghostsolve (SLEB's greedy search, each candidate ghost-recovered)",
                 run_recoverable_greedy, infinite_ok=True),
    )
})  # fmt: skip
"""Selection rules by name; see :mod:`ghostsolve.pipeline.select` for each score."""


def _check_scores(model: nn.Module, spec: Strategy, num_drop: int, scores: list[float],
                  details: Mapping[str, Any]) -> None:  # fmt: skip
    """Refuse a ranking built on NaN (or, where infinity means nothing, infinite) scores.

    A NaN score compares false with everything, so the ranking would silently follow the order of the
    finite ones: typically fp16 hidden states that overflowed inside a layer. A rule that scores only a
    ``shortlist`` (recoverable-ppl: NaN marks the blocks it did not re-rank) is checked on the shortlist and
    on the ``relative_residuals`` it shortlisted from.
    """
    shortlist = details.get("shortlist")
    checked = sorted(shortlist) if isinstance(shortlist, list) else range(len(scores))
    bad = [i for i in checked if math.isnan(scores[i]) or (math.isinf(scores[i]) and not spec.infinite_ok)]
    residuals = details.get("relative_residuals")
    if isinstance(residuals, list):
        bad = sorted({*bad, *(i for i, r in enumerate(residuals) if not math.isfinite(float(r)))})
        shown = zip(residuals, scores, strict=True)
        scores = [float(r) if not math.isfinite(float(r)) else s for r, s in shown]
    if not bad:
        return
    first = bad[0]
    where = "layer" if spec.unit == "layer" else "block starting at layer"
    span = str(first)
    if spec.unit == "block" and num_drop > 1:
        span += f" ({first}-{first + num_drop - 1})"
    dtype = next((p.dtype for p in model.parameters()), None)
    name = "the model's dtype" if dtype is None else str(dtype).removeprefix("torch.")
    raise GhostsolveError(
        f"strategy {spec.name!r} gave {len(bad)} non-finite score(s) (first: {where} {span}, "
        f"{scores[first]}); the hidden states overflow or hold NaN there (in {name}), so no layer can be "
        "ranked: load the model in float32 (--dtype float32), or check that layer's weights"
    )


def select_layers(
    model: nn.Module,
    batches: Iterable[Any],
    strategy: str,
    num_drop: int,
    *,
    keep_stats: StatsSpec | None = None,
    **options: Any,
) -> Selection:
    """Choose ``num_drop`` decoder layers to remove with a named strategy.

    Parameters
    ----------
    model : transformers causal LM
        A model that :func:`ghostsolve.adapters.get_adapter` knows. It is left unmodified (hooks, gradients,
        ``requires_grad`` flags and train/eval mode are restored, also on error).
    batches : iterable of batches
        Calibration batches: ``input_ids`` ``(batch, tokens)`` int64, or mappings with ``"input_ids"`` and an
        optional ``"attention_mask"``. Consumed into a list, since most rules make several passes.
    strategy : str
        A key of :data:`STRATEGIES`.
    num_drop : int
        Number of layers to remove, ``1 <= num_drop < num_layers``.
    **options
        Strategy options: ``last_token`` (angular), ``skip_first_token`` (cosine rules and recoverable: drop
        each row's first real token, an attention sink in real LLMs), ``keep_first`` / ``keep_last`` (taylor),
        ``top_k`` (recoverable-ppl, default 3), ``ridge``, ``normalize`` and ``max_stats_bytes`` (recoverable
        rules; the fp64 statistics of one candidate block take ``16 d^2`` bytes, and the candidates are
        captured in groups that fit ``max_stats_bytes``, default 8 GiB, one pass per group).
    keep_stats : StatsSpec, optional
        The statistics a recovery of the chosen block will need
        (:func:`ghostsolve.pipeline.recover.stats_spec`): the block rules (angular, streamline, the
        recoverable rules) capture them for every candidate block in their own pass, within
        ``max_stats_bytes``, and hand the chosen block's on in :attr:`Selection.stats`, so that recovery makes
        no second pass.

    Returns
    -------
    Selection
        ``selected`` holds ``num_drop`` sorted, distinct 0-based layer indices; ``stats`` the boundary
        statistics of the chosen block where the rule captured them (the recoverable rules).

    Raises
    ------
    GhostsolveError
        Unknown strategy or option, ``num_drop`` out of range, malformed or empty batches, a model family
        without an adapter, or batches with no usable tokens.

    Examples
    --------
    >>> sel = select_layers(model, batches, "angular", 2)  # doctest: +SKIP
    >>> sel.selected  # doctest: +SKIP
    [5, 6]
    """
    if strategy not in STRATEGIES:
        raise GhostsolveError(
            f"unknown selection strategy {strategy!r}; choose one of "
            f"{', '.join(STRATEGIES)}"
        )
    spec = STRATEGIES[strategy]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise GhostsolveError(
            f"strategy {strategy!r} does not accept option(s) {unknown}; "
            f"it accepts {list(spec.options) or 'no options'}"
        )
    adapter = get_adapter(model)
    num_layers = len(adapter.layers(model))
    if isinstance(num_drop, bool) or not isinstance(num_drop, int) or not 1 <= num_drop < num_layers:
        raise GhostsolveError(
            f"num_drop must be an int with 1 <= num_drop < {num_layers} (the model has {num_layers} decoder "
            f"layers and at least one must stay), got {num_drop!r}"
        )
    ctx = SelectionContext(model, adapter, as_batches(batches), keep_stats=keep_stats)
    if "max_stats_bytes" in options:
        ctx.max_stats_bytes = int(options["max_stats_bytes"])
    scores, selected, details = spec.run(ctx, num_drop, **options)
    _check_scores(model, spec, num_drop, [float(s) for s in scores], details)
    if len(set(selected)) != num_drop:  # a broken rule must not silently remove fewer layers
        raise AssertionError(f"strategy {strategy!r} selected {selected} for num_drop={num_drop}")
    logger.info("%s selects layers %s", strategy, selected)
    return Selection(
        strategy=strategy, num_drop=num_drop, scores=[float(s) for s in scores], selected=sorted(selected),
        unit=spec.unit, score_name=spec.score_name, removes=spec.removes, details=details,
        stats=dict(ctx.captured),
    )  # fmt: skip
