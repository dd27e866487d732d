"""Cross-validation from fold statistics against brute force on the raw rows (numpy/scipy refits)."""

from __future__ import annotations

import io
import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ghostsolve
from ghostsolve import FoldedStats, GhostsolveError, Stats
from ghostsolve.crossval import CV_RIDGES, accumulate_folds, cv_rank, cv_ridge, gcv_ridge

from ._problems import make_case

GRID = (0.0, 1e-4, 1e-2, 0.3, 3.0)


def _labels(n: int, k: int, seq: int) -> torch.Tensor:
    """Fold label of each row: rows come in sequences of ``seq`` tokens, sequence i goes to fold i % k."""
    return (torch.arange(n) // seq) % k


def _ridge_fit(X: np.ndarray, D: np.ndarray, r: float, family: str, rank: int | None = None) -> np.ndarray:
    """Independent optimum of ``family`` with relative ridge ``r`` on rows (numpy/scipy)."""
    G, B = X.T @ X, X.T @ D
    d = G.shape[0]
    lam = r * np.trace(G) / d
    if family == "full":
        return np.linalg.solve(G + lam * np.eye(d), B)
    if family == "diagonal":
        return np.diag(np.diag(B) / (np.diag(G) + lam))
    if family == "scalar":
        return np.trace(B) / (np.trace(G) + d * lam) * np.eye(d)
    if family == "hadamard":
        H = scipy.linalg.hadamard(d) / math.sqrt(d)
        Xh, Dh = X @ H, D @ H
        m = (Xh * Dh).sum(0) / ((Xh * Xh).sum(0) + lam)
        return H @ np.diag(m) @ H.T
    if family == "symmetric":
        A = G + lam * np.eye(d)
        return scipy.linalg.solve_sylvester(A, A, B + B.T)
    assert family == "lowrank" and rank is not None
    M = np.linalg.solve(G + lam * np.eye(d), B)
    _, V = np.linalg.eigh(M.T @ (G + lam * np.eye(d)) @ M)
    Vr = V[:, ::-1][:, :rank]
    return M @ Vr @ Vr.T


def _brute_force(X, Y, labels, grid, family, rank=None):  # type: ignore[no-untyped-def]
    Xn, Dn, lab = X.numpy(), (Y - X).numpy(), labels.numpy()
    out = []
    for k in range(int(lab.max()) + 1):
        tr, te = lab != k, lab == k
        out.append(
            [
                float(((Xn[te] @ _ridge_fit(Xn[tr], Dn[tr], r, family, rank) - Dn[te]) ** 2).sum())
                for r in grid
            ]
        )
    return np.array(out)


@settings(deadline=None, max_examples=15)
@given(
    seed=st.integers(0, 2**31 - 1),
    k=st.integers(2, 5),
    family=st.sampled_from(["full", "diagonal", "scalar", "hadamard", "symmetric", "lowrank"]),
    noise=st.sampled_from([0.1, 1.0]),
)
def test_cv_curve_equals_brute_force_kfold(seed: int, k: int, family: str, noise: float) -> None:
    d = 8
    case = make_case(seed, 24 * k, d, 10.0, noise=noise)
    labels = _labels(case.n, k, seq=6)
    folded = accumulate_folds(case.X, case.Y, labels)
    rank = 3 if family == "lowrank" else None
    res = cv_ridge(folded, family=family, grid=GRID, rank=rank)
    ref = _brute_force(case.X, case.Y, labels, res.grid, family, rank)
    np.testing.assert_allclose(np.array(res.fold_scores), ref, rtol=1e-8, atol=1e-10 * ref.max())
    np.testing.assert_allclose(res.scores, ref.sum(0), rtol=1e-8)
    assert res.grid == tuple(sorted(GRID, reverse=True)) and res.method == "kfold"


@settings(deadline=None, max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(2, 4), ridge=st.sampled_from([0.0, 0.05]))
def test_rank_cv_equals_brute_force(seed: int, k: int, ridge: float) -> None:
    d = 6
    case = make_case(seed, 20 * k, d, 10.0, noise=0.5)
    labels = _labels(case.n, k, seq=5)
    res = cv_rank(accumulate_folds(case.X, case.Y, labels), ridge=ridge)
    assert res.grid == tuple(float(r) for r in range(d + 1))
    Xn, Dn, lab = case.X.numpy(), (case.Y - case.X).numpy(), labels.numpy()
    for j, r in enumerate(range(d + 1)):
        ref = sum(
            float(
                (
                    (
                        Xn[lab == f] @ _ridge_fit(Xn[lab != f], Dn[lab != f], ridge, "lowrank", r)
                        - Dn[lab == f]
                    )
                    ** 2
                ).sum()
            )
            for f in range(k)
        )
        assert res.scores[j] == pytest.approx(ref, rel=1e-8)


@settings(deadline=None, max_examples=15)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(12, 60))
def test_gcv_matches_its_formula_on_raw_rows(seed: int, n: int) -> None:
    d = 6
    case = make_case(seed, n, d, 10.0, noise=0.5)
    res = gcv_ridge(Stats(d).update(case.X, case.Y), grid=GRID)
    Xn, Dn = case.X.numpy(), (case.Y - case.X).numpy()
    for g, score in zip(res.grid, res.scores, strict=True):
        lam = g * np.trace(Xn.T @ Xn) / d
        H = Xn @ np.linalg.solve(Xn.T @ Xn + lam * np.eye(d), Xn.T)
        rss = float((((np.eye(n) - H) @ Dn) ** 2).sum())
        df = float(np.trace(H))
        assert score == pytest.approx(n * rss / (n - df) ** 2, rel=1e-8)
    assert res.chosen == res.grid[int(np.argmin(res.scores))] or res.scores[
        res.grid.index(res.chosen)
    ] <= min(res.scores) * (1 + 1e-12)


