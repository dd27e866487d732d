"""Cross-validation folds in the capture: whole sequences, the same in any batching, summing to the total."""

from __future__ import annotations

import torch

import ghostsolve
from ghostsolve.crossval import FoldedStats
from ghostsolve.pipeline.capture import IntervalStats, StatsSpec, capture_stats, run_capture
from ghostsolve.pipeline.data import batches_from_windows
from ghostsolve.pipeline.recover import recover
from tests.model_factories import tiny_model

WINDOWS = torch.randint(3, 97, (10, 12), generator=torch.Generator().manual_seed(4))


def _folded(model: torch.nn.Module, batch_size: int, interval: tuple[int, int] = (1, 3)) -> FoldedStats:
    consumer = IntervalStats([interval], num_layers=4, spec=StatsSpec(folds=5))
    run_capture(model, batches_from_windows(WINDOWS, batch_size), [consumer], progress=False)
    stats = consumer.stats[interval]
    assert isinstance(stats, FoldedStats)
    return stats


def test_folds_hold_whole_sequences_and_sum_to_the_plain_statistics() -> None:
    model = tiny_model("llama")
    folded = _folded(model, batch_size=3)
    plain = capture_stats(model, batches_from_windows(WINDOWS, 3), [(1, 3)], progress=False)[(1, 3)]
    # Ten windows of 12 tokens, window i in fold i mod 5: two whole windows (24 rows) per fold.
    assert [f.n_rows for f in folded.folds] == [24] * 5
    total = folded.total
    torch.testing.assert_close(total.xtx, plain.xtx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(total.xtd, plain.xtd, rtol=1e-12, atol=1e-12)


def test_folds_do_not_depend_on_the_batch_size() -> None:
    # Each window carries its position (sequence_index), so its fold is the same in any batching or shard.
    model = tiny_model("llama")
    one, other = _folded(model, batch_size=2), _folded(model, batch_size=7)
    for a, b in zip(one.folds, other.folds, strict=True):
        torch.testing.assert_close(a.xtx, b.xtx, rtol=1e-12, atol=1e-12)


def test_recover_with_a_cross_validated_ridge_fits_the_fold_statistics() -> None:
    model = tiny_model("llama")
    batches = batches_from_windows(WINDOWS, 4)
    rec = recover(model, [1, 2], batches, method="ghost", ridge="cv", progress=False)
    fitted = rec.fits[(1, 3)]
    assert fitted is not None
    # The same choice as the core's cross-validation on the same fold statistics.
    expected = ghostsolve.fit(_folded(model, batch_size=4), family="full", ridge="cv")
    assert fitted.ridge == expected.ridge
    torch.testing.assert_close(fitted.delta, expected.delta, rtol=1e-10, atol=1e-12)
    assert fitted.diagnostics.ridge_cv is not None


def test_sequential_order_cross_validates_each_interval_on_the_pruned_stream() -> None:
    model = tiny_model("llama", num_layers=5)
    batches = batches_from_windows(WINDOWS, 5)
    for capture in ({}, {"capture": "layerwise", "device": "cpu"}):
        rec = recover(model, [1, 3], batches, method="lowrank", rank="cv", order="sequential", progress=False,
                      **capture)  # fmt: skip
        for fitted in rec.fits.values():
            assert fitted is not None and fitted.diagnostics.rank_cv is not None
            assert 0 <= int(fitted.rank or 0) <= 32
