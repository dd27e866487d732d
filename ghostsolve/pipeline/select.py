"""Which decoder layers to remove: the published selection rules and a recoverability-aware one.

Every rule scores a model on calibration batches and returns a :class:`Selection`: the 0-based indices of
the layers to remove, the per-layer or per-block scores behind the choice, and details for the report.

Hidden states and what each score compares
------------------------------------------
``h_l`` is the residual stream *entering* decoder layer ``l`` (0-based), captured by a forward pre-hook on the
layer, for ``l = 0 .. L-1``; ``h_L`` is the input of the final norm, i.e. the output of the last layer before
normalization. This is the convention of ``docs/design.md`` (``X`` and ``Y`` of a removed interval). Hugging
Face's ``output_hidden_states`` returns ``h_0 .. h_{L-1}`` too, but its last entry is taken *after* the final
norm; comparing against it would score the last layer on a different scale, so it is not used.

All cosines are computed **per token over the hidden dimension**, in fp64, over the tokens that the
attention mask keeps (padding never counts), and then averaged over tokens. Some reference implementations
call ``cosine_similarity`` along the token (sequence) axis of a ``(batch, tokens, hidden)`` tensor instead,
which compares a feature's trajectory over positions rather than two token representations; that is not the
quantity the papers define, and this module does not reproduce it.

Strategies (``STRATEGIES``)
---------------------------
==================  =====  ===========================================================================
name                unit   score and rule
==================  =====  ===========================================================================
block-influence     layer  ShortGPT: ``BI_l = 1 - mean_t cos(h_l, h_{l+1})``; remove the ``n`` lowest
                           (possibly non-contiguous).
angular             block  Gromov et al.: ``d_l = mean_t arccos(cos(h_l, h_{l+n})) / pi``; remove the
                           block ``l .. l+n-1`` with the smallest distance. ``last_token=True`` uses only
                           the last (non-padding) token of each sequence, as the paper does.
streamline          block  LLM-Streamline: ``s_l = mean_t cos(h_l, h_{l+n})``; remove the block with the
                           highest similarity.
sleb                layer  SLEB: iterative and greedy; each round removes the layer whose (additional)
                           removal gives the lowest calibration perplexity, recomputed after each removal.
ppl                 layer  Shortened LLaMA (PPL): calibration perplexity with each layer removed alone;
                           remove the ``n`` lowest, one shot.
taylor              layer  Shortened LLaMA (Taylor+): ``sum |w * dL/dw|`` over the layer's parameters;
                           remove the ``n`` lowest among layers outside the first ``keep_first`` and last
                           ``keep_last`` (the "+" heuristic).
recoverable         block  New: ``min_W sum_t ||h_l W - h_{l+n}||^2 / sum_t ||h_{l+n}||^2``, the residual
                           of the ghost (``family="full"``) fit of block ``(l, l+n)`` relative to the
                           stream, for every block from one pass of statistics; remove the smallest.
                           (``normalize="block"`` divides by ``sum_t ||h_{l+n} - h_l||^2`` instead.)
recoverable-ppl     block  New: the ``top_k`` best ``recoverable`` blocks, re-ranked by calibration
                           perplexity after ghost recovery.
recoverable-greedy  layer  New: SLEB's iterative greedy search, but each candidate removal set is
                           ghost-recovered (fitted on the calibration batches) before its calibration
                           perplexity is measured; may remove non-contiguous layers.
==================  =====  ===========================================================================

``Selection.scores`` is indexed by layer (length ``L``) for unit ``layer`` and by block start ``l``
(length ``L - n + 1``, block ``l .. l+n-1``) for unit ``block``.

Removal in the perplexity-based rules is simulated by a forward hook that returns a layer's input as its
output (the layer still runs, its result is discarded), which equals removing the layer for a forward pass
without a cache and leaves the model's structure, config and per-layer attributes untouched.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ghostsolve.adapters import ModelAdapter, get_adapter
from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.devices import model_input_device

__all__ = [
    "STRATEGIES",
    "Batch",
    "Selection",
    "Strategy",
    "select_layers",
]

logger = logging.getLogger(__name__)

Batch = Tensor | Mapping[str, Tensor]
"""A calibration batch: ``input_ids`` ``(batch, tokens)`` int64, or a mapping with ``"input_ids"`` and an
optional ``"attention_mask"`` (1 = real token, 0 = padding) of the same shape."""

Unit = Literal["layer", "block"]


@dataclass(frozen=True)
class Selection:
    """The layers a strategy chose to remove, and why.

    Attributes
    ----------
    strategy : str
        The strategy's name, a key of :data:`STRATEGIES`.
    num_drop : int
        How many layers are removed.
    scores : list of float
        Unit ``"layer"``: one score per decoder layer (length ``num_layers``). Unit ``"block"``: one score
        per contiguous block start ``l`` (length ``num_layers - num_drop + 1``; block ``l .. l+num_drop-1``).
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
    """

    strategy: str
    num_drop: int
    scores: list[float]
    selected: list[int]
    unit: Unit
    score_name: str
    removes: Literal["lowest", "highest"]
    details: dict[str, Any] = field(default_factory=dict)

    def to_report(self) -> dict[str, Any]:
        """The JSON report: ``{"strategy", "num_drop", "scores", "selected"}`` plus descriptive keys.

        Non-finite scores become ``None`` (JSON has no NaN or infinity).
        """
        return {
            "strategy": self.strategy,
            "num_drop": self.num_drop,
            "scores": [s if math.isfinite(s) else None for s in self.scores],
            "selected": list(self.selected),
            "unit": self.unit,
            "score_name": self.score_name,
            "removes": self.removes,
            "details": _json_safe(self.details),
        }


def _json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by ``None`` and tuples by lists, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


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
        Keyword options accepted by :func:`select_layers` for this rule.
    reference : str
        Where the rule was published.
    run : callable
        ``run(ctx, num_drop, **options) -> (scores, selected, details)``.
    """

    name: str
    unit: Unit
    score_name: str
    removes: Literal["lowest", "highest"]
    options: tuple[str, ...]
    reference: str
    run: Callable[..., tuple[list[float], list[int], dict[str, Any]]]


