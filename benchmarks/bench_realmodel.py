"""Speed on the reference real LLM, SmolLM2-135M-Instruct (issue 10): recovery cost, prefill overhead, memory.

Skipped, with the command that obtains it, when the reference-model cache is absent (``nox -s realmodel``).
Calibration: ``GHOSTSOLVE_BENCH_REAL_WINDOWS`` (default 4) windows of 256 tokens of WikiText-2 validation
(``../shared/data``; seeded random token ids when it is absent), batches of 4. Removal: layers 12-18 (7 of 30,
one interval, the block streamline chooses on 32 WikiText-2 windows, see docs/results_smollm2.md).

1. **Recovery cost.** Paired runs A B A B ...: A = one plain forward pass (logits included, no KV cache) over
   the calibration windows; B = the whole recovery of every method of ``scripts/smollm2_protocol.py``
   (``iter_recoveries``: one capture pass serving every boundary and ReplaceMe's MLP statistics, every fit,
   one model copy per method, made one after the other). Also B' = ``recover(..., method="ghost")`` alone.
   Reported: the median of each, and the median and range of the per-pair ratios B / A. Target ≤ 1.3.
2. **Prefill latency.** The ghost-recovered model against the plainly pruned one (both 23 layers), batch 1,
   256 tokens, no KV cache, paired A B A B over ``GHOSTSOLVE_BENCH_ROUNDS`` (default 11) rounds after a
   warm-up. Target: ghost / pruned − 1 ≤ 3%.
3. **Peak memory of capture.** The growth of the resident set (``/proc/self/statm``, sampled every 2 ms by a
   thread) above its level before the call, for the plain forward and for ``recover(ghost)``.

Run: ``pytest benchmarks/bench_realmodel.py -s -p no:cacheprovider`` (prints the figures; pytest-benchmark
keeps them in ``extra_info``). Set ``OMP_NUM_THREADS`` and report the load average.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WINDOWS = int(os.environ.get("GHOSTSOLVE_BENCH_REAL_WINDOWS", "4"))
ROUNDS = max(3, int(os.environ.get("GHOSTSOLVE_BENCH_ROUNDS", "11")))
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
    from ghostsolve.pipeline.data import batches_from_windows, calibration_windows

    model, tokenizer = smollm2
    text = _protocol().shared_data() / "wikitext-2" / "wiki.valid.tokens"
    if text.exists():
        windows = calibration_windows(model, tokenizer, [text], n_windows=WINDOWS, seq_len=SEQ_LEN, seed=0,
                                      progress=False)  # fmt: skip
    else:
        gen = torch.Generator().manual_seed(0)
        windows = torch.randint(0, model.config.vocab_size, (WINDOWS, SEQ_LEN), generator=gen)
    return batches_from_windows(windows, 4)


def _timed(fn: Callable[[], Any]) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def paired(a: Callable[[], Any], b: Callable[[], Any], rounds: int) -> dict[str, Any]:
    """A and B alternately (A B, then B A, ...) ``rounds`` times; medians and the per-pair ratios B / A."""
    times_a, times_b = [], []
    for r in range(rounds):
        if r % 2 == 0:
            times_a.append(_timed(a))
            times_b.append(_timed(b))
        else:
            times_b.append(_timed(b))
            times_a.append(_timed(a))
    ratios = [tb / ta for ta, tb in zip(times_a, times_b, strict=True)]
    return {"a": statistics.median(times_a), "b": statistics.median(times_b),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "rounds": rounds, "load": os.getloadavg()[0]}  # fmt: skip


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """The peak growth of the resident set while the ``with`` block runs, sampled by a thread."""

    def __init__(self, every: float = 0.002) -> None:
        self.every = every
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.base = _rss()
        self.peak = self.base
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            time.sleep(self.every)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def growth(self) -> int:
        return self.peak - self.base


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
    with PeakRSS() as fwd:
        forward()
    with PeakRSS() as cap:
        ghost()
    out["memory"] = {"forward": fwd.growth, "recover_ghost": cap.growth, "base": fwd.base}
    out["tokens"] = sum(int(b["input_ids"].numel()) for b in batches)
    out["methods"] = len(methods)
    benchmark.extra_info.update({"ratio_all": out["all"]["ratio"], "ratio_ghost": out["ghost"]["ratio"]})
    RESULTS["cost"] = out


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
                         f"(pairs {r['ratio_min']:.2f}-{r['ratio_max']:.2f}, {r['rounds']} rounds, load "
                         f"{r['load']:.2f}; target <= 1.3)")  # fmt: skip
        m = c["memory"]
        lines.append(f"peak RSS growth: plain forward {m['forward'] / 2**20:.0f} MiB, recover(ghost) "
                     f"{m['recover_ghost'] / 2**20:.0f} MiB (process RSS before: "
                     f"{m['base'] / 2**20:.0f} MiB)")  # fmt: skip
    if "prefill" in RESULTS:
        r = RESULTS["prefill"]
        lines.append(f"prefill 1 x {SEQ_LEN}: pruned {1e3 * r['a']:.1f} ms, ghost {1e3 * r['b']:.1f} ms -> "
                     f"overhead {100 * r['overhead']:+.2f}% (pair ratios "
                     f"{r['ratio_min']:.3f}-{r['ratio_max']:.3f}, "
                     f"{r['rounds']} rounds, load {r['load']:.2f}; target <= 3%)")  # fmt: skip
    return "\n".join(lines)


def test_zz_report() -> None:
    print("\n" + report())