def _check_one_se_rule(res) -> None:  # type: ignore[no-untyped-def]
    F = np.array(res.fold_scores)
    best = res.grid.index(res.best)
    assert res.scores[best] == min(res.scores)
    diff = F - F[:, [best]]
    se = diff.std(axis=0, ddof=1) * math.sqrt(F.shape[0])
    ok = [j for j in range(len(res.grid)) if diff[:, j].sum() <= se[j]]
    assert res.grid.index(res.chosen) == ok[0]  # the simplest value within one SE (grid is simplest first)
    np.testing.assert_allclose(res.standard_errors, se, rtol=1e-10, atol=1e-12)


def test_one_standard_error_rule_and_small_data_regularizes() -> None:
    d = 16
    case = make_case(3, 48, d, 30.0, noise=2.0)  # few rows per unknown, much noise: a ridge must help
    labels = _labels(case.n, 4, seq=4)
    res = cv_ridge(accumulate_folds(case.X, case.Y, labels))
    _check_one_se_rule(res)
    assert res.best > 0 and res.chosen >= res.best
    ranks = cv_rank(accumulate_folds(case.X, case.Y, labels))
    _check_one_se_rule(ranks)
    assert ranks.chosen <= ranks.best


def test_with_ample_data_the_ridge_tends_to_zero() -> None:
    """More calibration sequences: the chosen ridge shrinks and the fit approaches the ridge-0 optimum."""
    d = 4
    case = make_case(5, 64000, d, 3.0, noise=0.3)
    gaps, ridges, best = [], [], []
    for n in (640, 6400, 64000):
        X, Y = case.X[:n], case.Y[:n]
        labels = _labels(n, 5, seq=32)
        f = ghostsolve.fit(X, Y, ridge="cv", folds=labels)
        g = ghostsolve.fit(X, Y)
        assert f.diagnostics.ridge_cv is not None
        ridges.append(f.ridge)
        best.append(f.diagnostics.ridge_cv.best)
        gaps.append(float(torch.linalg.matrix_norm(f.delta - g.delta) / torch.linalg.matrix_norm(g.delta)))
    assert ridges == sorted(ridges, reverse=True) and ridges[-1] <= 1e-2 and best[-1] <= 1e-3
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] <= 1e-2
    assert ghostsolve.fit(case.X, case.Y, ridge="gcv").ridge <= 1e-3