# ---------------------------------------------------------------------------------------------------------
# Model access and batches
# ---------------------------------------------------------------------------------------------------------


@dataclass
class _Context:
    model: nn.Module
    adapter: ModelAdapter
    layers: nn.ModuleList
    norm: nn.Module
    batches: list[Mapping[str, Tensor]]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def hidden_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        """The residual-stream argument of a decoder layer's (or the final norm's) forward call."""
        position = self.adapter.hidden_states_arg_position
        if len(args) > position:
            return args[position]  # type: ignore[no-any-return]
        return kwargs[self.adapter.hidden_states_kwarg]  # type: ignore[no-any-return]


def _unpack(batch: Batch) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        input_ids, mask = batch, None
    elif isinstance(batch, Mapping) and "input_ids" in batch:
        input_ids, mask = batch["input_ids"], batch.get("attention_mask")
    else:
        raise GhostsolveError(
            f"a calibration batch must be an input_ids tensor or a mapping with 'input_ids', got "
            f"{type(batch).__name__}; build batches with ghostsolve.pipeline.data"
        )
    if input_ids.ndim != 2:
        raise GhostsolveError(
            f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}; add a batch dimension"
        )
    if mask is not None and mask.shape != input_ids.shape:
        raise GhostsolveError(
            f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(input_ids.shape)}; "
            "they must match"
        )
    return input_ids, mask


def _forward(model: nn.Module, batch: Batch) -> Tensor:
    """Logits ``(batch, tokens, vocab)`` of one batch, without a cache."""
    input_ids, mask = _unpack(batch)
    device = model_input_device(model)
    kwargs: dict[str, Any] = {"input_ids": input_ids.to(device), "use_cache": False}
    if mask is not None:
        kwargs["attention_mask"] = mask.to(device)
    return model(**kwargs).logits


def _token_mask(
    input_ids: Tensor, mask: Tensor | None, *, skip_first_token: bool, last_token: bool
) -> Tensor:
    """Boolean ``(batch, tokens)``: the positions whose hidden states a cosine statistic uses."""
    keep = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    if last_token:
        # The last real token of each row, wherever the padding sits (left or right).
        positions = torch.arange(keep.shape[1], device=keep.device).expand_as(keep)
        last = torch.where(keep, positions, -1).amax(dim=1)
        one_hot = torch.zeros_like(keep)
        rows = torch.nonzero(last >= 0).flatten()
        one_hot[rows, last[rows]] = True
        return one_hot
    if skip_first_token:
        # The first *real* token of each row (left padding moves it): BOS, an attention sink in real LLMs.
        first = (keep.long().cumsum(dim=1) == 1) & keep
        keep = keep & ~first
    return keep


