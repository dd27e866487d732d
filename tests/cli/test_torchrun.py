"""The command line under ``torchrun``: 2 CPU processes (gloo) against the same command in one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ghostsolve.cli import main
from tests.pipeline._tiny import text_file, tiny_model_dir

REPO = Path(__file__).resolve().parents[2]
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
TIMEOUT_S = 180

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _torchrun(argv: list[str], cwd: Path) -> str:
    """Run ``ghostsolve ARGV`` as 2 gloo ranks on the loopback; returns the combined log, fails on error."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",  # two ranks on a 2-core runner: no oversubscription
        TOKENIZERS_PARALLELISM="false",
    )
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "ghostsolve.cli", *argv,
    ]  # fmt: skip
    # Own session, so a hung run is killed with every rank it started.
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s:\n{log[-4000:]}")
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{log[-6000:]}"
    return log


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model", layers=6)


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    return text_file(tmp_path_factory.mktemp("text") / "sonnet.txt")


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


@pytest.mark.parametrize("order", ["independent", "sequential"])
def test_prune_under_torchrun_equals_one_process(tmp_path, model_dir, capsys, order):
    # Self-sampled calibration: rank 0 samples and broadcasts; 8 windows in batches of 2 give each rank
    # 2 batches. Two removed intervals, so the all-reduce covers more than one boundary.
    common = [
        "prune", str(model_dir), "--drop", "1,3-4", "--calib", "self", "--num-calib", "8", "--batch-size",
        "2", "--seq-len", "24", "--num-eval", "4", "--recover", "ghost,identity,diagonal", "--order", order,
        "--no-progress",
    ]  # fmt: skip
    dist_dir, single_dir = tmp_path / "dist", tmp_path / "single"
    dist_dir.mkdir()
    single_dir.mkdir()
    log = _torchrun(
        [*common, "--out", str(dist_dir / "ckpt"), "--report", str(dist_dir / "r.json"),
         "--plot", str(dist_dir / "p.png")],
        cwd=dist_dir,
    )  # fmt: skip
    assert main([*common, "--out", str(single_dir / "ckpt"), "--report", str(single_dir / "r.json")]) == 0
    capsys.readouterr()

    # Written once, by rank 0: one table, one save, and nothing else in the output folder.
    assert log.count("saved ghost:") == 1 and log.count("report:") == 1 and log.count("* saved: ghost") == 1
    assert "ghostsolve: error" not in log
    assert sorted(p.name for p in dist_dir.iterdir()) == ["ckpt", "p.png", "r.json"]
    distributed, single = (json.loads((d / "r.json").read_text()) for d in (dist_dir, single_dir))
    assert distributed["removed"] == single["removed"] == [1, 3, 4]
    assert distributed["calibration"] == single["calibration"]
    # The fp64 fit behind each operator: its residual agrees to fp64 summation-order rounding.
    for method in ("ghost", "diagonal"):
        for interval, value in single["methods"][method]["relative_residuals"].items():
            assert _rel(distributed["methods"][method]["relative_residuals"][interval], value) < 1e-10
    for method, entry in single["methods"].items():
        assert _rel(distributed["methods"][method]["perplexity"], entry["perplexity"]) < 1e-6
    # The saved operators (stored in fp32): equal up to one fp32 rounding of the fp64 solution.
    a, b = (load_file(d / "ckpt" / "model.safetensors") for d in (dist_dir, single_dir))
    assert a.keys() == b.keys()
    ghost_keys = [k for k in a if "ghost" in k]
    assert ghost_keys, sorted(a)
    for key in a:
        scale = float(b[key].abs().max()) or 1.0
        assert float((a[key] - b[key]).abs().max()) <= 2 * torch.finfo(torch.float32).eps * scale, key


def test_diagnose_under_torchrun_equals_one_process(tmp_path, model_dir, text, capsys):
    common = [
        "diagnose", str(model_dir), "--drop", "2-3", "--calib-text", str(text), "--num-calib", "8",
        "--batch-size", "2", "--seq-len", "32", "--max-rows", "256", "--no-progress",
    ]  # fmt: skip
    log = _torchrun([*common, "--report", str(tmp_path / "dist.json")], cwd=tmp_path)
    assert main([*common, "--report", str(tmp_path / "single.json")]) == 0
    capsys.readouterr()
    assert log.count("boundary 2->4") == 1 and log.count("report:") == 1
    distributed, single = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("dist", "single"))
    # Statistics summed over the two ranks' shards equal one process's over all batches.
    d, s = distributed["intervals"]["2-3"]["conditioning"], single["intervals"]["2-3"]["conditioning"]
    assert d["n_rows"] == s["n_rows"] == 8 * 32
    for key in ("condition_gram", "condition_x", "channel_ratio"):
        assert _rel(d[key], s[key]) < 1e-10, key


def test_select_under_torchrun_equals_one_process(tmp_path, model_dir, capsys):
    # Self-sampled calibration is drawn on rank 0 and broadcast; rank 0 scores and writes.
    common = [
        "select", str(model_dir), "--strategy", "recoverable", "--num-drop", "2", "--calib", "self",
        "--num-calib", "4", "--batch-size", "2", "--seq-len", "24", "--no-progress",
    ]  # fmt: skip
    log = _torchrun(
        [*common, "--report", str(tmp_path / "dist.json"), "--plot", str(tmp_path / "d.png")], tmp_path
    )
    assert main([*common, "--report", str(tmp_path / "single.json")]) == 0
    capsys.readouterr()
    assert log.count("remove layers (0-based)") == 1 and log.count("report:") == 1
    distributed, single = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("dist", "single"))
    assert distributed["selected"] == single["selected"]
    assert len(distributed["scores"]) == len(single["scores"]) == 6 - 2 + 1
    for a, b in zip(distributed["scores"], single["scores"], strict=True):
        assert _rel(a, b) < 1e-10
    assert (tmp_path / "d.png").read_bytes()[:4] == b"\x89PNG"


def test_cross_validated_ridge_under_torchrun_equals_one_process(tmp_path, model_dir, capsys):
    # The folds follow each window's position, not the rank that captured it, and sum across ranks like the
    # rest of the statistics: the same ridge is chosen as in one process.
    common = [
        "prune", str(model_dir), "--drop", "2", "--calib", "self", "--num-calib", "10", "--batch-size", "2",
        "--seq-len", "24", "--num-eval", "2", "--recover", "ghost", "--ridge", "cv", "--no-progress",
    ]  # fmt: skip
    (tmp_path / "dist").mkdir()
    _torchrun([*common, "--report", str(tmp_path / "dist" / "r.json")], cwd=tmp_path / "dist")
    assert main([*common, "--report", str(tmp_path / "single.json")]) == 0
    capsys.readouterr()
    distributed = json.loads((tmp_path / "dist" / "r.json").read_text())["methods"]["ghost"]
    single = json.loads((tmp_path / "single.json").read_text())["methods"]["ghost"]
    assert distributed["ridges"] == single["ridges"]
    assert _rel(distributed["relative_residuals"]["2"], single["relative_residuals"]["2"]) < 1e-10
