"""Invariances of the full operator: scaling of the data and orthogonal changes of basis."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given
from hypothesis import strategies as st

import ghostsolve

from ._problems import Case, cases, eps


def _tol(case: Case) -> float:
    return 1e3 * case.d * eps(torch.float64) * case.cond_x**2


@given(
    case=cases(max_d=16, allow_wide=False, conds=(1.0, 1e2, 1e4)), c=st.sampled_from([1e-3, 0.5, 7.0, 1e3])
)
def test_scaling_x_and_y_leaves_w_unchanged(case: Case, c: float) -> None:
    for family in ("full", "symmetric", "diagonal", "scalar", "scalar-magnitude", "diagonal-magnitude"):
        W1 = ghostsolve.fit(case.X, case.Y, family=family).weight
        W2 = ghostsolve.fit(c * case.X, c * case.Y, family=family).weight
        assert torch.allclose(W1, W2, atol=_tol(case) * float(W1.abs().max())), family
    # the relative ridge makes ridge fits scale-invariant too
    R1 = ghostsolve.fit(case.X, case.Y, ridge=1e-3).weight
    R2 = ghostsolve.fit(c * case.X, c * case.Y, ridge=1e-3).weight
    assert torch.allclose(R1, R2, atol=_tol(case) * float(R1.abs().max()))


@given(case=cases(max_d=16, allow_wide=False, conds=(1.0, 1e2, 1e4)), seed=st.integers(0, 2**31 - 1))
def test_orthogonal_change_of_basis(case: Case, seed: int) -> None:
    """fit(XQ, YQ) = Qᵀ W Q for orthogonal Q (full and the other rotation-equivariant families)."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(case.d, case.d, generator=g, dtype=torch.float64)).Q
    for family, kw in (("full", {}), ("symmetric", {}), ("scalar", {}), ("lowrank", {"rank": case.d // 2})):
        W = ghostsolve.fit(case.X, case.Y, family=family, **kw).weight
        WQ = ghostsolve.fit(case.X @ Q, case.Y @ Q, family=family, **kw).weight
        np.testing.assert_allclose(WQ.numpy(), (Q.T @ W @ Q).numpy(), atol=_tol(case) * float(W.abs().max()))
