"""diagnose() and compare_precisions(): reports that say which solver and precision to use."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ghostsolve
from ghostsolve import GhostsolveError, Stats

from ._problems import make_case


def test_diagnose_well_conditioned() -> None:
    case = make_case(0, 300, 12, 10.0)
    rep = ghostsolve.diagnose(case.X)
    assert rep.condition_gram == pytest.approx(case.cond_x**2, rel=1e-6)
    assert rep.condition_x == pytest.approx(case.cond_x, rel=1e-6)
    assert rep.recommended_solver == "cholesky" and rep.recommended_dtype == torch.float32
    assert rep.effective_rank == 12 and rep.fast_mode_safe
    text = str(rep)
    assert "recommended solver  cholesky" in text and "cond(X)" in text


def test_diagnose_ill_conditioned_and_outliers() -> None:
    case = make_case(1, 300, 12, 1e3, outlier=True)
    rep = ghostsolve.diagnose(Stats(12).update(case.X, case.Y))
    assert rep.recommended_dtype == torch.float64 and not rep.fast_mode_safe
    assert rep.channel_ratio > 100 and any("outlier channels" in n for n in rep.notes)
    mid = ghostsolve.diagnose(make_case(2, 300, 12, 3e2).X)
    assert mid.recommended_dtype == torch.float32 and any("only with solver='qr'" in n for n in mid.notes)
    ridged = ghostsolve.diagnose(case.X, ridge=1.0)
    assert ridged.condition_gram < rep.condition_gram


def test_diagnose_rank_deficient() -> None:
    case = make_case(3, 5, 12)
    rep = ghostsolve.diagnose(case.X)
    assert (rep.recommended_solver == "svd" and math.isinf(rep.condition_gram)) or rep.condition_gram > 1e12
    assert rep.effective_rank == 5
    assert any("fewer rows (5) than d=12" in n for n in rep.notes)
    with pytest.raises(GhostsolveError, match="hold no rows"):
        ghostsolve.diagnose(Stats(4))
    with pytest.raises(GhostsolveError, match=r"diagnose\(stats\) takes no Y"):
        ghostsolve.diagnose(Stats(4), torch.zeros(1, 4))


def test_fit_diagnostics_values() -> None:
    case = make_case(4, 300, 10, 1e2)
    f = ghostsolve.fit(case.X, case.Y)
    d = f.diagnostics
    sv = np.linalg.svd(case.X.numpy(), compute_uv=False)
    assert d.condition_number == pytest.approx((sv[0] / sv[-1]) ** 2, rel=1e-6)
    assert d.condition_estimate == pytest.approx(d.condition_number, rel=1e-3)
    assert d.effective_rank == 10
    M = f.delta.numpy()
    assert d.skew_share == pytest.approx(np.linalg.norm(M - M.T) / (2 * np.linalg.norm(M)))
    assert d.fast_mode_safe == (d.condition_estimate <= 1e-3 / 2**-23)


def test_compare_precisions_table() -> None:
    case = make_case(5, 400, 12, 1e5, noise=1e-3)
    table = ghostsolve.compare_precisions(case.X.float(), case.Y.float())
    assert len(table.rows) == 2 * len(ghostsolve.SOLVERS)
    by = {(r.solver, r.dtype): r for r in table.rows}
    for s in ghostsolve.SOLVERS:
        assert abs(by[(s, torch.float64)].objective_gap) < 1e-6
    assert by[("qr", torch.float32)].objective_gap < 1e-4
    assert by[("cholesky", torch.float32)].objective_gap > 1e-2  # fp32 normal equations visibly fail
    text = str(table)
    assert "reference = float64 svd" in text and "cholesky" in text and "float32" in text
    assert table.as_dicts()[0]["dtype"] in ("float32", "float64")


def test_compare_precisions_reports_refusals() -> None:
    case = make_case(6, 5, 8)
    table = ghostsolve.compare_precisions(case.X, case.Y, solvers=("cholesky", "svd"))
    chol = [r for r in table.rows if r.solver == "cholesky"]
    assert all(r.error is not None and "needs at least d=8 rows" in r.error for r in chol)
    assert "error:" in str(table)
    with pytest.raises(GhostsolveError, match="unknown solver 'lu'"):
        ghostsolve.compare_precisions(case.X, case.Y, solvers=("lu",))