@given(seed=st.integers(0, 2**31 - 1), data=st.data())
@settings(deadline=None, max_examples=20)
def test_folds_stream_and_merge_like_rows(seed: int, data: st.DataObject) -> None:
    case = make_case(seed, 60, 5)
    labels = _labels(case.n, 3, seq=5)
    whole = accumulate_folds(case.X, case.Y, labels)
    cut = data.draw(st.integers(0, case.n))
    a = accumulate_folds(case.X[:cut], case.Y[:cut], labels[:cut], n_folds=3)
    b = accumulate_folds(case.X[cut:], case.Y[cut:], labels[cut:], n_folds=3)
    for s in (a + b, b.merge(a)):
        assert list(s.tensors()) == list(whole.tensors())
        for name, t in s.tensors().items():
            u = whole.tensors()[name]
            assert torch.allclose(t, u, rtol=1e-12, atol=1e-12 * float(u.abs().max())), name
    # an all-reduce(SUM), in tensors() order, on a's live buffers equals the merge
    for name, t in a.tensors().items():
        t.add_(b.tensors()[name])
    assert torch.allclose(a.total.xtx, whole.total.xtx, rtol=1e-12)
    ref = Stats(5).update(case.X, case.Y)
    assert whole.total.n_rows == ref.n_rows and torch.allclose(whole.total.xtx, ref.xtx, rtol=1e-12)
    assert whole.n_rows == 60 and torch.allclose(whole.xtx, ref.xtx, rtol=1e-12)  # reads as the total


def test_folded_stats_api() -> None:
    case = make_case(7, 40, 4)
    fs = FoldedStats(4, n_folds=12, magnitudes=False)
    for i in range(12):
        fs.update(case.X[i::12], case.Y[i::12], fold=i)
    names = list(fs.tensors())
    folds_in_order = [n.split(".")[0] for n in names]
    assert folds_in_order == sorted(folds_in_order) and names[0] == "fold00.rows"
    assert len(names) == 12 * len(Stats(4, magnitudes=False).tensors())
    buf = io.BytesIO()
    torch.save(fs.state_dict(), buf)
    buf.seek(0)
    again = FoldedStats.from_state_dict(torch.load(buf))
    assert again.n_folds == 12 and torch.equal(again.total.xtx, fs.total.xtx)
    assert fs.r_factor is None and fs.settings() == Stats(4, magnitudes=False).settings()
    assert "rows per fold" in repr(fs) and fs.to("cpu").n_folds == 12
    f = ghostsolve.fit(fs)
    g = ghostsolve.fit(Stats(4).update(case.X, case.Y))
    assert torch.allclose(f.delta, g.delta, rtol=1e-10) and f.objective_on(fs) == pytest.approx(g.objective)
    assert ghostsolve.ridge_path(fs, ridges=[0.0])[0].objective == pytest.approx(g.objective)
    with pytest.raises(AttributeError, match="'FoldedStats' object has no attribute 'nope'"):
        fs.nope  # noqa: B018


def test_fit_with_cv_records_the_curve() -> None:
    case = make_case(8, 120, 8, 10.0, noise=1.0)
    labels = _labels(case.n, 4, seq=10)
    f = ghostsolve.fit(case.X, case.Y, ridge="cv", folds=labels)
    cv = f.diagnostics.ridge_cv
    assert cv is not None and f.ridge == cv.chosen and cv.grid == tuple(sorted(CV_RIDGES, reverse=True))
    assert f.diagnostics.as_dict()["ridge_cv"]["chosen"] == f.ridge
    same = ghostsolve.fit(accumulate_folds(case.X, case.Y, labels), ridge="cv")
    assert same.ridge == f.ridge and torch.allclose(same.delta, f.delta)
    assert torch.allclose(f.delta, ghostsolve.fit(case.X, case.Y, ridge=f.ridge).delta, rtol=1e-10)
    assert any("chosen by kfold" in n for n in f.diagnostics.notes)
    lr = ghostsolve.fit(case.X, case.Y, family="lowrank", rank="cv", folds=labels)
    assert lr.diagnostics.rank_cv is not None and lr.rank == int(lr.diagnostics.rank_cv.chosen)
    mag = ghostsolve.fit(case.X, case.Y, family="diagonal-magnitude", ridge="cv", folds=labels)
    assert mag.ridge == 0 and any("has no ridge" in n for n in mag.diagnostics.notes)
    text = str(ghostsolve.diagnose(accumulate_folds(case.X, case.Y, labels), ridge="cv"))
    assert "ridge by 4-fold CV: chosen" in text and "<- chosen" in text
    assert "ridge by GCV" in str(ghostsolve.diagnose(case.X, ridge="gcv"))


