"""Architecture adapters, one per model family, looked up by ``config.model_type``.

The registry is explicit: a model type maps to the adapter class that states its facts. To support
a new family, subclass :class:`ModelAdapter`, override the facts that differ from the Llama layout,
and register it::

    from ghostsolve.adapters import ModelAdapter, register_adapter

    class MyAdapter(ModelAdapter):
        model_types = ("my_model",)
        family = "MyModel"
        layers_path = "transformer.blocks"

    register_adapter(MyAdapter)
"""

from __future__ import annotations

from typing import Any

from ghostsolve.adapters.base import ModelAdapter, NormPlacement, resolve_path
from ghostsolve.adapters.llama import LlamaAdapter, MistralAdapter
from ghostsolve.adapters.olmo import Olmo2Adapter, Olmo3Adapter
from ghostsolve.adapters.qwen import Qwen2Adapter, Qwen3Adapter
from ghostsolve.errors import GhostsolveError

__all__ = [
    "ADAPTERS",
    "GHOSTED_MODEL_TYPE_PREFIX",
    "LlamaAdapter",
    "MistralAdapter",
    "ModelAdapter",
    "NormPlacement",
    "Olmo2Adapter",
    "Olmo3Adapter",
    "Qwen2Adapter",
    "Qwen3Adapter",
    "get_adapter",
    "known_model_types",
    "register_adapter",
    "resolve_path",
]

#: ``config.model_type`` → adapter class. Extend it with :func:`register_adapter`.
ADAPTERS: dict[str, type[ModelAdapter]] = {
    "llama": LlamaAdapter,
    "mistral": MistralAdapter,
    "qwen2": Qwen2Adapter,
    "qwen3": Qwen3Adapter,
    "olmo2": Olmo2Adapter,
    "olmo3": Olmo3Adapter,
}


def known_model_types() -> tuple[str, ...]:
    """The ``config.model_type`` values that have an adapter, sorted."""
    return tuple(sorted(ADAPTERS))


def register_adapter(adapter: type[ModelAdapter], *, replace: bool = False) -> None:
    """Register an adapter class for each of its ``model_types``.

    Raises
    ------
    GhostsolveError
        If the class is not a :class:`ModelAdapter` subclass, lists no model types, or a type is
        already registered and ``replace`` is False.
    """
    if not (isinstance(adapter, type) and issubclass(adapter, ModelAdapter)):
        raise GhostsolveError(f"register_adapter expects a ModelAdapter subclass, got {adapter!r}")
    if not adapter.model_types:
        raise GhostsolveError(
            f"{adapter.__name__}.model_types is empty; set it to the config.model_type values it describes"
        )
    taken = [t for t in adapter.model_types if t in ADAPTERS and ADAPTERS[t] is not adapter]
    if taken and not replace:
        raise GhostsolveError(
            f"model types {taken} already have adapters "
            f"({', '.join(ADAPTERS[t].__name__ for t in taken)}); pass replace=True to override them"
        )
    for model_type in adapter.model_types:
        ADAPTERS[model_type] = adapter


#: A model whose removed layers were replaced by ghost operators has the model type ``ghostsolve_<base>`` and
#: the architecture of ``<base>`` (see :mod:`ghostsolve.pipeline.model.ghosted`, which cannot import this).
GHOSTED_MODEL_TYPE_PREFIX = "ghostsolve_"


def _model_type_of(model_or_config: Any) -> str | None:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if not (isinstance(model_type, str) and model_type):
        return None
    return model_type.removeprefix(GHOSTED_MODEL_TYPE_PREFIX)


def get_adapter(model_or_config: Any) -> ModelAdapter:
    """The adapter for a model, a config, or anything with a ``.config``, by ``config.model_type``.

    Parameters
    ----------
    model_or_config : transformers PreTrainedModel or PretrainedConfig
        The model (or its config) to describe.

    Returns
    -------
    ModelAdapter
        An instance of the registered adapter class.

    Raises
    ------
    GhostsolveError
        If the object has no ``config.model_type``, or no adapter is registered for it; the message
        lists the known types and how to add an adapter.

    Examples
    --------
    >>> from transformers import LlamaConfig
    >>> get_adapter(LlamaConfig()).family
    'Llama'
    """
    model_type = _model_type_of(model_or_config)
    if model_type is None:
        raise GhostsolveError(
            f"cannot tell the architecture of {type(model_or_config).__name__}: it has no config.model_type; "
            "pass a transformers model or its config"
        )
    try:
        adapter_class = ADAPTERS[model_type]
    except KeyError:
        raise GhostsolveError(
            f"no adapter for model_type {model_type!r}; known model types: {', '.join(known_model_types())}. "
            "To add one, subclass ghostsolve.adapters.ModelAdapter (override the attribute paths and "
            "norm_placement that differ from Llama) and call "
            "ghostsolve.adapters.register_adapter(YourAdapter)"
        ) from None
    return adapter_class(model_type)
