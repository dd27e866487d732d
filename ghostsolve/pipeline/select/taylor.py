"""Taylor+ (Shortened LLaMA): first-order importance ``Σ |w · ∂L/∂w|`` of each layer's parameters."""

from __future__ import annotations

import math

import torch

from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.evaluate import logits_of, shifted_nll
from ghostsolve.pipeline.model.batches import eval_mode
from ghostsolve.pipeline.progress import progress_bar
from ghostsolve.pipeline.select.base import RuleResult, SelectionContext, argsort

__all__ = ["run_taylor"]


def _keep_defaults(num_layers: int) -> tuple[int, int]:
    # Shortened LLaMA keeps the first 4 and the last 2 of LLaMA-7B's 32 blocks; scale that proportionally.
    return math.ceil(num_layers * 4 / 32), math.ceil(num_layers * 2 / 32)


def _candidates(num_layers: int, num_drop: int, keep_first: int, keep_last: int) -> list[int]:
    if keep_first < 0 or keep_last < 0:
        raise GhostsolveError(f"keep_first and keep_last must be >= 0, got {keep_first} and {keep_last}")
    candidates = list(range(keep_first, num_layers - keep_last))
    if len(candidates) < num_drop:
        raise GhostsolveError(
            f"taylor keeps the first {keep_first} and last {keep_last} of {num_layers} layers (the '+' "
            f"heuristic), leaving {len(candidates)} candidates for num_drop={num_drop}; pass smaller "
            "keep_first/keep_last options (0 and 0 give plain Taylor)"
        )
    return candidates


def _importance(ctx: SelectionContext) -> list[float]:
    """``Σ |w · ∂L/∂w|`` per decoder layer, L the mean NLL over every predicted calibration token.

    Gradients are computed for the decoder layers' parameters only (embeddings and lm_head would double the
    memory); every parameter's ``requires_grad`` and ``grad`` are restored afterwards, also on error.
    """
    params = list(ctx.model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    layer_params = [list(layer.parameters()) for layer in ctx.adapter.layers(ctx.model)]
    wanted = {id(p) for ps in layer_params for p in ps}
    total_tokens = 0
    try:
        for p in params:
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        with eval_mode(ctx.model):
            for batch in progress_bar(ctx.batches, None, "taylor pass"):
                nll, n = shifted_nll(logits_of(ctx.model, batch), batch)
                nll.backward()
                total_tokens += n
        if total_tokens == 0:
            raise GhostsolveError(
                "the calibration batches predict no tokens (every sequence has fewer than 2 real tokens); "
                "use longer calibration sequences"
            )
        scores = []
        for ps in layer_params:
            total = torch.zeros((), dtype=torch.float64)
            for p in ps:
                if p.grad is not None:
                    total += (p.detach().double() * p.grad.double()).abs().sum().cpu()
            # The summed gradient is divided once here: L is the mean over all predicted tokens.
            scores.append(float(total) / total_tokens)
        return scores
    finally:
        for p, (requires_grad, grad) in zip(params, saved, strict=True):
            p.requires_grad_(requires_grad)
            p.grad = grad


def run_taylor(
    ctx: SelectionContext, num_drop: int, *, keep_first: int | None = None, keep_last: int | None = None
) -> RuleResult:
    default_first, default_last = _keep_defaults(ctx.num_layers)
    keep_first = default_first if keep_first is None else keep_first
    keep_last = default_last if keep_last is None else keep_last
    candidates = _candidates(ctx.num_layers, num_drop, keep_first, keep_last)
    scores = _importance(ctx)
    order = [i for i in argsort(scores) if i in candidates]
    details = {"keep_first": keep_first, "keep_last": keep_last, "candidates": candidates}
    return scores, sorted(order[:num_drop]), details
