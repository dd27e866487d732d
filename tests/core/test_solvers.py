"""Solvers against an independent numpy reference, their precision, fallbacks and the auto rule."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ghostsolve
from ghostsolve.errors import GhostsolveError, IllConditionedWarning
from ghostsolve.solvers import choose_solver, kappa_safe

from ._problems import Case, cases, eps, lstsq_delta, make_case, objective

DTYPES = [torch.float64, torch.float32]
SOLVERS = [s for s in ghostsolve.SOLVERS]


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32"])
@given(case=cases(max_d=20))
def test_full_matches_numpy_lstsq(case: Case, dtype: torch.dtype) -> None:
    """‖X(M − M_ref)‖/‖Y − X‖ within the eps·cond bound, for every solver that accepts the data."""
    m_ref = lstsq_delta(case.X, case.Y)
    D = math.sqrt(objective(case.X, case.Y, np.zeros((case.d, case.d))))
    bound = case.bound(dtype, m_ref)
    for solver in SOLVERS:
        if case.n < case.d and solver in ("cholesky", "qr"):
            with pytest.raises(GhostsolveError, match="solver='svd'"):
                ghostsolve.fit(case.X, case.Y, solver=solver, dtype=dtype)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", IllConditionedWarning)
            f = ghostsolve.fit(case.X, case.Y, solver=solver, dtype=dtype)
        M = f.delta.double().numpy()
        assert np.isfinite(M).all(), solver
        if bound < 1:
            err = np.linalg.norm(case.X.numpy() @ (M - m_ref)) / D
            assert err <= bound, (solver, f.solver, err, bound)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp64", "fp32"])
@given(case=cases(max_d=20, allow_wide=False))
def test_normal_equation_residual_at_machine_precision(case: Case, dtype: torch.dtype) -> None:
    """‖(XᵀX)M − Xᵀ(Y−X)‖ is at the backward-error level c·eps·‖XᵀX‖‖M‖ of the dtype (default solver)."""
    f = ghostsolve.fit(case.X, case.Y, dtype=dtype)
    M = f.delta.double().numpy()
    Xn, Yn = case.X.numpy(), case.Y.numpy()
    G, C = Xn.T @ Xn, Xn.T @ Yn
    c = 50 * max(case.d, math.sqrt(case.n)) * eps(dtype)
    level = c * (np.linalg.norm(G, 2) * np.linalg.norm(M) + np.linalg.norm(C - G)) / np.linalg.norm(C)
    if f.solver == "svd":  # truncated directions leave their share of the right-hand side
        level += 10 * case.d * eps(dtype) * case.cond_x
    assert f.diagnostics.normal_equation_residual <= level


@given(seed=st.integers(0, 2**31 - 1), noise=st.sampled_from([1e-4, 1e-3]))
def test_fp32_qr_agrees_where_fp32_cholesky_fails(seed: int, noise: float) -> None:
    """cond(X) = 1e5: XᵀX (1e10) is far beyond float32 (1/eps32 ≈ 8e6), X itself is not.

    The rows are made exactly representable in float32, so the gap measures the solvers, not input
    rounding; fit(X, Y) accumulates exact float64 statistics, so the gap is the float32 solve's alone.
    (Outlier channels alone are a diagonal scaling that Cholesky tolerates; they push
    cond(X) past what any float32 method resolves when added on top of a spread spectrum.)
    """
    case = make_case(seed, 600, 12, 1e5, noise=noise)
    X, Y = case.X.float(), case.Y.float()
    ref = objective(X, Y, lstsq_delta(X, Y))
    gap = {}
    for solver in ("qr", "cholesky"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", IllConditionedWarning)
            f = ghostsolve.fit(X, Y, solver=solver, dtype=torch.float32)
        gap[solver] = (objective(X, Y, f.delta) - ref) / ref
    assert gap["qr"] < 1e-4
    assert gap["cholesky"] > 1e-3 and gap["cholesky"] > 1e3 * gap["qr"]


def test_cholesky_failure_falls_back_and_says_so() -> None:
    case = make_case(1, 100, 8)
    X = case.X.clone()
    X[:, 3] = 0.0  # XᵀX exactly singular: the factorization must fail
    f = ghostsolve.fit(X, case.Y, solver="cholesky")
    assert f.solver == "cholesky→qr" or f.solver.startswith("cholesky→")
    assert any("cholesky failed" in n for n in f.diagnostics.notes)
    np.testing.assert_allclose(f.delta.numpy(), lstsq_delta(X, case.Y), atol=1e-8)
    g = ghostsolve.fit(ghostsolve.Stats(8).update(X, case.Y), solver="cholesky")
    assert g.solver == "cholesky→svd" and "fell back to svd" in g.diagnostics.notes[0]


def test_cholesky_warns_when_fp32_is_unsafe() -> None:
    case = make_case(2, 400, 10, 3e2, noise=1e-3)  # cond(XᵀX) ≈ 1e5 > 8.4e3, factorization still succeeds
    with pytest.warns(IllConditionedWarning, match="cond ≈ .* use solver='qr'"):
        ghostsolve.fit(case.X.float(), case.Y.float(), solver="cholesky", dtype=torch.float32)


@given(
    case=cases(max_d=16, allow_wide=False, conds=(1.0, 1e2, 1e4)), ridge=st.sampled_from([1e-6, 1e-3, 0.1])
)
def test_ridge_solution_all_solvers(case: Case, ridge: float) -> None:
    """(XᵀX + λI) M = Xᵀ(Y − X) with λ = ridge · mean(diag XᵀX), for every solver."""
    Xn, Yn = case.X.numpy(), case.Y.numpy()
    G = Xn.T @ Xn
    lam = ridge * np.trace(G) / case.d
    ref = np.linalg.solve(G + lam * np.eye(case.d), Xn.T @ (Yn - Xn))
    for solver in ghostsolve.SOLVERS:
        f = ghostsolve.fit(case.X, case.Y, solver=solver, ridge=ridge)
        kappa = np.linalg.cond(G + lam * np.eye(case.d))
        np.testing.assert_allclose(
            f.delta.numpy(), ref, atol=1e3 * eps(torch.float64) * kappa * np.abs(ref).max()
        )
        assert f.lam == pytest.approx(lam)


def test_ridge_allows_fewer_rows_than_d() -> None:
    case = make_case(4, 5, 12)
    f = ghostsolve.fit(case.X, case.Y, solver="cholesky", ridge=1e-3)
    assert f.solver == "cholesky" and torch.isfinite(f.delta).all()


@given(case=cases(max_d=16, allow_wide=False, conds=(1.0, 1e3)))
def test_ridge_path_matches_separate_fits(case: Case) -> None:
    ridges = [0.0, 1e-4, 1e-2, 1.0]
    path = ghostsolve.ridge_path(case.X, case.Y, ridges=ridges)
    G = case.X.numpy().T @ case.X.numpy()
    for r, f in zip(ridges, path, strict=True):
        g = ghostsolve.fit(case.X, case.Y, solver="cholesky", ridge=r)
        assert f.solver == "eigh" and f.ridge == r
        kappa = np.linalg.cond(G + f.lam * np.eye(case.d))
        tol = 1e3 * eps(torch.float64) * kappa * float(g.delta.abs().max())
        assert torch.allclose(f.delta, g.delta, atol=tol)
    objs = [f.objective for f in path]
    assert objs == sorted(objs) or all(b >= a * (1 - 1e-12) for a, b in itertools.pairwise(objs))


@given(case=cases(max_d=16))
def test_svd_is_minimum_norm_for_rank_deficient_rows(case: Case) -> None:
    if case.n >= case.d or case.cond_x > 1e6:
        return
    m_ref = lstsq_delta(case.X, case.Y)
    f = ghostsolve.fit(case.X, case.Y, solver="svd")
    tol = 1e3 * case.d * eps(torch.float64) * case.cond_x
    assert np.linalg.norm(f.delta.numpy() - m_ref) <= tol * np.linalg.norm(m_ref) + 1e-12


def _stats(case: Case, **kw: object) -> ghostsolve.Stats:
    return ghostsolve.Stats(case.d, **kw).update(case.X, case.Y)  # type: ignore[arg-type]


def test_auto_decision_list() -> None:
    wide = make_case(0, 4, 10)
    assert choose_solver(_stats(wide)).solver == "svd"
    assert "fewer rows" in choose_solver(_stats(wide)).reason
    assert choose_solver(_stats(wide), ridge=1e-3).solver == "cholesky"
    good = make_case(0, 200, 10, 10.0)
    assert choose_solver(_stats(good)).solver == "cholesky"
    assert choose_solver(_stats(good), dtype=torch.float32).solver == "cholesky"
    mid = make_case(0, 200, 10, 1e4)  # cond(XᵀX) = 1e8: fine in float64, not in float32
    assert choose_solver(_stats(mid)).solver == "cholesky"
    assert choose_solver(_stats(mid), dtype=torch.float32).solver == "svd"
    assert choose_solver(_stats(mid, qr=True), dtype=torch.float32).solver == "svd"
    mild = make_case(0, 200, 10, 3e2)  # cond(XᵀX) ≈ 1e5: cholesky unsafe in float32, qr safe
    choice = choose_solver(_stats(mild, qr=True), dtype=torch.float32)
    assert choice.solver == "qr" and "cond(X)" in str(choice)
    assert choose_solver(_stats(mild), dtype=torch.float32, raw_data=True).solver == "qr"
    bad = make_case(0, 200, 10, 1e10)
    assert choose_solver(_stats(bad, qr=True)).solver == "qr"
    assert kappa_safe(torch.float32) == pytest.approx(1e-3 / 2**-23)


def test_auto_records_its_choice_and_builds_tsqr_when_needed() -> None:
    case = make_case(0, 200, 10, 3e2, noise=1e-3)
    f = ghostsolve.fit(case.X.float(), case.Y.float(), dtype=torch.float32)
    assert f.solver == "qr"
    assert f.diagnostics.notes[0].startswith("auto chose qr")


def test_qr_on_stats_needs_the_tsqr_factor() -> None:
    case = make_case(0, 50, 6)
    with pytest.raises(GhostsolveError, match=r"solver='qr' needs the TSQR factor.*Stats\(dim, qr=True\)"):
        ghostsolve.fit(_stats(case), solver="qr")
    f = ghostsolve.fit(_stats(case, qr=True), solver="qr")
    np.testing.assert_allclose(f.delta.numpy(), lstsq_delta(case.X, case.Y), atol=1e-10)


@given(seed=st.integers(0, 2**31 - 1), spread=st.sampled_from([0.0, 2.0, 5.0]))
@settings(max_examples=10, deadline=None)
def test_condition_estimate_for_large_d_is_a_safe_side_estimate(seed: int, spread: float) -> None:
    """LAPACK's 1-norm estimate: never below cond₂/3 (a usable lower side) and at most d·cond₂."""
    from ghostsolve.solvers import estimate_condition

    d = 160  # above the size at which the exact eigenvalues are used
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * d, d, generator=g, dtype=torch.float64) * torch.logspace(
        0, spread, d, dtype=torch.float64
    )
    A = X.T @ X
    e = np.linalg.eigvalsh(A.numpy())
    k2 = e[-1] / e[0]
    est = estimate_condition(A)
    assert k2 / 3 <= est <= d * k2
    choice = choose_solver(ghostsolve.Stats(d).update(X, X))
    assert choice.factor is not None and torch.allclose(choice.factor @ choice.factor.T, A, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_lapack_cholesky_agrees_with_torch(dtype: torch.dtype) -> None:
    # wide CPU systems are factored by scipy's LAPACK (the statistics' thread pool), narrow ones by torch
    from ghostsolve.solvers import _chol_solve, cholesky_lower
    from ghostsolve.stats import BLAS_MIN_DIM

    d = BLAS_MIN_DIM
    g = torch.Generator().manual_seed(3)
    Z = torch.randn(2 * d, d, generator=g, dtype=torch.float64)
    A = (Z.T @ Z).to(dtype)
    B = torch.randn(d, 5, generator=g, dtype=torch.float64).to(dtype)
    L, info = cholesky_lower(A)
    assert info == 0 and torch.equal(L, L.tril())
    ref = torch.linalg.cholesky(A)
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    assert torch.allclose(L, ref, rtol=0, atol=tol * float(ref.abs().max()))
    M = _chol_solve(L, B)
    residual = A.double() @ M.double() - B.double()
    assert float(residual.abs().max()) <= 1e3 * torch.finfo(dtype).eps * float(A.abs().max() * M.abs().max())
    bad = A.clone()
    bad[7, 7] = -1.0  # not positive definite from leading minor 8 on
    _, info_bad = cholesky_lower(bad)
    assert info_bad == int(torch.linalg.cholesky_ex(bad).info) == 8


def test_lapack_cholesky_reads_only_the_lower_triangle() -> None:
    # as torch.linalg.cholesky_ex: whatever the upper triangle holds (a stale one, between Stats
    # updates on the BLAS path) must not change the factor
    from ghostsolve.solvers import _chol_solve, cholesky_lower
    from ghostsolve.stats import BLAS_MIN_DIM

    d = BLAS_MIN_DIM
    g = torch.Generator().manual_seed(4)
    Z = torch.randn(2 * d, d, generator=g, dtype=torch.float64)
    A = Z.T @ Z
    junk = A.tril() + torch.randn(d, d, generator=g, dtype=torch.float64).triu(1)
    L, info = cholesky_lower(junk)
    ref = torch.linalg.cholesky(A)
    assert info == 0 and torch.allclose(L, ref, rtol=0, atol=1e-10 * float(ref.abs().max()))
    B = torch.randn(d, 3, generator=g, dtype=torch.float64)
    assert torch.allclose(_chol_solve(L, B), torch.linalg.solve(A, B), rtol=1e-8, atol=1e-12)


def test_objective_and_condition_accept_tensors_that_require_grad() -> None:
    from ghostsolve.fit import evaluate

    case = make_case(5, 60, 6)
    s = ghostsolve.Stats(6).update(case.X, case.Y)
    f = ghostsolve.fit(s)
    M = f.delta.clone().requires_grad_(True)
    assert evaluate(s, M, 0.0).objective == pytest.approx(f.objective, rel=1e-9)
    wide = make_case(6, 400, 150)  # above the exact-eigenvalue size: the LAPACK estimate
    A = ghostsolve.Stats(150).update(wide.X, wide.Y).xtx.clone().requires_grad_(True)
    assert math.isfinite(ghostsolve.solvers.estimate_condition(A))
