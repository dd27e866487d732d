"""Checkpoints of pruned and recovered models: atomic save, strict load.

Two kinds of checkpoint come out of :func:`save`:

* **plain** – the model has no ghost operators (plain pruning, or a method folded into standard weights:
  ``identity``, Prune&Comp's scalar, ReplaceMe). An ordinary Hugging Face directory of the base architecture:
  ``AutoModelForCausalLM.from_pretrained(DIR)``, vLLM and llama.cpp converters take it as it is.
* **ghosted** – the model holds ghost operators. Its ``model_type`` is ``ghostsolve_<base type>``, its
  ``architectures`` ``["Ghostsolve<Base>ForCausalLM"]``, its weights the base model's names plus
  ``...ghost.delta``, and it ships its remote code (:mod:`ghostsolve.pipeline.model.ghosted`): see there.
  ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` and :func:`load` (without remote code)
  rebuild it; a plain load without remote code fails loudly instead of building the unrecovered model.

Both kinds record a ``"ghostsolve"`` section in ``config.json``: the original model, the removed layers, the
recovery method, the ghost layout and the fit diagnostics as JSON (:mod:`ghostsolve.pipeline.io.jsonio`).
Every load checks that the weights match the architecture exactly. Checkpoints of the first format (ghosts in
wrapper modules, weights under ``...layers.{i}.layer.*``) still load with :func:`load`.

Writes are atomic (:mod:`ghostsolve.pipeline.io.atomic`): an existing ``out_dir`` is refused unless
``overwrite=True``, and a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ghostsolve.adapters import ModelAdapter, get_adapter
from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.io.atomic import atomic_directory, recover_interrupted, refuse_existing
from ghostsolve.pipeline.io.jsonio import interval_label, to_json
from ghostsolve.pipeline.model.ghosted import (
    FORMAT_VERSION,
    MODEL_TYPE_PREFIX,
    MODELING_FILE,
    SECTION,
    ghosted_config_class,
    ghosted_model_class,
    make_ghosted,
)
from ghostsolve.pipeline.model.surgery import ghost_layout

__all__ = [
    "CONFIG_SECTION",
    "FORMAT_VERSION",
    "MODELING_FILE",
    "checkpoint_info",
    "load",
    "load_tokenizer",
    "save",
]

logger = logging.getLogger(__name__)

CONFIG_SECTION = SECTION


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ghostsolve")
    except PackageNotFoundError:
        return "unknown"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# the config section
# ---------------------------------------------------------------------------------------------
def _describe_fit(fit: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in ("family", "solver", "dtype", "ridge", "rank", "objective", "relative_residual", "n_rows"):
        if hasattr(fit, name):
            out[name] = to_json(getattr(fit, name))
    diagnostics = getattr(fit, "diagnostics", None)
    as_dict = getattr(diagnostics, "as_dict", None)
    if callable(as_dict):
        out["diagnostics"] = to_json(as_dict())
    return out


def _is_recovery(obj: Any) -> bool:
    return hasattr(obj, "model") and hasattr(obj, "method") and not isinstance(obj, nn.Module)


def _recovery_section(recovery: Any, model: Any) -> dict[str, Any]:
    removed = [int(i) for i in recovery.removed]
    fits = recovery.fits or {}
    return {
        "removed": removed,
        "intervals": [interval_label(iv) for iv in recovery.intervals],
        "method": recovery.method,
        "order": recovery.order,
        "fit_seconds": to_json(recovery.fit_seconds),
        "relative_residuals": to_json(recovery.relative_residuals),
        "fits": [
            {"interval": interval_label(iv), **({} if f is None else _describe_fit(f))} for iv,
            f in fits.items()
        ],
        "original_num_layers": int(model.config.num_hidden_layers) + len(removed),
    }


def _section(obj: Any, model: Any, original_model: str | None, extra: Mapping[str, Any] | None,
             adapter: ModelAdapter) -> dict[str, Any]:  # fmt: skip
    previous = getattr(model.config, SECTION, None)
    section: dict[str, Any] = dict(previous) if isinstance(previous, Mapping) else {}
    section.update({"format_version": FORMAT_VERSION, "ghostsolve_version": _version()})
    if _is_recovery(obj):
        section.update(_recovery_section(obj, model))
    if original_model is not None:
        section["original_model"] = str(original_model)
    section.setdefault("original_model", getattr(model.config, "_name_or_path", None) or None)
    base_type = str(section.get("base_model_type") or model.config.model_type).removeprefix(MODEL_TYPE_PREFIX)
    section["base_model_type"] = base_type
    section["base_architecture"] = _base_class(type(model)).__name__
    section["layout"] = {"layers_path": adapter.layers_path, "final_norm_path": adapter.final_norm_path}
    section["checkpoint_kind"] = "ghosted" if ghost_layout(model, adapter=adapter) else "plain"
    if extra:
        section.update(to_json(dict(extra)))
    return section


def _base_class(cls: type) -> type:
    """The transformers class a (possibly ghosted) model class derives from."""
    import transformers

    for klass in cls.__mro__:
        public = getattr(transformers, klass.__name__, None) is klass
        if klass.__module__.startswith("transformers.") and public:
            return klass
    return cls


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
        diagnostics are recorded) or a bare model (e.g. one returned by :func:`load`, whose recorded section
        is kept).
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
        More entries for the config's ``"ghostsolve"`` section (JSON under the one policy).

    Returns
    -------
    Path
        ``out_dir``.

    Raises
    ------
    GhostsolveError
        If ``out_dir`` exists and ``overwrite`` is false, or is, contains or lies inside the directory the
        model was loaded from (its ``_name_or_path``), or the model is of a family without an adapter.
        Nothing is left behind on failure.
    """
    candidate = recovery_or_model.model if _is_recovery(recovery_or_model) else recovery_or_model
    if not isinstance(candidate, nn.Module) or not hasattr(candidate, "save_pretrained"):
        raise GhostsolveError(
            f"save() needs a Recovery or a transformers model, got {type(recovery_or_model).__name__}"
        )
    model: Any = candidate
    out = Path(out_dir)
    refuse_existing(out.absolute(), overwrite, inputs=(getattr(model.config, "_name_or_path", None),))
    adapter = get_adapter(model)
    section = _section(recovery_or_model, model, original_model, extra, adapter)
    if section["checkpoint_kind"] == "ghosted":
        make_ghosted(model, layers_path=adapter.layers_path, final_norm_path=adapter.final_norm_path)
    previous = getattr(model.config, SECTION, None)
    setattr(model.config, SECTION, section)
    try:
        with atomic_directory(out, overwrite=overwrite, what="the checkpoint") as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    finally:
        # The section describes this checkpoint; the in-memory model keeps what it had (plus the layout).
        if section["checkpoint_kind"] == "plain":
            if previous is None:
                delattr(model.config, SECTION)
            else:
                setattr(model.config, SECTION, previous)
    logger.info("saved a %s checkpoint to %s", section["checkpoint_kind"], out)
    return out


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
def checkpoint_info(path: str | Path) -> dict[str, Any] | None:
    """The ``"ghostsolve"`` section of a checkpoint's ``config.json`` (``None`` for other checkpoints).

    Raises
    ------
    GhostsolveError
        If ``path`` is a local directory without a readable ``config.json``.
    """
    raw = _read_config(path)
    section = raw.get(SECTION) if raw is not None else None
    return dict(section) if isinstance(section, Mapping) else None


