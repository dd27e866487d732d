"""Where a model's inputs must go, also when accelerate has dispatched or offloaded it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ghostsolve.adapters import ModelAdapter

__all__ = ["model_input_device"]


def _input_module(model: Any, adapter: ModelAdapter | None) -> Any:
    if adapter is not None:
        return adapter.embeddings(model)
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (AttributeError, NotImplementedError):
            emb = None
        if emb is not None:
            return emb
    return model


def _first_real_device(module: Any) -> torch.device | None:
    parameters = getattr(module, "parameters", None)
    if not callable(parameters):
        return None
    for param in parameters():
        if param.device.type != "meta":
            return param.device
    return None


def model_input_device(model: Any, adapter: ModelAdapter | None = None) -> torch.device:
    """The device to put ``input_ids`` (and the attention mask) on before calling ``model``.

    That is the device of the input embeddings — found with ``adapter.embeddings(model)``, else the
    model's ``get_input_embeddings()``. ``next(model.parameters()).device`` is wrong for a model that
    accelerate dispatched over several devices or offloaded: its first parameter may sit elsewhere or on
    ``meta``. So an accelerate hook's ``execution_device`` wins, then the first parameter not on
    ``meta`` (of the embeddings, then of the whole model); a model with neither runs on the CPU.

    Parameters
    ----------
    model : nn.Module or any object with ``parameters()``
    adapter : ModelAdapter, optional
        Locates the embeddings of models whose ``get_input_embeddings`` is missing or not the first
        module the input meets.

    Returns
    -------
    torch.device
    """
    emb = _input_module(model, adapter)
    # accelerate's offloading leaves parameters on "meta" and names the real device on its hook.
    for module in (emb, model):
        execution_device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        if execution_device is not None:
            return torch.device(execution_device)
    return _first_real_device(emb) or _first_real_device(model) or torch.device("cpu")
