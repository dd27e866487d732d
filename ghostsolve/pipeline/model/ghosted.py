"""The model and config classes of a model that holds ghost operators (and a checkpoint's remote code).

A pruned model whose removed intervals were replaced by ghost operators is an instance of
``Ghostsolve<Base>ForCausalLM``, a subclass of its base class (``GhostsolveLlamaForCausalLM`` of
``LlamaForCausalLM``), with a ``Ghostsolve<Base>Config`` whose ``model_type`` is ``ghostsolve_<base type>``.
So ``isinstance(model, LlamaForCausalLM)`` holds, ``generate`` and every other transformers feature work, and
``model.save_pretrained(DIR)`` writes a checkpoint that loads back exactly:

* ``config.json`` keeps the base model's fields (with the pruned layer count), names ``model_type =
  "ghostsolve_llama"`` (so plain transformers refuses it rather than silently building the unrecovered model)
  and ``architectures = ["GhostsolveLlamaForCausalLM"]`` (what a serving engine's plugin registers), maps
  ``AutoConfig`` / ``AutoModelForCausalLM`` to this file, and records the ghost layout in its ``ghostsolve``
  section;
* the weights keep the base model's names and add ``model.layers.{i}.ghost.delta`` /
  ``model.norm.ghost.delta``;
* this file is copied beside them as ``modeling_ghostsolve.py`` and the operators as
  ``ghostsolve_operators.py``, so ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` works
  without ghostsolve installed.

This file imports only torch, transformers and the operators module (the package's own, or the copy shipped
beside it in a checkpoint). Keep it that way. The classes are made on demand from their names
(``Ghostsolve<Base>ForCausalLM`` subclasses ``<Base>ForCausalLM`` of transformers), so no list of
architectures lives here.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import transformers
from torch import nn

try:  # inside the ghostsolve package
    if not (__package__ or "").startswith("ghostsolve."):
        raise ImportError
    from ghostsolve.pipeline.model import operators as _operators
    from ghostsolve.pipeline.model.operators import apply_ghost_entries, check_exact_load, ghost_of
except ImportError:  # the remote code of a checkpoint: the operators shipped beside this file
    from . import ghostsolve_operators as _operators  # type: ignore[no-redef]
    from .ghostsolve_operators import apply_ghost_entries, check_exact_load, ghost_of  # type: ignore[no-redef]

try:  # ghostsolve installed (also when this file runs as a checkpoint's remote code): its error class
    from ghostsolve.errors import GhostsolveError as _Error
except ImportError:  # without ghostsolve: its base class
    _Error = ValueError  # type: ignore[assignment, misc]

__all__ = [
    "FORMAT_VERSION",
    "MODELING_FILE",
    "MODEL_TYPE_PREFIX",
    "OPERATORS_FILE",
    "SECTION",
    "check_layout",
    "ghost_entries",
    "ghosted_config_class",
    "ghosted_model_class",
    "make_ghosted",
]

SECTION = "ghostsolve"
#: 2: ghosts are children of the module they correct, weights keep the base names. 1: wrapper modules.
FORMAT_VERSION = 2
MODEL_TYPE_PREFIX = "ghostsolve_"
MODELING_FILE = "modeling_ghostsolve.py"
OPERATORS_FILE = "ghostsolve_operators.py"
_PREFIX = "Ghostsolve"

_CONFIGS: dict[type, type] = {}
_MODELS: dict[type, type] = {}


def ghosted_config_class(base: type) -> type:
    """``Ghostsolve<Base>Config``: ``base`` with ``model_type = "ghostsolve_" + base.model_type``."""
    if base not in _CONFIGS:
        name = _PREFIX + base.__name__
        model_type = MODEL_TYPE_PREFIX + str(vars(base).get("model_type") or base.model_type)  # type: ignore[attr-defined]
        _CONFIGS[base] = type(name, (base,), {"model_type": model_type, "__module__": __name__,
                                              "__qualname__": name})  # fmt: skip
    return _CONFIGS[base]


def ghost_entries(model: nn.Module, layers_path: str, final_norm_path: str) -> list[dict[str, Any]]:
    """Where the ghost operators of ``model`` sit, as the checkpoint's ``ghosts`` entries (JSON data)."""
    entries: list[dict[str, Any]] = []
    layers: Any = model.get_submodule(layers_path)
    for i, layer in enumerate(layers):
        ghost = ghost_of(layer)
        if ghost is not None:
            entries.append({"kind": "layer", "insert_at": i, "module": f"{layers_path}.{i}",
                            **_describe(ghost), "hidden_states_kwarg": layer.hidden_states_kwarg,
                            "hidden_states_arg_position": layer.hidden_states_arg_position})  # fmt: skip
    ghost = ghost_of(model.get_submodule(final_norm_path))
    if ghost is not None:
        entry = {"kind": "norm", "insert_at": "final_norm", "module": final_norm_path, **_describe(ghost)}
        entries.append(entry)
    return entries


