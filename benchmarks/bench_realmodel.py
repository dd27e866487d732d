"""Speed on the reference real LLM, SmolLM2-135M-Instruct (issue 10): recovery cost, prefill overhead, memory.

Skipped, with the command that obtains it, when the reference-model cache is absent (``nox -s realmodel``).
Calibration: ``GHOSTSOLVE_BENCH_REAL_WINDOWS`` (default 4) windows of 256 tokens of WikiText-2 validation
(``../shared/data``; seeded random token ids when it is absent), batches of 4. Removal: layers 12-18 (7 of 30,
one interval, the block streamline chooses on 32 WikiText-2 windows, see docs/results_smollm2.md).

1. **Recovery cost.** Paired runs A B A B ...: A = one plain forward pass (logits included, no KV cache) over
   the calibration windows; B = the whole recovery of every method of ``scripts/smollm2_protocol.py``
   (``iter_recoveries``: one capture pass serving every boundary and ReplaceMe's MLP statistics, every fit,
   one model copy per method, made one after the other). Also B' = ``recover(..., method="ghost")`` alone.
   Reported: the median of each, and the median and range of the per-pair ratios B / A, in wall and in
   process CPU seconds (one thread: CPU time leaves out waiting for a core). Target ≤ 1.3.
2. **Prefill latency.** The ghost-recovered model against the plainly pruned one (both 23 layers), batch 1,
   256 tokens, no KV cache, paired A B A B over ``GHOSTSOLVE_BENCH_ROUNDS`` (default 31) rounds after a
   warm-up. Target: ghost / pruned − 1 ≤ 3%.
3. **Peak memory of capture.** In a fresh process each (so no memory freed by an earlier step is reused): the
   peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` after the model is loaded) above the
   resident set before the step, for one plain forward over the calibration windows and for
   ``recover(..., method="ghost", inplace=True)`` (capture + fit + insertion; in place, so the model copy a
   default recovery makes is not counted: that copy is the pruned model's size).

Run: ``pytest benchmarks/bench_realmodel.py -s -p no:cacheprovider`` (prints the figures; pytest-benchmark
keeps them in ``extra_info``). Set ``OMP_NUM_THREADS`` and report the load average.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WINDOWS = int(os.environ.get("GHOSTSOLVE_BENCH_REAL_WINDOWS", "4"))
ROUNDS = max(3, int(os.environ.get("GHOSTSOLVE_BENCH_ROUNDS", "31")))
COST_ROUNDS = max(2, int(os.environ.get("GHOSTSOLVE_BENCH_COST_ROUNDS", "3")))
SEQ_LEN = 256
DROP = list(range(12, 19))
RESULTS: dict[str, dict[str, Any]] = {}


def _protocol() -> Any:
    sys.path.insert(0, str(REPO / "scripts"))
    import smollm2_protocol

    return smollm2_protocol


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    sys.path.insert(0, str(REPO / "scripts"))
    import get_reference_model as script
    from transformers import AutoTokenizer

    from ghostsolve.pipeline.io.checkpoint import load

    found = script.find_reference_model()
    if found is None:
        pytest.skip(f"needs the reference model SmolLM2-135M-Instruct in {script.cache_dir()}; obtain it "
                    f"with {script.OBTAIN_COMMAND}, or set {script.ENV_VAR} to a cache made by "
                    "it")  # fmt: skip
    return load(found.hf_dir, dtype="float32"), AutoTokenizer.from_pretrained(found.hf_dir)


@pytest.fixture(scope="module")
def batches(smollm2: tuple[Any, Any]) -> list[dict[str, torch.Tensor]]:
    return _windows(*smollm2)


def _windows(model: Any, tokenizer: Any) -> list[dict[str, torch.Tensor]]:
    from ghostsolve.pipeline.data import batches_from_windows, calibration_windows

    text = _protocol().shared_data() / "wikitext-2" / "wiki.valid.tokens"
    if text.exists():
        windows = calibration_windows(model, tokenizer, [text], n_windows=WINDOWS, seq_len=SEQ_LEN, seed=0,
                                      progress=False)  # fmt: skip
    else:
        gen = torch.Generator().manual_seed(0)
        windows = torch.randint(0, model.config.vocab_size, (WINDOWS, SEQ_LEN), generator=gen)
    return batches_from_windows(windows, 4)


def _timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall seconds and CPU seconds of this process (on a shared machine the CPU time leaves out the time
    spent waiting for a core, which dominates the spread of wall times)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def paired(a: Callable[[], Any], b: Callable[[], Any], rounds: int) -> dict[str, Any]:
    """A and B alternately (A B, then B A, ...) ``rounds`` times; medians (wall and CPU seconds) and the
    median and range of the per-pair ratios B / A."""
    runs_a, runs_b = [], []
    for r in range(rounds):
        if r % 2 == 0:
            runs_a.append(_timed(a))
            runs_b.append(_timed(b))
        else:
            runs_b.append(_timed(b))
            runs_a.append(_timed(a))
    out: dict[str, Any] = {"rounds": rounds, "load": os.getloadavg()[0]}
    for k, clock in enumerate(("", "cpu_")):
        ta, tb = [t[k] for t in runs_a], [t[k] for t in runs_b]
        ratios = [y / x for x, y in zip(ta, tb, strict=True)]
        out.update({f"{clock}a": statistics.median(ta), f"{clock}b": statistics.median(tb),
                    f"{clock}ratio": statistics.median(ratios), f"{clock}ratio_min": min(ratios),
                    f"{clock}ratio_max": max(ratios)})  # fmt: skip
    return out


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_growth(step: Callable[[], Any]) -> int:
    """Peak resident bytes of ``step`` above the resident set before it (Linux: VmHWM reset by clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_bytes("VmRSS")
    step()
    return _status_bytes("VmHWM") - before


def _memory_child(kind: str) -> None:
    """Run in a subprocess: load the model and the windows, measure one step, print bytes as JSON."""
    import json

    from ghostsolve.pipeline.recover import recover

    sys.path.insert(0, str(REPO / "scripts"))
    import get_reference_model as script
    from transformers import AutoTokenizer

    from ghostsolve.pipeline.io.checkpoint import load

    torch.set_num_threads(1)
    found = script.require_reference_model()
    model = load(found.hf_dir, dtype="float32")
    data = _windows(model, AutoTokenizer.from_pretrained(found.hf_dir))
    if kind == "forward":
        grown = _peak_growth(_forward(model, data))
    else:
        grown = _peak_growth(lambda: recover(model, DROP, data, method="ghost", inplace=True, progress=False))
    print(json.dumps({"kind": kind, "bytes": grown, "rss": _status_bytes("VmRSS")}))


def _forward(model: Any, batches: list[dict[str, torch.Tensor]]) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            for batch in batches:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)

    return run


