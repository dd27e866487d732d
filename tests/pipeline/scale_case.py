"""The small calibration case shared by the distributed test and its torchrun worker."""

from __future__ import annotations

from typing import Any

import torch

from tests.model_factories import random_batches, tiny_model

#: Removed intervals: one in the middle, one reaching the final norm.
INTERVALS: list[tuple[int, int]] = [(1, 2), (3, 4)]


def case_model() -> Any:
    """A seeded tiny Llama (4 layers, d = 32), identical in every process."""
    return tiny_model("llama", num_layers=4, seed=0)


def case_batches() -> list[dict[str, torch.Tensor]]:
    """Five padded batches: an odd count, so the two shards differ in size."""
    return random_batches(n_batches=5, batch_size=2, seq_len=12, seed=3, pad=True)


def build_recovered(model: Any, fits: dict[tuple[int, int], Any]) -> Any:
    """``model`` with the intervals removed and one ghost operator per interval inserted."""
    from ghostsolve.pipeline.model.operators import GhostOperator
    from ghostsolve.pipeline.model.surgery import insert_ghost, remove_layers

    num_layers = model.config.num_hidden_layers
    removed = [i for start, end in fits for i in range(start, end)]
    remove_layers(model, removed)
    for (start, end), fit in sorted(fits.items(), reverse=True):
        kept_before = start - sum(1 for i in removed if i < start)
        at: Any = "final_norm" if end == num_layers else kept_before
        insert_ghost(model, at, GhostOperator(fit.delta.to(torch.float32)))
    return model


def qr_case_rows(n_shards: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rows ``(X, Y)`` (``(40, 6)`` fp64 each) split into ``n_shards`` consecutive pieces."""
    gen = torch.Generator().manual_seed(11)
    X = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    Y = X @ torch.randn(6, 6, generator=gen, dtype=torch.float64)
    return list(zip(X.chunk(n_shards), Y.chunk(n_shards), strict=True))


def qr_case_stats(rank: int, world_size: int) -> Any:
    """``Stats(qr=True)`` of this rank's piece of :func:`qr_case_rows`."""
    import ghostsolve

    X, Y = qr_case_rows(world_size)[rank]
    return ghostsolve.Stats(6, qr=True).update(X, Y)
