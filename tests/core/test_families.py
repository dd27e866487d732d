"""The family hierarchy: full is the optimum, each family is exact in its subspace, lowrank is monotone."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ghostsolve
from ghostsolve.hadamard import hadamard_matrix

from ._problems import Case, cases, eps, lstsq_delta, make_case, objective

LEAST_SQUARES = ("identity", "scalar", "diagonal", "hadamard", "symmetric", "full")
# (larger, smaller): the first family's subspace contains the second's, so its objective is lower.
NESTED = [
    ("scalar", "identity"),
    ("diagonal", "scalar"),
    ("symmetric", "diagonal"),
    ("hadamard", "scalar"),
    ("symmetric", "hadamard"),
    ("full", "symmetric"),
]


def _fam_kwargs(family: str, d: int) -> dict:
    return {"rank": max(1, d // 2)} if family == "lowrank" else {}


def _hadamard_d(case: Case) -> bool:
    return case.d in (1, 2, 4, 8, 12, 16, 20, 24)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@given(case=cases(max_d=24))
def test_full_is_lowest_objective(case: Case, dtype: torch.dtype) -> None:
    """objective(full) ≤ objective(f) for every family, up to full's own dtype-scaled error."""
    full = ghostsolve.fit(case.X, case.Y, dtype=dtype)
    m_full = full.delta.double().numpy()
    m_ref = lstsq_delta(case.X, case.Y)
    D2 = objective(case.X, case.Y, np.zeros((case.d, case.d)))
    # ‖X(M − M*)‖² is what full may lose to the true optimum; cap the allowance at the whole ‖D‖².
    slack = D2 * min(1.0, case.bound(dtype, m_ref) ** 2) + 1e-12 * D2
    obj_full = objective(case.X, case.Y, m_full)
    for family in ghostsolve.FAMILIES:
        if family.startswith("hadamard") and not _hadamard_d(case):
            continue
        f = ghostsolve.fit(case.X, case.Y, family=family, dtype=dtype, **_fam_kwargs(family, case.d))
        assert obj_full <= objective(case.X, case.Y, f.delta) + slack, family


@given(case=cases(max_d=20, allow_wide=False, conds=(1.0, 1e2, 1e4)))
def test_nested_families_are_ordered(case: Case) -> None:
    """identity ⊇... : a family containing another never has a larger objective (float64)."""
    objs = {}
    for family in LEAST_SQUARES:
        if family == "hadamard" and not _hadamard_d(case):
            continue
        objs[family] = objective(case.X, case.Y, ghostsolve.fit(case.X, case.Y, family=family).delta)
    D2 = objs["identity"]
    for big, small in NESTED:
        if big in objs and small in objs:
            assert objs[big] <= objs[small] * (1 + 1e-9) + 1e-12 * D2, (big, small)


def _orthogonal_noise(X: torch.Tensor, seed: int, size: float) -> torch.Tensor:
    """Noise orthogonal to the columns of X: it does not move the least-squares optimum."""
    g = torch.Generator().manual_seed(seed)
    N = torch.randn(X.shape, generator=g, dtype=torch.float64)
    Q = torch.linalg.qr(X).Q
    N = N - Q @ (Q.T @ N)
    return size * N / N.norm() * X.norm()


def _subspace_member(family: str, d: int, g: torch.Generator) -> torch.Tensor:
    r = torch.randn(d, d, generator=g, dtype=torch.float64) / d
    if family == "scalar":
        return 0.3 * torch.eye(d, dtype=torch.float64)
    if family == "diagonal":
        return torch.diag(torch.randn(d, generator=g, dtype=torch.float64))
    if family == "hadamard":
        H = hadamard_matrix(d)
        return (H * torch.randn(d, generator=g, dtype=torch.float64)) @ H.T
    if family == "symmetric":
        return r + r.T
    if family == "lowrank":
        return (
            torch.randn(d, 2, generator=g, dtype=torch.float64)
            @ torch.randn(2, d, generator=g, dtype=torch.float64)
            / d
        )
    return r


