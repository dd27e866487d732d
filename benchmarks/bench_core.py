"""Speed and memory of the core solver library (issue 2), measured side by side in one run.

Problem: N = 32768 rows, d = 1024, fp32 inputs fed in chunks of 4096 rows (override with the environment
variables GHOSTSOLVE_BENCH_N / GHOSTSOLVE_BENCH_D for a quick look). Measured, each as the median of its
rounds:

* ``Stats`` accumulation throughput against a bare GEMM of the precision it computes in (fp64 default;
  fp32 products in the fast mode), counting N·d² flops for the symmetric XᵀX and 2·N·d² for XᵀY against
  2·N·d² for the bare ``XᵀX`` GEMM on chunks of the same shape;
* the default fit (statistics + ``solver="auto"``) and the fast mode (``product_dtype=torch.float32``,
  fp64 accumulation) against the reference pattern (concatenate all rows, cast to fp64, form XᵀX and XᵀΔ,
  ``torch.linalg.solve``) and against ``numpy.linalg.lstsq`` in fp64, with the objectives compared;
* peak extra memory of ``ghostsolve.fit(X, Y)`` at N = 8192 and 65536: in a fresh subprocess per
  measurement (Linux), after a warm-up fit on 2·d rows, the peak resident set size is reset
  (``/proc/self/clear_refs``) and the peak during the fit (``VmHWM``) minus the resident set size just
  before it is reported (the inputs are already resident), next to the same figure for the reference
  pattern.

Run: ``pytest benchmarks/bench_core.py -s`` (``nox -s bench``). Prints a table with the ratios.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import ghostsolve

N = int(os.environ.get("GHOSTSOLVE_BENCH_N", "32768"))
D = int(os.environ.get("GHOSTSOLVE_BENCH_D", "1024"))
CHUNK = 4096
ROUNDS = 3
RESULTS: dict[str, float] = {}
EXTRA: dict[str, Any] = {}


@pytest.fixture(scope="module")
def data() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Well-conditioned fp32 chunks: Y = X W + noise, with mildly uneven channel scales."""
    g = torch.Generator().manual_seed(0)
    scales = torch.logspace(0, 1, D)
    W = torch.eye(D) + 0.05 * torch.randn(D, D, generator=g) / D**0.5
    xs, ys = [], []
    for _ in range(N // CHUNK):
        x = torch.randn(CHUNK, D, generator=g) * scales
        xs.append(x)
        ys.append(x @ W + 0.1 * torch.randn(CHUNK, D, generator=g))
    return xs, ys


def _run(benchmark: Any, key: str, fn: Any, rounds: int = ROUNDS) -> Any:
    out = benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
    RESULTS[key] = float(benchmark.stats.stats.median)
    return out


def _stats(xs: list[torch.Tensor], ys: list[torch.Tensor], **kw: Any) -> ghostsolve.Stats:
    s = ghostsolve.Stats(D, **kw)
    for x, y in zip(xs, ys, strict=True):
        s.update(x, y)
    return s


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_bare_gemm(benchmark: Any, data: Any, dtype: torch.dtype) -> None:
    chunks = [x.to(dtype) for x in data[0]]

    def run() -> None:
        for x in chunks:
            x.T @ x

    _run(benchmark, f"gemm_{dtype}", run)


STATS_VARIANTS = {
    "stats_default": {},
    "stats_lean": {"magnitudes": False},
    "stats_fast": {"product_dtype": torch.float32},
    "stats_fast_lean": {"product_dtype": torch.float32, "magnitudes": False},
}


@pytest.mark.parametrize("variant", list(STATS_VARIANTS))
def test_stats(benchmark: Any, data: Any, variant: str) -> None:
    _run(benchmark, variant, lambda: _stats(*data, **STATS_VARIANTS[variant]))


def test_fit_default(benchmark: Any, data: Any) -> None:
    """Statistics for the full operator (no magnitude sums, as fit(X, Y) builds them) + solver="auto"."""
    f = _run(benchmark, "fit_default", lambda: ghostsolve.fit(_stats(*data, magnitudes=False)))
    EXTRA["fit_default"] = f


def test_fit_fast(benchmark: Any, data: Any) -> None:
    f = _run(
        benchmark,
        "fit_fast",
        lambda: ghostsolve.fit(_stats(*data, product_dtype=torch.float32, magnitudes=False)),
    )
    EXTRA["fit_fast"] = f
    EXTRA["fast_mode_safe"] = f.diagnostics.fast_mode_safe


def test_reference_pattern(benchmark: Any, data: Any) -> None:
    xs, ys = data

    def run() -> torch.Tensor:
        X = torch.cat(xs).double()
        Dl = torch.cat(ys).double() - X
        return torch.linalg.solve(X.T @ X, X.T @ Dl)

    EXTRA["reference_M"] = _run(benchmark, "reference", run)


def test_numpy_lstsq(benchmark: Any, data: Any) -> None:
    xs, ys = data

    def run() -> np.ndarray:
        X = torch.cat(xs).double().numpy()
        Dl = torch.cat(ys).double().numpy() - X
        return np.linalg.lstsq(X, Dl, rcond=None)[0]

    M = _run(benchmark, "lstsq", run, rounds=2)
    X = torch.cat(xs).double()
    Dl = torch.cat(ys).double() - X
    EXTRA["lstsq_objective"] = float(((X @ torch.from_numpy(M) - Dl) ** 2).sum())
    for key in ("fit_default", "fit_fast"):
        if key in EXTRA:
            EXTRA[f"{key}_objective"] = float(((X @ EXTRA[key].delta - Dl) ** 2).sum())


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
    for n in (8192, 65536):
        for mode in ("ghostsolve", "reference"):
            EXTRA[f"mem_{mode}_{n}"] = _extra_memory(n, mode)
    small, large = EXTRA["mem_ghostsolve_8192"], EXTRA["mem_ghostsolve_65536"]
    # O(d²): the fit's working set must not scale with N (8× more rows here)
    assert large < 2 * small + 64


@pytest.fixture(scope="module", autouse=True)
def _table() -> Iterator[None]:
    yield
    print("\n" + report())


def report() -> str:
    """The measured figures and ratios as a text table."""
    r = RESULTS
    lines = [
        f"ghostsolve core benchmark: N={N}, d={D}, fp32 chunks of {CHUNK} rows, "
        f"{torch.get_num_threads()} torch threads (medians)"
    ]

    def rate(key: str, flops: float) -> float:
        return flops / r[key] / 1e9

    counted = 3.0 * N * D * D
    gemm = 2.0 * N * D * D
    for key, gk, label in (
        ("stats_default", "gemm_torch.float64", "Stats() fp64"),
        ("stats_lean", "gemm_torch.float64", "Stats(magnitudes=False)"),
        ("stats_fast", "gemm_torch.float32", "Stats fast (fp32 prod.)"),
        ("stats_fast_lean", "gemm_torch.float32", "Stats fast, no magn."),
    ):
        if key in r and gk in r:
            s, g = rate(key, counted), rate(gk, gemm)
            lines.append(
                f"  {label:<24} {r[key]:8.3f} s  {s:7.1f} GFLOP/s  vs bare {gk[-7:]} GEMM {g:7.1f} GFLOP/s"
                f"  -> {s / g:6.1%}"
            )
    for key, label in (("fit_default", "default fit"), ("fit_fast", "fast-mode fit")):
        if key in r:
            parts = [f"  {label:<22} {r[key]:8.3f} s"]
            if "reference" in r:
                parts.append(f"reference/{key.split('_')[1]} = {r['reference'] / r[key]:5.2f}x")
            if "lstsq" in r:
                parts.append(f"lstsq/{key.split('_')[1]} = {r['lstsq'] / r[key]:5.2f}x")
            lines.append("  ".join(parts))
    if "reference" in r:
        lines.append(
            f"  reference pattern      {r['reference']:8.3f} s  (cat, fp64, XᵀX, XᵀΔ, torch.linalg.solve)"
        )
    if "lstsq" in r:
        lines.append(f"  numpy.linalg.lstsq     {r['lstsq']:8.3f} s  (fp64)")
    if "lstsq_objective" in EXTRA:
        ref = EXTRA["lstsq_objective"]
        for key in ("fit_default", "fit_fast"):
            if f"{key}_objective" in EXTRA:
                gap = (EXTRA[f"{key}_objective"] - ref) / ref
                lines.append(f"  objective gap {key:<12} vs lstsq: {gap:+.2e} (relative)")
    if "fast_mode_safe" in EXTRA:
        lines.append(f"  diagnostics.fast_mode_safe on this data: {EXTRA['fast_mode_safe']}")
    if "mem_ghostsolve_8192" in EXTRA:
        lines.append("  peak extra memory (VmHWM during the fit − RSS before it, fresh process, MiB):")
        for n in (8192, 65536):
            lines.append(
                f"    N={n:<6} ghostsolve.fit {EXTRA[f'mem_ghostsolve_{n}']:8.1f}   "
                f"reference pattern {EXTRA[f'mem_reference_{n}']:8.1f}"
            )
    return "\n".join(lines)
