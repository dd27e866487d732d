"""Serve ghosted checkpoints with vLLM: an out-of-tree model plugin.

vLLM finds :func:`register` through the entry point ``vllm.general_plugins`` (``ghostsolve =
"ghostsolve.integrations.vllm:register"`` in ghostsolve's ``pyproject.toml``) and calls it in every process
it starts, so with ghostsolve installed beside vLLM ::

    vllm serve ./llama-ghost          # or LLM("./llama-ghost")

serves a checkpoint written by :func:`ghostsolve.save`, without ``--trust-remote-code``. :func:`register`

* registers each ghosted config (``model_type = "ghostsolve_llama"``, …) with transformers' ``AutoConfig``,
  so vLLM parses ``config.json`` without running the checkpoint's remote code;
* registers each ghosted architecture (``GhostsolveLlamaForCausalLM``, …) with vLLM's ``ModelRegistry``,
  lazily (``"module:Class"``): a subclass of vLLM's *own* model class (``LlamaForCausalLM`` of
  ``vllm.model_executor.models.llama``, with its fused kernels, paged attention, tensor and pipeline
  parallelism and quantization), built in :mod:`ghostsolve.integrations.vllm_models`, which gives the decoder
  layers and the final norm named by the checkpoint's ``ghosts`` entries their ghost operator
  ``h ↦ h W = h + h M`` (row vectors) on the residual stream entering them.

Served families: :data:`SERVED` (vLLM's native Llama, Mistral, Qwen2 and Qwen3 classes). OLMo-2/OLMo-3 have
no native vLLM class (vLLM runs them through its Transformers backend), so their ghosted checkpoints are not
served by this plugin: serve them with transformers (``ghostsolve.load``), or prune them with ``identity``
(the folds are refused on post-norm models), which gives a plain checkpoint vLLM serves as it is.

This module imports vLLM only inside :func:`register`; the rest — which architectures, where the operators
go, how weight names map — is plain Python over the checkpoint's config, tested without vLLM.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.model.ghosted import MODEL_TYPE_PREFIX, SECTION
from ghostsolve.pipeline.model.operators import GhostOperator, apply_ghost_entries, ghost_of

__all__ = [
    "MODELS_MODULE",
    "SERVED",
    "GhostPlan",
    "ServedFamily",
    "ServedGhostedLayer",
    "ServedGhostedNorm",
    "attach_served_ghosts",
    "ghost_plan",
    "ghost_section",
    "map_weight_names",
    "register",
    "served_family",
    "weight_name_map",
]

#: The module vLLM imports, lazily, to build the model classes (it imports vLLM at its top).
MODELS_MODULE = "ghostsolve.integrations.vllm_models"
# Every served vLLM class keeps its decoder layers and final norm here (as the transformers classes do).
_LAYOUT = {"layers_path": "model.layers", "final_norm_path": "model.norm"}


@dataclass(frozen=True)
class ServedFamily:
    """One base architecture the plugin serves, and where vLLM keeps its own class for it.

    Attributes
    ----------
    model_type : str
        The base ``config.model_type`` (``"llama"``); the checkpoint's is ``"ghostsolve_" + model_type``.
    config_class : str
        The transformers config class of the base (``"LlamaConfig"``).
    architecture : str
        The base architecture (``"LlamaForCausalLM"``): vLLM's class and transformers' share this name.
    vllm_module : str
        The vLLM module defining ``architecture``.
    """

    model_type: str
    config_class: str
    architecture: str
    vllm_module: str

    @property
    def ghosted_architecture(self) -> str:
        """The name in a ghosted checkpoint's ``architectures`` (``"GhostsolveLlamaForCausalLM"``)."""
        return "Ghostsolve" + self.architecture

    @property
    def ghosted_model_type(self) -> str:
        """The ghosted checkpoint's ``model_type`` (``"ghostsolve_llama"``)."""
        return MODEL_TYPE_PREFIX + self.model_type


