"""The diagnose workflow: per removed boundary, the conditioning of the calibration activations and the
fp32-versus-fp64 solver table — what ``ghostsolve diagnose`` prints."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ghostsolve.adapters import get_adapter
from ghostsolve.diagnostics import compare_precisions, diagnose
from ghostsolve.pipeline.capture import capture_rows, capture_stats
from ghostsolve.pipeline.data import batches_from_windows
from ghostsolve.pipeline.distributed import DistributedContext, all_reduce_stats, run_on_main, shard_batches
from ghostsolve.pipeline.model.surgery import intervals_of, removal_set
from ghostsolve.workflows.prune import check_request, select_on_main
from ghostsolve.workflows.results import DiagnoseResult, IntervalDiagnosis

__all__ = ["diagnose_model"]


def diagnose_model(
    model: nn.Module,
    *,
    calibration: torch.Tensor,
    drop: Sequence[int] | None = None,
    select: str | None = None,
    num_drop: int | None = None,
    select_options: Mapping[str, Any] | None = None,
    batch_size: int = 8,
    max_rows: int = 4096,
    skip_first_token: bool = False,
    progress: bool = True,
    model_name: str | None = None,
    distributed: DistributedContext | None = None,
) -> DiagnoseResult | None:
    """Diagnose every removed interval: :func:`ghostsolve.diagnose` on the statistics of all calibration
    tokens, and :func:`ghostsolve.compare_precisions` on the first ``max_rows`` raw rows (it refits from
    rows).

    Parameters are those of :func:`ghostsolve.workflows.prune` (``drop`` or ``select`` with ``num_drop``).

    Returns
    -------
    DiagnoseResult
        On rank 0 (None on the other ranks under torchrun).

    Raises
    ------
    GhostsolveError
        An invalid removal set or strategy (before any work); as capture and the diagnostics.
    """
    check_request(model, methods=["identity"], drop=drop, select=select, num_drop=num_drop,
                  order="independent", out=None, overwrite=False)  # fmt: skip
    batches = batches_from_windows(calibration, batch_size)
    selection = None
    if select is not None:
        assert num_drop is not None
        selection = select_on_main(model, batches, select, num_drop, select_options or {}, distributed)
        drop = list(selection.selected)
    assert drop is not None
    removed = removal_set(drop, len(get_adapter(model).layers(model)))
    intervals = intervals_of(removed)
    mine = batches
    if distributed is not None and distributed.world_size > 1:
        mine = shard_batches(batches, distributed.rank, distributed.world_size)
    stats = capture_stats(model, mine, intervals, skip_first_token=skip_first_token, progress=progress)
    if mine is not batches:
        all_reduce_stats(stats)

    def on_main() -> DiagnoseResult:
        diagnoses = []
        for interval in intervals:
            X, Y = capture_rows(model, batches, interval, max_rows=max_rows,
                                skip_first_token=skip_first_token)  # fmt: skip
            diagnoses.append(IntervalDiagnosis(interval, diagnose(stats[interval]), compare_precisions(X, Y),
                                               int(X.shape[0])))  # fmt: skip
        name = model_name or str(getattr(getattr(model, "config", None), "_name_or_path", "") or "model")
        return DiagnoseResult(name, list(removed), diagnoses, selection)

    return run_on_main(on_main)
