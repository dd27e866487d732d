"""Ghost operators and how they sit in a model.

A ghost operator maps the residual stream ``h ↦ h W = h + h M`` (row vectors) and stores ``M`` as
``delta``. It is a real submodule, not a hook, and a *child* of the module whose input it corrects: the
first kept layer after a removed interval becomes a :class:`GhostedLayer` (its class is swapped for a
subclass that applies ``self.ghost`` to the hidden states first), and an interval reaching the end of the
model makes the final norm a :class:`GhostedNorm`. So the state dict keeps the base model's weight names
(``model.layers.3.self_attn.q_proj.weight``) and adds ``model.layers.3.ghost.delta`` (or
``model.norm.ghost.delta``); ``isinstance(layer, LlamaDecoderLayer)`` still holds, and the swapped class
keeps the base class's name (``_no_split_modules``, device maps and pipeline-parallel plans match it).

This file imports only torch (and ghostsolve's error class when ghostsolve is installed): a ghosted
checkpoint ships it verbatim as its remote code, so ``from_pretrained(DIR, trust_remote_code=True)``
rebuilds the operators with exactly these classes, with or without ghostsolve installed. Keep it that way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

try:  # inside ghostsolve: its documented error class
    from ghostsolve.errors import GhostsolveError as _Error
except ImportError:  # as the remote code of a checkpoint, without ghostsolve: its base class
    _Error = ValueError  # type: ignore[assignment, misc]

__all__ = [
    "GhostOperator",
    "GhostedLayer",
    "GhostedNorm",
    "apply_ghost_entries",
    "attach_ghost",
    "check_exact_load",
    "detach_ghost",
    "ghost_of",
]

# The storage and compute dtypes a checkpoint may name: nothing else is looked up on torch.
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
           "bfloat16": torch.bfloat16}  # fmt: skip
# A module path of a checkpoint: dotted identifiers and layer indices, no dunder parts.
_PATH = re.compile(r"^[A-Za-z][A-Za-z0-9_]*(\.([A-Za-z][A-Za-z0-9_]*|[0-9]+))*$")


class GhostOperator(nn.Module):
    """``h ↦ h W = h + h M``: a linear map of the residual stream, stored as ``M`` (``delta``).

    Every recovery family is stored densely (a scalar or diagonal ``M`` is a d×d matrix too), which keeps
    one module type and one state-dict layout for all methods; the cost is one ``(n, d)×(d, d)`` matmul
    per insertion point, small against a decoder layer.

    Parameters
    ----------
    delta : (d, d) tensor
        ``M = W − I``. Copied and stored in ``dtype``.
    compute_dtype : torch.dtype, optional
        Dtype of the matmul. None (default): the dtype of the incoming hidden states (the model's dtype).
        ``torch.float32`` runs a bf16/fp16 model's correction in fp32. The result is cast back to the
        dtype of the hidden states.
    dtype : torch.dtype
        Storage dtype of ``delta`` (fp32 by default). ``model.to(dtype)`` casts it like any parameter.

    Notes
    -----
    The forward never synchronizes with the host (no ``.item()``, no data-dependent branching), so it can
    be captured by CUDA graphs and ``torch.compile``. ``delta`` is an ``nn.Parameter`` with
    ``requires_grad=False``: it moves with ``.to(device)`` and appears in ``state_dict()``.

    Examples
    --------
    >>> op = GhostOperator(torch.zeros(4, 4))
    >>> h = torch.randn(2, 3, 4)
    >>> torch.equal(op(h), h)
    True
    """

    delta: nn.Parameter

    def __init__(
        self,
        delta: torch.Tensor,
        *,
        compute_dtype: torch.dtype | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if delta.ndim != 2 or delta.shape[0] != delta.shape[1]:
            raise _Error(f"a ghost operator needs a square (d, d) delta, got shape {tuple(delta.shape)}")
        if not delta.is_floating_point():
            raise _Error(f"delta must be a floating-point tensor, got dtype {delta.dtype}")
        if compute_dtype is not None and not compute_dtype.is_floating_point:
            raise _Error(f"compute_dtype must be a floating dtype, got {compute_dtype}")
        self.delta = nn.Parameter(delta.detach().to(dtype=dtype).clone(), requires_grad=False)
        self.compute_dtype = compute_dtype

    @classmethod
    def zeros(
        cls,
        dim: int,
        *,
        compute_dtype: torch.dtype | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> GhostOperator:
        """An identity operator (``M = 0``) of size ``dim``; a placeholder before loading weights."""
        zeros = torch.zeros(dim, dim, dtype=dtype, device=device)
        return cls(zeros, compute_dtype=compute_dtype, dtype=dtype)

    @property
    def dim(self) -> int:
        """The hidden size ``d``."""
        return int(self.delta.shape[0])

    def weight(self) -> torch.Tensor:
        """``W = I + M`` as a new ``(d, d)`` tensor in the storage dtype."""
        return self.delta.detach() + torch.eye(self.dim, dtype=self.delta.dtype, device=self.delta.device)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Apply ``h + h M`` to ``(..., d)`` hidden states; returns their dtype and shape."""
        cd = self.compute_dtype if self.compute_dtype is not None else hidden_states.dtype
        correction = hidden_states.to(cd) @ self.delta.to(cd)
        return hidden_states + correction.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, dtype={self.delta.dtype}, compute_dtype={self.compute_dtype}"


class GhostedLayer(nn.Module):
    """Marker base of decoder layers that carry a ghost operator (see :func:`attach_ghost`).

    A ghosted layer's ``forward(*args, **kwargs)`` replaces the hidden-states argument — keyword
    ``hidden_states_kwarg`` or positional argument ``hidden_states_arg_position`` (the adapter's facts, stored
    on the layer so that the remote code needs no adapter) — by ``self.ghost(hidden_states)`` and runs the
    base layer's forward with everything else unchanged, so it returns whatever the base layer returns.

    Attributes
    ----------
    ghost : GhostOperator
    """

    ghost: GhostOperator
    hidden_states_kwarg: str
    hidden_states_arg_position: int

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        key, pos = self.hidden_states_kwarg, self.hidden_states_arg_position
        if key in kwargs:
            kwargs[key] = self.ghost(kwargs[key])
        elif len(args) > pos:
            args = (*args[:pos], self.ghost(args[pos]), *args[pos + 1 :])
        else:
            raise _Error(
                f"a ghosted {type(self).__name__} found no hidden states: neither keyword {key!r} nor "
                f"positional argument {pos} was passed"
            )
        return super().forward(*args, **kwargs)


class GhostedNorm(nn.Module):
    """Marker base of a final norm that applies a ghost operator first (see :func:`attach_ghost`).

    Attributes
    ----------
    ghost : GhostOperator
    """

    ghost: GhostOperator

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return super().forward(self.ghost(hidden_states), *args, **kwargs)


_GHOSTED_CLASSES: dict[tuple[type, type], type] = {}


def _ghosted_class(marker: type, base: type) -> type:
    """The subclass ``(marker, base)`` under the base's own name, created once per base class."""
    key = (marker, base)
    if key not in _GHOSTED_CLASSES:
        _GHOSTED_CLASSES[key] = type(base.__name__, (marker, base), {"__qualname__": base.__qualname__,
                                                                   "_ghost_base": base})  # fmt: skip
    return _GHOSTED_CLASSES[key]


def ghost_of(module: nn.Module) -> GhostOperator | None:
    """The ghost operator ``module`` applies to its input, or None."""
    return module.ghost if isinstance(module, (GhostedLayer, GhostedNorm)) else None


def attach_ghost(
    module: nn.Module,
    ghost: GhostOperator,
    *,
    kind: str = "layer",
    hidden_states_kwarg: str = "hidden_states",
    hidden_states_arg_position: int = 0,
) -> nn.Module:
    """Make ``module`` (a decoder layer, or with ``kind="norm"`` the final norm) apply ``ghost`` to its input.

    In place: the module's class is swapped for the ghosted subclass of its class and ``ghost`` becomes its
    child ``ghost``; returns ``module``.

    Raises
    ------
    ValueError (GhostsolveError inside ghostsolve)
        If ``module`` already carries a ghost operator, or ``kind`` is neither ``"layer"`` nor ``"norm"``.
    """
    if ghost_of(module) is not None:
        raise _Error(f"this {type(module).__name__} already holds a ghost operator")
    if kind not in ("layer", "norm"):
        raise _Error(f"kind must be 'layer' or 'norm', got {kind!r}")
    module.__class__ = _ghosted_class(GhostedLayer if kind == "layer" else GhostedNorm, type(module))
    module.ghost = ghost
    if kind == "layer":
        setattr(module, "hidden_states_kwarg", hidden_states_kwarg)  # noqa: B010 - nn.Module attrs type as Tensor
        setattr(module, "hidden_states_arg_position", int(hidden_states_arg_position))  # noqa: B010
    return module


def detach_ghost(module: nn.Module) -> GhostOperator | None:
    """Undo :func:`attach_ghost` in place; returns the ghost operator it held (None if it held none)."""
    ghost = ghost_of(module)
    if ghost is None:
        return None
    module.__class__ = type(module)._ghost_base  # type: ignore[attr-defined]
    del module.ghost
    for name in ("hidden_states_kwarg", "hidden_states_arg_position"):
        module.__dict__.pop(name, None)
    return ghost


# ---------------------------------------------------------------------------------------------------------
# rebuilding the wrappers from a checkpoint's description (used by both loaders)
# ---------------------------------------------------------------------------------------------------------
def _dtype_named(name: Any, what: str) -> torch.dtype | None:
    if name is None:
        return None
    dtype = _DTYPES.get(str(name).removeprefix("torch."))
    if dtype is None:
        raise _Error(f"unknown {what} {name!r} in the checkpoint; expected one of {sorted(_DTYPES)}")
    return dtype


def _checked_entry(entry: Any, layers_path: str, final_norm_path: str) -> tuple[str, str, int]:
    """``(module path, kind, dim)`` of one ghost entry, refusing anything but a known module path."""
    if not isinstance(entry, Mapping):
        raise _Error(f"a ghost entry must be a mapping, got {type(entry).__name__}")
    path, kind, dim = entry.get("module"), entry.get("kind"), entry.get("dim")
    # The path comes from config.json: never let it reach dunder attributes or anything outside the
    # model's layer list and final norm (getattr/setattr on it would otherwise patch arbitrary objects).
    if not isinstance(path, str) or not _PATH.match(path) or "__" in path:
        raise _Error(f"ghost entry module path {path!r} is not a plain dotted module path")
    if kind == "layer":
        ok = path.startswith(layers_path + ".") and path[len(layers_path) + 1 :].isdigit()
    else:
        ok = kind == "norm" and path == final_norm_path
    if not ok:
        raise _Error(
            f"ghost entry {kind!r} at {path!r} names neither a decoder layer ({layers_path}.N) nor the final "
            f"norm ({final_norm_path}) of this architecture"
        )
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise _Error(f"ghost entry dim must be a positive int, got {dim!r}")
    return path, str(kind), dim


def _submodule(model: nn.Module, path: str) -> nn.Module:
    # get_submodule walks registered child modules only: no attribute, class or function is reachable.
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise _Error(f"ghost entry module path {path!r} names no submodule of this model ({exc})") from None


def apply_ghost_entries(
    model: nn.Module, entries: Iterable[Mapping[str, Any]], *, layers_path: str, final_norm_path: str
) -> None:
    """Give the modules named by a checkpoint's ``ghosts`` entries identity ghost operators.

    Each entry is ``{"kind": "layer" | "norm", "module": dotted path, "dim": d, "delta_dtype": name,
    "compute_dtype": name or None}`` (plus, for layers, ``hidden_states_kwarg`` and
    ``hidden_states_arg_position``). A loader calls this on a freshly built pruned model, then loads the
    state dict, which fills every ``ghost.delta``. Every entry is validated before anything changes: a layer
    entry must name ``{layers_path}.{index}`` of an existing layer, a norm entry ``final_norm_path`` exactly,
    both plain dotted names reached through registered submodules only.

    Raises
    ------
    ValueError (GhostsolveError inside ghostsolve)
        For a malformed entry, a path outside the allowed modules, an index out of range, an unknown dtype.
    """
    plan = []
    for entry in entries:
        path, kind, dim = _checked_entry(entry, layers_path, final_norm_path)
        if kind == "layer":
            layers = _submodule(model, layers_path)
            index = int(path.rsplit(".", 1)[1])
            if not (isinstance(layers, nn.ModuleList) and index < len(layers)):
                raise _Error(f"ghost entry {path!r} names a layer the model does not have")
            target = layers[index]
        else:
            target = _submodule(model, path)
        delta_dtype = _dtype_named(entry.get("delta_dtype", "float32"), "delta_dtype") or torch.float32
        compute_dtype = _dtype_named(entry.get("compute_dtype"), "compute_dtype")
        plan.append((entry, kind, target, dim, delta_dtype, compute_dtype))
    for entry, kind, target, dim, delta_dtype, compute_dtype in plan:
        attach_ghost(
            target,
            GhostOperator.zeros(dim, compute_dtype=compute_dtype, dtype=delta_dtype),
            kind=kind,
            hidden_states_kwarg=str(entry.get("hidden_states_kwarg", "hidden_states")),
            hidden_states_arg_position=int(entry.get("hidden_states_arg_position", 0)),
        )


def check_exact_load(info: Mapping[str, Any], where: str) -> None:
    """Refuse a load whose weights and architecture disagree (``output_loading_info`` of transformers).

    A missing, unexpected or mis-shaped tensor would leave an operator at its placeholder (identity)
    value — silently the unrecovered model — so any of them is an error naming the first few keys.

    Raises
    ------
    ValueError (GhostsolveError inside ghostsolve)
    """
    parts = []
    for key, label in (("missing_keys", "missing weights"), ("unexpected_keys", "unexpected weights"),
                       ("mismatched_keys", "mis-shaped weights"), ("error_msgs", "errors")):  # fmt: skip
        names = sorted(str(k if isinstance(k, str) else k[0]) for k in info.get(key) or [])
        if names:
            parts.append(f"{label} {names[:8]}{' ...' if len(names) > 8 else ''}")
    if parts:
        raise _Error(
            f"checkpoint {where!r} does not load exactly: {'; '.join(parts)}; the ghost operators and the "
            "saved weights disagree (re-save the checkpoint with ghostsolve)"
        )