def _read_config(path: str | Path) -> dict[str, Any] | None:
    local = Path(path)
    if not local.exists():
        recover_interrupted(local)  # a checkpoint whose --overwrite swap was killed midway
    if local.is_dir():
        config_file = local / "config.json"
        if not config_file.is_file():
            raise GhostsolveError(
                f"{str(local)!r} has no config.json; it is not a Hugging Face model "
                "directory"
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
                "failed "
                f"({exc}); check the path"
            ) from exc
        if resolved is None:
            return None
        config_file = Path(resolved)
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise GhostsolveError(f"{str(config_file)!r} is not valid JSON ({exc})") from exc
    return data if isinstance(data, dict) else None


def _is_load_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the files could not be read (rather than a bug): I/O, format, or safetensors."""
    return isinstance(exc, (OSError, RuntimeError, ValueError)) or type(exc).__name__ == "SafetensorError"


def _load_reason(exc: BaseException) -> str:
    reason = _first_line(exc)
    if type(exc).__name__ == "SafetensorError":
        # safetensors validates the header and the byte ranges before reading: a truncated or overwritten
        # file ends here.
        reason = (f"its weights file is truncated or corrupt ({reason}); copy or download the checkpoint "
                  "again, or re-save it")  # fmt: skip
    return reason


def _check_loading_info(info: Mapping[str, Any], path: str | Path) -> None:
    from ghostsolve.pipeline.model.operators import check_exact_load

    try:
        check_exact_load(info, str(path))
    except GhostsolveError:
        raise
    except ValueError as exc:  # pragma: no cover - inside ghostsolve it raises GhostsolveError
        raise GhostsolveError(str(exc)) from exc


def load(
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Load a checkpoint written by :func:`save` (or any Hugging Face causal LM) strictly.

    A ghosted checkpoint is rebuilt with ghostsolve's own classes, without remote code: exactly the model that
    :func:`~ghostsolve.pipeline.recover.recover` returns, a ``Ghostsolve<Base>ForCausalLM`` (a subclass of the
    base class) whose ``save_pretrained`` writes a checkpoint that loads back exactly.

    Parameters
    ----------
    path : path or hub id
    device : str or torch.device, optional
        Move the model there after loading.
    dtype : torch.dtype or str, optional
        Load in this dtype (``"auto"``: the saved one; the default). Ghost operators stay float32.
    **kwargs
        Passed to ``from_pretrained`` (e.g. ``attn_implementation``, ``revision``).

    Returns
    -------
    transformers PreTrainedModel, in eval mode.

    Notes
    -----
    In float32 the loaded model's logits are bit-identical to the in-memory model's (tested on CPU). In
    bf16/fp16 they can differ in the last bits from a model cast in memory with ``model.to(dtype)``: that cast
    also rounds non-persistent float buffers (the rotary ``inv_freq``) which ``from_pretrained`` rebuilds in
    float32.

    Raises
    ------
    GhostsolveError
        If the path holds no model, or the weights do not match the architecture exactly (a missing,
        unexpected or mis-shaped tensor: e.g. a ghost operator's weight missing) — never a silent load of the
        unrecovered model; a ghost operator holding NaN/Inf; a weights file that is truncated or corrupt; a
        ``device`` that is not available.
    """
    if device is not None:
        from ghostsolve.pipeline.model.devices import resolve_device

        device = resolve_device(device)  # an unavailable device fails before the model is read
    raw = _read_config(path)
    section = raw.get(SECTION) if raw is not None else None
    load_kwargs: dict[str, Any] = {**kwargs, "dtype": dtype if dtype is not None else "auto"}
    ghosted_type = raw is not None and str(raw.get("model_type", "")).startswith(MODEL_TYPE_PREFIX)
    if ghosted_type and not isinstance(section, Mapping):
        raise GhostsolveError(
            f"checkpoint {str(path)!r} has model_type {raw['model_type']!r} but no ghostsolve section in its "  # type: ignore[index]
            "config.json; the section was removed or damaged — re-save the checkpoint"
        )
    if ghosted_type:
        assert raw is not None and isinstance(section, Mapping)
        model = _load_ghosted(path, raw, section, load_kwargs)
    else:
        model = _load_plain(path, load_kwargs)
    if device is not None:
        model.to(device)
    model.eval()
    return model


