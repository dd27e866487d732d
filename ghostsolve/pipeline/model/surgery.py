"""Model surgery: validate removal sets, remove decoder layers, insert ghost operators, bypass layers.

Conventions (see ``docs/design.md``): layer indices are 0-based; a removal set is split into maximal
*intervals* ``(start, end)`` with ``end`` exclusive; hidden states are row vectors and an operator acts
as ``h W`` with ``W = I + M``.

The operators live in :mod:`ghostsolve.pipeline.model.operators`: the first kept layer after an interval
becomes a ``GhostedLayer`` holding the operator as its child ``ghost``; an interval reaching the end of the
model makes the final norm a ``GhostedNorm``. The state dict keeps the base model's names and adds
``...layers.{i}.ghost.delta`` (``...norm.ghost.delta``). :func:`ghost_layout` describes where ghosts sit as
plain data and :func:`apply_ghost_layout` rebuilds that structure on a freshly built pruned model.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import numbers
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ghostsolve.adapters import ModelAdapter, get_adapter
from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.model.operators import GhostOperator, attach_ghost, ghost_of

__all__ = [
    "FINAL_NORM",
    "Interval",
    "apply_ghost_layout",
    "bypassed",
    "check_intervals",
    "ghost_layout",
    "insert_ghost",
    "interval_label",
    "intervals_of",
    "removal_set",
    "remove_layers",
]

logger = logging.getLogger(__name__)

#: The ``insert_at`` value that designates the final norm (an interval reaching the end of the model).
FINAL_NORM: Literal["final_norm"] = "final_norm"

InsertAt = int | Literal["final_norm"]

Interval = tuple[int, int]
"""A removed interval ``(start, end)`` of 0-based layer indices, ``end`` exclusive."""


# ---------------------------------------------------------------------------------------------
# removal sets and intervals
# ---------------------------------------------------------------------------------------------
def removal_set(drop: Iterable[int], num_layers: int) -> tuple[int, ...]:
    """Validate a set of layer indices to remove and return it sorted.

    Parameters
    ----------
    drop : iterable of int
        0-based indices of decoder layers to remove, contiguous or not, in any order.
    num_layers : int
        Number of decoder layers in the model.

    Returns
    -------
    tuple of int
        The indices, sorted ascending.

    Raises
    ------
    GhostsolveError
        If ``drop`` is empty, holds a non-integer, an index outside ``[0, num_layers)`` or a duplicate,
        or would remove every layer.

    Examples
    --------
    >>> removal_set([7, 5, 6], 12)
    (5, 6, 7)
    """
    if isinstance(drop, (str, bytes)) or not isinstance(drop, Iterable):
        raise GhostsolveError(f"the removal set must be an iterable of layer indices, got {drop!r}")
    items = list(drop)
    if not items:
        raise GhostsolveError(f"the removal set is empty; pass at least one layer index in [0, {num_layers})")
    bad_type = [i for i in items if isinstance(i, bool) or not isinstance(i, numbers.Integral)]
    if bad_type:
        raise GhostsolveError(f"layer indices must be integers, got {bad_type!r} in {items!r}")
    indices = [int(i) for i in items]
    out_of_range = sorted({i for i in indices if not 0 <= i < num_layers})
    if out_of_range:
        raise GhostsolveError(
            f"layer indices {out_of_range} are out of range: the model has {num_layers} decoder layers, "
            f"valid indices are 0..{num_layers - 1} (negative indices are not accepted)"
        )
    duplicates = sorted({i for i in indices if indices.count(i) > 1})
    if duplicates:
        raise GhostsolveError(
            f"layer indices {duplicates} appear more than once in the removal set {indices}; list each once"
        )
    if len(indices) == num_layers:
        raise GhostsolveError(
            f"the removal set removes all {num_layers} decoder layers; keep at least one layer"
        )
    return tuple(sorted(indices))


def intervals_of(removed: Sequence[int]) -> list[Interval]:
    """Split sorted layer indices into maximal intervals ``(start, end)``, ``end`` exclusive.

    Examples
    --------
    >>> intervals_of([3, 5, 6, 7, 9])
    [(3, 4), (5, 8), (9, 10)]
    """
    intervals: list[Interval] = []
    for i in sorted(removed):
        if intervals and intervals[-1][1] == i:
            intervals[-1] = (intervals[-1][0], i + 1)
        else:
            intervals.append((i, i + 1))
    return intervals


def interval_label(interval: tuple[int, int]) -> str:
    """``(3, 5)`` (end exclusive) → ``"3-4"``; ``(7, 8)`` → ``"7"``: the layers, as ``--drop`` writes them.

    Examples
    --------
    >>> interval_label((3, 5)), interval_label((7, 8))
    ('3-4', '7')
    """
    start, end = int(interval[0]), int(interval[1])
    return str(start) if end - start == 1 else f"{start}-{end - 1}"


def check_intervals(
    intervals: Iterable[Interval], num_layers: int, *, allow_overlap: bool = False
) -> list[Interval]:
    """Validate ``(start, end)`` intervals (``0 <= start < end <= num_layers``) and return them sorted.

    ``allow_overlap`` admits intervals that share layers (the candidate blocks of a selection rule); a
    removal set's intervals never overlap.

    Raises
    ------
    GhostsolveError
        If there are none, one is malformed or out of range, or (unless allowed) two overlap.
    """
    out: list[Interval] = []
    for item in intervals:
        try:
            start, end = (int(v) for v in item)
        except (TypeError, ValueError):
            raise GhostsolveError(
                f"an interval is a pair (start, end) of layer indices, got {item!r}"
            ) from None
        if not 0 <= start < end <= num_layers:
            raise GhostsolveError(
                f"interval {(start, end)} is invalid for a model of {num_layers} layers: need "
                f"0 <= start < end <= {num_layers} (end exclusive)"
            )
        out.append((start, end))
    if not out:
        raise GhostsolveError("no intervals given; pass at least one (start, end) pair")
    out = sorted(set(out)) if allow_overlap else sorted(out)
    if not allow_overlap:
        for (s0, e0), (s1, e1) in itertools.pairwise(out):
            if s1 < e0:
                raise GhostsolveError(f"intervals {(s0, e0)} and {(s1, e1)} overlap")
    return out


# ---------------------------------------------------------------------------------------------
# removal
# ---------------------------------------------------------------------------------------------
def _adapter(model: nn.Module, adapter: ModelAdapter | None) -> ModelAdapter:
    return adapter if adapter is not None else get_adapter(model)


def _per_layer_config_keys(config: Any, adapter: ModelAdapter, num_layers: int) -> list[str]:
    """Config attributes holding one entry per decoder layer.

    The adapter's explicit keys, plus any other list whose name mentions "layer" and whose length is
    the layer count: new per-layer lists keep appearing in transformers configs and a stale one makes
    the model index past its end. Lists of layer *indices* (e.g. ``mlp_only_layers``) rarely have
    exactly ``num_layers`` entries; when they do, removal logs what it changed.
    """
    keys = [k for k in adapter.per_layer_config_keys if isinstance(getattr(config, k, None), (list, tuple))]
    try:
        items = config.to_dict().items()
    except Exception:  # a config without to_dict: only the adapter's keys
        items = ()
    for key, value in items:
        if key in keys or "layer" not in key:
            continue
        if isinstance(value, (list, tuple)) and len(value) == num_layers:
            keys.append(key)
    return keys


def remove_layers(model: nn.Module, drop: Iterable[int], *, adapter: ModelAdapter | None = None) -> nn.Module:
    """Remove decoder layers from ``model`` **in place** and return it.

    Updates the decoder-layer ``ModuleList``, ``config.num_hidden_layers``, the config lists with one
    entry per layer (``layer_types``...) and the ``layer_idx`` of every kept layer's attention (and
    any other submodule carrying it), so that generation with a KV cache indexes the new layers.

    Parameters
    ----------
    model : transformers PreTrainedModel
        A causal LM of a family with an adapter. Kept layers may hold ghost operators; a
        removed wrapper takes its ghost with it.
    drop : iterable of int
        0-based indices of the layers to remove (see :func:`removal_set`).
    adapter : ModelAdapter, optional
        Defaults to ``get_adapter(model)``.

    Returns
    -------
    nn.Module
        ``model`` itself.

    Raises
    ------
    GhostsolveError
        For an invalid removal set, an unknown architecture or a heterogeneous per-layer config; the
        model is left untouched (everything is validated before anything changes).
    """
    adapter = _adapter(model, adapter)
    layers = adapter.layers(model)
    config = adapter.config(model)
    num_layers = len(layers)
    removed = removal_set(drop, num_layers)
    if getattr(config, "is_heterogeneous", False) is True:
        raise GhostsolveError(
            "this model has a heterogeneous per-layer config (config.per_layer_config); "
            "ghostsolve cannot yet remove layers from it"
        )
    config_num = getattr(config, "num_hidden_layers", num_layers)
    if config_num != num_layers:
        raise GhostsolveError(
            f"config.num_hidden_layers is {config_num} but the model holds {num_layers} decoder layers; "
            "the model and its config disagree"
        )
    keys = _per_layer_config_keys(config, adapter, num_layers)
    kept = [i for i in range(num_layers) if i not in set(removed)]

    # Validation is over; from here on nothing can fail on user input.
    new_layers = nn.ModuleList([layers[i] for i in kept])
    adapter.set_layers(model, new_layers)
    config.num_hidden_layers = len(kept)
    for key in keys:
        old = list(getattr(config, key))
        setattr(config, key, [old[i] for i in kept])
        if key not in adapter.per_layer_config_keys:
            logger.info(
                "shortened per-layer config list %r from %d to %d entries", key, num_layers, len(kept)
            )
    for new_idx, layer in enumerate(new_layers):
        for module in layer.modules():
            if isinstance(getattr(module, adapter.layer_idx_attr, None), int):
                setattr(module, adapter.layer_idx_attr, new_idx)
    return model


# ---------------------------------------------------------------------------------------------
# insertion and layouts
# ---------------------------------------------------------------------------------------------
def insert_ghost(
    model: nn.Module, insert_at: InsertAt, ghost: GhostOperator, *, adapter: ModelAdapter | None = None
) -> None:
    """Insert ``ghost`` where the residual stream enters layer ``insert_at`` (or the final norm).

    Parameters
    ----------
    model : transformers PreTrainedModel
    insert_at : int or "final_norm"
        Index of a layer in the model *as it is now* (after removal), or ``"final_norm"``.
    ghost : GhostOperator
        Its ``dim`` must be the hidden size.
    adapter : ModelAdapter, optional

    Raises
    ------
    GhostsolveError
        If the position is out of range or already holds a ghost, or the sizes disagree.
    """
    adapter = _adapter(model, adapter)
    hidden = getattr(adapter.config(model), "hidden_size", ghost.dim)
    if ghost.dim != hidden:
        raise GhostsolveError(
            f"the ghost operator is {ghost.dim}×{ghost.dim} but the hidden size is {hidden}"
        )
    if insert_at == FINAL_NORM:
        norm = adapter.final_norm(model)
        if ghost_of(norm) is not None:
            raise GhostsolveError("the final norm already holds a ghost operator")
        attach_ghost(norm, ghost.to(_device_of(norm, ghost)), kind="norm")
        return
    layers = adapter.layers(model)
    if isinstance(insert_at, bool) or not isinstance(insert_at, int) or not 0 <= insert_at < len(layers):
        raise GhostsolveError(
            f"insert_at must be a layer index in [0, {len(layers)}) or {FINAL_NORM!r}, got {insert_at!r}"
        )
    if ghost_of(layers[insert_at]) is not None:
        raise GhostsolveError(f"layer {insert_at} already holds a ghost operator")
    attach_ghost(
        layers[insert_at],
        ghost.to(_device_of(layers[insert_at], ghost)),
        hidden_states_kwarg=adapter.hidden_states_kwarg,
        hidden_states_arg_position=adapter.hidden_states_arg_position,
    )


def _device_of(module: nn.Module, ghost: GhostOperator) -> torch.device:
    """The device of ``module``'s first parameter (the ghost's own when it has none)."""
    for param in module.parameters():
        return param.device
    return ghost.delta.device


def ghost_layout(model: nn.Module, *, adapter: ModelAdapter | None = None) -> list[dict[str, Any]]:
    """Where the ghost operators of ``model`` sit, as plain data (JSON-serializable).

    Returns
    -------
    list of dict
        ``{"insert_at": layer index or "final_norm", "dim": d}`` in model order; empty for a model
        without ghosts.
    """
    adapter = _adapter(model, adapter)
    layout: list[dict[str, Any]] = []
    for i, layer in enumerate(adapter.layers(model)):
        ghost = ghost_of(layer)
        if ghost is not None:
            layout.append({"insert_at": i, "dim": ghost.dim})
    ghost = ghost_of(adapter.final_norm(model))
    if ghost is not None:
        layout.append({"insert_at": FINAL_NORM, "dim": ghost.dim})
    return layout


def apply_ghost_layout(
    model: nn.Module,
    layout: Sequence[dict[str, Any]],
    *,
    adapter: ModelAdapter | None = None,
    compute_dtype: torch.dtype | None = None,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Rebuild the wrappers described by ``layout`` on a (pruned) model, with zero (identity) ghosts.

    A checkpoint loader builds the pruned architecture, calls this, then loads the state dict, which
    fills every ``...ghost.delta``. Validates the whole layout before changing anything.

    Parameters
    ----------
    model : transformers PreTrainedModel
        Without ghosts, holding the layer count of the pruned model.
    layout : sequence of dict
        As returned by :func:`ghost_layout`.
    compute_dtype, dtype : torch.dtype
        Passed to :class:`GhostOperator`.

    Raises
    ------
    GhostsolveError
        For a malformed entry, a position out of range or given twice, or a model that already holds
        ghosts at those positions.
    """
    adapter = _adapter(model, adapter)
    num_layers = len(adapter.layers(model))
    seen: set[Any] = set()
    for entry in layout:
        if not isinstance(entry, dict) or "insert_at" not in entry or "dim" not in entry:
            raise GhostsolveError(f"layout entries are dicts with 'insert_at' and 'dim', got {entry!r}")
        at, dim = entry["insert_at"], entry["dim"]
        ok_at = at == FINAL_NORM or (
            isinstance(at, int) and not isinstance(at, bool) and 0 <= at < num_layers
        )
        if not ok_at:
            raise GhostsolveError(
                f"layout position {at!r} is neither a layer index in [0, {num_layers}) nor {FINAL_NORM!r}"
            )
        if at in seen:
            raise GhostsolveError(f"layout position {at!r} appears twice")
        if not isinstance(dim, int) or dim <= 0:
            raise GhostsolveError(f"layout dim must be a positive int, got {dim!r}")
        seen.add(at)
    existing = {e["insert_at"] for e in ghost_layout(model, adapter=adapter)}
    clash = sorted(map(str, seen & existing))
    if clash:
        raise GhostsolveError(f"the model already holds ghosts at positions {clash}")
    device = next(adapter.embeddings(model).parameters()).device
    for entry in layout:
        ghost = GhostOperator.zeros(entry["dim"], compute_dtype=compute_dtype, dtype=dtype, device=device)
        insert_ghost(model, entry["insert_at"], ghost, adapter=adapter)


@contextlib.contextmanager
def bypassed(
    model: nn.Module, indices: Iterable[int], *, adapter: ModelAdapter | None = None
) -> Iterator[None]:
    """Within the block, each decoder layer in ``indices`` returns its input hidden states unchanged.

    A forward hook replaces the layer's output by its input (the layer still runs, its result is
    discarded), which equals removing the layer for a forward pass without a cache and leaves the model's
    structure, config and per-layer attributes untouched. The selection rules simulate removals this way.
    """
    adapter = _adapter(model, adapter)
    layers = adapter.layers(model)

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        hidden = adapter.hidden_states(args, kwargs)
        # Older transformers return (hidden_states, ...) tuples from decoder layers; newer a tensor.
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    handles = []
    try:
        for i in indices:
            handles.append(layers[i].register_forward_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
