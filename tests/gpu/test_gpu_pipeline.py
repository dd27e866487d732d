"""CUDA checks of the scale-out paths (marked ``gpu``; skipped where no CUDA device is present).

Run on a CUDA machine with ``python -m pytest tests/scale/test_gpu.py -m gpu -q``; the prefill-latency
benchmark of pruned versus pruned-plus-ghost is ``python benchmarks/bench_gpu_latency.py``.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import pytest
import torch

import ghostsolve
from ghostsolve.pipeline.capture import capture_stats, capture_stats_layerwise
from ghostsolve.pipeline.model.surgery import GhostOperator
from tests.model_factories import random_batches, tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none is visible)"),
]

# Big enough for real GEMM kernels, small enough to build in a second.
SIZE: dict[str, Any] = {"num_layers": 6, "hidden_size": 256}
DROP = [2, 3]
INTERVALS = [(2, 4), (5, 6)]


def _batches() -> list[dict[str, torch.Tensor]]:
    return random_batches(n_batches=4, batch_size=4, seq_len=64, seed=1, pad=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _assert_close_stats(got: dict, expected: dict, rtol: float) -> None:
    assert list(got) == list(expected)
    for interval, stats in expected.items():
        assert got[interval].n_rows == stats.n_rows > 0
        for name, tensor in stats.tensors().items():
            other = got[interval].tensors()[name].to(tensor.device)
            assert _rel(other, tensor) <= rtol, (interval, name, _rel(other, tensor))


def test_bf16_capture_fit_and_insertion_on_cuda() -> None:
    from ghostsolve.pipeline.recover import recover

    model = tiny_model("llama", dtype=torch.bfloat16, **SIZE).cuda()
    batches = _batches()
    stats = capture_stats(model, batches, INTERVALS, progress=False)
    for interval, s in stats.items():
        assert s.device.type == "cuda" and s.dtype == torch.float64, interval  # fp64 on the device
        fitted = ghostsolve.fit(s, family="full")
        assert fitted.weight.device.type == "cuda" and fitted.weight.dtype == torch.float64
        assert fitted.relative_residual < 1.0  # better than plain pruning on the calibration tokens

    rec = recover(model, DROP, batches, method="ghost", progress=False)
    ghosts = [m for m in rec.model.modules() if isinstance(m, GhostOperator)]
    assert len(ghosts) == 1 and ghosts[0].delta.device.type == "cuda"
    assert all(r < 1.0 for r in rec.relative_residuals.values())
    ids = batches[0]["input_ids"][:1].cuda()
    with torch.no_grad():
        logits = rec.model(ids).logits
        assert logits.dtype == torch.bfloat16 and bool(torch.isfinite(logits).all())
        generated = rec.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 8)
    # Running the correction in fp32 inside a bf16 model is an option; it must also stay finite.
    rec32 = recover(model, DROP, batches, method="ghost", compute_dtype=torch.float32, progress=False)
    with torch.no_grad():
        assert bool(torch.isfinite(rec32.model(ids).logits).all())


def test_fp32_capture_on_cuda_matches_cpu() -> None:
    model = tiny_model("qwen3", **SIZE)
    batches = _batches()
    on_cpu = capture_stats(model, batches, INTERVALS, progress=False)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # compare fp32 with fp32, not TF32
    try:
        on_gpu = capture_stats(model.cuda(), batches, INTERVALS, progress=False)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous
    _assert_close_stats(on_gpu, on_cpu, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_layerwise_onloads_one_layer_at_a_time(dtype: torch.dtype) -> None:
    model = tiny_model("olmo3", dtype=dtype, **SIZE)  # stays on the CPU
    batches = _batches()
    on_device: list[int] = []

    def watch(index: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
            on_device.append(sum(p.is_cuda for layer in model.model.layers for p in layer.parameters()))
            assert next(module.parameters()).is_cuda, f"layer {index} runs on the CPU"
            assert args[0].is_cuda

        return hook

    # On the MLP, which only runs when the layer really runs (not while its arguments are recorded).
    handles = [
        layer.mlp.register_forward_pre_hook(watch(i), with_kwargs=True)
        for i, layer in enumerate(model.model.layers)
    ]
    try:
        got = capture_stats_layerwise(model, batches, INTERVALS, device="cuda", progress=False)
    finally:
        for handle in handles:
            handle.remove()
    per_layer = sum(1 for _ in model.model.layers[0].parameters())
    assert on_device and max(on_device) == per_layer  # never more than one layer on the GPU
    assert all(p.device.type == "cpu" for p in model.parameters())  # everything back on the CPU
    assert all(s.device.type == "cuda" for s in got.values())
    expected = capture_stats(model.cuda(), batches, INTERVALS, progress=False)
    # Same kernels on the same inputs; the tolerance only absorbs a different summation order.
    _assert_close_stats(got, expected, rtol=1e-10)


def test_device_map_auto_split_over_gpu_and_cpu(tmp_path: Path) -> None:
    import transformers

    dense = tiny_model("llama", **SIZE)
    dense.save_pretrained(tmp_path)
    batches = _batches()
    expected = capture_stats(dense.cuda(), batches, INTERVALS, progress=False)
    layer_bytes = sum(p.numel() * 4 for p in dense.model.layers[0].parameters())
    # Room for the embeddings and about two layers on the GPU: the rest goes to the CPU.
    budget = sum(p.numel() * 4 for p in dense.model.embed_tokens.parameters()) + 2 * layer_bytes
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, device_map="auto", max_memory={0: budget, "cpu": 10**10}
    )
    placed = set(model.hf_device_map.values())
    assert "cpu" in placed and (0 in placed or "cuda:0" in placed), model.hf_device_map
    got = capture_stats(model, batches, INTERVALS, progress=False)
    _assert_close_stats(got, expected, rtol=1e-4)
    layerwise = capture_stats_layerwise(model, batches, INTERVALS, device="cuda", progress=False)
    _assert_close_stats(layerwise, expected, rtol=1e-4)


def test_nccl_group_binds_the_local_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    from ghostsolve.pipeline.distributed import all_reduce_stats, distributed

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    with distributed() as ctx:
        assert ctx.backend == "nccl" and ctx.device == torch.device("cuda", 0)
        assert torch.cuda.current_device() == 0
        stats = {(0, 1): ghostsolve.Stats(8).update(torch.randn(20, 8), torch.randn(20, 8))}
        assert all_reduce_stats(stats) is stats