_M = "vllm.model_executor.models."
#: Ghosted architecture name → the family it is served as. Each decoder layer of these vLLM classes is
#: called ``layer(positions, hidden_states, residual)`` with the residual stream split in two (``hidden_states
#: + residual``, ``residual`` None for the first layer) and returns the pair; the final norm is called
#: ``norm(hidden_states, residual)``. ``vllm_models`` relies on exactly that convention.
SERVED: dict[str, ServedFamily] = {
    f.ghosted_architecture: f
    for f in (
        ServedFamily("llama", "LlamaConfig", "LlamaForCausalLM", _M + "llama"),
        ServedFamily("mistral", "MistralConfig", "MistralForCausalLM", _M + "mistral"),
        ServedFamily("qwen2", "Qwen2Config", "Qwen2ForCausalLM", _M + "qwen2"),
        ServedFamily("qwen3", "Qwen3Config", "Qwen3ForCausalLM", _M + "qwen3"),
    )
}


def served_family(architecture: str) -> ServedFamily:
    """The :class:`ServedFamily` of a ghosted architecture name.

    Raises
    ------
    GhostsolveError
        If the plugin does not serve ``architecture``; the message lists those it serves.
    """
    family = SERVED.get(architecture)
    if family is None:
        raise GhostsolveError(
            f"the ghostsolve vLLM plugin does not serve {architecture!r}; it serves {sorted(SERVED)}. Serve "
            "other families' ghosted checkpoints with transformers (ghostsolve.load), or save a plain "
            "checkpoint (method identity; prune-comp or replaceme on pre-norm models) that vLLM serves as is"
        )
    return family


def ghost_section(config: Any) -> Mapping[str, Any]:
    """The ``ghostsolve`` section of a ghosted checkpoint's config (a transformers config or a mapping).

    Raises
    ------
    GhostsolveError
        If there is no section, or it does not describe a ghosted checkpoint.
    """
    section = config.get(SECTION) if isinstance(config, Mapping) else getattr(config, SECTION, None)
    if not isinstance(section, Mapping):
        raise GhostsolveError(
            "this config has no 'ghostsolve' section, so nothing says where the ghost operators go; serve a "
            "checkpoint written by ghostsolve.save (its config.json carries the section)"
        )
    kind = section.get("checkpoint_kind", "ghosted")
    if kind != "ghosted" or not isinstance(section.get("ghosts"), list):
        raise GhostsolveError(
            f"the ghostsolve section describes a {kind!r} checkpoint without a 'ghosts' list; a plain "
            "checkpoint needs no plugin (serve it as its base architecture)"
        )
    return section


@dataclass
class GhostPlan:
    """Where a served model's ghost operators go: decoder layer index (pruned numbering) → operator.

    The operators are identity placeholders (``M = 0``) of the stored dtype and hidden size; loading the
    checkpoint's ``...ghost.delta`` weights fills them.

    Attributes
    ----------
    layers : dict of int to GhostOperator
        Operators applied to the residual stream entering these decoder layers.
    norm : GhostOperator or None
        Operator applied to the stream entering the final norm (an interval reaching the end).
    format_version : int
        The checkpoint's format (1: wrapper weight names, see :func:`weight_name_map`).
    """

    layers: dict[int, GhostOperator] = field(default_factory=dict)
    norm: GhostOperator | None = None
    format_version: int = 2


def _skeleton(num_layers: int) -> nn.Module:
    """Empty modules at the served layout's paths, for :func:`apply_ghost_entries` to check entries on."""
    root, model = nn.Module(), nn.Module()
    root.add_module("model", model)
    model.add_module("layers", nn.ModuleList(nn.Module() for _ in range(num_layers)))
    model.add_module("norm", nn.Module())
    return root