def test_recovery_cost(benchmark: Any, smollm2: tuple[Any, Any], batches: list[dict[str, torch.Tensor]],
                       ) -> None:  # fmt: skip
    from ghostsolve.pipeline.recover import iter_recoveries, recover

    model, _ = smollm2
    methods = list(_protocol().METHODS)
    forward = _forward(model, batches)

    def everything() -> None:
        for _ in iter_recoveries(model, DROP, batches, methods, progress=False):
            pass

    def ghost() -> None:
        recover(model, DROP, batches, method="ghost", progress=False)

    forward()  # warm-up
    out: dict[str, Any] = {}
    out["all"] = benchmark.pedantic(lambda: paired(forward, everything, COST_ROUNDS), rounds=1, iterations=1)
    out["ghost"] = paired(forward, ghost, COST_ROUNDS)
    out["tokens"] = sum(int(b["input_ids"].numel()) for b in batches)
    out["methods"] = len(methods)
    benchmark.extra_info.update({"ratio_all": out["all"]["ratio"], "ratio_ghost": out["ghost"]["ratio"]})
    RESULTS["cost"] = out


def test_capture_memory(smollm2: tuple[Any, Any]) -> None:
    import json
    import subprocess

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak resident set")
    out = {}
    for kind in ("forward", "capture"):
        done = subprocess.run([sys.executable, __file__, kind], capture_output=True, text=True, check=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
        out[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    RESULTS["memory"] = out


def test_prefill_latency(benchmark: Any, smollm2: tuple[Any, Any], batches: list[dict[str, torch.Tensor]],
                         ) -> None:  # fmt: skip
    from ghostsolve.pipeline.recover import recover

    model, _ = smollm2
    pruned = recover(model, DROP, batches, method="identity", progress=False).model
    ghosted = recover(model, DROP, batches, method="ghost", progress=False).model
    ids = batches[0]["input_ids"][:1]

    def prefill(m: Any) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                m(input_ids=ids, use_cache=False)

        return run

    for m in (pruned, ghosted):  # warm-up
        prefill(m)()
    result = benchmark.pedantic(lambda: paired(prefill(pruned), prefill(ghosted), ROUNDS), rounds=1,
                                iterations=1)
    result["overhead"] = result["b"] / result["a"] - 1.0
    benchmark.extra_info.update(result)
    RESULTS["prefill"] = result


def report() -> str:
    lines = [f"SmolLM2-135M, torch threads {torch.get_num_threads()}, {WINDOWS} x {SEQ_LEN} calibration "
             f"tokens, layers {DROP[0]}-{DROP[-1]} removed"]  # fmt: skip
    if "cost" in RESULTS:
        c = RESULTS["cost"]
        every = f"every method ({c['methods']}), one capture"
        for key, what in (("all", every), ("ghost", "recover(ghost)")):
            r = c[key]
            lines.append(f"{what}: {r['b']:.2f} s vs plain forward {r['a']:.2f} s -> ratio {r['ratio']:.2f} "
                         f"(pairs {r['ratio_min']:.2f}-{r['ratio_max']:.2f}); CPU time {r['cpu_b']:.2f} vs "
                         f"{r['cpu_a']:.2f} s -> {r['cpu_ratio']:.2f} (pairs {r['cpu_ratio_min']:.2f}-"
                         f"{r['cpu_ratio_max']:.2f}); {r['rounds']} rounds, load {r['load']:.2f}; "
                         "target <= 1.3")  # fmt: skip
    if "memory" in RESULTS:
        m = RESULTS["memory"]
        lines.append("peak resident growth (fresh process each): plain forward "
                     f"{m['forward']['bytes'] / 2**20:.0f} MiB, recover(ghost, inplace) "
                     f"{m['capture']['bytes'] / 2**20:.0f} MiB (model loaded: "
                     f"{m['forward']['rss'] / 2**20:.0f} MiB resident)")  # fmt: skip
    if "prefill" in RESULTS:
        r = RESULTS["prefill"]
        lines.append(f"prefill 1 x {SEQ_LEN}: pruned {1e3 * r['a']:.1f} ms, ghost {1e3 * r['b']:.1f} ms -> "
                     f"overhead {100 * r['overhead']:+.2f}% (pair ratios "
                     f"{r['ratio_min']:.3f}-{r['ratio_max']:.3f}); CPU time {1e3 * r['cpu_a']:.1f} vs "
                     f"{1e3 * r['cpu_b']:.1f} ms -> {100 * (r['cpu_b'] / r['cpu_a'] - 1):+.2f}% (pair ratios "
                     f"{r['cpu_ratio_min']:.3f}-{r['cpu_ratio_max']:.3f}, "
                     f"{r['rounds']} rounds, load {r['load']:.2f}; target <= 3%)")  # fmt: skip
    return "\n".join(lines)


def test_zz_report() -> None:
    print("\n" + report())


if __name__ == "__main__":
    _memory_child(sys.argv[1])
