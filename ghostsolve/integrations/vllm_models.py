"""The vLLM model classes of ghosted checkpoints (imported by vLLM, lazily, after :func:`register`).

``Ghostsolve<Base>ForCausalLM`` subclasses vLLM's own ``<Base>ForCausalLM`` (see
:data:`ghostsolve.integrations.vllm.SERVED`) and is made on demand from its name, as vLLM resolves
``"ghostsolve.integrations.vllm_models:GhostsolveLlamaForCausalLM"``. After the base class has built its
layers, each decoder layer and the final norm named by the checkpoint's ``ghosts`` entries gets a ghost
operator as its child ``ghost`` (so its weight is ``model.layers.{i}.ghost.delta``, the checkpoint's own name)
and a class that applies it first (:class:`~ghostsolve.integrations.vllm.ServedGhostedLayer`,
:class:`~ghostsolve.integrations.vllm.ServedGhostedNorm`: the stream, ``hidden_states + residual`` in vLLM's
split form, is mapped before the base module runs).

This is exactly ghostsolve's transformers-side ``GhostedLayer`` / ``GhostedNorm`` in vLLM's calling
convention: the same :class:`~ghostsolve.pipeline.model.operators.GhostOperator` (stored in its checkpoint
dtype, float32 by default, computed in the hidden states' dtype unless the checkpoint names one), so in
float32 the served model and ``ghostsolve.load`` compute the same function. The operator is replicated on
every tensor-parallel rank (the stream between layers is replicated there) and lives on the pipeline stage
that holds its layer.

This module imports vLLM at its top: only vLLM imports it.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Any

import torch
from vllm.model_executor.models.utils import PPMissingLayer

from ghostsolve.integrations.vllm import attach_served_ghosts, ghost_plan, map_weight_names, served_family

__all__ = ["ghosted_vllm_class"]


class _Ghosted:
    """Behaviour of every served ``Ghostsolve<Base>ForCausalLM`` (mixed in before vLLM's base class)."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)  # type: ignore[call-arg]
        hf_config = vllm_config.model_config.hf_config
        # Made under vLLM's default-device context, like the base class's own parameters.
        self._ghost_plan = ghost_plan(hf_config)
        model: Any = self
        attach_served_ghosts(model, self._ghost_plan, absent=(PPMissingLayer,))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        mapped = map_weight_names(weights, self._ghost_plan.format_version)
        return super().load_weights(mapped)  # type: ignore[misc, no-any-return]


_CLASSES: dict[str, type] = {}


def ghosted_vllm_class(architecture: str) -> type:
    """``Ghostsolve<Base>ForCausalLM`` for vLLM: vLLM's ``<Base>ForCausalLM`` with the ghost operators.

    Raises
    ------
    GhostsolveError
        If the plugin does not serve ``architecture``.
    """
    if architecture not in _CLASSES:
        family = served_family(architecture)
        base = getattr(importlib.import_module(family.vllm_module), family.architecture)
        _CLASSES[architecture] = type(architecture, (_Ghosted, base),
                                      {"__module__": __name__, "__qualname__": architecture})  # fmt: skip
    return _CLASSES[architecture]


def __getattr__(name: str) -> type:
    # vLLM resolves "module:Class" by attribute: make Ghostsolve<Base>ForCausalLM on demand.
    if name.startswith("Ghostsolve") and name.endswith("ForCausalLM"):
        return ghosted_vllm_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
