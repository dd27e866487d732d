"""Speed and memory of the core solver library (issue 11), measured side by side, paired, in one run.

Problem: N = 32768 rows, d = 1024, fp32 inputs fed in chunks of 4096 rows (override with the environment
variables GHOSTSOLVE_BENCH_N / GHOSTSOLVE_BENCH_D / GHOSTSOLVE_BENCH_ROUNDS for a quick look).

Every comparison runs its contenders in turn, A B A B … (round robin, one warm-up each), so that both
see the same machine load; the ratio is formed within each round and its median and min–max over the
rounds are printed, with the load average (``os.getloadavg``) before and after. Measured:

* ``Stats`` accumulation throughput against a bare GEMM ``XᵀX`` on the same chunks (pre-cast) of the
  precision it computes in (fp64 default; fp32 products in the fast mode). Flops are counted honestly:
  N·d² for the symmetric XᵀX (what a rank-k update needs) and 2·N·d² for Xᵀ(Y−X), against 2·N·d² for the
  bare GEMM; share = (3·N·d² / t_stats) / (2·N·d² / t_gemm), with t_gemm the faster in each round of
  torch's ``x.T @ x`` and scipy's OpenBLAS ``gemm`` (the library ``Stats`` calls on the CPU);
* the three product paths of ``Stats`` (torch fused, torch half, numpy/OpenBLAS), each forced, over
  whole update passes at d = 1024 and the real model's d = 576 (and a small d = 64);
* the default fit (``Stats.for_families(d, ["full"])`` in fp64 + ``fit``, solver ``auto``) and the fast
  mode (the same with ``product_dtype=torch.float32``, fp64 accumulation) against the reference pattern
  (concatenate all rows, cast to fp64, form XᵀX and XᵀΔ, ``torch.linalg.solve``) and against
  ``numpy.linalg.lstsq`` in fp64, with relative objective gaps computed on the materialized rows;
* where the time of ``Stats.update`` and ``fit`` goes (cProfile, top operations) at d = 1024 (chunks of
  4096) and at the real model's d = 576 (chunks of 4096 and 512);
* peak extra memory of ``ghostsolve.fit(X, Y)`` at N = 8192 and 65536: in a fresh subprocess per
  measurement (Linux), after a warm-up fit on 2·d rows, the peak resident set size is reset
  (``/proc/self/clear_refs``) and the peak during the fit (``VmHWM``) minus the resident set size just
  before it is reported (the inputs are already resident), next to the same figure for the reference.

Run: ``pytest benchmarks/bench_core.py -s`` (``nox -s bench``). Prints one table with every target.
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch

import ghostsolve

N = int(os.environ.get("GHOSTSOLVE_BENCH_N", "32768"))
D = int(os.environ.get("GHOSTSOLVE_BENCH_D", "1024"))
ROUNDS = int(os.environ.get("GHOSTSOLVE_BENCH_ROUNDS", "5"))
LSTSQ_ROUNDS = max(1, min(ROUNDS, 2))  # numpy's lstsq takes tens of seconds per run at the full size
CHUNK = 4096
LINES: list[str] = []  # the report, printed at the end of the module

# Targets of issue 11 (ratios of times measured in the same round).
TARGETS = {
    "default fit vs reference": 1.35,
    "fast fit vs reference": 2.5,
    "default fit vs lstsq": 3.0,
    "fast fit vs lstsq": 8.0,
    "Stats fp64 vs fp64 GEMM (share)": 0.80,
    "Stats fast vs fp32 GEMM (share)": 0.80,
}
MAX_GAP = 1e-9


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.2f}/{five:.2f} (1/5 min) on {os.cpu_count()} CPUs"


@dataclass
class Rounds:
    """Times of contenders measured round robin; ``ratio(a, b)`` is ``t_b / t_a`` within each round."""

    times: dict[str, list[float]]
    load_before: str
    load_after: str

    def median(self, key: str) -> float:
        return statistics.median(self.times[key])

    def ratios(self, a: str, b: str) -> list[float]:
        return [tb / ta for ta, tb in zip(self.times[a], self.times[b], strict=True)]


def round_robin(contenders: dict[str, Callable[[], Any]], rounds: int) -> tuple[Rounds, dict[str, Any]]:
    """Run each contender once (warm-up, result kept), then ``rounds`` rounds of all in turn."""
    results = {k: f() for k, f in contenders.items()}
    before = _load()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for k, f in contenders.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return Rounds(times, before, _load()), results


def _ratio_line(label: str, values: list[float], target: float | None, unit: str = "x") -> str:
    med, lo, hi = statistics.median(values), min(values), max(values)
    fmt = (lambda v: f"{v:6.1%}") if unit == "%" else (lambda v: f"{v:5.2f}x")
    verdict = ""
    if target is not None:
        verdict = f"  target ≥ {fmt(target).strip()}: " + ("met" if med >= target else "NOT met")
    spread = f"(min–max {fmt(lo).strip()}–{fmt(hi).strip()}, {len(values)} rounds)"
    return f"  {label:<34} {fmt(med)}  {spread}{verdict}"


@pytest.fixture(scope="module")
def data() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Well-conditioned fp32 chunks: Y = X W + noise, with mildly uneven channel scales."""
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(0, 1, D)
    W = torch.eye(D) + 0.05 * torch.randn(D, D, generator=g) / D**0.5
    xs, ys = [], []
    for _ in range(max(1, N // CHUNK)):
        x = torch.randn(CHUNK, D, generator=g) * scales
        xs.append(x)
        ys.append(x @ W + 0.1 * torch.randn(CHUNK, D, generator=g))
    return xs, ys


def _stats(xs: list[torch.Tensor], ys: list[torch.Tensor], **kw: Any) -> ghostsolve.Stats:
    s = ghostsolve.Stats.for_families(xs[0].shape[1], ["full"], **kw)
    for x, y in zip(xs, ys, strict=True):
        s.update(x, y)
    return s


def _fit_default(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> ghostsolve.Fit:
    return ghostsolve.fit(_stats(xs, ys))


def _fit_fast(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> ghostsolve.Fit:
    return ghostsolve.fit(_stats(xs, ys, product_dtype=torch.float32))


def _reference(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    X = torch.cat(xs).double()
    Dl = torch.cat(ys).double() - X
    return torch.linalg.solve(X.T @ X, X.T @ Dl)


def _lstsq(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> np.ndarray:
    X = torch.cat(xs).double().numpy()
    Dl = torch.cat(ys).double().numpy() - X
    return np.linalg.lstsq(X, Dl, rcond=None)[0]


def _gemm(chunks: list[torch.Tensor]) -> None:
    for x in chunks:
        x.T @ x


def _gemm_openblas(chunks: list[torch.Tensor]) -> None:
    """The same XᵀX by scipy's OpenBLAS gemm on the row-major memory (what ``Stats`` calls)."""
    from scipy.linalg import blas

    for x in chunks:
        xn = x.numpy()
        gemm = blas.dgemm if xn.dtype == np.float64 else blas.sgemm
        gemm(1.0, xn.T, xn.T, trans_b=1)


@pytest.mark.parametrize("mode", ["fp64", "fast"])
def test_stats_throughput(benchmark: Any, data: Any, mode: str) -> None:
    xs, ys = data
    dtype = torch.float64 if mode == "fp64" else torch.float32
    chunks = [x.to(dtype) for x in xs]
    kw = {} if mode == "fp64" else {"product_dtype": torch.float32}
    contenders = {
        "stats": lambda: _stats(xs, ys, **kw),
        "gemm": lambda: _gemm(chunks),
        "gemm, OpenBLAS": lambda: _gemm_openblas(chunks),
        "stats, all features": lambda: _stats_all(xs, ys, **kw),
    }
    rounds, _ = benchmark.pedantic(round_robin, args=(contenders, ROUNDS), rounds=1, iterations=1)
    # against the faster of the two GEMMs in each round: the best this machine offers in that precision
    best = [min(a, b) for a, b in zip(rounds.times["gemm"], rounds.times["gemm, OpenBLAS"], strict=True)]
    rounds.times["best gemm"] = best
    share = [1.5 * r for r in rounds.ratios("stats", "best gemm")]
    share_all = [1.5 * r for r in rounds.ratios("stats, all features", "best gemm")]
    name = "Stats fp64 vs fp64 GEMM (share)" if mode == "fp64" else "Stats fast vs fp32 GEMM (share)"
    LINES.append(
        f"Stats accumulation, {mode} ({rounds.load_before} → {rounds.load_after}); medians: Stats "
        f"{rounds.median('stats'):.3f} s, bare {dtype} GEMM XᵀX {rounds.median('gemm'):.3f} s (torch) / "
        f"{rounds.median('gemm, OpenBLAS'):.3f} s (OpenBLAS), "
        f"Stats with every feature {rounds.median('stats, all features'):.3f} s"
    )
    LINES.append(_ratio_line(name, share, TARGETS[name], unit="%"))
    LINES.append(_ratio_line("  (with magnitude sums, informative)", share_all, None, unit="%"))


def _stats_all(xs: list[torch.Tensor], ys: list[torch.Tensor], **kw: Any) -> ghostsolve.Stats:
    s = ghostsolve.Stats(xs[0].shape[1], **kw)  # magnitudes and Hadamard magnitudes, as Stats() defaults
    for x, y in zip(xs, ys, strict=True):
        s.update(x, y)
    return s


def _gap(xs: list[torch.Tensor], ys: list[torch.Tensor], M: torch.Tensor, ref: float) -> float:
    X = torch.cat(xs).double()
    Dl = torch.cat(ys).double() - X
    return (float(((X @ M.double() - Dl) ** 2).sum()) - ref) / ref


def test_fits_vs_reference(benchmark: Any, data: Any) -> None:
    xs, ys = data
    contenders = {
        "reference": lambda: _reference(xs, ys),
        "default": lambda: _fit_default(xs, ys),
        "fast": lambda: _fit_fast(xs, ys),
    }
    rounds, out = benchmark.pedantic(round_robin, args=(contenders, ROUNDS), rounds=1, iterations=1)
    LINES.append(
        f"fits vs the reference pattern ({rounds.load_before} → {rounds.load_after}); medians: reference "
        f"{rounds.median('reference'):.3f} s, default fit {rounds.median('default'):.3f} s, fast fit "
        f"{rounds.median('fast'):.3f} s; fast_mode_safe={out['fast'].diagnostics.fast_mode_safe}"
    )
    for key in ("default", "fast"):
        name = f"{key} fit vs reference"
        LINES.append(_ratio_line(name, rounds.ratios(key, "reference"), TARGETS[name]))


def test_fits_vs_lstsq(benchmark: Any, data: Any) -> None:
    xs, ys = data
    contenders = {
        "lstsq": lambda: _lstsq(xs, ys),
        "default": lambda: _fit_default(xs, ys),
        "fast": lambda: _fit_fast(xs, ys),
    }
    rounds, out = benchmark.pedantic(round_robin, args=(contenders, LSTSQ_ROUNDS), rounds=1, iterations=1)
    X = torch.cat(xs).double()
    ref = float(((X @ torch.from_numpy(out["lstsq"]) - (torch.cat(ys).double() - X)) ** 2).sum())
    LINES.append(
        f"fits vs numpy.linalg.lstsq (fp64) ({rounds.load_before} → {rounds.load_after}); medians: lstsq "
        f"{rounds.median('lstsq'):.2f} s, default {rounds.median('default'):.3f} s, fast "
        f"{rounds.median('fast'):.3f} s"
    )
    for key in ("default", "fast"):
        name = f"{key} fit vs lstsq"
        LINES.append(_ratio_line(name, rounds.ratios(key, "lstsq"), TARGETS[name]))
        gap = _gap(xs, ys, out[key].delta, ref)
        verdict = "met" if abs(gap) <= MAX_GAP else "NOT met"
        LINES.append(
            f"  objective gap, {key} fit vs lstsq:  {gap:+.2e} (target |gap| ≤ {MAX_GAP:g}: {verdict})"
        )


def _stats_by_path(
    xs: list[torch.Tensor], ys: list[torch.Tensor], path: str, pd: torch.dtype | None
) -> ghostsolve.Stats:
    import ghostsolve.stats as stats_module  # the internal path choice: what the path table there cites

    chosen = stats_module._product_path
    stats_module._product_path = lambda *_: path  # type: ignore[assignment]
    try:
        return _stats(xs, ys, product_dtype=pd)
    finally:
        stats_module._product_path = chosen


def _paths_at(d: int, chunk: int) -> None:
    g = torch.Generator().manual_seed(d)
    xs = [torch.randn(chunk, d, generator=g) for _ in range(32768 // chunk)]
    ys = [x + 0.1 * torch.randn(chunk, d, generator=g) for x in xs]
    for mode, pd in (("fp64", None), ("fast", torch.float32)):
        contenders = {
            path: (lambda path=path, pd=pd: _stats_by_path(xs, ys, path, pd))
            for path in ("fused", "half", "blas")
        }
        rounds, _ = round_robin(contenders, ROUNDS)
        for key in ("half", "blas"):
            rel = rounds.ratios(key, "fused")
            med, lo, hi = statistics.median(rel), min(rel), max(rel)
            LINES.append(
                f"  d={d:<5} chunks {chunk:<5} {mode:<5} {key:<5} {med:5.2f}× "
                f"(min–max {lo:.2f}–{hi:.2f}; {rounds.load_before})"
            )


def test_product_paths(benchmark: Any) -> None:
    """The three ways ``Stats`` computes a chunk's products (the table in ghostsolve.stats), side by side:
    whole ``Stats.update`` passes over 32768 rows (rows, products and accumulation), each path forced."""
    LINES.append("chunk product paths, Stats over 32768 rows (speed relative to torch's fused Xᵀ[X | D]):")
    shapes = ((1024, 4096), (576, 4096), (576, 512), (64, 512))
    benchmark.pedantic(lambda: [_paths_at(d, chunk) for d, chunk in shapes], rounds=1, iterations=1)


def _profile(d: int, chunk: int, n: int, mode: str) -> list[str]:
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(chunk, d, generator=g) for _ in range(max(1, n // chunk))]
    ys = [x + 0.1 * torch.randn(chunk, d, generator=g) for x in xs]
    kw = {} if mode == "fp64" else {"product_dtype": torch.float32}
    ghostsolve.fit(_stats(xs[:1], ys[:1], **kw))  # warm-up: thread pools, caches
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    ghostsolve.fit(_stats(xs, ys, **kw))
    prof.disable()
    total = time.perf_counter() - t0
    st = pstats.Stats(prof)
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:8]  # type: ignore[attr-defined]
    out = [f"  d={d}, chunks of {chunk}, N={n}, {mode}: {total:.3f} s ({_load()}); top self times:"]
    for (fname, line, func), (_, ncalls, tottime, _, _) in rows:
        where = f"{os.path.basename(fname)}:{line}" if line else "torch/C"
        out.append(f"    {tottime:7.3f} s {tottime / total:6.1%} {ncalls:6d} calls  {func} ({where})")
    return out


def test_profile() -> None:
    """Where Stats.update + fit spend their time (cProfile self time; torch ops appear by name)."""
    LINES.append("profile (Stats.for_families(d, ['full']) over all chunks, then fit):")
    for d, chunk, n in ((D, CHUNK, N), (576, 4096, min(N, 16384)), (576, 512, min(N, 16384))):
        for mode in ("fp64", "fast"):
            LINES.extend(_profile(d, chunk, n, mode))


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, ghostsolve
    n, d, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    X = torch.randn(n, d)
    Y = torch.randn(n, d).mul_(0.1).add_(X)      # in place: no temporary
    def kib(field):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith(field)).split()[1])
    # warm-up on a few rows: library loading and thread pools are not part of the fit's working set
    ghostsolve.fit(X[: 2 * d], Y[: 2 * d])
    Xw = X[: 2 * d].double(); torch.linalg.solve(Xw.T @ Xw, Xw.T @ (Y[: 2 * d].double() - Xw)); del Xw
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                             # reset the peak (VmHWM) to the current RSS
    before = kib("VmRSS:")
    if mode == "ghostsolve":
        ghostsolve.fit(X, Y)
    else:
        Xd = X.double(); Dd = Y.double() - Xd
        torch.linalg.solve(Xd.T @ Xd, Xd.T @ Dd)
    print(json.dumps({"extra_bytes": (kib("VmHWM:") - before) * 1024}))
    """
)


def _extra_memory(n: int, mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(n), str(D), mode],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"] / 2**20


@pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs to reset VmHWM"
)
def test_peak_extra_memory() -> None:
    mem = {(n, mode): _extra_memory(n, mode) for n in (8192, 65536) for mode in ("ghostsolve", "reference")}
    LINES.append("peak extra memory (VmHWM during the fit − RSS before it, fresh process, MiB):")
    for n in (8192, 65536):
        ours, ref = mem[(n, "ghostsolve")], mem[(n, "reference")]
        LINES.append(f"  N={n:<6} ghostsolve.fit {ours:8.1f}   reference {ref:8.1f}")
    small, large = mem[(8192, "ghostsolve")], mem[(65536, "ghostsolve")]
    # O(d²): the fit's working set must not scale with N (8× more rows here)
    assert large < 2 * small + 64


@pytest.fixture(scope="module", autouse=True)
def _table() -> Iterator[None]:
    yield
    head = (
        f"ghostsolve core benchmark: N={N}, d={D}, fp32 chunks of {CHUNK} rows, {torch.get_num_threads()} "
        f"torch threads, {ROUNDS} paired rounds ({LSTSQ_ROUNDS} with lstsq); ratios are per-round "
        "speed-ups (median, min–max)"
    )
    print("\n" + "\n".join([head, *LINES]))