@pytest.mark.parametrize("family", ["scalar", "diagonal", "hadamard", "symmetric", "lowrank", "full"])
@given(seed=st.integers(0, 2**31 - 1), cond=st.sampled_from([1.0, 1e3]))
def test_equality_when_optimum_lies_in_subspace(family: str, seed: int, cond: float) -> None:
    """With noise orthogonal to X, the unconstrained optimum is M_f ∈ family: both objectives agree."""
    d, n = 16, 120
    case = make_case(
        seed, n, d, cond, noise=0.0, M=_subspace_member(family, d, torch.Generator().manual_seed(seed))
    )
    Y = case.Y + _orthogonal_noise(case.X, seed + 1, 0.5)
    kw = {"rank": 2} if family == "lowrank" else {}
    f = ghostsolve.fit(case.X, Y, family=family, **kw)
    full = ghostsolve.fit(case.X, Y)
    tol = 1e-9 * cond
    assert f.objective == pytest.approx(full.objective, rel=tol)
    assert torch.allclose(f.delta, full.delta, atol=tol * float(full.delta.abs().max()) + 1e-12)


@given(seed=st.integers(0, 2**31 - 1), scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_magnitude_rules_recover_exact_scalings(seed: int, scale: float) -> None:
    """Prune&Comp, LinearPatch-D and -R are exact when Y is a positive scaling of X in their basis."""
    g = torch.Generator().manual_seed(seed)
    d = 16
    X = scale * torch.randn(200, d, generator=g, dtype=torch.float64)
    a = 0.5 + torch.rand(d, generator=g, dtype=torch.float64)
    H = hadamard_matrix(d)
    truth = {
        "scalar-magnitude": 1.7 * torch.eye(d, dtype=torch.float64),
        "diagonal-magnitude": torch.diag(a),
        "hadamard-magnitude": (H * a) @ H.T,
    }
    for family, W in truth.items():
        f = ghostsolve.fit(X, X @ W, family=family)
        assert torch.allclose(f.weight, W, atol=1e-10), family


@given(case=cases(max_d=16, allow_wide=False, conds=(1.0, 1e2)))
def test_magnitude_rules_follow_published_formulas(case: Case) -> None:
    """α = mean|Y|/mean|X| (overall, per channel, per rotated channel), computed independently in numpy."""
    Xn, Yn = case.X.numpy(), case.Y.numpy()
    alpha = np.abs(Yn).mean() / np.abs(Xn).mean()
    f = ghostsolve.fit(case.X, case.Y, family="scalar-magnitude")
    np.testing.assert_allclose(f.weight.numpy(), alpha * np.eye(case.d), rtol=1e-12, atol=1e-14)
    per = np.abs(Yn).mean(0) / np.abs(Xn).mean(0)
    f = ghostsolve.fit(case.X, case.Y, family="diagonal-magnitude")
    np.testing.assert_allclose(np.diag(f.weight.numpy()), per, rtol=1e-12)
    if case.d in (2, 4, 8, 12, 16):
        H = hadamard_matrix(case.d).numpy()
        rot = np.abs(Yn @ H).mean(0) / np.abs(Xn @ H).mean(0)
        f = ghostsolve.fit(case.X, case.Y, family="hadamard-magnitude")
        np.testing.assert_allclose(f.weight.numpy(), (H * rot) @ H.T, rtol=1e-10, atol=1e-12)
        # the least-squares member of the same subspace is never worse than the magnitude rule
        ls = ghostsolve.fit(case.X, case.Y, family="hadamard")
        assert ls.objective <= f.objective * (1 + 1e-12)


@given(case=cases(max_d=16, allow_wide=False, conds=(1.0, 1e3)))
def test_lowrank_monotone_and_equal_to_full_at_d(case: Case) -> None:
    objs = [
        objective(case.X, case.Y, ghostsolve.fit(case.X, case.Y, family="lowrank", rank=r).delta)
        for r in range(case.d + 1)
    ]
    D2 = objs[0]
    for a, b in itertools.pairwise(objs):
        assert b <= a + 1e-10 * D2
    full = ghostsolve.fit(case.X, case.Y)
    at_d = ghostsolve.fit(case.X, case.Y, family="lowrank", rank=case.d)
    assert at_d.objective == pytest.approx(full.objective, rel=1e-9, abs=1e-12 * D2)
    assert torch.allclose(at_d.delta, full.delta, atol=1e-8 * float(full.delta.abs().max()) + 1e-14)
    assert objs[0] == pytest.approx(objective(case.X, case.Y, np.zeros((case.d, case.d))))


@given(case=cases(max_d=12, allow_wide=False, conds=(1.0, 1e2)), data=st.data())
def test_lowrank_is_the_reduced_rank_regression_optimum(case: Case, data: st.DataObject) -> None:
    """Independent reference: with Δ = Y − X and M_full the least-squares solution, the rank-r optimum of
    ‖X M − Δ‖² is M_full V_r V_rᵀ, V_r the top-r right singular vectors of the fitted values X M_full."""
    r = data.draw(st.integers(1, case.d))
    Xn, Dn = case.X.numpy(), (case.Y - case.X).numpy()
    M_full = np.linalg.lstsq(Xn, Dn, rcond=None)[0]
    V = np.linalg.svd(Xn @ M_full)[2].T[:, :r]
    reference = M_full @ V @ V.T
    got = ghostsolve.fit(case.X, case.Y, family="lowrank", rank=r)
    ref_obj = objective(case.X, case.Y, reference)
    assert got.objective == pytest.approx(ref_obj, rel=1e-8, abs=1e-12 * float((Dn**2).sum()))
    assert np.linalg.matrix_rank(got.delta.numpy(), tol=1e-9 * float(np.abs(M_full).max())) <= r


@given(seed=st.integers(0, 2**31 - 1))
def test_symmetric_cannot_reach_a_skew_optimum(seed: int) -> None:
    """A skew part in the optimal M is out of reach of every symmetric operator (docs/theory.md)."""
    g = torch.Generator().manual_seed(seed)
    d = 12
    A = torch.randn(d, d, generator=g, dtype=torch.float64)
    case = make_case(seed, 200, d, 1.0, noise=0.01, M=0.3 * (A - A.T) / d**0.5)
    full = ghostsolve.fit(case.X, case.Y)
    sym = ghostsolve.fit(case.X, case.Y, family="symmetric")
    assert full.diagnostics.skew_share > 0.5
    assert sym.diagnostics.skew_share < 1e-12
    assert sym.objective > 2 * full.objective


@given(case=cases(max_d=16, allow_wide=False, conds=(1.0, 1e3)))
def test_symmetric_solves_its_lyapunov_equation(case: Case) -> None:
    """G S + S G = B + Bᵀ with G = XᵀX, B = Xᵀ(Y − X), checked in numpy."""
    S = ghostsolve.fit(case.X, case.Y, family="symmetric").delta.numpy()
    Xn, Yn = case.X.numpy(), case.Y.numpy()
    G, B = Xn.T @ Xn, Xn.T @ (Yn - Xn)
    lhs = G @ S + S @ G
    assert np.allclose(S, S.T)
    assert np.linalg.norm(lhs - (B + B.T)) <= 1e3 * case.d * eps(
        torch.float64
    ) * case.cond_x**2 * np.linalg.norm(B + B.T)


def test_symmetric_with_ridge_matches_shifted_lyapunov() -> None:
    case = make_case(3, 100, 10, 1e2)
    ridge = 0.1
    S = ghostsolve.fit(case.X, case.Y, family="symmetric", ridge=ridge).delta.numpy()
    Xn, Yn = case.X.numpy(), case.Y.numpy()
    G, B = Xn.T @ Xn, Xn.T @ (Yn - Xn)
    A = G + ridge * np.trace(G) / 10 * np.eye(10)
    np.testing.assert_allclose(A @ S + S @ A, B + B.T, atol=1e-9 * np.abs(B).max())


def test_closed_forms_with_ridge() -> None:
    """scalar m = tr B / (tr G + dλ); diagonal m_c = B_cc / (G_cc + λ)."""
    case = make_case(5, 300, 8, 1e2)
    Xn, Yn = case.X.numpy(), case.Y.numpy()
    G, B = Xn.T @ Xn, Xn.T @ (Yn - Xn)
    lam = 0.05 * np.trace(G) / 8
    s = ghostsolve.fit(case.X, case.Y, family="scalar", ridge=0.05)
    np.testing.assert_allclose(s.delta.numpy(), np.trace(B) / (np.trace(G) + 8 * lam) * np.eye(8), rtol=1e-12)
    dg = ghostsolve.fit(case.X, case.Y, family="diagonal", ridge=0.05)
    np.testing.assert_allclose(np.diag(dg.delta.numpy()), np.diag(B) / (np.diag(G) + lam), rtol=1e-12)
    assert s.lam == pytest.approx(lam)
