"""Hadamard matrices: Paley constructions, Kronecker products, the fast transform, refusals."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ghostsolve import GhostsolveError
from ghostsolve.hadamard import (
    apply_hadamard,
    hadamard_factors,
    hadamard_matrix,
    hadamard_supported,
    paley_hadamard,
)

SUPPORTED = [1, 2, 4, 8, 12, 20, 24, 28, 36, 40, 48, 56, 80, 96, 128, 640, 896, 1152]


@pytest.mark.parametrize("order", [12, 20, 28, 36, 44, 60])
def test_paley_is_hadamard(order: int) -> None:
    H = paley_hadamard(order)
    assert set(H.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(H @ H.T, order * torch.eye(order, dtype=torch.float64))


@pytest.mark.parametrize("d", SUPPORTED)
def test_normalized_and_orthogonal(d: int) -> None:
    H = hadamard_matrix(d)
    assert torch.allclose(H @ H.T, torch.eye(d, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(H.abs(), torch.full((d, d), d**-0.5, dtype=torch.float64))


def test_power_of_two_is_walsh_hadamard() -> None:
    H = (hadamard_matrix(4) * 2).round()
    expected = torch.tensor(
        [[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float64
    )
    assert torch.equal(H, expected)
    assert hadamard_factors(1024) is not None and all(f in (16, 32, 64) for f in hadamard_factors(1024) or ())


@given(d=st.sampled_from(SUPPORTED), lead=st.integers(1, 3), seed=st.integers(0, 1000))
def test_fast_transform_equals_matrix(d: int, lead: int, seed: int) -> None:
    x = torch.randn(lead, 3, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x0 = x.clone()
    assert torch.allclose(apply_hadamard(x), x @ hadamard_matrix(d), atol=1e-12)
    assert torch.equal(x, x0)


@pytest.mark.parametrize("d", [3, 14, 22, 26, 52, 100])
def test_unsupported_sizes_are_refused(d: int) -> None:
    assert not hadamard_supported(d)
    with pytest.raises(
        GhostsolveError, match=rf"d={d} has no supported Hadamard matrix.*Nearest supported sizes"
    ):
        hadamard_matrix(d)
    with pytest.raises(GhostsolveError, match="Use family='diagonal' or 'symmetric' instead"):
        apply_hadamard(torch.zeros(2, d))


def test_paley_refuses_other_orders() -> None:
    with pytest.raises(GhostsolveError, match="no Paley construction of order 16"):
        paley_hadamard(16)