def _describe(ghost: Any) -> dict[str, Any]:
    compute = ghost.compute_dtype
    return {"dim": ghost.dim, "delta_dtype": str(ghost.delta.dtype).removeprefix("torch."),
            "compute_dtype": None if compute is None else str(compute).removeprefix("torch.")}  # fmt: skip


def _section(config: Any) -> dict[str, Any]:
    section = getattr(config, SECTION, None)
    if not isinstance(section, Mapping) or not isinstance(section.get("layout"), Mapping):
        raise ValueError(
            f"this {type(config).__name__} has no ghostsolve section with a ghost layout; the checkpoint's "
            "config.json was damaged — re-save it with ghostsolve"
        )
    return dict(section)


# A path component of the layout: an attribute name that cannot be private or special, or a list index.
_PART = re.compile(r"^(?:[A-Za-z][A-Za-z0-9_]*|[0-9]+)$")
_MAX_ARG_POSITION = 16


def _plain_path(path: Any, what: str) -> str:
    if not isinstance(path, str) or not all(_PART.match(p) for p in path.split(".")):
        raise _Error(
            f"the checkpoint's {what} {path!r} is not a dotted path of plain attribute names and indices; "
            "the config.json was altered — re-save it with ghostsolve"
        )
    return path


def check_layout(model: nn.Module, section: Mapping[str, Any]) -> tuple[str, str]:
    """The ``(layers_path, final_norm_path)`` of a checkpoint, checked against what ``model`` is built of.

    The layout and the ghost entries come from ``config.json``: before anything follows them, every path
    must be plain dotted names (no private or special attributes), the layers path must reach — through
    registered submodules only — a ``ModuleList`` of ``config.num_hidden_layers`` decoder layers, the final
    norm path a module outside it holding only 1-D parameters (a norm's weight and bias, not an embedding or
    the head), and each entry's hidden-states keyword and position must be a plain name and a small index.

    Raises
    ------
    ValueError (GhostsolveError inside ghostsolve)
        For anything else.
    """
    layout = section.get("layout")
    if not isinstance(layout, Mapping):
        raise _Error("the checkpoint's ghostsolve section has no layout; re-save it with ghostsolve")
    layers_path = _plain_path(layout.get("layers_path"), "layers path")
    norm_path = _plain_path(layout.get("final_norm_path"), "final norm path")
    try:
        layers, norm = model.get_submodule(layers_path), model.get_submodule(norm_path)
    except AttributeError as exc:
        raise _Error(f"the checkpoint's layout names no submodule of this model ({exc})") from None
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) != expected:
        raise _Error(
            f"the checkpoint's layers path {layers_path!r} is a {type(layers).__name__}, not the model's "
            f"list of {expected} decoder layers"
        )
    inside = norm_path == layers_path or norm_path.startswith(layers_path + ".")
    params = list(norm.parameters())
    if inside or list(norm.children()) or not params or any(p.ndim != 1 for p in params):
        raise _Error(f"the checkpoint's final norm path {norm_path!r} does not name the model's final norm")
    for entry in section.get("ghosts") or []:
        if not isinstance(entry, Mapping):
            raise _Error(f"a ghost entry must be a mapping, got {type(entry).__name__}")
        if entry.get("kind") != "layer":
            continue
        key = entry.get("hidden_states_kwarg", "hidden_states")
        pos = entry.get("hidden_states_arg_position", 0)
        if not isinstance(key, str) or not key.isidentifier() or key.startswith("_"):
            raise _Error(f"ghost entry hidden_states_kwarg {key!r} is not a plain argument name")
        if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos < _MAX_ARG_POSITION:
            raise _Error(f"ghost entry hidden_states_arg_position {pos!r} is not an index below "
                         f"{_MAX_ARG_POSITION}")  # fmt: skip
    return layers_path, norm_path


def _check_finite_ghosts(model: nn.Module, where: str) -> None:
    """Refuse operators holding NaN/Inf: they would turn every hidden state they touch into NaN."""
    for name, module in model.named_modules():
        ghost = ghost_of(module)
        if ghost is None or ghost.delta.device.type == "meta":
            continue
        bad = int((~ghost.delta.isfinite()).sum())
        if bad:
            raise _Error(
                f"checkpoint {where!r}: the ghost operator of {name} holds {bad} NaN/Inf value(s) of "
                f"{ghost.delta.numel()}; the weights file is damaged — copy the checkpoint again or re-save "
                "it"
            )


