"""Where a model's inputs must go and where its modules sit, also when accelerate dispatched it.

Layers already managed by accelerate (``dispatch_model``, ``device_map="auto"``, ``cpu_offload``) are never
moved by ghostsolve: their hooks place the weights themselves. Everything else is moved by whole modules
with :func:`onloaded`, which always puts them back.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ghostsolve.errors import GhostsolveError

if TYPE_CHECKING:
    from ghostsolve.adapters import ModelAdapter

__all__ = [
    "default_execution_device",
    "is_dispatched",
    "model_input_device",
    "move_to",
    "onloaded",
    "resolve_device",
    "tensor_devices",
]


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


def default_execution_device() -> torch.device:
    """``cuda`` (the current device) when CUDA is available, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_device(device: torch.device | str | None, *, what: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` (None: :func:`default_execution_device`), checked to exist.

    Raises
    ------
    GhostsolveError
        For a malformed name, or a CUDA device when none is visible (instead of a raw torch error later).
    """
    if device is None:
        return default_execution_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise GhostsolveError(
            f"{what}={device!r} is not a device name (e.g. 'cpu', 'cuda', 'cuda:1')"
        ) from exc
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (resolved.index is not None and resolved.index >= count):
            raise GhostsolveError(
                f"{what}={str(device)!r} was asked but {count} CUDA device(s) are visible; use 'cpu' or a "
                "visible GPU"
            )
    return resolved


def has_accelerate_hook(module: nn.Module) -> bool:
    """Whether accelerate manages where ``module``'s weights sit (it then moves them itself)."""
    return hasattr(module, "_hf_hook")


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate dispatched or offloaded ``model`` (a ``device_map`` or any module hook)."""
    return getattr(model, "hf_device_map", None) is not None or any(
        has_accelerate_hook(m) for m in model.modules()
    )


def tensor_devices(module: nn.Module, *, recurse: bool = True) -> set[torch.device]:
    """The devices of ``module``'s parameters and buffers."""
    return {t.device for t in (*module.parameters(recurse=recurse), *module.buffers(recurse=recurse))}


def _single_device(module: nn.Module, what: str) -> torch.device | None:
    devices = tensor_devices(module)
    if not devices:
        return None
    if len(devices) > 1:
        raise GhostsolveError(
            f"{what} has tensors on several devices ({sorted(map(str, devices))}); layer-by-layer capture "
            "moves whole modules, so place each on one device (or dispatch the model with accelerate)"
        )
    (device,) = devices
    if device.type == "meta":
        raise GhostsolveError(
            f"{what} has its weights on the meta device (not loaded); load the model's weights, or "
            "dispatch it with accelerate so its hooks load them"
        )
    return device


@contextmanager
def onloaded(modules: Sequence[nn.Module], device: torch.device, what: str) -> Iterator[None]:
    """Move modules to ``device`` for the block and back to where each was, also on error.

    Modules managed by accelerate (on themselves or, with ``cpu_offload``, on their leaves) are left to
    its hooks.

    Raises
    ------
    GhostsolveError
        If a module has tensors on several devices or on the meta device (not dispatched).
    """
    moved: list[tuple[nn.Module, torch.device]] = []
    try:
        for module in modules:
            if any(has_accelerate_hook(m) for m in module.modules()):
                continue
            home = _single_device(module, what)
            if home is None or home == device:
                continue
            module.to(device)
            moved.append((module, home))
        yield
    finally:
        for module, home in reversed(moved):
            module.to(home)


def move_to(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor inside (nested tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(move_to(v, device) for v in obj)
    if isinstance(obj, list):
        return [move_to(v, device) for v in obj]
    if isinstance(obj, dict):
        return {k: move_to(v, device) for k, v in obj.items()}
    return obj
