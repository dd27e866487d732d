"""Checkpoints of pruned and recovered models: atomic save, strict load, remote code.

Two kinds of checkpoint come out of :func:`save`:

* **plain** – the model has no ghost operators (plain pruning, or a method folded into standard
  weights: ``identity``, Prune&Comp's scalar, ReplaceMe). It is an ordinary Hugging Face directory that
  ``AutoModelForCausalLM.from_pretrained(DIR)`` loads with no custom code.
* **ghosted** – the model holds :class:`~ghostsolve.pipeline.surgery.GhostOperator` modules. The directory
  also holds a generated, self-contained ``modeling_ghostsolve.py`` (it imports only torch and
  transformers, so users without ghostsolve can load it) and ``config.json`` maps ``AutoConfig`` and
  ``AutoModelForCausalLM`` to it, so ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``
  rebuilds the wrappers and loads the same weights. Its ``model_type`` is ``ghostsolve_<base type>``, so a
  load *without* ``trust_remote_code`` fails loudly instead of building the unrecovered architecture and
  silently dropping the operators. :func:`load` (``ghostsolve.load``) reads it without remote code.

Both kinds record a ``"ghostsolve"`` section in ``config.json``: the original model, the removed layers,
the recovery method, the ghost layout and the fit diagnostics. Every load checks that the weights match the
architecture exactly: a missing, unexpected or mis-shaped tensor (a missing operator weight, say) raises.

Writes are atomic: everything is written into a temporary directory beside ``out_dir``, then renamed into
place (with the modes the umask asks for, see :mod:`ghostsolve.pipeline.atomic`); an existing
``out_dir`` is refused unless ``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.atomic import atomic_directory, refuse_existing

__all__ = [
    "CONFIG_SECTION",
    "MODELING_FILE",
    "atomic_directory",
    "checkpoint_info",
    "load",
    "save",
]

logger = logging.getLogger(__name__)

CONFIG_SECTION = "ghostsolve"
MODELING_FILE = "modeling_ghostsolve.py"
FORMAT_VERSION = 1
_REMOTE_MODEL = "GhostsolveForCausalLM"
_REMOTE_CONFIG = "GhostsolveConfig"
_MODEL_TYPE_PREFIX = "ghostsolve_"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ghostsolve")
    except PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# the config section
# ---------------------------------------------------------------------------------------------
def _jsonable(value: Any, depth: int = 0) -> Any:
    """Best-effort conversion of fit diagnostics to JSON: numbers, strings, lists, dicts; tensors become
    numbers (scalars) or their shape; non-finite floats become strings ("nan", "inf")."""
    if depth > 6:
        return repr(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return _jsonable(value.item(), depth + 1)
        return {"tensor_shape": list(value.shape), "dtype": str(value.dtype).replace("torch.", "")}
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_jsonable(v, depth + 1) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        with contextlib.suppress(Exception):
            return _jsonable(value.item(), depth + 1)
    return repr(value)


def _describe_fit(fit: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("family", "solver", "dtype", "ridge", "rank", "objective", "relative_residual"):
        if hasattr(fit, name):
            out[name] = _jsonable(getattr(fit, name))
    if hasattr(fit, "diagnostics"):
        out["diagnostics"] = _jsonable(fit.diagnostics)
    return out


def _describe_fits(fits: Any) -> list[dict[str, Any]]:
    if fits is None:
        return []
    if isinstance(fits, Mapping):
        items = list(fits.items())
    else:
        items = [(None, f) for f in fits]
    described = []
    for key, fit in items:
        entry = {"interval": _jsonable(key)} if key is not None else {}
        if fit is not None:
            entry.update(_describe_fit(fit))
        described.append(entry)
    return described


def _ghost_entries(model: nn.Module, adapter: Any) -> list[dict[str, Any]]:
    """Where each ghost sits as module paths, with its storage and compute dtypes (for remote code)."""
    from ghostsolve.pipeline.surgery import FINAL_NORM, GhostedLayer, GhostedNorm

    entries = []
    for i, layer in enumerate(adapter.layers(model)):
        if isinstance(layer, GhostedLayer):
            entries.append(
                {
                    "kind": "layer",
                    "insert_at": i,
                    "module": f"{adapter.layers_path}.{i}",
                    "dim": layer.ghost.dim,
                    "delta_dtype": str(layer.ghost.delta.dtype).replace("torch.", ""),
                    "compute_dtype": _jsonable(layer.ghost.compute_dtype),
                    "hidden_states_kwarg": layer.hidden_states_kwarg,
                    "hidden_states_arg_position": layer.hidden_states_arg_position,
                }
            )
    norm = adapter.final_norm(model)
    if isinstance(norm, GhostedNorm):
        entries.append(
            {
                "kind": "norm",
                "insert_at": FINAL_NORM,
                "module": adapter.final_norm_path,
                "dim": norm.ghost.dim,
                "delta_dtype": str(norm.ghost.delta.dtype).replace("torch.", ""),
                "compute_dtype": _jsonable(norm.ghost.compute_dtype),
            }
        )
    return entries


def _is_recovery(obj: Any) -> bool:
    return hasattr(obj, "model") and hasattr(obj, "method") and not isinstance(obj, nn.Module)


def _section(
    obj: Any, model: Any, original_model: str | None, extra: Mapping[str, Any] | None
) -> dict[str, Any]:
    previous = getattr(model.config, CONFIG_SECTION, None)
    section: dict[str, Any] = dict(previous) if isinstance(previous, Mapping) else {}
    section.update({"format_version": FORMAT_VERSION, "ghostsolve_version": _version()})
    if _is_recovery(obj):
        removed = [int(i) for i in getattr(obj, "removed", [])]
        section.update(
            {
                "removed": removed,
                "intervals": [list(map(int, iv)) for iv in getattr(obj, "intervals", [])],
                "method": getattr(obj, "method", None),
                "order": getattr(obj, "order", None),
                "fit_seconds": _jsonable(getattr(obj, "fit_seconds", None)),
                "relative_residuals": _jsonable(getattr(obj, "relative_residuals", None)),
                "fits": _describe_fits(getattr(obj, "fits", None)),
                "original_num_layers": int(model.config.num_hidden_layers) + len(removed),
            }
        )
    if original_model is not None:
        section["original_model"] = str(original_model)
    section.setdefault("original_model", getattr(model.config, "_name_or_path", None) or None)
    if extra:
        section.update(_jsonable(dict(extra)))
    return section


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------
def save(
    recovery_or_model: Any,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    tokenizer: Any = None,
    original_model: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save a recovered (or plainly pruned) model as a Hugging Face checkpoint directory.

    Parameters
    ----------
    recovery_or_model : Recovery or transformers PreTrainedModel
        A :class:`~ghostsolve.pipeline.recover.Recovery` (its model, removed layers, method and fit
        diagnostics are recorded) or a bare model (e.g. one returned by :func:`load`, whose recorded
        section is kept).
    out_dir : path
        The directory to create.
    overwrite : bool
        Replace an existing ``out_dir`` (atomically: the old one is removed only after the new one is in
        place).
    tokenizer : transformers tokenizer, optional
        Saved alongside, so the directory is self-sufficient.
    original_model : str, optional
        Name or path of the dense model, recorded in the config (default: the model's ``_name_or_path``).
    extra : mapping, optional
        More JSON-serializable entries for the config's ``"ghostsolve"`` section.

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    GhostsolveError
        If ``out_dir`` exists and ``overwrite`` is false, the model is of a family without an adapter, or
        its classes are not importable from ``transformers`` (needed by the remote code). Nothing is left
        behind on failure.

    Notes
    -----
    The weights are written by ``save_pretrained`` (safetensors), so the state-dict keys are the model's own
    (``model.layers.{i}.layer.*``, ``model.layers.{i}.ghost.delta`` for a ghosted layer).
    """
    from ghostsolve.adapters import get_adapter

    candidate = recovery_or_model.model if _is_recovery(recovery_or_model) else recovery_or_model
    if not isinstance(candidate, nn.Module) or not hasattr(candidate, "save_pretrained"):
        raise GhostsolveError(
            f"save() needs a Recovery or a transformers model, got {type(recovery_or_model).__name__}"
        )
    model: Any = candidate
    out = Path(out_dir)
    refuse_existing(out.absolute(), overwrite)
    adapter = get_adapter(model)
    ghosts = _ghost_entries(model, adapter)
    section = _section(recovery_or_model, model, original_model, extra)
    base_type = str(section.get("base_model_type") or model.config.model_type)
    if base_type.startswith(_MODEL_TYPE_PREFIX):
        base_type = base_type[len(_MODEL_TYPE_PREFIX) :]
    section["base_model_type"] = base_type
    section["base_architecture"] = type(model).__name__
    section["ghost_layout"] = [{"insert_at": g["insert_at"], "dim": g["dim"]} for g in ghosts]
    section["ghosts"] = ghosts
    section["checkpoint_kind"] = "ghosted" if ghosts else "plain"
    if ghosts:
        import transformers

        for name in (type(model).__name__, type(model.config).__name__):
            if not hasattr(transformers, name):
                raise GhostsolveError(
                    f"{name} is not importable from transformers {transformers.__version__}; the remote "
                    "code of a ghosted checkpoint needs the model and config classes from transformers itself"
                )

    with atomic_directory(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        config_path = tmp / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config[CONFIG_SECTION] = section
        config["model_type"] = base_type
        config.pop("auto_map", None)
        if ghosts:
            config["model_type"] = _MODEL_TYPE_PREFIX + base_type
            config["architectures"] = [_REMOTE_MODEL]
            config["auto_map"] = {
                "AutoConfig": f"{MODELING_FILE[:-3]}.{_REMOTE_CONFIG}",
                "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.{_REMOTE_MODEL}",
            }
            (tmp / MODELING_FILE).write_text(
                _remote_code(
                    type(model).__name__,
                    type(model.config).__name__,
                    base_type,
                    keep_fp32=any(g["delta_dtype"] == "float32" for g in ghosts),
                ),
                encoding="utf-8",
            )
        else:
            config["architectures"] = [type(model).__name__]
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    logger.info("saved a %s checkpoint to %s", section["checkpoint_kind"], out)
    return out


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    value = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise GhostsolveError(f"unknown dtype {name!r} in the checkpoint's ghostsolve section")
    return value


def checkpoint_info(path: str | Path) -> dict[str, Any] | None:
    """The ``"ghostsolve"`` section of a checkpoint's ``config.json`` (``None`` for other checkpoints).

    Raises
    ------
    GhostsolveError
        If ``path`` is a local directory without a readable ``config.json``.
    """
    raw = _read_config(path)
    section = raw.get(CONFIG_SECTION) if raw is not None else None
    return dict(section) if isinstance(section, Mapping) else None


def _read_config(path: str | Path) -> dict[str, Any] | None:
    local = Path(path)
    if local.is_dir():
        config_file = local / "config.json"
        if not config_file.is_file():
            raise GhostsolveError(
                f"{str(local)!r} has no config.json; it is not a Hugging Face model directory"
            )
    elif local.exists():
        raise GhostsolveError(f"{str(local)!r} is a file; give the model's directory (holding config.json)")
    else:
        # Possibly a hub id: resolved through transformers' own cache / download logic.
        from transformers.utils import cached_file

        try:
            resolved = cached_file(str(path), "config.json")
        except OSError as exc:
            raise GhostsolveError(
                f"cannot find a model at {str(path)!r}: it is not a local directory and the hub lookup "
                f"failed ({exc}); check the path"
            ) from exc
        if resolved is None:
            return None
        config_file = Path(resolved)
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise GhostsolveError(f"{str(config_file)!r} is not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else None


def _check_loading_info(info: Mapping[str, Any], path: str | Path, ghosted: bool) -> None:
    missing = sorted(info.get("missing_keys") or [])
    unexpected = sorted(info.get("unexpected_keys") or [])
    mismatched = [k if isinstance(k, str) else k[0] for k in (info.get("mismatched_keys") or [])]
    errors = [str(e) for e in (info.get("error_msgs") or [])]
    if not (missing or unexpected or mismatched or errors):
        return
    parts = []
    if missing:
        parts.append(f"missing weights {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        parts.append(f"unexpected weights {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    if mismatched:
        parts.append(f"mis-shaped weights {sorted(mismatched)[:8]}")
    if errors:
        parts.append(f"errors {errors[:3]}")
    hint = (
        "the ghost operators and the saved weights disagree; re-save the checkpoint with ghostsolve"
        if ghosted or any("ghost" in k for k in missing + unexpected + mismatched)
        else "the weights do not match the architecture in config.json"
    )
    raise GhostsolveError(f"checkpoint {str(path)!r} does not load exactly: {'; '.join(parts)}; {hint}")


def load(
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load a checkpoint written by :func:`save` (or any Hugging Face causal LM) strictly.

    A ghosted checkpoint is rebuilt with ghostsolve's own classes, without remote code: the base model
    class of the recorded family is built with the recorded pruned config, the
    :class:`~ghostsolve.pipeline.surgery.GhostedLayer`/``GhostedNorm`` wrappers are inserted
    (``apply_ghost_layout``), then the weights are loaded. The result is an instance of the base class
    (e.g. ``LlamaForCausalLM``) with its ``config.ghostsolve`` section, exactly what
    :func:`~ghostsolve.pipeline.recover.recover` returns.

    Parameters
    ----------
    path : path or hub id
    device : str or torch.device, optional
        Move the model there after loading.
    dtype : torch.dtype or str, optional
        Load in this dtype (``"auto"``: the saved one; the default). Ghost operators keep the storage
        dtype they were saved with when it is float32.
    **kwargs
        Passed to ``from_pretrained`` (e.g. ``attn_implementation``, ``revision``).

    Returns
    -------
    transformers PreTrainedModel, in eval mode.

    Notes
    -----
    In float32 the loaded model's logits are bit-identical to the in-memory model's (tested on CPU). In
    bf16/fp16 they can differ in the last bits from a model cast in memory with ``model.to(dtype)``:
    that cast also rounds non-persistent float buffers (the rotary ``inv_freq``) which ``from_pretrained``
    rebuilds in float32 — plain transformers models without ghost operators show the same difference.

    Raises
    ------
    GhostsolveError
        If the path holds no model, or the weights do not match the architecture exactly (a missing,
        unexpected or mis-shaped tensor: e.g. a ghost operator's weight missing) — never a silent load of
        the unrecovered model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = _read_config(path)
    section = raw.get(CONFIG_SECTION) if raw is not None else None
    layout = section.get("ghost_layout") if isinstance(section, Mapping) else None
    load_kwargs: dict[str, Any] = dict(kwargs)
    load_kwargs["dtype"] = dtype if dtype is not None else "auto"
    if not layout:
        if raw is not None and str(raw.get("model_type", "")).startswith(_MODEL_TYPE_PREFIX):
            raise GhostsolveError(
                f"checkpoint {str(path)!r} has model_type {raw['model_type']!r} but no ghost layout in its "
                "config.json; the ghostsolve section was removed or damaged — re-save the checkpoint"
            )
        try:
            loaded: Any = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **load_kwargs)
            model, info = loaded
        except (OSError, ValueError) as exc:
            raise GhostsolveError(f"cannot load a causal LM from {str(path)!r}: {exc}") from exc
        _check_loading_info(info, path, ghosted=False)
    else:
        assert isinstance(section, Mapping) and raw is not None
        model = _load_ghosted(path, raw, section, load_kwargs, AutoConfig, AutoModelForCausalLM)
    if device is not None:
        model.to(device)
    model.eval()
    return model


def _load_ghosted(
    path: str | Path,
    raw: dict[str, Any],
    section: Mapping[str, Any],
    load_kwargs: dict[str, Any],
    auto_config: Any,
    auto_model: Any,
) -> nn.Module:
    from ghostsolve.pipeline.surgery import apply_ghost_layout

    base_type = section.get("base_model_type")
    ghosts = section.get("ghosts") or section.get("ghost_layout")
    if not isinstance(base_type, str) or not isinstance(ghosts, list):
        raise GhostsolveError(
            f"checkpoint {str(path)!r} has a damaged ghostsolve section (base_model_type={base_type!r}); "
            "re-save the checkpoint"
        )
    config_dict = {k: v for k, v in raw.items() if k not in ("auto_map", "model_type", "architectures")}
    try:
        config = auto_config.for_model(base_type, **config_dict)
    except ValueError as exc:
        raise GhostsolveError(
            f"checkpoint {str(path)!r} is of model type {base_type!r}, unknown to this transformers: {exc}"
        ) from exc
    try:
        base_cls = auto_model._model_mapping[type(config)]
    except KeyError as exc:
        raise GhostsolveError(f"transformers has no causal LM class for model type {base_type!r}") from exc
    ghost_list: list[dict[str, Any]] = ghosts
    keep_fp32 = ["ghost"] if any(g.get("delta_dtype") == "float32" for g in ghost_list) else []

    class _Ghosted(base_cls):  # type: ignore[misc, valid-type]
        # Built only so that from_pretrained creates the wrappers before it loads the weights; the instance
        # is switched back to base_cls below, which adds no state of its own.
        _keep_in_fp32_modules: ClassVar[list[str]] = [
            *(getattr(base_cls, "_keep_in_fp32_modules", None) or []),
            *keep_fp32,
        ]

        def __init__(self, config: Any, *args: Any, **kw: Any) -> None:
            super().__init__(config, *args, **kw)
            for ghost in ghost_list:
                apply_ghost_layout(
                    self,
                    [{"insert_at": ghost["insert_at"], "dim": ghost["dim"]}],
                    dtype=_dtype(ghost.get("delta_dtype")) or torch.float32,
                    compute_dtype=_dtype(ghost.get("compute_dtype")),
                )

    _Ghosted.__name__ = base_cls.__name__
    _Ghosted.__qualname__ = base_cls.__qualname__
    try:
        model, info = _Ghosted.from_pretrained(path, config=config, output_loading_info=True, **load_kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        raise GhostsolveError(
            f"cannot load the ghosted checkpoint {str(path)!r}: {_first_line(exc)}"
        ) from exc
    _check_loading_info(info, path, ghosted=True)
    model.__class__ = base_cls
    return model


# ---------------------------------------------------------------------------------------------
# remote code
# ---------------------------------------------------------------------------------------------
_REMOTE_TEMPLATE = '''"""Remote code of a ghostsolve checkpoint (ghostsolve $version; generated, do not edit).

The model is a $model_cls whose decoder layers were partly removed; the linear ghost operators
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
from transformers import $config_cls, $model_cls

MODEL_TYPE = "$model_type"


class $remote_config($config_cls):
    """$config_cls of the pruned model; its ``ghostsolve`` entry records the ghost layout."""

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


class $remote_model($model_cls):
    """$model_cls with ghost operators rebuilt from ``config.ghostsolve["ghosts"]``."""

    config_class = $remote_config
    _keep_in_fp32_modules = $keep_fp32

    def __init__(self, config: $remote_config, *args: Any, **kwargs: Any) -> None:
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
'''


def _remote_code(model_cls: str, config_cls: str, base_type: str, keep_fp32: bool) -> str:
    from string import Template

    return Template(_REMOTE_TEMPLATE).substitute(
        version=_version(),
        model_cls=model_cls,
        config_cls=config_cls,
        model_type=_MODEL_TYPE_PREFIX + base_type,
        remote_config=_REMOTE_CONFIG,
        remote_model=_REMOTE_MODEL,
        # A float32 operator stays float32 when the rest of the model is loaded in bf16/fp16.
        keep_fp32=repr(["ghost"] if keep_fp32 else []),
    )