def ghost_plan(config: Any, *, device: torch.device | str | None = None) -> GhostPlan:
    """The :class:`GhostPlan` a ghosted config describes (its ``ghostsolve`` section).

    Every entry is checked by :func:`~ghostsolve.pipeline.model.operators.apply_ghost_entries`, the check the
    transformers loaders use: a layer entry must name ``model.layers.{i}`` with ``i < num_hidden_layers``, a
    norm entry ``model.norm``, dtypes must be known.

    Parameters
    ----------
    config : transformers config or mapping
        With ``num_hidden_layers`` (the pruned count) and the ``ghostsolve`` section.
    device : optional
        Where the placeholders are made (default: torch's default device, which vLLM sets while it builds a
        model).

    Raises
    ------
    GhostsolveError
        For a missing or non-ghosted section, a layout other than ``model.layers`` / ``model.norm``, or an
        entry the check refuses.
    """
    section = ghost_section(config)
    raw_layers = config.get("num_hidden_layers") if isinstance(config, Mapping) else config.num_hidden_layers
    if isinstance(raw_layers, bool) or not isinstance(raw_layers, int) or raw_layers < 1:
        raise GhostsolveError(f"num_hidden_layers must be a positive int, got {raw_layers!r}")
    layout = dict(section.get("layout") or _LAYOUT)  # format 1 recorded no layout: it was always this one
    if layout != _LAYOUT:
        raise GhostsolveError(
            f"the checkpoint places its ghost operators under {layout}, but the served vLLM classes keep "
            f"their layers and final norm under {_LAYOUT}"
        )
    skeleton = _skeleton(raw_layers)
    try:
        with torch.device(device) if device is not None else nullcontext():
            apply_ghost_entries(skeleton, section["ghosts"], **layout)
    except ValueError as exc:
        raise GhostsolveError(f"cannot serve this checkpoint: {exc}") from exc
    layers: Any = skeleton.get_submodule(layout["layers_path"])
    plan = GhostPlan(format_version=int(section.get("format_version", 1)))
    for i, layer in enumerate(layers):
        ghost = ghost_of(layer)
        if ghost is not None:
            plan.layers[i] = ghost
    plan.norm = ghost_of(skeleton.get_submodule(layout["final_norm_path"]))
    return plan


def weight_name_map(format_version: int) -> Callable[[str], str]:
    """The renaming from a checkpoint's weight names to the served model's.

    Format 2 keeps the base model's names and adds ``model.layers.{i}.ghost.delta`` /
    ``model.norm.ghost.delta`` — exactly the served model's names: the identity. Format 1 kept each ghosted
    layer in a wrapper (``model.layers.{i}.layer.*``, ``model.norm.norm.*``): those move back to the base
    names.

    Examples
    --------
    >>> weight_name_map(1)("model.layers.3.layer.mlp.down_proj.weight")
    'model.layers.3.mlp.down_proj.weight'
    >>> weight_name_map(1)("model.layers.3.ghost.delta")
    'model.layers.3.ghost.delta'
    """
    if format_version >= 2:
        return lambda name: name
    rules = [(re.compile(r"^model\.layers\.(\d+)\.layer\."), r"model.layers.\1."),
             (re.compile(r"^model\.norm\.norm\."), "model.norm.")]  # fmt: skip

    def rename(name: str) -> str:
        for pattern, replacement in rules:
            name, n = pattern.subn(replacement, name)
            if n:
                break
        return name

    return rename


