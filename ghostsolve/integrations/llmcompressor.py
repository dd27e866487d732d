"""Layer removal and recovery as an llm-compressor modifier, so pruning composes with quantization in one
``oneshot``.

::

    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from ghostsolve.integrations.llmcompressor import GhostsolveModifier

    recipe = [
        GhostsolveModifier(drop=[20, 21, 22, 23], method="ghost"),
        QuantizationModifier(targets="Linear", scheme="W8A16", ignore=["lm_head"]),
    ]
    oneshot(model=model, dataset=calibration_set, recipe=recipe)
    # the run (removed layers, fits) in the ghostsolve section, beside llm-compressor's quantization config
    ghostsolve.save(recipe[0].recovery, "out")

In a YAML recipe the modifier is ``GhostsolveModifier`` (registered with llm-compressor's modifier factory
when this module's class is first used).

How it composes: llm-compressor initializes every modifier of a recipe, in order, before any calibration
pipeline runs. ``GhostsolveModifier`` does all its work in ``on_initialize``: it reads the calibration batches
(``state.data.calib``, the dataloader ``oneshot`` built from ``dataset``), captures the boundary statistics
with ghostsolve's own engine, removes the layers and inserts the ghost operators (or folds the method into the
weights) *in place*, on the model the session holds. Put it first: the modifiers after it then see the pruned,
recovered model — a quantization modifier resolves its targets on the remaining layers, and its calibration
(GPTQ's Hessians, activation observers) runs through the operators. The operators are not ``nn.Linear``, so
``targets="Linear"`` leaves them in their stored dtype (float32 by default), as ``ghostsolve.load`` does.

Saving: llm-compressor's ``save_pretrained`` would rewrite ``config.json`` from the dense original's config
(see :func:`detach_original_config`); the modifier prevents that, so both ``model.save_pretrained(out)`` and
``ghostsolve.save(modifier.recovery, out)`` (which also records the removed layers and the fits) write the
pruned config with its quantization config.

The modifier needs no pipeline of its own (``requires_calibration_data`` is False: it consumes the data
during initialization), so a recipe of ``GhostsolveModifier`` alone runs llm-compressor's data-free pipeline
after it.

Only the ``independent`` order is offered: it is the one ghostsolve runs in place (the sequential order
builds the model on a copy).

llm-compressor is imported lazily, when ``GhostsolveModifier`` is first accessed; :func:`prune_and_recover`,
the modifier's whole work, is plain ghostsolve and tested without llm-compressor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.model.ghosted import SECTION
from ghostsolve.pipeline.recover import METHODS, Recovery, recover

__all__ = ["GhostsolveModifier", "calibration_batches", "detach_original_config", "prune_and_recover"]

#: Resolved on first access (module ``__getattr__``), which imports llm-compressor.
GhostsolveModifier: type

_COMPUTE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def calibration_batches(dataloader: Iterable[Any], *, max_batches: int | None = None) -> list[dict[str, Any]]:
    """The ``{"input_ids", "attention_mask"}`` batches of an llm-compressor calibration dataloader.

    Other keys (``labels``, ``pixel_values``…) are dropped: the capture reads token ids and the mask only.

    Raises
    ------
    GhostsolveError
        If the dataloader is None or empty, or a batch has no ``input_ids``.
    """
    if dataloader is None:
        raise GhostsolveError(
            "GhostsolveModifier needs calibration data and the session has none: pass dataset= (and "
            "num_calibration_samples=) to oneshot"
        )
    batches: list[dict[str, Any]] = []
    for batch in dataloader:
        if max_batches is not None and len(batches) >= max_batches:
            break
        if not isinstance(batch, Mapping) or "input_ids" not in batch:
            keys = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise GhostsolveError(f"a calibration batch must be a mapping with 'input_ids'; got {keys}")
        batches.append({k: batch[k] for k in ("input_ids", "attention_mask") if batch.get(k) is not None})
    if not batches:
        raise GhostsolveError("the calibration dataloader yielded no batch; give oneshot a non-empty dataset")
    return batches


def prune_and_recover(
    model: nn.Module,
    batches: Iterable[Any],
    drop: Iterable[int],
    *,
    method: str = "ghost",
    ridge: float | str | None = None,
    solver: str = "auto",
    rank: int | str | None = None,
    skip_first_token: bool = False,
    compute_dtype: str | None = None,
) -> Recovery:
    """Remove ``drop`` from ``model`` and recover with ``method``, in place (the modifier's work).

    :func:`ghostsolve.pipeline.recover.recover` with ``inplace=True`` and the independent order; ``model``
    becomes the recovered model (a ``Ghostsolve<Base>ForCausalLM`` when it holds ghost operators).

    Parameters
    ----------
    model : transformers PreTrainedModel
    batches : iterable of dict
        Calibration batches (see :func:`calibration_batches`).
    drop : iterable of int
        0-based layers to remove.
    method, ridge, solver, rank, skip_first_token
        As for :func:`~ghostsolve.pipeline.recover.recover`.
    compute_dtype : {"float32", "float16", "bfloat16"}, optional
        Matmul dtype of the operators (None: the model's dtype).

    Raises
    ------
    GhostsolveError
        For an unknown method or compute dtype, and everything :func:`recover` refuses; the model is
        unchanged then.
    """
    if method not in METHODS:
        raise GhostsolveError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    if compute_dtype is not None and compute_dtype not in _COMPUTE_DTYPES:
        names = sorted(_COMPUTE_DTYPES)
        raise GhostsolveError(f"compute_dtype must be one of {names} or None, got {compute_dtype!r}")
    return recover(
        model, list(drop), list(batches), method=method, ridge=ridge, solver=solver, rank=rank,
        skip_first_token=skip_first_token, compute_dtype=_COMPUTE_DTYPES.get(compute_dtype or ""),
        inplace=True, progress=False,
    )  # fmt: skip


def detach_original_config(model: nn.Module) -> str | None:
    """Make a pruned model's saves write its own config, not its dense original's; returns the original name.

    llm-compressor's ``save_pretrained`` rewrites ``config.json`` from the *original* checkpoint's config
    (found through ``config._name_or_path``), patching only the fields it changes itself: a pruned model would
    be saved with the dense layer count, the base ``model_type`` and no ghost layout — silently wrong. With
    ``_name_or_path`` empty it keeps the config transformers serialized. The original name moves to the
    config's ``ghostsolve`` section (``original_model``), where :func:`ghostsolve.save` records it.
    """
    config: Any = getattr(model, "config", None)
    if config is None:
        return None
    original = str(getattr(config, "_name_or_path", "") or "") or None
    section = dict(getattr(config, SECTION, None) or {})
    section.setdefault("original_model", original)
    setattr(config, SECTION, section)
    config._name_or_path = ""
    return original


_CLASS: list[type] = []


def _modifier_class() -> type:
    """Build ``GhostsolveModifier`` on llm-compressor's ``Modifier`` (once) and register it by name."""
    if _CLASS:
        return _CLASS[0]
    from llmcompressor.modifiers import Modifier
    from llmcompressor.modifiers.factory import ModifierFactory
    from pydantic import PrivateAttr

    class GhostsolveModifier(Modifier):  # type: ignore[misc, valid-type]
        """Remove decoder layers and recover them with a closed-form map, in place, at initialization.

        Parameters
        ----------
        drop : list of int
            0-based layers to remove (contiguous or not).
        method : str
            A ghostsolve recovery method (``"ghost"`` by default; ``"prune-comp"``, ``"replaceme"`` and
            ``"identity"`` fold into plain weights).
        ridge, solver, rank, skip_first_token, compute_dtype
            As for :func:`ghostsolve.pipeline.recover.recover` (``compute_dtype`` by name).
        max_batches : int, optional
            Use at most this many calibration batches.

        Attributes
        ----------
        recovery : Recovery or None
            What the initialization did (removed layers, fits, residuals); ``ghostsolve.save(recovery, out)``
            records it in the checkpoint.
        """

        drop: list[int]
        method: str = "ghost"
        ridge: float | str | None = None
        solver: str = "auto"
        rank: int | str | None = None
        skip_first_token: bool = False
        compute_dtype: str | None = None
        max_batches: int | None = None

        _recovery: Any = PrivateAttr(default=None)

        @property
        def recovery(self) -> Recovery | None:
            return self._recovery  # type: ignore[no-any-return]

        def on_initialize(self, state: Any, **kwargs: Any) -> bool:
            batches = calibration_batches(state.data.calib, max_batches=self.max_batches)
            self._recovery = prune_and_recover(
                state.model, batches, self.drop, method=self.method, ridge=self.ridge, solver=self.solver,
                rank=self.rank, skip_first_token=self.skip_first_token, compute_dtype=self.compute_dtype,
            )  # fmt: skip
            detach_original_config(state.model)
            return True

    GhostsolveModifier.__module__ = __name__
    ModifierFactory.register("GhostsolveModifier", GhostsolveModifier)
    _CLASS.append(GhostsolveModifier)
    return GhostsolveModifier


def __getattr__(name: str) -> Any:
    # `from ghostsolve.integrations.llmcompressor import GhostsolveModifier` imports llm-compressor here.
    if name == "GhostsolveModifier":
        return _modifier_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