def _load_plain(path: str | Path, load_kwargs: dict[str, Any]) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **load_kwargs)
        model, info = loaded
    except Exception as exc:
        if not _is_load_failure(exc):
            raise
        raise GhostsolveError(f"cannot load a causal LM from {str(path)!r}: {_load_reason(exc)}") from exc
    _check_loading_info(info, path)
    return model  # type: ignore[no-any-return]


# Checkpoints of format 1 kept each ghosted layer inside a wrapper: ``<layers>.{i}.layer.*`` and
# ``<norm>.norm.*``; the wrapped module's own weights move back to the base model's names.
def _v1_key_mapping(adapter: ModelAdapter) -> dict[str, str]:
    layers, norm = re.escape(adapter.layers_path), re.escape(adapter.final_norm_path)
    return {
        rf"^{layers}\.(\d+)\.layer\.": rf"{adapter.layers_path}.\1.",
        rf"^{norm}\.norm\.": f"{adapter.final_norm_path}.",
    }


def _ghosted_config(path: str | Path, raw: dict[str, Any], section: Mapping[str, Any]) -> tuple[Any, Any]:
    """The ghosted config (with a checked layout) and model class of a ghosted checkpoint."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    base_type = section.get("base_model_type")
    if not isinstance(base_type, str):
        raise GhostsolveError(
            f"checkpoint {str(path)!r} has a damaged ghostsolve section (no "
            "base_model_type)"
        )
    fields = {k: v for k, v in raw.items() if k not in ("auto_map", "model_type", "architectures", SECTION)}
    try:
        base_config = AutoConfig.for_model(base_type, **fields)
        base_cls: Any = MODEL_FOR_CAUSAL_LM_MAPPING[type(base_config)]
    except (KeyError, ValueError) as exc:
        raise GhostsolveError(
            f"checkpoint {str(path)!r} is of model type {base_type!r}, which this transformers has no "
            f"causal LM for: {_first_line(exc)}"
        ) from exc
    adapter = get_adapter(base_config)
    layout = {"layers_path": adapter.layers_path, "final_norm_path": adapter.final_norm_path}
    stated = section.get("layout", layout)
    if dict(stated) != layout:
        raise GhostsolveError(
            f"checkpoint {str(path)!r} places its ghost operators under {dict(stated)}, but the "
            f"{adapter.family} layout is {layout}; refusing a layout that does not match the architecture"
        )
    ghosts = section.get("ghosts") or []
    _check_ghost_facts(path, ghosts, adapter)
    config = ghosted_config_class(type(base_config))(**fields)
    setattr(config, SECTION, {**section, "layout": layout, "ghosts": ghosts})
    return config, ghosted_model_class(base_cls)


def _check_ghost_facts(path: str | Path, ghosts: Any, adapter: ModelAdapter) -> None:
    """The ghost entries of ``config.json`` must state the adapter's own facts about a layer's arguments."""
    if not isinstance(ghosts, list):
        raise GhostsolveError(
            f"checkpoint {str(path)!r} has a damaged ghostsolve section (ghosts is not a list)"
        )
    facts = {"hidden_states_kwarg": adapter.hidden_states_kwarg,
             "hidden_states_arg_position": adapter.hidden_states_arg_position}  # fmt: skip
    for entry in ghosts:
        if not isinstance(entry, Mapping) or entry.get("kind") != "layer":
            continue
        stated = {key: entry.get(key, value) for key, value in facts.items()}
        if stated != facts:
            raise GhostsolveError(
                f"checkpoint {str(path)!r} says its ghosted layers take their hidden states as {stated}, but "
                f"the {adapter.family} layers take them as {facts}; refusing a config.json that does not "
                "match the architecture"
            )


def _load_ghosted(
    path: str | Path, raw: dict[str, Any], section: Mapping[str, Any], load_kwargs: dict[str, Any]
) -> nn.Module:
    config, model_cls = _ghosted_config(path, raw, section)
    if int(section.get("format_version", 1)) < 2:
        load_kwargs = {**load_kwargs, "key_mapping": _v1_key_mapping(get_adapter(config))}
    try:
        model = model_cls.from_pretrained(path, config=config, **load_kwargs)  # type: ignore[attr-defined]
        if int(section.get("format_version", 1)) < 2:
            # transformers would undo the renaming when this model is saved again: it is to stay, so that a
            # re-save writes the current format.
            model._weight_conversions = None
    except Exception as exc:
        if isinstance(exc, GhostsolveError) or not _is_load_failure(exc):
            raise
        raise GhostsolveError(
            f"cannot load the ghosted checkpoint {str(path)!r}: {_load_reason(exc)}"
        ) from exc
    return model  # type: ignore[no-any-return]


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved with a model or checkpoint (no remote code: a ghosted checkpoint's remote code is
    for the model only).

    Raises
    ------
    GhostsolveError
        If the directory holds no tokenizer.
    """
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as exc:
        raise GhostsolveError(
            f"cannot load a tokenizer from {str(path)!r} ({_first_line(exc)}); the model directory needs its "
            "tokenizer files (tokenizer.json or tokenizer.model with tokenizer_config.json)"
        ) from exc