def map_weight_names(
    weights: Iterable[tuple[str, torch.Tensor]], format_version: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` pairs with :func:`weight_name_map` applied to the names (lazily)."""
    rename = weight_name_map(format_version)
    for name, tensor in weights:
        yield rename(name), tensor


# ---------------------------------------------------------------------------------------------------------
# the operators in vLLM's calling convention (plain torch: the model classes live in vllm_models)
# ---------------------------------------------------------------------------------------------------------
class ServedGhostedLayer(nn.Module):
    """Marker base of a vLLM decoder layer that maps the residual stream entering it by ``self.ghost``.

    vLLM's decoder layers carry the stream in two parts, ``hidden_states + residual`` (the sum is deferred
    into the next layer's fused add-and-norm; ``residual`` is None for the first layer). A ghosted layer forms
    the stream, maps it (``h ↦ h + h M``, row vectors) and runs the base layer with ``residual=None`` — the
    path by which vLLM's first layer starts from the embedding — so it returns the base layer's own pair.
    """

    ghost: GhostOperator

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None,
        *args: Any, **kwargs: Any,
    ) -> Any:  # fmt: skip
        stream = hidden_states if residual is None else hidden_states + residual
        return super().forward(positions, self.ghost(stream), None, *args, **kwargs)


class ServedGhostedNorm(nn.Module):
    """Marker base of vLLM's final norm that maps the stream entering it by ``self.ghost``.

    Called as ``norm(hidden_states, residual)`` it returns ``(norm(h W), h W)`` with ``h = hidden_states +
    residual``, the pair vLLM's fused add-and-norm returns; called with one tensor, ``norm(h W)``.
    """

    ghost: GhostOperator

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
        stream = self.ghost(hidden_states if residual is None else hidden_states + residual)
        out = super().forward(stream)
        return out if residual is None else (out, stream)


_SWAPPED: dict[tuple[type, type], type] = {}


def _attach(module: nn.Module, ghost: GhostOperator, marker: type) -> None:
    base = type(module)
    if (marker, base) not in _SWAPPED:
        _SWAPPED[(marker, base)] = type(base.__name__, (marker, base), {"__qualname__": base.__qualname__})
    module.__class__ = _SWAPPED[(marker, base)]
    module.ghost = ghost


def attach_served_ghosts(model: nn.Module, plan: GhostPlan, *, absent: tuple[type, ...] = ()) -> None:
    """Give ``model``'s ``model.layers`` and ``model.norm`` the operators of ``plan``, in place.

    Each target keeps its class's name but becomes a :class:`ServedGhostedLayer` / :class:`ServedGhostedNorm`
    subclass with the operator as its child ``ghost``, so the operator's weight is
    ``model.layers.{i}.ghost.delta`` / ``model.norm.ghost.delta``: the checkpoint's own names.

    Parameters
    ----------
    model : nn.Module
        A vLLM causal LM (``model.layers``, ``model.norm``).
    plan : GhostPlan
    absent : tuple of types
        Placeholder classes of modules that live on another pipeline stage (vLLM's ``PPMissingLayer``):
        skipped, as their weights are.

    Raises
    ------
    GhostsolveError
        If a planned layer index is beyond ``model.layers``.
    """
    layers: Any = model.get_submodule(_LAYOUT["layers_path"])
    beyond = [i for i in plan.layers if i >= len(layers)]
    if beyond:
        raise GhostsolveError(f"the plan puts operators at layers {beyond}, but the model has {len(layers)}")
    for index, ghost in plan.layers.items():
        if not isinstance(layers[index], absent):
            _attach(layers[index], ghost, ServedGhostedLayer)
    norm = model.get_submodule(_LAYOUT["final_norm_path"])
    if plan.norm is not None and not isinstance(norm, absent):
        _attach(norm, plan.norm, ServedGhostedNorm)


def register() -> None:
    """Register the ghosted configs with transformers and the ghosted architectures with vLLM.

    Called by vLLM through the ``vllm.general_plugins`` entry point in every process it starts; idempotent.
    Imports vLLM and transformers here, not at module import.

    Raises
    ------
    ImportError
        If vLLM is not installed (``pip install 'ghostsolve[vllm]'``).
    """
    import transformers
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from ghostsolve.pipeline.model.ghosted import ghosted_config_class

    for family in SERVED.values():
        base = getattr(transformers, family.config_class, None)
        if base is None:  # an older transformers without this family: nothing to serve for it
            continue
        AutoConfig.register(family.ghosted_model_type, ghosted_config_class(base), exist_ok=True)
        name = family.ghosted_architecture
        ModelRegistry.register_model(name, f"{MODELS_MODULE}:{name}")
