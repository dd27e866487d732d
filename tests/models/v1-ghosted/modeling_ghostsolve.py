"""Remote code of a ghostsolve checkpoint (ghostsolve unknown; generated, do not edit).

The model is a LlamaForCausalLM whose decoder layers were partly removed; the linear ghost operators
inserted where the residual stream enters the first kept layer after each removed interval (or the final
norm) are rebuilt here, so that

    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)

loads the recovered model without ghostsolve installed. This file imports only torch and transformers.
Hidden states are row vectors; an operator maps h to h W = h + h M and stores M as ``delta``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

MODEL_TYPE = "ghostsolve_llama"


class GhostsolveConfig(LlamaConfig):
    """LlamaConfig of the pruned model; its ``ghostsolve`` entry records the ghost layout."""

    model_type = MODEL_TYPE


class GhostOperator(nn.Module):
    """h -> h + h M, the matmul in ``compute_dtype`` (default: the dtype of h), cast back to it."""

    def __init__(self, dim: int, delta_dtype: torch.dtype, compute_dtype: torch.dtype | None) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros(dim, dim, dtype=delta_dtype), requires_grad=False)
        self.compute_dtype = compute_dtype

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        cd = self.compute_dtype if self.compute_dtype is not None else hidden_states.dtype
        correction = hidden_states.to(cd) @ self.delta.to(cd)
        return hidden_states + correction.to(hidden_states.dtype)


class _Wrapper(nn.Module):
    _wrapped_name = ""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get(self._wrapped_name)
            if inner is None or name.startswith("__"):
                raise
            return getattr(inner, name)


class GhostedLayer(_Wrapper):
    """A decoder layer whose hidden-states input first passes through a ghost operator."""

    _wrapped_name = "layer"

    def __init__(self, ghost: GhostOperator, layer: nn.Module, kwarg: str, position: int) -> None:
        super().__init__()
        self.ghost = ghost
        self.layer = layer
        self.hidden_states_kwarg = kwarg
        self.hidden_states_arg_position = position

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        key, pos = self.hidden_states_kwarg, self.hidden_states_arg_position
        if key in kwargs:
            kwargs[key] = self.ghost(kwargs[key])
        elif len(args) > pos:
            args = (*args[:pos], self.ghost(args[pos]), *args[pos + 1 :])
        else:
            raise ValueError(f"GhostedLayer got no hidden states (keyword {key!r} or position {pos})")
        return self.layer(*args, **kwargs)


class GhostedNorm(_Wrapper):
    """The final norm applied after a ghost operator."""

    _wrapped_name = "norm"

    def __init__(self, ghost: GhostOperator, norm: nn.Module) -> None:
        super().__init__()
        self.ghost = ghost
        self.norm = norm

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return self.norm(self.ghost(hidden_states), *args, **kwargs)


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def _resolve(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    parent = root
    for part in parent_path.split(".") if parent_path else []:
        parent = getattr(parent, part)
    return parent, name


def _apply_layout(model: nn.Module, ghosts: list[dict[str, Any]]) -> None:
    for entry in ghosts:
        parent, name = _resolve(model, entry["module"])
        inner = parent[int(name)] if isinstance(parent, nn.ModuleList) else getattr(parent, name)
        ghost = GhostOperator(entry["dim"], _dtype(entry["delta_dtype"]), _dtype(entry.get("compute_dtype")))
        if entry["kind"] == "layer":
            wrapped: nn.Module = GhostedLayer(
                ghost, inner, entry["hidden_states_kwarg"], entry["hidden_states_arg_position"]
            )
        else:
            wrapped = GhostedNorm(ghost, inner)
        if isinstance(parent, nn.ModuleList):
            parent[int(name)] = wrapped
        else:
            setattr(parent, name, wrapped)


class GhostsolveForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM with ghost operators rebuilt from ``config.ghostsolve["ghosts"]``."""

    config_class = GhostsolveConfig
    _keep_in_fp32_modules = ['ghost']

    def __init__(self, config: GhostsolveConfig, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        _apply_layout(self, list(config.ghostsolve["ghosts"]))

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        # A missing, unexpected or mis-shaped tensor would leave an operator at its placeholder (identity)
        # value, i.e. silently give the unrecovered model: refuse instead.
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        problems = {
            key: sorted(str(k) for k in info.get(key) or [])
            for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
        }
        problems = {k: v for k, v in problems.items() if v}
        if problems:
            raise ValueError(
                f"this ghostsolve checkpoint does not load exactly: {problems}; its ghost operators and "
                "weights disagree, so the recovered model cannot be rebuilt"
            )
        return (model, info) if want_info else model