def test_cv_refusals() -> None:
    case = make_case(9, 40, 4)
    with pytest.raises(GhostsolveError, match=r"ridge='cv' needs folds: pass a FoldedStats.*ridge='gcv'"):
        ghostsolve.fit(case.X, case.Y, ridge="cv")
    with pytest.raises(GhostsolveError, match=r"rank='cv' needs folds"):
        ghostsolve.fit(case.X, case.Y, family="lowrank", rank="cv")
    one = accumulate_folds(case.X, case.Y, torch.zeros(40, dtype=torch.long), n_folds=3)
    with pytest.raises(GhostsolveError, match=r"ridge='cv' needs at least 2 folds holding rows, got 1 of 3"):
        ghostsolve.fit(one, ridge="cv")
    with pytest.raises(GhostsolveError, match=r"diagnose\(\.\.\., ridge='cv'\) needs a FoldedStats"):
        ghostsolve.diagnose(case.X, ridge="cv")
    with pytest.raises(GhostsolveError, match=r"FoldedStats\(qr=True\) is not supported"):
        FoldedStats(4, qr=True)
    with pytest.raises(GhostsolveError, match=r"n_folds must be a positive int"):
        FoldedStats(4, n_folds=0)
    with pytest.raises(GhostsolveError, match=r"fold must be an int in \[0, 2\), got 2"):
        FoldedStats(4, n_folds=2).update(case.X, case.Y, fold=2)
    with pytest.raises(GhostsolveError, match=r"folds must be integer fold labels of shape \(40,\)"):
        accumulate_folds(case.X, case.Y, torch.zeros(40))
    with pytest.raises(GhostsolveError, match=r"fold labels must lie in \[0, 2\); saw 0…3"):
        accumulate_folds(case.X, case.Y, torch.arange(40) % 4, n_folds=2)
    with pytest.raises(GhostsolveError, match=r"can only merge FoldedStats with 2 folds, got 3 folds"):
        FoldedStats(4, n_folds=2) + FoldedStats(4, n_folds=3)
    with pytest.raises(GhostsolveError, match=r"not a FoldedStats state dict"):
        FoldedStats.from_state_dict({"meta": {"kind": "Stats"}, "folds": []})
    folded = accumulate_folds(case.X, case.Y, _labels(40, 2, 5))
    with pytest.raises(
        GhostsolveError, match=r"family='identity' has no ridge to cross-validate; valid: scalar"
    ):
        cv_ridge(folded, family="identity")
    with pytest.raises(GhostsolveError, match=r"ridge grid must hold finite values ≥ 0"):
        cv_ridge(folded, grid=[-1.0])
    with pytest.raises(GhostsolveError, match=r"ranks must lie in \[0, 4\]"):
        cv_rank(folded, ranks=[5])
    with pytest.raises(GhostsolveError, match=r"fit\(stats\) takes no Y, weights or folds"):
        ghostsolve.fit(folded, folds=torch.zeros(40, dtype=torch.long))
    with pytest.raises(GhostsolveError, match=r"needs rank=r, an int with 0 ≤ r ≤ d, or rank='cv'"):
        ghostsolve.fit(case.X, case.Y, family="lowrank", rank="big")


def test_cv_ridges_grid_is_documented_shape() -> None:
    assert (
        CV_RIDGES[0] == 0.0
        and min(CV_RIDGES[1:]) == pytest.approx(1e-8)
        and max(CV_RIDGES) == pytest.approx(10.0)
    )
    ratios = [b / a for a, b in itertools.pairwise(CV_RIDGES[1:])]
    assert all(r == pytest.approx(math.sqrt(10)) for r in ratios)