class _GhostedModel:
    """Behaviour shared by every ``Ghostsolve<Base>ForCausalLM`` (mixed in before the base class)."""

    config: Any

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)  # type: ignore[call-arg]
        section = _section(config)
        model: Any = self
        layers_path, norm_path = check_layout(model, section)
        apply_ghost_entries(model, section.get("ghosts") or [], layers_path=layers_path,
                            final_norm_path=norm_path)  # fmt: skip

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        # A missing, unexpected or mis-shaped tensor would leave an operator at its placeholder (identity)
        # value, i.e. silently give the unrecovered model: refuse instead.
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)  # type: ignore[misc]
        where = str(args[0]) if args else "checkpoint"
        check_exact_load(info, where)
        _check_finite_ghosts(model, where)
        return (model, info) if want_info else model

    def save_pretrained(self, save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
        """The base class's ``save_pretrained``, the ghost layout refreshed and the remote code beside."""
        section = _section(self.config)
        layout = section["layout"]
        model: Any = self
        section["ghosts"] = ghost_entries(model, str(layout["layers_path"]), str(layout["final_norm_path"]))
        section["format_version"] = FORMAT_VERSION
        setattr(self.config, SECTION, section)
        result = super().save_pretrained(save_directory, *args, **kwargs)  # type: ignore[misc]
        folder = Path(save_directory)
        shutil.copyfile(__file__, folder / MODELING_FILE)
        shutil.copyfile(_operators.__file__, folder / OPERATORS_FILE)
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["auto_map"] = {
            "AutoConfig": f"{MODELING_FILE[:-3]}.{type(self.config).__name__}",
            "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{type(self).__name__}",
        }
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        return result


def ghosted_model_class(base: type) -> type:
    """``Ghostsolve<Base>ForCausalLM``: ``base`` that rebuilds its ghost operators from its config.

    ``_keep_in_fp32_modules`` gains ``"ghost"``, so an fp32 operator stays fp32 when the rest of the model is
    loaded in bf16/fp16.
    """
    if base not in _MODELS:
        name = _PREFIX + base.__name__
        keep = [*(getattr(base, "_keep_in_fp32_modules", None) or []), "ghost"]
        config_class = ghosted_config_class(base.config_class)  # type: ignore[attr-defined]
        namespace = {"config_class": config_class, "_keep_in_fp32_modules": keep, "__module__": __name__,
                     "__qualname__": name}  # fmt: skip
        _MODELS[base] = type(name, (_GhostedModel, base), namespace)
    return _MODELS[base]


def make_ghosted(model: nn.Module, *, layers_path: str, final_norm_path: str) -> nn.Module:
    """Make a model that holds ghost operators a ``Ghostsolve<Base>ForCausalLM``, in place; returns it.

    The model's class and its config's class are swapped for their ghosted subclasses (nothing else changes:
    same modules, same weights) and the config's ``ghostsolve`` section records where the layers and the final
    norm sit and where the ghost operators are, so that ``save_pretrained`` writes a checkpoint that loads
    back.
    """
    if not isinstance(model, _GhostedModel):
        model.__class__ = ghosted_model_class(type(model))
    config = model.config
    base_type = str(getattr(type(config), "model_type", ""))
    if not base_type.startswith(MODEL_TYPE_PREFIX):
        config.__class__ = ghosted_config_class(type(config))
    section = dict(getattr(config, SECTION, None) or {})
    section.setdefault("base_model_type", base_type.removeprefix(MODEL_TYPE_PREFIX))
    section.setdefault("base_architecture", type(model).__name__.removeprefix(_PREFIX))
    section["checkpoint_kind"] = "ghosted"
    section["layout"] = {"layers_path": layers_path, "final_norm_path": final_norm_path}
    section["ghosts"] = ghost_entries(model, layers_path, final_norm_path)
    setattr(config, SECTION, section)
    return model


def __getattr__(name: str) -> type:
    # transformers resolves auto_map entries by attribute: make Ghostsolve<Base>{ForCausalLM,Config} on
    # demand.
    base_name = name.removeprefix(_PREFIX)
    base = getattr(transformers, base_name, None) if name.startswith(_PREFIX) else None
    if isinstance(base, type) and issubclass(base, transformers.PreTrainedModel):
        return ghosted_model_class(base)
    if isinstance(base, type) and issubclass(base, transformers.PretrainedConfig):
        return ghosted_config_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
