"""Calibration batches and the one rule for which token positions enter a statistic.

Every engine, consumer and selection rule reads batches through :func:`as_batch` and chooses rows with
:meth:`CalibrationBatch.keep`; a change to the token rule lands here and nowhere else.

A batch is ``{"input_ids": (batch, seq) integer tensor, "attention_mask": (batch, seq), optional}`` or a
bare ``(batch, seq)`` id tensor. Other keys of a mapping are ignored: the model is called with the ids and
the mask only, as perplexity is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ghostsolve.errors import GhostsolveError

__all__ = ["Batch", "CalibrationBatch", "as_batch", "as_batches", "eval_mode"]

Batch = torch.Tensor | Mapping[str, torch.Tensor]
"""What callers pass: a ``(batch, seq)`` id tensor, or a mapping with ``"input_ids"`` and an optional
``"attention_mask"`` (1 = real token, 0 = padding) of the same shape."""


@dataclass(frozen=True)
class CalibrationBatch:
    """One parsed calibration batch.

    Attributes
    ----------
    input_ids : (batch, seq) integer tensor
    attention_mask : (batch, seq) tensor or None
        1 (or True) for real tokens, 0 for padding; None means every position is real.
    sequence_index : (batch,) integer tensor or None
        Each row's position in the whole calibration set (``"sequence_index"`` of a batch dict, which
        :func:`ghostsolve.pipeline.data.batches_from_windows` writes), so that cross-validation folds of whole
        sequences are the same whatever the batching and however torchrun shards the batches.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    sequence_index: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """``(batch, seq)``."""
        b, s = self.input_ids.shape
        return int(b), int(s)

    def model_inputs(self, device: torch.device | str | None) -> dict[str, torch.Tensor]:
        """The keyword arguments of the model call, on ``device`` (None: where they are)."""
        inputs = {"input_ids": self.input_ids.to(device) if device is not None else self.input_ids}
        if self.attention_mask is not None:
            mask = self.attention_mask
            inputs["attention_mask"] = mask.to(device) if device is not None else mask
        return inputs

    def real(self) -> torch.Tensor:
        """Boolean ``(batch, seq)``: the positions that are not padding."""
        if self.attention_mask is None:
            return torch.ones(self.shape, dtype=torch.bool, device=self.input_ids.device)
        return self.attention_mask.to(device=self.input_ids.device) != 0

    def keep(self, *, skip_first_token: bool = False, last_token: bool = False) -> torch.Tensor:
        """Boolean ``(batch, seq)``: the positions whose hidden states enter a statistic.

        Padding never counts. ``skip_first_token`` also drops each row's first *real* token (left padding
        moves it): typically BOS, an attention sink whose hidden state is orders of magnitude larger than
        the rest in real LLMs. ``last_token`` keeps only each row's last real token (Gromov et al.'s
        angular distance), wherever the padding sits.
        """
        real = self.real()
        if last_token:
            positions = torch.arange(real.shape[1], device=real.device).expand_as(real)
            last = torch.where(real, positions, -1).amax(dim=1)
            keep = torch.zeros_like(real)
            rows = torch.nonzero(last >= 0).flatten()
            keep[rows, last[rows]] = True
            return keep
        if skip_first_token:
            return real & (real.long().cumsum(dim=1) != 1)
        return real

    def n_predicted(self) -> int:
        """Tokens a next-token loss predicts: positions that are real and follow a real one."""
        real = self.real()
        return int((real[:, 1:] & real[:, :-1]).sum())


def as_batch(batch: Any) -> CalibrationBatch:
    """Parse one batch (see the module docstring).

    Raises
    ------
    GhostsolveError
        If it is neither a tensor nor a mapping with ``"input_ids"``, the ids are not a 2-D integer
        tensor, or the mask's shape differs from the ids'.
    """
    if isinstance(batch, CalibrationBatch):
        return batch
    index = None
    if isinstance(batch, torch.Tensor):
        ids, mask = batch, None
    elif isinstance(batch, Mapping) and "input_ids" in batch:
        ids, mask, index = batch["input_ids"], batch.get("attention_mask"), batch.get("sequence_index")
    else:
        raise GhostsolveError(
            f"a calibration batch is a {type(batch).__name__}; it must be a dict with 'input_ids' "
            "(batch, seq) and optionally 'attention_mask', or a plain (batch, seq) token-id tensor "
            "(ghostsolve.pipeline.data.batches_from_windows builds them)"
        )
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise GhostsolveError(
            f"input_ids of a calibration batch is {shape}; it must be a (batch, seq) integer tensor "
            "(add a batch dimension)"
        )
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise GhostsolveError(f"input_ids has dtype {ids.dtype}; it must hold integer token ids")
    if mask is not None:
        mask = torch.as_tensor(mask)
        if tuple(mask.shape) != tuple(ids.shape):
            raise GhostsolveError(
                f"attention_mask is {tuple(mask.shape)} but input_ids is {tuple(ids.shape)}; they must match "
                "(both (batch, seq))"
            )
    if index is not None and tuple(torch.as_tensor(index).shape) != (ids.shape[0],):
        raise GhostsolveError(
            f"sequence_index has shape {tuple(torch.as_tensor(index).shape)}; it must be ({ids.shape[0]},): "
            "one position per row of input_ids"
        )
    return CalibrationBatch(ids, mask, None if index is None else torch.as_tensor(index))


def as_batches(batches: Iterable[Any]) -> list[CalibrationBatch]:
    """Parse every batch into a list (an engine that passes over them more than once needs one).

    Raises
    ------
    GhostsolveError
        As :func:`as_batch`, or when there is no batch at all.
    """
    if isinstance(batches, (torch.Tensor, Mapping)):
        raise GhostsolveError(
            "batches must be an iterable of batches (e.g. a list of dicts), not a single batch; wrap it "
            "in a list"
        )
    out = [as_batch(b) for b in batches]
    if not out:
        raise GhostsolveError("no calibration batches: the batches iterable was empty")
    return out


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode for the block; restore each one's own flag on any exit."""
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        yield model
    finally:
        for module, mode in modes.items():
            module.training = mode
