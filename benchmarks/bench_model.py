"""Model-side speed (issue 3): recovery cost against a plain forward pass, and prefill overhead.

1. **Recovery cost.** The whole recovery of ``recover(model, drop, batches, method="ghost")`` in
   ``independent`` order — the capture pass for every boundary, every fit, the model copy and the
   insertion — against one plain forward pass (``model(input_ids)``, logits included) over the same
   calibration tokens. Measured interleaved (forward, recovery, forward, ...) and compared by medians, on

   * a synthetic Llama with d = 1024 (4 layers, MLP 2816, 16 heads / 8 KV heads, vocabulary 32000;
     random weights), removing layers 1 and 3 (two intervals, one reaching the final norm), 16
     sequences × 256 tokens;
   * the trained stories260K (llama2.c, d = 64; skipped without ../shared/data), removing layers 1
     and 3, 64 sequences × 256 tokens.

   Every method of :data:`~ghostsolve.pipeline.recover.METHODS` from one capture (``iter_recoveries``:
   one capture, 13 fits, 13 model copies made one after the other) is reported beside it for
   information. Target: ratio ≤ 1.3.

2. **Sequential cost whatever k.** ``recover(..., order="sequential")`` on k = 1, 2 and 4 removed
   intervals of a synthetic Llama with d = 512 (12 layers, MLP 1408, random weights), 8 sequences ×
   256 tokens, with each capture engine (``capture="hooks"`` and ``"layerwise"``), against one plain
   forward pass over the same tokens; every run interleaved with the forward pass, medians of
   ``GHOSTSOLVE_BENCH_COST_ROUNDS`` rounds. Sequential order is one two-stream pass (the dense and the
   pruned stream advance together, the pass stopping at the last boundary it needs), so its cost is
   bounded whatever k: at most the dense layers plus the kept ones. Target: ratio ≤ 2 for every k
   and engine.

3. **Prefill latency.** A synthetic Llama with d = 2048 (8 layers, MLP 5632, 16 heads / 8 KV heads,
   vocabulary 32000, fp32 on CPU), batch 1, sequence length 128, no KV cache: the dense model, the
   plainly pruned model (layers 3 and 4 removed) and the same pruned model with a ghost operator
   before layer 5. The three share their weights (the decoder-layer list is swapped between runs), are
   run interleaved in rotating order after warm-up, and compared by the medians of ``ROUNDS`` ≥ 11
   runs each. Target: ghost / pruned − 1 ≤ 3%.

Run: ``pytest benchmarks/bench_model.py -s`` (``nox -s bench``); prints a table with the ratios.
Environment: ``GHOSTSOLVE_BENCH_ROUNDS`` (default 11), ``GHOSTSOLVE_BENCH_COST_ROUNDS`` (default 3).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from ghostsolve.pipeline.model.operators import GhostOperator
from ghostsolve.pipeline.model.surgery import insert_ghost, remove_layers
from ghostsolve.pipeline.recover import METHODS, iter_recoveries, recover

ROUNDS = max(11, int(os.environ.get("GHOSTSOLVE_BENCH_ROUNDS", "11")))
COST_ROUNDS = int(os.environ.get("GHOSTSOLVE_BENCH_COST_ROUNDS", "3"))
REPO = Path(__file__).resolve().parents[1]
RESULTS: dict[str, dict[str, float]] = {}


def synthetic_llama(hidden: int, layers: int, intermediate: int, seed: int = 0) -> nn.Module:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def stories260k() -> nn.Module:
    import transformers

    from ghostsolve.pipeline.io.convert_llama2c import convert_llama2c

    env = os.environ.get("GHOSTSOLVE_SHARED_DATA")
    source = (Path(env) if env else REPO.parent / "shared" / "data") / "models" / "stories260K"
    if not (source / "stories260K.bin").exists():
        pytest.skip(f"needs models/stories260K from the shared data folder ({source} is absent)")
    with tempfile.TemporaryDirectory() as tmp:
        directory = convert_llama2c(source / "stories260K.bin", source / "tok512.bin", Path(tmp) / "hf")
        return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


def _timed(fn: Callable[[], Any]) -> float:
    tic = time.perf_counter()
    fn()
    return time.perf_counter() - tic


def _interleaved(named: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Median seconds of each callable, run in rotating order ``rounds`` times."""
    names = list(named)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for k in range(len(names)):
            name = names[(r + k) % len(names)]
            times[name].append(_timed(named[name]))
    return {n: statistics.median(t) for n, t in times.items()}


def _cost_case(benchmark: Any, key: str, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
    def forward() -> None:
        with torch.inference_mode():
            for batch in batches:
                model(**batch, use_cache=False)

    def recovery() -> None:
        recover(model, [1, 3], batches, method="ghost", progress=False)

    def everything() -> None:
        # recover_all's work, holding one recovered model at a time (13 copies of a d=1024 model at once
        # would only measure memory pressure).
        for _ in iter_recoveries(model, [1, 3], batches, METHODS, progress=False):
            pass

    forward()  # warm-up (allocator, kernels)
    medians: dict[str, float] = {}

    def run() -> None:
        medians.update(_interleaved({"forward": forward, "recover": recovery}, COST_ROUNDS))

    benchmark.pedantic(run, rounds=1, iterations=1)
    medians["recover_all"] = statistics.median(_timed(everything) for _ in range(max(1, COST_ROUNDS - 2)))
    medians["ratio"] = medians["recover"] / medians["forward"]
    medians["ratio_all"] = medians["recover_all"] / medians["forward"]
    medians["tokens"] = float(sum(b["input_ids"].numel() for b in batches))
    benchmark.extra_info.update(medians)
    RESULTS[key] = medians


def test_recovery_cost_synthetic_llama_d1024(benchmark: Any) -> None:
    model = synthetic_llama(1024, 4, 2816)
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 32000, (4, 256), generator=gen)} for _ in range(4)]
    _cost_case(benchmark, "synthetic Llama d=1024", model, batches)


