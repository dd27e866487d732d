"""CUDA paths of the core (skipped without a GPU): chunks on the GPU, statistics on either device."""

from __future__ import annotations

import pytest
import torch

import ghostsolve

from ._problems import make_case

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("stats_device", ["cpu", "cuda"])
@pytest.mark.parametrize("qr", [False, True])
def test_cuda_chunks_match_cpu(stats_device: str, qr: bool) -> None:
    case = make_case(0, 300, 24, 10.0)
    ref = ghostsolve.Stats(24, qr=qr).update(case.X, case.Y)
    gpu = ghostsolve.Stats(24, device=stats_device, qr=qr)
    mask = torch.ones(300, device="cuda")
    gpu.update(
        case.X.cuda().to(torch.bfloat16).float(), case.Y.cuda().to(torch.bfloat16).float(), weights=mask
    )
    cpu_of_bf16 = ghostsolve.Stats(24, qr=qr).update(
        case.X.to(torch.bfloat16).float(), case.Y.to(torch.bfloat16).float()
    )
    for name, t in cpu_of_bf16.tensors().items():
        # products are fp64 on both devices; magnitude sums are per-chunk fp32 reductions (order differs)
        rtol = 1e-6 if "abs" in name else 1e-10
        got = gpu.tensors()[name].cpu()
        assert torch.allclose(got, t, rtol=rtol, atol=rtol * float(t.abs().max())), name
    f = ghostsolve.fit(gpu)
    g = ghostsolve.fit(cpu_of_bf16)
    assert torch.allclose(f.delta.cpu(), g.delta, atol=1e-8)
    assert ref.n_rows == gpu.n_rows
    h = case.X[:8].cuda().to(torch.bfloat16)
    out = f(h)
    assert out.device.type == "cuda" and out.dtype == torch.bfloat16


def test_fit_on_cuda_tensors() -> None:
    case = make_case(1, 400, 16, 1e3)
    f = ghostsolve.fit(case.X.cuda(), case.Y.cuda())
    g = ghostsolve.fit(case.X, case.Y)
    assert torch.allclose(f.delta.cpu(), g.delta, atol=1e-8 * float(g.delta.abs().max()))
    for family in ghostsolve.FAMILIES:
        kw = {"rank": 4} if family == "lowrank" else {}
        assert torch.isfinite(ghostsolve.fit(case.X.cuda(), case.Y.cuda(), family=family, **kw).delta).all()