@contextlib.contextmanager
def _bypassed(ctx: _Context, indices: Iterable[int]) -> Iterator[None]:
    """Within the block, each layer in ``indices`` returns its input hidden states unchanged."""
    layers = ctx.layers

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        hidden = ctx.hidden_of(args, kwargs)
        # Older transformers return (hidden_states, ...) tuples from decoder layers; newer a tensor.
        if isinstance(output, tuple):
            return (hidden, *output[1:])
        return hidden

    handles = []
    try:
        for i in indices:
            handles.append(layers[i].register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------------------
# Cosine statistics (one pass)
# ---------------------------------------------------------------------------------------------------------


def _boundary_pass(
    ctx: _Context,
    pairs: Sequence[tuple[int, int]],
    on_pair: Callable[[int, int, Tensor, Tensor], None],
    *,
    last_token: bool = False,
    skip_first_token: bool = False,
    desc: str = "calibration pass",
) -> int:
    """One forward pass per batch; calls ``on_pair(a, b, H_a, H_b)`` for every boundary pair ``(a, b)``.

    Boundary ``j`` (``0 <= j <= L``) is the stream entering layer ``j``, or the final-norm input for
    ``j = L``. ``H_a`` and ``H_b`` are the rows ``(n_selected_tokens, d)`` of the two states at the tokens
    the mask keeps, in the model's dtype, on the device of ``H_b``. Only the states of one batch that a
    later pair still needs are held. Returns the number of selected tokens.
    """
    num_boundaries = ctx.num_layers + 1
    ends: dict[int, list[int]] = {}
    last_use: dict[int, int] = {}
    for a, b in pairs:
        ends.setdefault(b, []).append(a)
        last_use[a] = max(last_use.get(a, -1), b)
    state: dict[str, Any] = {"mask": None, "rows": {}, "seen": set()}

    def observe(j: int, hidden: Tensor) -> None:
        rows = hidden[state["mask"].to(hidden.device)]
        held: dict[int, Tensor] = state["rows"]
        for a in ends.get(j, ()):
            on_pair(a, j, held[a].to(rows.device), rows)
        if last_use.get(j, -1) > j:
            held[j] = rows
        for a in [a for a in held if last_use[a] <= j]:
            del held[a]
        state["seen"].add(j)

    def hook(j: int) -> Callable[..., None]:
        def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if j == ctx.num_layers:  # the final norm takes the stream as its only argument
                observe(j, args[0] if args else next(iter(kwargs.values())))
            else:
                observe(j, ctx.hidden_of(args, kwargs))

        return pre_hook

    handles = []
    n_tokens = 0
    try:
        for j, layer in enumerate(ctx.layers):
            handles.append(layer.register_forward_pre_hook(hook(j), with_kwargs=True))
        handles.append(ctx.norm.register_forward_pre_hook(hook(ctx.num_layers), with_kwargs=True))
        with _eval_mode(ctx.model), torch.no_grad():
            for batch in tqdm(ctx.batches, desc=desc, leave=False, disable=None):
                input_ids, mask = _unpack(batch)
                state["mask"] = _token_mask(
                    input_ids, mask, skip_first_token=skip_first_token, last_token=last_token
                )
                state["rows"], state["seen"] = {}, set()
                _forward(ctx.model, batch)
                if len(state["seen"]) != num_boundaries:
                    missing = sorted(set(range(num_boundaries)) - state["seen"])
                    raise GhostsolveError(
                        f"the forward pass never reached boundaries {missing} (of 0..{ctx.num_layers}); "
                        "the model's forward must run every decoder layer and the final norm"
                    )
                n_tokens += int(state["mask"].sum())
    finally:
        state["rows"] = {}
        for handle in handles:
            handle.remove()
    if n_tokens == 0:
        raise GhostsolveError(
            "the calibration batches contain no unmasked tokens; check the attention masks "
            "(and skip_first_token with one-token sequences)"
        )
    return n_tokens


@dataclass
class _CosineSums:
    """Sums over tokens of ``cos(h_l, h_{l+o})`` and of the angle ``arccos(cos) / pi``, per start ``l``."""

    cos: Tensor  # (L + 1 - o,) fp64
    angle: Tensor  # (L + 1 - o,) fp64
    n_tokens: int


def _cosine_pass(
    ctx: _Context, offset: int, *, last_token: bool = False, skip_first_token: bool = False
) -> _CosineSums:
    """Per-token cosines (fp64, over the hidden dimension) between boundaries ``offset`` apart, one pass."""
    starts = range(ctx.num_layers + 1 - offset)
    sums = _CosineSums(
        cos=torch.zeros(len(starts), dtype=torch.float64),
        angle=torch.zeros(len(starts), dtype=torch.float64),
        n_tokens=0,
    )

    def on_pair(a: int, b: int, H_a: Tensor, H_b: Tensor) -> None:
        u = torch.nn.functional.normalize(H_a.to(torch.float64), dim=-1)
        v = torch.nn.functional.normalize(H_b.to(torch.float64), dim=-1)
        # Rounding can push |cos| a hair above 1, where arccos is NaN.
        cos = (u * v).sum(dim=-1).clamp(-1.0, 1.0)
        sums.cos[a] += cos.sum().cpu()
        sums.angle[a] += (torch.arccos(cos) / math.pi).sum().cpu()

    sums.n_tokens = _boundary_pass(
        ctx,
        [(a, a + offset) for a in starts],
        on_pair,
        last_token=last_token,
        skip_first_token=skip_first_token,
        desc="cosine pass",
    )
    return sums


def _argsort(scores: Sequence[float], *, descending: bool = False) -> list[int]:
    # Ties go to the lower index, so selections are deterministic.
    return sorted(range(len(scores)), key=lambda i: (-scores[i] if descending else scores[i], i))


def _block(start: int, num_drop: int) -> list[int]:
    return list(range(start, start + num_drop))


def _run_block_influence(
    ctx: _Context, num_drop: int, *, skip_first_token: bool = False
) -> tuple[list[float], list[int], dict[str, Any]]:
    sums = _cosine_pass(ctx, 1, skip_first_token=skip_first_token)
    scores = (1.0 - sums.cos / sums.n_tokens).tolist()
    return scores, sorted(_argsort(scores)[:num_drop]), {"n_tokens": sums.n_tokens}


def _run_angular(
    ctx: _Context, num_drop: int, *, last_token: bool = False, skip_first_token: bool = False
) -> tuple[list[float], list[int], dict[str, Any]]:
    sums = _cosine_pass(ctx, num_drop, last_token=last_token, skip_first_token=skip_first_token)
    scores = (sums.angle / sums.n_tokens).tolist()
    details = {"n_tokens": sums.n_tokens, "last_token": last_token}
    return scores, _block(_argsort(scores)[0], num_drop), details


def _run_streamline(
    ctx: _Context, num_drop: int, *, skip_first_token: bool = False
) -> tuple[list[float], list[int], dict[str, Any]]:
    sums = _cosine_pass(ctx, num_drop, skip_first_token=skip_first_token)
    scores = (sums.cos / sums.n_tokens).tolist()
    return scores, _block(_argsort(scores, descending=True)[0], num_drop), {"n_tokens": sums.n_tokens}


# ---------------------------------------------------------------------------------------------------------
# Perplexity-based rules
# ---------------------------------------------------------------------------------------------------------


def _shifted_nll(logits: Tensor, input_ids: Tensor, mask: Tensor | None) -> tuple[Tensor, int]:
    """Summed next-token NLL (fp64 scalar, keeps the graph) and the number of predicted tokens.

    A position is predicted when it and the position before it are both real (unmasked) tokens.
    """
    targets = input_ids[:, 1:].to(logits.device)
    valid = torch.ones_like(targets, dtype=torch.bool)
    if mask is not None:
        m = mask.to(device=logits.device, dtype=torch.bool)
        valid = m[:, 1:] & m[:, :-1]
    flat_logits = logits[:, :-1][valid].float()
    nll = torch.nn.functional.cross_entropy(flat_logits, targets[valid], reduction="sum")
    return nll.to(torch.float64), int(valid.sum())


def _calibration_nll(model: nn.Module, batches: Sequence[Batch]) -> float:
    """Mean next-token NLL over all predicted tokens of the batches (fp64 accumulation)."""
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    with _eval_mode(model), torch.no_grad():
        for batch in batches:
            input_ids, mask = _unpack(batch)
            nll, n = _shifted_nll(_forward(model, batch), input_ids, mask)
            total += nll.cpu()
            count += n
    if count == 0:
        raise GhostsolveError(
            "the calibration batches predict no tokens (every sequence has fewer than 2 real tokens); "
            "use longer calibration sequences"
        )
    return float(total) / count


def _ppl(nll: float) -> float:
    # exp overflows float64 beyond ~709 nats per token; such a model is broken anyway, report infinity.
    return math.exp(nll) if nll < 700 else math.inf


def _ppl_without(ctx: _Context, removed: Iterable[int]) -> float:
    with _bypassed(ctx, removed):
        return _ppl(_calibration_nll(ctx.model, ctx.batches))


def _run_ppl(ctx: _Context, num_drop: int) -> tuple[list[float], list[int], dict[str, Any]]:
    dense = _ppl(_calibration_nll(ctx.model, ctx.batches))
    scores = [
        _ppl_without(ctx, [layer])
        for layer in tqdm(range(ctx.num_layers), desc="ppl: one layer removed", leave=False, disable=None)
    ]
    return scores, sorted(_argsort(scores)[:num_drop]), {"dense_perplexity": dense}


def _greedy(
    ctx: _Context, num_drop: int, removal_ppl: Callable[[list[int]], float], label: str
) -> tuple[list[float], list[int], dict[str, Any]]:
    """Remove one layer per round: the one whose removal (with those already removed) scores lowest.

    A layer once removed is never a candidate again, so the rounds remove ``num_drop`` distinct layers.
    Returns the first round's scores (every layer removed alone), the removed layers, and every round's
    scores (``None`` for layers already removed).
    """
    dense = _ppl(_calibration_nll(ctx.model, ctx.batches))
    removed: list[int] = []
    rounds: list[list[float | None]] = []
    first_round: list[float] = []
    for r in range(num_drop):
        candidates = [layer for layer in range(ctx.num_layers) if layer not in removed]
        row: list[float | None] = [None] * ctx.num_layers
        for layer in tqdm(candidates, desc=f"{label} round {r + 1}/{num_drop}", leave=False, disable=None):
            row[layer] = removal_ppl([*removed, layer])
        best = min(candidates, key=lambda layer: (row[layer], layer))
        removed.append(best)
        rounds.append(row)
        if r == 0:
            first_round = [float(v) for v in row]  # type: ignore[arg-type]
        logger.info("%s round %d removes layer %d (calibration ppl %.4g)", label, r + 1, best, row[best])
    details = {"dense_perplexity": dense, "removal_order": removed, "rounds": rounds}
    return first_round, sorted(removed), details


def _run_sleb(ctx: _Context, num_drop: int) -> tuple[list[float], list[int], dict[str, Any]]:
    return _greedy(ctx, num_drop, lambda removed: _ppl_without(ctx, removed), "sleb")


# ---------------------------------------------------------------------------------------------------------
# Taylor+ (first-order importance)
# ---------------------------------------------------------------------------------------------------------


def _taylor_keep_defaults(num_layers: int) -> tuple[int, int]:
    # Shortened LLaMA keeps the first 4 and the last 2 of LLaMA-7B's 32 blocks; scale that proportionally.
    return math.ceil(num_layers * 4 / 32), math.ceil(num_layers * 2 / 32)


def _run_taylor(
    ctx: _Context, num_drop: int, *, keep_first: int | None = None, keep_last: int | None = None
) -> tuple[list[float], list[int], dict[str, Any]]:
    default_first, default_last = _taylor_keep_defaults(ctx.num_layers)
    keep_first = default_first if keep_first is None else keep_first
    keep_last = default_last if keep_last is None else keep_last
    if keep_first < 0 or keep_last < 0:
        raise GhostsolveError(f"keep_first and keep_last must be >= 0, got {keep_first} and {keep_last}")
    candidates = list(range(keep_first, ctx.num_layers - keep_last))
    if len(candidates) < num_drop:
        raise GhostsolveError(
            f"taylor keeps the first {keep_first} and last {keep_last} of {ctx.num_layers} layers (the '+' "
            f"heuristic), leaving {len(candidates)} candidates for num_drop={num_drop}; pass smaller "
            "keep_first/keep_last options (0 and 0 give plain Taylor)"
        )
    params = list(ctx.model.parameters())
    saved = [(p.requires_grad, p.grad) for p in params]
    layer_params = [list(layer.parameters()) for layer in ctx.layers]
    wanted = {id(p) for ps in layer_params for p in ps}
    total_tokens = 0
    try:
        # Gradients only for decoder-layer parameters: embeddings and lm_head would double the memory.
        for p in params:
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        with _eval_mode(ctx.model):
            for batch in tqdm(ctx.batches, desc="taylor pass", leave=False, disable=None):
                input_ids, mask = _unpack(batch)
                nll, n = _shifted_nll(_forward(ctx.model, batch), input_ids, mask)
                nll.backward()
                total_tokens += n
        if total_tokens == 0:
            raise GhostsolveError(
                "the calibration batches predict no tokens (every sequence has fewer than 2 real tokens); "
                "use longer calibration sequences"
            )
        # L = mean NLL over all predicted tokens; the summed gradient is divided once here.
        scores = []
        for ps in layer_params:
            total = torch.zeros((), dtype=torch.float64)
            for p in ps:
                if p.grad is not None:
                    total += (p.detach().double() * p.grad.double()).abs().sum().cpu()
            scores.append(float(total) / total_tokens)
    finally:
        for p, (requires_grad, grad) in zip(params, saved, strict=True):
            p.requires_grad_(requires_grad)
            p.grad = grad
    order = [i for i in _argsort(scores) if i in candidates]
    details = {"keep_first": keep_first, "keep_last": keep_last, "candidates": candidates}
    return scores, sorted(order[:num_drop]), details


# ---------------------------------------------------------------------------------------------------------
# Recoverability-aware rules
# ---------------------------------------------------------------------------------------------------------

# fp64 statistics of one block hold two d x d matrices (X^T X and X^T (Y - X)); beyond this budget the
# candidate blocks are split into groups, one calibration pass per group.
_DEFAULT_MAX_STATS_BYTES = 8 * 2**30


def _stats_bytes(dim: int) -> int:
    return 2 * dim * dim * 8


class _StatsByStart:
    """fp64 boundary statistics keyed by block start, created on the device of the first ``Y`` seen."""

    def __init__(self) -> None:
        self.by_start: dict[int, Any] = {}

    def update(self, a: int, b: int, X: Tensor, Y: Tensor) -> None:
        from ghostsolve import Stats

        if a not in self.by_start:
            self.by_start[a] = Stats(X.shape[-1], dtype=torch.float64, device=Y.device)
        self.by_start[a].update(X, Y)


def _recoverable_residuals(
    ctx: _Context,
    num_drop: int,
    *,
    skip_first_token: bool,
    ridge: float,
    max_stats_bytes: int,
    normalize: str,
) -> tuple[list[float], dict[str, Any]]:
    """Ghost-fit relative residual of every contiguous block ``(l, l + num_drop)``.

    ``normalize="stream"``: ``min_W Σ‖x W − y‖² / Σ‖y‖²``, the error left after recovery relative to the
    residual stream it perturbs. ``normalize="block"``: ``min_W Σ‖x W − y‖² / Σ‖y − x‖²``
    (:attr:`ghostsolve.Fit.relative_residual`), the share of the block's own contribution that no linear
    map explains; it calls a block that barely changes the stream unrecoverable when that small change is
    nonlinear, so it is not the default.

    The candidate blocks overlap, which :func:`ghostsolve.pipeline.capture.capture_stats` refuses, so their
    statistics are accumulated here by one boundary pass feeding :class:`ghostsolve.Stats` directly (same
    rows as capture: ``X`` = stream entering layer ``l``, ``Y`` = stream entering ``l + num_drop``,
    padding excluded, fp64). Groups of candidates that fit ``max_stats_bytes`` share a pass.
    """
    from ghostsolve import fit

    starts = list(range(ctx.num_layers - num_drop + 1))
    dim = int(getattr(ctx.model.config, "hidden_size"))  # noqa: B009 - nn.Module attributes type as Tensor
    per_group = max(1, max_stats_bytes // _stats_bytes(dim))
    groups = [starts[i : i + per_group] for i in range(0, len(starts), per_group)]
    if len(groups) > 1:
        logger.info(
            "recoverable: %d candidate blocks need %.1f GiB of fp64 statistics; %d passes of <= %d blocks",
            len(starts),
            len(starts) * _stats_bytes(dim) / 2**30,
            len(groups),
            per_group,
        )
    residuals: dict[int, float] = {}
    for group in groups:
        stats = _StatsByStart()
        _boundary_pass(
            ctx,
            [(l, l + num_drop) for l in group],
            stats.update,
            skip_first_token=skip_first_token,
            desc="recoverable pass",
        )
        for l in group:
            block_stats = stats.by_start.pop(l)
            ghost = fit(block_stats, family="full", ridge=ridge)
            if normalize == "block":
                # A block that leaves the stream exactly unchanged has 0/0 here: perfectly recoverable.
                dtd = float(block_stats.dtd)
                residuals[l] = ghost.objective / dtd if dtd > 0 else 0.0
            else:
                residuals[l] = ghost.objective / float(block_stats.yty)
    details = {"passes": len(groups), "ridge": ridge, "normalize": normalize}
    return [residuals[l] for l in starts], details


def _check_normalize(normalize: str) -> str:
    if normalize not in ("stream", "block"):
        raise GhostsolveError(
            f"normalize must be 'stream' (error / stream energy) or 'block' (error / the block's own "
            f"change), got {normalize!r}"
        )
    return normalize


def _run_recoverable(
    ctx: _Context,
    num_drop: int,
    *,
    skip_first_token: bool = False,
    ridge: float = 0.0,
    max_stats_bytes: int = _DEFAULT_MAX_STATS_BYTES,
    normalize: str = "stream",
) -> tuple[list[float], list[int], dict[str, Any]]:
    scores, details = _recoverable_residuals(
        ctx,
        num_drop,
        skip_first_token=skip_first_token,
        ridge=ridge,
        max_stats_bytes=max_stats_bytes,
        normalize=_check_normalize(normalize),
    )
    return scores, _block(_argsort(scores)[0], num_drop), details


def _run_recoverable_ppl(
    ctx: _Context,
    num_drop: int,
    *,
    top_k: int = 3,
    skip_first_token: bool = False,
    ridge: float = 0.0,
    max_stats_bytes: int = _DEFAULT_MAX_STATS_BYTES,
    normalize: str = "stream",
) -> tuple[list[float], list[int], dict[str, Any]]:
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise GhostsolveError(f"top_k must be a positive int, got {top_k!r}")
    residuals, details = _recoverable_residuals(
        ctx,
        num_drop,
        skip_first_token=skip_first_token,
        ridge=ridge,
        max_stats_bytes=max_stats_bytes,
        normalize=_check_normalize(normalize),
    )
    shortlist = _argsort(residuals)[:top_k]
    scores = [math.nan] * len(residuals)
    for start in tqdm(shortlist, desc="recoverable-ppl: ghost recovery", leave=False, disable=None):
        scores[start] = _ghost_recovered_ppl(
            ctx, _block(start, num_drop), ridge=ridge, skip_first_token=skip_first_token
        )
    best = min(shortlist, key=lambda s: (scores[s], s))
    details.update({"relative_residuals": residuals, "shortlist": shortlist, "top_k": top_k})
    return scores, _block(best, num_drop), details


def _ghost_recovered_ppl(ctx: _Context, removed: list[int], *, ridge: float, skip_first_token: bool) -> float:
    """Calibration perplexity of a copy of the model with ``removed`` removed and ghost-recovered."""
    from ghostsolve.pipeline.recover import recover

    recovery = recover(
        ctx.model,
        sorted(removed),
        ctx.batches,
        method="ghost",
        ridge=ridge,
        skip_first_token=skip_first_token,
        progress=False,
    )
    return _ppl(_calibration_nll(recovery.model, ctx.batches))


def _run_recoverable_greedy(
    ctx: _Context, num_drop: int, *, ridge: float = 0.0, skip_first_token: bool = False
) -> tuple[list[float], list[int], dict[str, Any]]:
    def removal_ppl(removed: list[int]) -> float:
        return _ghost_recovered_ppl(ctx, removed, ridge=ridge, skip_first_token=skip_first_token)

    return _greedy(ctx, num_drop, removal_ppl, "recoverable-greedy")


# ---------------------------------------------------------------------------------------------------------
# Registry and entry point
# ---------------------------------------------------------------------------------------------------------

STRATEGIES: Mapping[str, Strategy] = MappingProxyType(
    {
        s.name: s
        for s in (
            Strategy(
                "block-influence",
                "layer",
                "block influence 1 - mean cos(h_l, h_l+1)",
                "lowest",
                ("skip_first_token",),
                "ShortGPT (Men et al., 2024)",
                _run_block_influence,
            ),
            Strategy(
                "angular",
                "block",
                "angular distance arccos(cos(h_l, h_l+n)) / pi",
                "lowest",
                ("last_token", "skip_first_token"),
                "Gromov et al., 2024",
                _run_angular,
            ),
            Strategy(
                "streamline",
                "block",
                "mean cos(h_l, h_l+n)",
                "highest",
                ("skip_first_token",),
                "LLM-Streamline (Chen et al., 2024)",
                _run_streamline,
            ),
            Strategy(
                "sleb",
                "layer",
                "calibration perplexity, layer removed (round 1)",
                "lowest",
                (),
                "SLEB (Song et al., 2024)",
                _run_sleb,
            ),
            Strategy(
                "ppl",
                "layer",
                "calibration perplexity, layer removed alone",
                "lowest",
                (),
                "Shortened LLaMA, PPL (Kim et al., 2024)",
                _run_ppl,
            ),
            Strategy(
                "taylor",
                "layer",
                "Taylor importance sum |w * dL/dw|",
                "lowest",
                ("keep_first", "keep_last"),
                "Shortened LLaMA, Taylor+ (Kim et al., 2024)",
                _run_taylor,
            ),
            Strategy(
                "recoverable",
                "block",
                "ghost-fit residual / stream energy",
                "lowest",
                ("skip_first_token", "ridge", "max_stats_bytes", "normalize"),
                "ghostsolve",
                _run_recoverable,
            ),
            Strategy(
                "recoverable-ppl",
                "block",
                "calibration perplexity after ghost recovery",
                "lowest",
                ("top_k", "skip_first_token", "ridge", "max_stats_bytes", "normalize"),
                "ghostsolve",
                _run_recoverable_ppl,
            ),
            Strategy(
                "recoverable-greedy",
                "layer",
                "calibration perplexity after ghost recovery (round 1)",
                "lowest",
                ("skip_first_token", "ridge"),
                "ghostsolve (SLEB's greedy search, each candidate ghost-recovered)",
                _run_recoverable_greedy,
            ),
        )
    }
)
"""Selection rules by name; see the module docstring for each score."""


def select_layers(
    model: nn.Module, batches: Iterable[Batch], strategy: str, num_drop: int, **options: Any
) -> Selection:
    """Choose ``num_drop`` decoder layers to remove with a named strategy.

    Parameters
    ----------
    model : transformers causal LM
        A model that :func:`ghostsolve.adapters.get_adapter` knows. It is left unmodified (hooks, gradients,
        ``requires_grad`` flags and train/eval mode are restored, also on error).
    batches : iterable of Batch
        Calibration batches: ``input_ids`` ``(batch, tokens)`` int64, or mappings with ``"input_ids"`` and
        an optional ``"attention_mask"``. Consumed into a list, since most rules make several passes.
    strategy : str
        A key of :data:`STRATEGIES`.
    num_drop : int
        Number of layers to remove, ``1 <= num_drop < num_layers``.
    **options
        Strategy options: ``last_token`` (angular), ``skip_first_token`` (cosine rules and recoverable:
        drop position 0, whose hidden state is an attention sink in real LLMs), ``keep_first`` /
        ``keep_last`` (taylor), ``top_k`` (recoverable-ppl, default 3), ``ridge`` and ``max_stats_bytes``
        (recoverable rules; the fp64 statistics of one candidate block take ``16 d^2`` bytes, and the
        candidates are captured in groups that fit ``max_stats_bytes``, default 8 GiB, one pass per group).

    Returns
    -------
    Selection
        ``selected`` holds ``num_drop`` sorted, distinct 0-based layer indices.

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
            f"unknown selection strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}"
        )
    spec = STRATEGIES[strategy]
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise GhostsolveError(
            f"strategy {strategy!r} does not accept option(s) {unknown}; "
            f"it accepts {list(spec.options) or 'no options'}"
        )
    adapter = get_adapter(model)
    layers, norm = adapter.layers(model), adapter.final_norm(model)
    num_layers = len(layers)
    if isinstance(num_drop, bool) or not isinstance(num_drop, int) or not 1 <= num_drop < num_layers:
        raise GhostsolveError(
            f"num_drop must be an int with 1 <= num_drop < {num_layers} (the model has {num_layers} decoder "
            f"layers and at least one must stay), got {num_drop!r}"
        )
    batch_list = list(batches)
    if not batch_list:
        raise GhostsolveError("no calibration batches were given; pass at least one batch of token ids")
    for batch in batch_list:
        _unpack(batch)
    # Bare input_ids become {"input_ids": ...}, the batch form capture and recovery take.
    batch_list_dicts = [{"input_ids": b} if isinstance(b, Tensor) else b for b in batch_list]
    ctx = _Context(model=model, adapter=adapter, layers=layers, norm=norm, batches=batch_list_dicts)
    scores, selected, details = spec.run(ctx, num_drop, **options)
    if len(set(selected)) != num_drop:  # a broken rule must not silently remove fewer layers
        raise AssertionError(f"strategy {strategy!r} selected {selected} for num_drop={num_drop}")
    logger.info("%s selects layers %s", strategy, selected)
    return Selection(
        strategy=strategy,
        num_drop=num_drop,
        scores=[float(s) for s in scores],
        selected=sorted(selected),
        unit=spec.unit,
        score_name=spec.score_name,
        removes=spec.removes,
        details=details,
    )
