"""The public surface of ghostsolve.fit / Fit: argument errors and documented behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import ghostsolve
from ghostsolve import GhostsolveError, Stats

from ._problems import make_case


@pytest.fixture
def case():  # type: ignore[no-untyped-def]
    return make_case(0, 64, 8)


def test_public_names() -> None:
    for name in (
        "fit",
        "Fit",
        "Stats",
        "diagnose",
        "Diagnostics",
        "compare_precisions",
        "GhostsolveError",
        "NumericalError",
        "IllConditionedWarning",
        "FAMILIES",
        "SOLVERS",
        "ridge_path",
        "choose_solver",
    ):
        assert hasattr(ghostsolve, name), name
    assert issubclass(GhostsolveError, ValueError)
    assert issubclass(ghostsolve.NumericalError, GhostsolveError)
    assert "full" in ghostsolve.FAMILIES and "auto" in ghostsolve.SOLVERS
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        ghostsolve.nope  # noqa: B018


def test_unknown_names_list_the_valid_ones(case) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(
        GhostsolveError, match=r"unknown family 'fancy'; valid families: identity, scalar, .*full"
    ):
        ghostsolve.fit(case.X, case.Y, family="fancy")
    with pytest.raises(
        GhostsolveError, match=r"unknown solver 'lu'; valid solvers: auto, cholesky, qr, svd, eigh"
    ):
        ghostsolve.fit(case.X, case.Y, solver="lu")


def test_rank_errors(case) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(GhostsolveError, match=r"rank=9 exceeds d=8; use rank ≤ 8"):
        ghostsolve.fit(case.X, case.Y, family="lowrank", rank=9)
    with pytest.raises(GhostsolveError, match=r"family='lowrank' needs rank=r.*got rank=None"):
        ghostsolve.fit(case.X, case.Y, family="lowrank")
    with pytest.raises(
        GhostsolveError, match=r"rank=2 is only used by family='lowrank' \(got family='full'\)"
    ):
        ghostsolve.fit(case.X, case.Y, rank=2)


def test_argument_errors(case) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(GhostsolveError, match=r"ridge must be a number ≥ 0.*got -1"):
        ghostsolve.fit(case.X, case.Y, ridge=-1)
    with pytest.raises(GhostsolveError, match=r"dtype=torch.float16 is not supported"):
        ghostsolve.fit(case.X, case.Y, dtype=torch.float16)
    with pytest.raises(GhostsolveError, match=r"fit\(X, Y\) needs Y"):
        ghostsolve.fit(case.X)
    stats = Stats(8).update(case.X, case.Y)
    with pytest.raises(GhostsolveError, match=r"fit\(stats\) takes no Y, weights or folds"):
        ghostsolve.fit(stats, case.Y)
    with pytest.raises(GhostsolveError, match=r"X is \(64, 8\) but Y is \(64, 7\)"):
        ghostsolve.fit(case.X, case.Y[:, :7])
    with pytest.raises(GhostsolveError, match=r"weights is \(3,\) but X is \(64, 8\)"):
        ghostsolve.fit(case.X, case.Y, weights=torch.ones(3))


def test_too_few_rows_for_full_rank_solvers() -> None:
    case = make_case(1, 5, 8)
    for solver in ("cholesky", "qr"):
        with pytest.raises(
            GhostsolveError,
            match=rf"solver='{solver}' needs at least d=8 rows.*only 5 rows.*solver='svd'.*ridge>0",
        ):
            ghostsolve.fit(case.X, case.Y, solver=solver)
    assert ghostsolve.fit(case.X, case.Y).solver == "svd"


def test_hadamard_family_refuses_unsupported_sizes() -> None:
    case = make_case(2, 40, 14)
    for family in ("hadamard", "hadamard-magnitude"):
        with pytest.raises(
            GhostsolveError, match=r"d=14 has no supported Hadamard matrix.*12, 20.*Nearest supported"
        ):
            ghostsolve.fit(case.X, case.Y, family=family)


def test_fit_object(case) -> None:  # type: ignore[no-untyped-def]
    f = ghostsolve.fit(case.X, case.Y)
    assert torch.allclose(f.weight, torch.eye(8, dtype=torch.float64) + f.delta)
    assert f.family == "full" and f.dtype == torch.float64 and f.ridge == 0 and f.rank is None
    assert f.n_rows == 64 and f.dim == 8
    for dt in (torch.float32, torch.bfloat16, torch.float64):
        h = case.X[:5].to(dt).reshape(1, 5, 8)
        out = f(h)
        assert out.dtype == dt and out.shape == (1, 5, 8)
        ref = h.double() @ f.weight
        assert torch.allclose(
            out.double(), ref, rtol=0, atol=float(torch.finfo(dt).eps) * 20 * float(ref.abs().max())
        )
    with pytest.raises(GhostsolveError, match=r"h is \(3, 4\) but this Fit has d=8"):
        f(torch.zeros(3, 4))
    assert "relative_residual" in repr(f) and "FitDiagnostics" in repr(f.diagnostics)
    assert set(f.diagnostics.as_dict()) >= {
        "condition_number",
        "effective_rank",
        "normal_equation_residual",
        "skew_share",
        "notes",
    }
    # objective is Σ‖xW − y‖², relative to Σ‖y − x‖²
    Xn, Yn = case.X.numpy(), case.Y.numpy()
    obj = ((Xn @ f.weight.numpy() - Yn) ** 2).sum()
    assert f.objective == pytest.approx(obj, rel=1e-9)
    assert f.relative_residual == pytest.approx(obj / ((Yn - Xn) ** 2).sum(), rel=1e-9)
    ident = ghostsolve.fit(case.X, case.Y, family="identity")
    assert ident.relative_residual == pytest.approx(1.0) and ident.solver == "closed-form"


def test_lowrank_keeps_factors(case) -> None:  # type: ignore[no-untyped-def]
    f = ghostsolve.fit(case.X, case.Y, family="lowrank", rank=3)
    assert f.factors is not None
    U, V = f.factors
    assert U.shape == (8, 3) and V.shape == (8, 3)
    assert torch.allclose(f.delta, U @ V.T)
    assert np.linalg.matrix_rank(f.delta.numpy()) == 3
    h = case.X[:4]
    assert torch.allclose(f(h), h @ f.weight)
    assert ghostsolve.fit(case.X, case.Y).factors is None


def test_objective_on_held_out_rows(case) -> None:  # type: ignore[no-untyped-def]
    f = ghostsolve.fit(case.X[:40], case.Y[:40])
    held = Stats(8).update(case.X[40:], case.Y[40:])
    Xn, Yn = case.X[40:].numpy(), case.Y[40:].numpy()
    assert f.objective_on(held) == pytest.approx(((Xn @ f.weight.numpy() - Yn) ** 2).sum(), rel=1e-9)
    with pytest.raises(GhostsolveError, match="stats have dim 4 but this Fit has d=8"):
        f.objective_on(Stats(4))


def test_notes_for_solver_given_to_closed_form_family(case) -> None:  # type: ignore[no-untyped-def]
    f = ghostsolve.fit(case.X, case.Y, family="diagonal", solver="qr")
    assert "has a closed form; solver='qr' was not used" in f.diagnostics.notes[0]
    g = ghostsolve.fit(case.X, case.Y, family="scalar-magnitude", ridge=0.1)
    assert any("magnitude rule" in n for n in g.diagnostics.notes)
    s = ghostsolve.fit(case.X, case.Y, family="symmetric", solver="cholesky")
    assert s.solver == "eigh" and "does not apply, used eigh" in s.diagnostics.notes[0]


def test_exact_fit_and_identity_data() -> None:
    X = torch.randn(50, 6, dtype=torch.float64)
    f = ghostsolve.fit(X, X)
    assert f.relative_residual == 0.0
    assert torch.allclose(f.delta, torch.zeros(6, 6, dtype=torch.float64), atol=1e-12)


def test_numpy_inputs(case) -> None:  # type: ignore[no-untyped-def]
    f = ghostsolve.fit(case.X.numpy(), case.Y.numpy())
    g = ghostsolve.fit(case.X, case.Y)
    assert torch.allclose(f.delta, g.delta)


def test_zero_channel_keeps_identity_in_magnitude_rules() -> None:
    X = torch.randn(30, 4, dtype=torch.float64)
    X[:, 2] = 0
    f = ghostsolve.fit(X, 2 * X, family="diagonal-magnitude")
    assert f.weight[2, 2] == 1.0 and f.weight[0, 0] == pytest.approx(2.0)
    g = ghostsolve.fit(X, 2 * X, family="diagonal")
    assert g.weight[2, 2] == 1.0


def test_fit_applies_to_numpy_and_keeps_its_kind(case) -> None:  # type: ignore[no-untyped-def]
    """Issue 14.10: numpy input to Fit.__call__ raised a raw TypeError."""
    f = ghostsolve.fit(case.X, case.Y)
    for dt in (np.float64, np.float32, np.float16):
        h = case.X[:5].numpy().astype(dt)
        out = f(h)
        assert isinstance(out, np.ndarray) and out.dtype == dt and out.shape == (5, 8)
        ref = h.astype(np.float64) @ f.weight.numpy()
        np.testing.assert_allclose(
            out.astype(np.float64), ref, atol=20 * np.finfo(dt).eps * np.abs(ref).max()
        )
    assert f(case.X[0]).shape == (8,)  # a single row (d,) is an operator input too
    lr = ghostsolve.fit(case.X, case.Y, family="lowrank", rank=2)
    np.testing.assert_allclose(lr(case.X[:3].numpy()), (case.X[:3] @ lr.weight).numpy(), atol=1e-12)
    with pytest.raises(
        GhostsolveError, match=r"h must be a float torch.Tensor or numpy array \(\.\.\., 8\), got list"
    ):
        f([[0.0] * 8])  # type: ignore[call-overload]
    with pytest.raises(GhostsolveError, match=r"got Tensor of dtype torch.int64"):
        f(torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(GhostsolveError, match=r"h has numpy dtype int64"):
        f(np.zeros((2, 8), dtype=np.int64))
    h = case.X[:2].clone().requires_grad_(True)
    f(h).sum().backward()  # the operator stays differentiable for tensors
    assert h.grad is not None


def test_mixed_precision_rows_are_promoted() -> None:
    """Issue 14.10: float64 X with float32 Y was refused; both are read at the wider dtype."""
    case = make_case(3, 80, 6)
    X64, Y32 = case.X, case.Y.float()
    f = ghostsolve.fit(X64, Y32)
    g = ghostsolve.fit(X64, Y32.double())
    assert torch.allclose(f.delta, g.delta, rtol=0, atol=0)
    s = Stats(6).update(X64.half(), Y32)
    t = Stats(6).update(X64.half().float(), Y32)
    for name, v in s.tensors().items():
        assert torch.equal(v, t.tensors()[name]), name


def test_row_count_is_an_int_and_weight_sum_separate() -> None:
    """Issue 14.10: Stats.n_rows was a float (the weighted sum)."""
    case = make_case(4, 40, 4)
    w = torch.linspace(0, 2, 40)  # one zero weight
    s = Stats(4).update(case.X, case.Y, weights=w)
    assert isinstance(s.n_rows, int) and s.n_rows == 39
    assert s.weight_sum == pytest.approx(float(w.sum()))
    f = ghostsolve.fit(case.X, case.Y, weights=w)
    assert isinstance(f.n_rows, int) and f.n_rows == 39 and f.weight_sum == pytest.approx(float(w.sum()))
    merged = s + Stats(4).update(case.X[:3], case.Y[:3])
    assert merged.n_rows == 42 and merged.rows.dtype == torch.int64
    old = s.state_dict()
    del old["rows"]  # a version-1 state dict
    old["meta"]["version"] = 1
    assert Stats.from_state_dict(old).n_rows == round(float(w.sum()))
    assert Stats.from_state_dict(s.state_dict()).n_rows == 39
