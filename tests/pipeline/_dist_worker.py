"""Worker of tests/pipeline/test_distributed.py, started by torchrun with 2 gloo ranks on 127.0.0.1.

Each rank captures its shard of the calibration batches (whole-model and layer-by-layer), all-reduces the
statistics, fits every interval, and writes its results to ``OUT/rank{r}.pt`` for the test to compare.
Rank 0 alone saves the recovered checkpoint (through ``run_on_main``); every call of the save function is
logged to ``OUT/save_calls.log`` so the test can check it ran once. It also records the errors raised when
the ranks disagree on the intervals and when the rank-0 job fails.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import ghostsolve  # noqa: E402
from ghostsolve.errors import GhostsolveError  # noqa: E402
from ghostsolve.pipeline.capture import (  # noqa: E402
    capture_stats,
    capture_stats_layerwise,
)
from ghostsolve.pipeline.distributed import (  # noqa: E402
    all_reduce_stats,
    barrier,
    distributed,
    is_main_process,
    run_on_main,
    shard_batches,
)
from tests.pipeline.scale_case import (  # noqa: E402
    INTERVALS,
    build_recovered,
    case_batches,
    case_model,
    qr_case_stats,
)


def _gram(r: torch.Tensor) -> torch.Tensor:
    return r.T @ r


def _save_checkpoint(out: Path, fits: dict[Any, Any]) -> Path:
    # O_APPEND keeps each rank's line whole even if two ranks were (wrongly) to write at once.
    with open(out / "save_calls.log", "a") as log:
        log.write(f"{os.environ['RANK']}\n")
    model = build_recovered(case_model(), fits)
    target = out / "checkpoint"
    try:
        from ghostsolve.pipeline.io.checkpoint import save
    except ImportError:  # the checkpoint module is optional for this test: write the weights once
        target.mkdir()
        torch.save(model.state_dict(), target / "model.pt")
        return target
    return save(model, target)


def _fail() -> None:
    raise OSError("disk full (simulated)")


def main() -> None:
    out = Path(sys.argv[1])
    with distributed(timeout=datetime.timedelta(seconds=60)) as ctx:
        assert ctx.world_size == 2 and ctx.backend == "gloo", ctx
        result: dict[str, Any] = {"rank": ctx.rank, "is_main": is_main_process()}
        model = case_model()
        mine = shard_batches(case_batches(), ctx.rank, ctx.world_size)
        result["n_batches"] = len(mine)

        stats = capture_stats(model, mine, INTERVALS, progress=False)
        result["local_rows"] = {iv: s.n_rows for iv, s in stats.items()}
        all_reduce_stats(stats)
        fits = {iv: ghostsolve.fit(s, family="full") for iv, s in stats.items()}
        result["stats"] = {iv: s.state_dict() for iv, s in stats.items()}
        result["weights"] = {iv: f.weight for iv, f in fits.items()}

        layerwise = capture_stats_layerwise(model, mine, INTERVALS, device="cpu", progress=False)
        all_reduce_stats(layerwise)
        result["layerwise_weights"] = {
            iv: ghostsolve.fit(s, family="full").weight for iv, s in layerwise.items()
        }

        # TSQR factors are not sums: all_reduce_stats gathers and re-factors them.
        qr_stats = {(0, 1): qr_case_stats(ctx.rank, ctx.world_size)}
        all_reduce_stats(qr_stats)
        result["qr_gram"] = _gram(qr_stats[(0, 1)].r_factor)

        saved = run_on_main(_save_checkpoint, out, fits)
        result["saved"] = None if saved is None else str(saved)
        barrier()

        # Ranks that disagree on the removal set must all raise, not hang or sum unrelated matrices.
        disagreeing = INTERVALS[:1] if ctx.rank == 0 else INTERVALS
        try:
            all_reduce_stats(capture_stats(model, mine, disagreeing, progress=False))
        except GhostsolveError as err:
            result["mismatch_error"] = str(err)

        try:
            run_on_main(_fail)
        except (GhostsolveError, OSError) as err:
            result["failed_main"] = f"{type(err).__name__}: {err}"

        torch.save(result, out / f"rank{ctx.rank}.pt")


if __name__ == "__main__":
    main()