def test_recovery_cost_stories260k(benchmark: Any) -> None:
    model = stories260k()
    torch.manual_seed(0)
    bos = torch.ones(64, 1, dtype=torch.long)
    with torch.no_grad():
        ids = model.generate(
            bos, attention_mask=torch.ones_like(bos), do_sample=True, top_k=0,
            max_new_tokens=255, min_new_tokens=255, pad_token_id=2,
        )  # fmt: skip
    batches = [{"input_ids": ids[i : i + 16]} for i in range(0, 64, 16)]
    _cost_case(benchmark, "stories260K d=64", model, batches)


SEQUENTIAL_DROPS = {1: [5], 2: [2, 6], 4: [1, 4, 7, 10]}


@pytest.mark.parametrize("capture", ["hooks", "layerwise"])
def test_sequential_cost_whatever_k(benchmark: Any, capture: str) -> None:
    model = synthetic_llama(512, 12, 1408)
    gen = torch.Generator().manual_seed(3)
    batches = [{"input_ids": torch.randint(0, 32000, (4, 256), generator=gen)} for _ in range(2)]

    def forward() -> None:
        with torch.inference_mode():
            for batch in batches:
                model(**batch, use_cache=False)

    def sequential(drop: list[int]) -> Callable[[], None]:
        def run() -> None:
            recover(model, drop, batches, method="ghost", order="sequential", capture=capture, progress=False)

        return run

    runs: dict[str, Callable[[], Any]] = {"forward": forward}
    runs.update({f"k={k}": sequential(drop) for k, drop in SEQUENTIAL_DROPS.items()})
    forward()  # warm-up
    medians: dict[str, float] = {}
    benchmark.pedantic(lambda: medians.update(_interleaved(runs, COST_ROUNDS)), rounds=1, iterations=1)
    for k in SEQUENTIAL_DROPS:
        medians[f"ratio k={k}"] = medians[f"k={k}"] / medians["forward"]
    benchmark.extra_info.update(medians)
    RESULTS[f"sequential, {capture} engine, d=512"] = medians


def test_prefill_latency_overhead(benchmark: Any) -> None:
    model = synthetic_llama(2048, 8, 5632)
    dense = list(model.model.layers)
    remove_layers(model, [3, 4])
    pruned = list(model.model.layers)
    d = model.config.hidden_size
    delta = 0.01 * torch.randn(d, d, generator=torch.Generator().manual_seed(0))
    insert_ghost(model, 3, GhostOperator(delta))
    ghosted = list(model.model.layers)
    ids = torch.randint(0, 32000, (1, 128), generator=torch.Generator().manual_seed(2))

    def prefill(layers: list[nn.Module]) -> Callable[[], None]:
        def run() -> None:
            model.model.layers = nn.ModuleList(layers)
            model.config.num_hidden_layers = len(layers)
            with torch.inference_mode():
                model(input_ids=ids, use_cache=False)

        return run

    runs = {"dense": prefill(dense), "pruned": prefill(pruned), "ghost": prefill(ghosted)}
    for run in runs.values():  # warm-up
        run()
    medians: dict[str, float] = {}
    benchmark.pedantic(lambda: medians.update(_interleaved(runs, ROUNDS)), rounds=1, iterations=1)
    medians["overhead"] = medians["ghost"] / medians["pruned"] - 1.0
    medians["rounds"] = float(ROUNDS)
    benchmark.extra_info.update(medians)
    RESULTS["prefill d=2048 seq=128"] = medians


def report() -> str:
    lines = []
    for key, r in RESULTS.items():
        if "ratio k=1" in r:
            ratios = ", ".join(f"k={k} {r[f'ratio k={k}']:.2f}" for k in SEQUENTIAL_DROPS)
            lines.append(
                f"{key}: plain forward {r['forward']:.3f} s; recover(ghost, sequential) / forward: {ratios} "
                "(target <= 2 for every k)"
            )
        elif "ratio" in r:
            lines.append(
                f"{key}: {r['tokens']:.0f} tokens, plain forward {r['forward']:.3f} s, recover(ghost) "
                f"{r['recover']:.3f} s -> ratio {r['ratio']:.2f} (target <= 1.3); recover_all({len(METHODS)} "
                f"methods) {r['recover_all']:.3f} s -> ratio {r['ratio_all']:.2f}"
            )
        else:
            lines.append(
                f"{key}: medians of {r['rounds']:.0f} interleaved runs: dense {1e3 * r['dense']:.1f} ms, "
                f"pruned {1e3 * r['pruned']:.1f} ms, ghost {1e3 * r['ghost']:.1f} ms -> ghost overhead "
                f"{100 * r['overhead']:+.2f}% over pruned (target <= 3%)"
            )
    return "\n".join(lines)


def test_zz_report() -> None:
    print("\n" + report())
