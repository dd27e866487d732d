"""Data-parallel calibration: sharding, the Stats all-reduce, and a real 2-process gloo run via torchrun."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import ghostsolve
from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline import distributed as gd
from ghostsolve.pipeline.distributed import (
    all_reduce_stats,
    barrier,
    distributed,
    init_distributed,
    is_main_process,
    run_on_main,
    shard_batches,
)

REPO = Path(__file__).resolve().parents[2]
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def no_torchrun_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# ------------------------------------------------------------------------------------------- sharding
@pytest.mark.parametrize(
    ("n_batches", "world_size"), [(n, w) for n in (2, 3, 7, 8) for w in (1, 2, 3) if n >= w]
)
def test_shards_partition_the_batches(n_batches: int, world_size: int) -> None:
    batches = list(range(n_batches))
    shards = [shard_batches(iter(batches), rank, world_size) for rank in range(world_size)]
    assert sorted(x for shard in shards for x in shard) == batches
    sizes = [len(shard) for shard in shards]
    assert max(sizes) - min(sizes) <= 1
    assert min(sizes) >= 1


@pytest.mark.parametrize(
    ("n", "rank", "world", "match"),
    [
        (3, 0, 4, r"3 calibration batch\(es\) cannot be sharded over 4 ranks"),
        (4, 2, 2, r"rank=2, world_size=2; rank must lie in \[0, world_size\)"),
        (4, -1, 2, r"rank=-1"),
        (4, 0, 0, r"world_size >= 1"),
    ],
)
def test_shard_errors(n: int, rank: int, world: int, match: str) -> None:
    with pytest.raises(GhostsolveError, match=match):
        shard_batches(range(n), rank, world)


# ------------------------------------------------------------------------------ single process, no torchrun
def _stats(seed: int, dim: int = 8) -> ghostsolve.Stats:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(50, dim, generator=gen, dtype=torch.float64)
    return ghostsolve.Stats(dim).update(X, X + 0.1 * torch.randn(50, dim, generator=gen, dtype=torch.float64))


def test_single_process_is_a_no_op(no_torchrun_env: pytest.MonkeyPatch) -> None:
    assert not dist.is_initialized()
    ctx = init_distributed()
    assert (ctx.rank, ctx.world_size, ctx.backend) == (0, 1, None)
    assert ctx.is_main and not ctx.is_distributed
    stats = {(1, 3): _stats(0)}
    before = {k: t.clone() for k, t in stats[(1, 3)].tensors().items()}
    assert all_reduce_stats(stats) is stats
    assert all(torch.equal(before[k], t) for k, t in stats[(1, 3)].tensors().items())
    assert is_main_process()
    barrier()
    assert run_on_main(lambda a, b: a + b, 2, b=3) == 5
    with distributed() as again:
        assert again.world_size == 1
    assert not dist.is_initialized()


def test_one_rank_gloo_group_through_the_context_manager(no_torchrun_env: pytest.MonkeyPatch) -> None:
    no_torchrun_env.setenv("RANK", "0")
    no_torchrun_env.setenv("WORLD_SIZE", "1")
    no_torchrun_env.setenv("MASTER_ADDR", "127.0.0.1")
    no_torchrun_env.setenv("MASTER_PORT", str(_free_port()))
    with distributed("gloo") as ctx:
        assert dist.is_initialized()
        assert (ctx.rank, ctx.world_size, ctx.backend, ctx.owns_group) == (0, 1, "gloo", True)
        assert init_distributed().owns_group is False  # joins the existing group, does not own it
        stats = {(0, 2): _stats(1)}
        xtx = stats[(0, 2)].xtx.clone()
        all_reduce_stats(stats)
        assert torch.equal(stats[(0, 2)].xtx, xtx)
        assert run_on_main(lambda: "written") == "written"
    assert not dist.is_initialized()


@pytest.mark.parametrize(
    ("env", "backend", "match"),
    [
        ({"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, None,
         r"environment variable RANK is not set, but WORLD_SIZE is; launch with torchrun"),
        ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, None,
         r"RANK=2 and WORLD_SIZE=2 are inconsistent"),
        ({"WORLD_SIZE": "two", "RANK": "0"}, None, r"WORLD_SIZE='two' is not an integer"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "1"}, None, r"MASTER_ADDR is not set"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}, "mpi",
         r"backend is 'mpi'; use 'nccl' \(CUDA\) or 'gloo' \(CPU\)"),
    ],
)  # fmt: skip
def test_environment_errors(
    no_torchrun_env: pytest.MonkeyPatch, env: dict[str, str], backend: str | None, match: str
) -> None:
    for name, value in env.items():
        no_torchrun_env.setenv(name, value)
    with pytest.raises(GhostsolveError, match=match):
        init_distributed(backend)
    assert not dist.is_initialized()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is absent")
def test_nccl_without_cuda_is_refused(no_torchrun_env: pytest.MonkeyPatch) -> None:
    env = {"WORLD_SIZE": "1", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    for name, value in env.items():
        no_torchrun_env.setenv(name, value)
    with pytest.raises(GhostsolveError, match=r"backend 'nccl' needs CUDA, but no CUDA device is visible"):
        init_distributed("nccl")


def test_signature_names_the_disagreement() -> None:
    a = gd._describe(gd._signature({(1, 3): _stats(0, dim=8)}))
    b = gd._describe(gd._signature({(1, 3): _stats(0, dim=4), (5, 6): _stats(0, dim=4)}))
    assert "(1, 3): count[] float64" in a and "xtx[8, 8] float64" in a
    assert "(5, 6)" in b and "xtx[4, 4]" in b


# --------------------------------------------------------------------------------- two processes, torchrun
@pytest.fixture(scope="module")
def torchrun_results(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("torchrun")
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",  # two ranks on a 2-core runner: no oversubscription
        TOKENIZERS_PARALLELISM="false",
    )
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # keep gloo's own connections on the loopback device
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
        # As a module: a script's own folder would go first on sys.path, and tests/pipeline/select would then
        # shadow the standard library's select module.
        "-m", "tests.pipeline._dist_worker", str(out),
    ]  # fmt: skip
    # Own session, so a hung run is killed with every worker it started.
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within 150 s:\n{log[-4000:]}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{log[-6000:]}"
    results = {r: torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)}
    results[-1] = {"out": out}
    return results


@pytest.fixture(scope="module")
def single_process_reference() -> dict:
    from ghostsolve.pipeline.capture import capture_stats
    from tests.pipeline.scale_case import INTERVALS, case_batches, case_model

    stats = capture_stats(case_model(), case_batches(), INTERVALS, progress=False)
    return {
        "stats": stats,
        "weights": {iv: ghostsolve.fit(s, family="full").weight for iv, s in stats.items()},
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


@pytest.mark.slow
def test_ranks_calibrated_disjoint_shards(torchrun_results: dict, single_process_reference: dict) -> None:
    r0, r1 = torchrun_results[0], torchrun_results[1]
    assert (r0["n_batches"], r1["n_batches"]) == (3, 2)
    for iv, total in single_process_reference["stats"].items():
        assert r0["local_rows"][iv] + r1["local_rows"][iv] == total.n_rows
        assert 0 < r1["local_rows"][iv] < total.n_rows


@pytest.mark.slow
@pytest.mark.parametrize("key", ["weights", "layerwise_weights"])
def test_all_reduced_operators_equal_single_process(
    torchrun_results: dict, single_process_reference: dict, key: str
) -> None:
    for iv, expected in single_process_reference["weights"].items():
        for rank in (0, 1):
            got = torchrun_results[rank][key][iv]
            assert _rel(got, expected) <= 1e-12, (rank, iv, _rel(got, expected))
        # Every rank ends with the very same operator, not merely a close one.
        assert torch.equal(torchrun_results[0][key][iv], torchrun_results[1][key][iv])


@pytest.mark.slow
def test_all_reduced_stats_equal_single_process(
    torchrun_results: dict, single_process_reference: dict
) -> None:
    for iv, expected in single_process_reference["stats"].items():
        got = ghostsolve.Stats.from_state_dict(torchrun_results[0]["stats"][iv])
        assert got.n_rows == expected.n_rows
        for name, tensor in expected.tensors().items():
            scale = float(tensor.abs().max())
            assert float((got.tensors()[name] - tensor).abs().max()) <= 1e-13 * scale, name


@pytest.mark.slow
def test_checkpoint_is_written_once_by_rank_0(torchrun_results: dict) -> None:
    out = torchrun_results[-1]["out"]
    assert (out / "save_calls.log").read_text().split() == ["0"]
    assert torchrun_results[0]["is_main"] and not torchrun_results[1]["is_main"]
    assert torchrun_results[0]["saved"] == str(out / "checkpoint")
    assert torchrun_results[1]["saved"] is None
    assert (out / "checkpoint").is_dir()
    leftovers = [p.name for p in out.iterdir() if p.name not in {"checkpoint", "save_calls.log"}]
    assert sorted(leftovers) == ["rank0.pt", "rank1.pt"]  # no second or half-written checkpoint


@pytest.mark.slow
def test_saved_checkpoint_holds_the_all_reduced_operators(
    torchrun_results: dict, single_process_reference: dict
) -> None:
    pytest.importorskip("ghostsolve.pipeline.io.checkpoint")
    from ghostsolve.pipeline.model.surgery import ghost_layout

    model = ghostsolve.load(torchrun_results[-1]["out"] / "checkpoint")
    deltas = sorted(
        (name, p.detach()) for name, p in model.named_parameters() if name.endswith("ghost.delta")
    )
    assert len(deltas) == len(single_process_reference["weights"]) == len(ghost_layout(model))
    # Interval (1, 2) sits before layer 1 of the pruned model; (3, 4) before the final norm.
    by_place = {"layers": deltas[0][1], "norm": deltas[1][1]}
    assert "layers" in deltas[0][0] and "norm" in deltas[1][0]
    for (iv, place) in (((1, 2), "layers"), ((3, 4), "norm")):
        expected = single_process_reference["weights"][iv] - torch.eye(32, dtype=torch.float64)
        # Stored in fp32: compare at fp32 resolution.
        assert _rel(by_place[place].double(), expected) <= 1e-6


@pytest.mark.slow
def test_tsqr_factors_are_combined_not_summed(torchrun_results: dict) -> None:
    from tests.pipeline.scale_case import qr_case_rows

    (X, Y), = qr_case_rows(1)
    Z = torch.cat([X, Y - X], dim=1)
    expected = Z.T @ Z
    for rank in (0, 1):
        assert _rel(torchrun_results[rank]["qr_gram"], expected) <= 1e-12
    assert torch.equal(torchrun_results[0]["qr_gram"], torchrun_results[1]["qr_gram"])


@pytest.mark.slow
def test_ranks_that_disagree_all_raise(torchrun_results: dict) -> None:
    for rank in (0, 1):
        message = torchrun_results[rank].get("mismatch_error", "")
        assert "ranks disagree on the statistics to sum: rank 0 has (1, 2):" in message
        assert "but rank 1 has (1, 2):" in message and "(3, 4):" in message
        assert "every rank must capture the same removal set" in message


@pytest.mark.slow
def test_failure_on_rank_0_reaches_every_rank(torchrun_results: dict) -> None:
    assert torchrun_results[0]["failed_main"] == "OSError: disk full (simulated)"
    assert torchrun_results[1]["failed_main"].startswith(
        "GhostsolveError: rank 0 failed in _fail: OSError: disk full (simulated)"
    )
