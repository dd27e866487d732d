"""Regression tests for the core defects of issue 13 (each failed before its fix) and input hygiene."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import ghostsolve
from ghostsolve import GhostsolveError, IllConditionedWarning, NumericalError, Stats

from ._problems import Case, cases, lstsq_delta, make_case, objective


def _truth(X: torch.Tensor, Y: torch.Tensor, f: ghostsolve.Fit) -> float:
    return objective(X, Y, f.delta.double())


# ---------------------------------------------------------------- (2) an objective that cannot lie
def test_fp32_eigh_reports_an_honest_objective_and_warns() -> None:
    """cond(X) = 1e4 with little noise: fp32 statistics used to claim objective 0.0 for a bad operator."""
    case = make_case(1, 320, 16, 1e4, noise=1e-5)
    X, Y = case.X.float(), case.Y.float()
    opt = objective(X, Y, lstsq_delta(X, Y))
    with pytest.warns(IllConditionedWarning, match=r"eigh in torch.float32 kept \d+ of 16 directions"):
        f = ghostsolve.fit(X, Y, solver="eigh", dtype=torch.float32)
    truth = _truth(X, Y, f)
    assert truth > 10 * opt  # the float32 solve really is bad here ...
    # ... and the fit says so, within its stated rounding uncertainty
    assert f.objective + f.diagnostics.objective_uncertainty >= truth
    assert f.relative_residual == pytest.approx(
        truth / float(((Y.double() - X.double()) ** 2).sum()), rel=1e-6
    )
    assert any("kept" in n and "directions" in n for n in f.diagnostics.notes)
    with pytest.warns(IllConditionedWarning, match="cholesky on XᵀX"):
        g = ghostsolve.fit(X, Y, solver="cholesky", dtype=torch.float32)
    assert g.objective == pytest.approx(_truth(X, Y, g), rel=1e-6) and g.relative_residual > 0


def test_low_precision_statistics_report_an_upper_bound_when_unresolved() -> None:
    case = make_case(1, 320, 16, 1e4, noise=1e-5)
    X, Y = case.X.float(), case.Y.float()
    stats = Stats(16, dtype=torch.float32).update(X, Y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f = ghostsolve.fit(stats, solver="eigh", dtype=torch.float32)
    delta = f.diagnostics.objective_uncertainty
    assert f.objective >= _truth(X, Y, f) and f.objective >= delta > 0
    assert any("below what these statistics resolve" in str(w.message) for w in caught)
    assert any("upper bound" in n for n in f.diagnostics.notes)


@settings(deadline=None, max_examples=40)
@given(
    case=cases(max_d=12),
    solver=st.sampled_from(ghostsolve.SOLVERS),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    low_stats=st.booleans(),
)
def test_objective_is_never_below_the_truth_beyond_its_stated_uncertainty(
    case: Case, solver: str, dtype: torch.dtype, low_stats: bool
) -> None:
    if case.n < case.d and solver in ("cholesky", "qr"):
        return
    X, Y = (case.X.float(), case.Y.float()) if low_stats else (case.X, case.Y)
    src = Stats(case.d, dtype=torch.float32, qr=solver == "qr").update(X, Y) if low_stats else X
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IllConditionedWarning)
        f = ghostsolve.fit(src, None if low_stats else Y, solver=solver, dtype=dtype)
    truth = _truth(X, Y, f)
    assert f.objective + f.diagnostics.objective_uncertainty >= truth * (1 - 1e-12)
    assert f.objective >= 0 and math.isfinite(f.relative_residual)


def test_normal_equation_residual_far_above_its_level_warns(monkeypatch: pytest.MonkeyPatch) -> None:
    """A solver that returns a wrong operator (simulated) is caught by the residual check."""
    import ghostsolve.families as families

    case = make_case(3, 200, 8)
    real = families.solve

    def broken(problem, solver, *, checked=False):  # type: ignore[no-untyped-def]
        sol = real(problem, solver, checked=checked)
        sol.M = sol.M * 1.01
        return sol

    monkeypatch.setattr(families, "solve", broken)
    with pytest.warns(IllConditionedWarning, match=r"normal-equation residual .* is \d.*× the level"):
        f = ghostsolve.fit(case.X, case.Y, solver="cholesky")
    assert any("normal-equation residual" in n for n in f.diagnostics.notes)


# ---------------------------------------------------------------- (5) autograd inputs
def test_inputs_that_require_grad_are_detached() -> None:
    X = torch.randn(30, 4, requires_grad=True)
    layer = torch.nn.Linear(4, 4)
    Y = layer(X)
    w = torch.ones(30, requires_grad=True)
    ref = Stats(4, qr=True).update(X.detach(), Y.detach())
    for kw in ({}, {"qr": True}, {"product_dtype": torch.float32}, {"dtype": torch.float32}):
        s = Stats(4, **kw).update(X, Y, weights=w)  # type: ignore[arg-type]
        assert not any(t.requires_grad for t in s.tensors().values())
        assert torch.allclose(s.xtx.double(), ref.xtx, atol=1e-5 * float(ref.xtx.abs().max()))
    for kw in ({}, {"solver": "qr"}, {"family": "hadamard-magnitude"}):
        f = ghostsolve.fit(X, Y, **kw)  # type: ignore[arg-type]
        assert not f.delta.requires_grad
    assert X.grad is None and w.grad is None


# ---------------------------------------------------------------- (6) non-finite statistics
@pytest.mark.parametrize("entry", ["xtx", "xtd", "dtd"])
def test_non_finite_statistics_raise_numerical_error(entry: str) -> None:
    case = make_case(4, 40, 6)
    state = Stats(6).update(case.X, case.Y).state_dict()
    state[entry].view(-1)[0] = float("nan")
    stats = Stats.from_state_dict(state)
    for solver in ghostsolve.SOLVERS:
        with pytest.raises(NumericalError, match=rf"statistics hold NaN/Inf \(in {entry}\).*rebuild"):
            ghostsolve.fit(stats, solver=solver)
    with pytest.raises(NumericalError, match="statistics hold NaN/Inf"):
        ghostsolve.fit(stats, family="diagonal")
    with pytest.raises(NumericalError, match="statistics hold NaN/Inf"):
        ghostsolve.ridge_path(stats, ridges=[0.0, 0.1])
    with pytest.raises(NumericalError, match="statistics hold NaN/Inf"):
        ghostsolve.diagnose(stats)
    with pytest.raises(NumericalError, match="statistics hold NaN/Inf"):
        ghostsolve.choose_solver(stats)


# ---------------------------------------------------------------- (10) misleading messages
def test_infinite_weight_is_named() -> None:
    X = torch.randn(6, 3)
    w = torch.ones(6)
    w[4] = float("inf")
    with pytest.raises(GhostsolveError, match=r"1 of 6 weights are not finite and ≥ 0; first at row 4: inf"):
        Stats(3).update(X, X, weights=w)
    w[4] = -2.0
    with pytest.raises(GhostsolveError, match=r"first at row 4: -2"):
        Stats(3).update(X, X, weights=w)


def test_large_rows_do_not_overflow_low_precision_products() -> None:
    """fp32/fp16 products of rows near the ends of their range are exact after a power-of-two rescale."""
    case = make_case(5, 200, 8, 10.0)
    ref = ghostsolve.fit(case.X, case.Y)
    for scale in (1e30, 1e-30):  # squares overflow / underflow float32
        s = Stats(8, product_dtype=torch.float32).update((case.X * scale).float(), (case.Y * scale).float())
        f = ghostsolve.fit(s)
        assert torch.allclose(f.delta, ref.delta, atol=1e-4 * float(ref.delta.abs().max())), scale
        assert f.relative_residual == pytest.approx(ref.relative_residual, rel=1e-3)
    # fp16: rows of ~3e3 used to overflow (Σ x² > 65504); scaling by 2^10 is now exact
    X16, Y16 = case.X.half(), case.Y.half()
    small = Stats(8, product_dtype=torch.float16).update(X16, Y16)
    big = Stats(8, product_dtype=torch.float16).update(X16 * 1024, Y16 * 1024)
    for name in ("xtx", "xtd", "dtd"):
        assert torch.equal(getattr(big, name), getattr(small, name) * 2.0**20), name


def test_overflow_message_recommends_a_wider_product_dtype() -> None:
    X = torch.full((70000, 2), 1.0)  # Σ x² = 70000 > 65504 even after rescaling to [1, 2)
    with pytest.raises(
        GhostsolveError, match=r"overflowed in product_dtype=torch.float16.*use product_dtype=torch.float32"
    ):
        Stats(2, product_dtype=torch.float16).update(X, X)
    # the advice never names the dtype already in use
    with pytest.raises(GhostsolveError) as info:
        Stats(2, product_dtype=torch.float16).update(X, X)
    assert "torch.float16 or" not in str(info.value)


def test_tiny_fp32_rows_fit_correctly() -> None:
    """1e-30-scale fp32 rows: their squares underflow float32, the fit must not report inf or 0."""
    case = make_case(6, 200, 8, 10.0)
    X, Y = (case.X * 1e-30).float(), (case.Y * 1e-30).float()
    for dtype in (torch.float64, torch.float32):
        f = ghostsolve.fit(X, Y, dtype=dtype)
        rel = _truth(X, Y, f) / float(((Y.double() - X.double()) ** 2).sum())
        assert math.isfinite(f.relative_residual) and f.relative_residual == pytest.approx(rel, rel=1e-3)
    with pytest.raises(
        GhostsolveError, match=r"Stats\(dtype=torch.float32\) cannot hold .* use dtype=torch.float64"
    ):
        Stats(8, dtype=torch.float32).update(X, Y)


def test_diagnose_header_and_notes_agree() -> None:
    rep = ghostsolve.diagnose(make_case(2, 300, 12, 3e2).X)
    assert rep.recommended_dtype == torch.float32 and rep.recommended_solver == "qr"
    assert "recommended solver  qr" in str(rep)
    well = ghostsolve.diagnose(make_case(0, 300, 12, 10.0).X)
    assert well.recommended_solver == "cholesky" and well.recommended_dtype == torch.float32


# ---------------------------------------------------------------- (11) loose checks
def test_one_dimensional_input_is_refused() -> None:
    with pytest.raises(
        GhostsolveError, match=r"X is 1-D \(4,\); pass rows as \(n_tokens, 4\).*reshape\(1, -1\)"
    ):
        Stats(4).update(torch.randn(4), torch.randn(4))
    with pytest.raises(GhostsolveError, match=r"X is 1-D \(7,\)"):
        ghostsolve.fit(torch.randn(7), torch.randn(7))
    with pytest.raises(GhostsolveError, match=r"X is 0-D"):
        ghostsolve.fit(torch.tensor(1.0), torch.tensor(1.0))


def test_ridge_types() -> None:
    case = make_case(7, 40, 4)
    with pytest.raises(GhostsolveError, match=r"ridge=True is a bool"):
        ghostsolve.fit(case.X, case.Y, ridge=True)  # type: ignore[arg-type]
    with pytest.raises(GhostsolveError, match=r"ridge must be a number ≥ 0, 'cv' or 'gcv'.*got 'big'"):
        ghostsolve.fit(case.X, case.Y, ridge="big")  # type: ignore[arg-type]
    a = ghostsolve.fit(case.X, case.Y, ridge=np.float32(0.25))  # type: ignore[arg-type]
    b = ghostsolve.fit(case.X, case.Y, ridge=0.25)
    assert a.ridge == pytest.approx(0.25) and torch.allclose(a.delta, b.delta, rtol=1e-6)
    assert ghostsolve.fit(case.X, case.Y, ridge=np.int64(0)).ridge == 0  # type: ignore[arg-type]


def test_numpy_layouts() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((30, 5))
    b = a @ np.eye(5) * 1.5 + 0.01 * rng.standard_normal((30, 5))
    ref = Stats(5).update(np.ascontiguousarray(a[::-1]), np.ascontiguousarray(b[::-1]))
    for X, Y in (
        (a[::-1], b[::-1]),  # negative strides
        (a.astype(">f8"), b.astype(">f8")),  # big-endian
        (np.asfortranarray(a)[::-1], np.asfortranarray(b)[::-1]),
    ):
        s = Stats(5).update(X, Y)
        assert torch.allclose(s.xtx, ref.xtx) and torch.allclose(s.xtd, ref.xtd)
    ro = a.copy()
    ro.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "non-writable array" UserWarning from torch
        Stats(5).update(ro, ro)
    with pytest.raises(GhostsolveError, match=r"X has numpy dtype float128.*float64"):
        Stats(5).update(a.astype(np.longdouble), b)
    with pytest.raises(GhostsolveError, match=r"X has numpy dtype object"):
        Stats(5).update(a.astype(object), b)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown when CUDA is missing")
def test_unavailable_device_is_a_clear_error() -> None:
    with pytest.raises(GhostsolveError, match=r"device='cuda' is not available here.*device='cpu'"):
        Stats(4, device="cuda")
    with pytest.raises(GhostsolveError, match=r"device='gpu9' is not a torch device"):
        Stats(4, device="gpu9")


# ---------------------------------------------------------------- fuzz: no raw exception escapes
TORCH_DTYPES = [
    torch.float64,
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.bool,
    torch.complex64,
]
NUMPY_DTYPES = [np.float64, np.float32, np.float16, np.int32, np.complex128, object, np.longdouble, ">f8"]


GOOD_TORCH = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
BAD_TORCH = [torch.int64, torch.bool, torch.complex64]
GOOD_NUMPY = [np.float64, np.float32, np.float16, ">f8"]
BAD_NUMPY = [np.int32, np.complex128, object, np.longdouble]
AXES = (
    "shape",
    "values",
    "dtype",
    "Y",
    "weights",
    "family",
    "solver",
    "ridge",
    "rank",
    "work_dtype",
    "stats",
)


@st.composite
def _rows(draw: st.DrawFn, shape: tuple[int, ...], bad_values: bool, bad_dtype: bool) -> object:
    base = np.random.default_rng(draw(st.integers(0, 2**16))).standard_normal(shape)
    base *= draw(st.sampled_from([1.0, 1.0, 1e-3, 1e3] + ([1e-30, 1e30] if bad_values else [])))
    if bad_values and base.size:
        special = draw(st.sampled_from([np.nan, -np.inf, 1e38, 1e-40, 0.0]))
        flat = base.reshape(-1)
        flat[draw(st.integers(0, flat.size - 1)) :: max(1, flat.size // 3)] = special
    if draw(st.booleans()):  # numpy, in some layout
        a = base.astype(draw(st.sampled_from(BAD_NUMPY if bad_dtype else GOOD_NUMPY)))
        layout = draw(st.sampled_from(["c", "f", "reversed", "strided"]))
        if layout == "f":
            a = np.asfortranarray(a)
        elif layout == "reversed" and a.ndim:
            a = a[::-1]
        elif layout == "strided" and a.ndim:
            a = np.repeat(a, 2, axis=0)[::2]
        return a
    t = torch.from_numpy(np.ascontiguousarray(base)).to(
        draw(st.sampled_from(BAD_TORCH if bad_dtype else GOOD_TORCH))
    )
    if t.dim() >= 2 and draw(st.booleans()):
        t = t.mT.contiguous().mT  # column-major
    if t.is_floating_point() and draw(st.booleans()):
        t.requires_grad_(True)
    return t


@st.composite
def _call(draw: st.DrawFn) -> dict[str, object]:
    """One call's arguments, with at most two axes deliberately wrong (so most calls get deep)."""
    broken = draw(st.sets(st.sampled_from(AXES), max_size=2))

    def pick(axis: str, good: list[object], bad: list[object]) -> object:
        return draw(st.sampled_from(bad if axis in broken else good))

    d = draw(st.integers(1, 6))
    n = draw(st.integers(1, 14))
    shape = pick("shape", [(n, d), (2, n, d), (0, d)], [(d,), (), (n, d + 1)])
    X = draw(_rows(shape, "values" in broken, "dtype" in broken))  # type: ignore[arg-type]
    Y = pick(
        "Y", [draw(_rows(shape, False, False))], [None, [[1.0] * d], draw(_rows((n + 1, d), False, False))]
    )  # type: ignore[arg-type]
    return {
        "d": d,
        "X": X,
        "Y": Y,
        "weights": pick(
            "weights", [None, "ones", "mask", "int", "zeros"], ["negative", "nan", "short", "list", "huge"]
        ),
        "family": pick("family", list(ghostsolve.FAMILIES), ["bogus"]),
        "solver": pick("solver", list(ghostsolve.SOLVERS), ["lu"]),
        "ridge": pick(
            "ridge",
            [0.0, 1e-3, 1.0, np.float32(0.1), 0, "gcv", "cv"],
            [-1.0, math.nan, math.inf, True, "x", None],
        ),
        "rank": pick("rank", [None], [d + 1, -1, 1.5, True, 1, "cv"]),
        "dtype": pick("work_dtype", [torch.float64, torch.float32], [torch.float16, "float32"]),
        "stats_kw": draw(
            st.fixed_dictionaries(
                {},
                optional={
                    "dtype": st.sampled_from(
                        [torch.float64, torch.float32] + ([torch.int32] if "stats" in broken else [])
                    ),
                    "product_dtype": st.sampled_from(
                        [None, torch.float32, torch.float16, torch.bfloat16]
                        + (["x"] if "stats" in broken else [])
                    ),
                    "qr": st.booleans(),
                    "magnitudes": st.booleans(),
                    "device": st.sampled_from(
                        [None, "cpu"] + (["cuda:7", "gpu9"] if "stats" in broken else [])
                    ),
                },
            )
        ),
    }


def _weights(kind: object, X: object) -> object:
    shape = tuple(getattr(X, "shape", ()))[:-1]
    n = int(np.prod(shape)) if shape else 1
    return {
        None: None,
        "ones": torch.ones(shape),
        "mask": torch.arange(n).reshape(shape) % 2 == 0,
        "negative": -torch.ones(shape),
        "nan": torch.full(shape, math.nan),
        "int": np.ones(shape, dtype=np.int64),
        "short": torch.ones(n + 1),
        "list": [1.0] * n,
        "huge": torch.full(shape, 1e300, dtype=torch.float64),
        "zeros": torch.zeros(shape),
    }[kind]  # type: ignore[index]


def _attempt(fn, *args, **kw):  # type: ignore[no-untyped-def]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kw)
    except GhostsolveError:
        return None


@settings(deadline=None, max_examples=300)
@given(call=_call())
def test_fuzz_input_validation(call: dict) -> None:  # type: ignore[type-arg]
    """Every call either works or raises GhostsolveError / NumericalError: never a raw torch/numpy error."""
    X, Y, d = call["X"], call["Y"], call["d"]
    w = _weights(call["weights"], X)
    kw = {k: call[k] for k in ("family", "solver", "ridge", "dtype", "rank")}
    if kw["family"] == "lowrank" and kw["rank"] is None:
        kw["rank"] = min(call["d"], 2)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f = ghostsolve.fit(X, Y, weights=w, **kw)
        event("fit worked")
    except GhostsolveError as exc:
        event(f"fit refused: {str(exc)[:30]}")
        f = None
    if f is not None:
        h = X if isinstance(X, torch.Tensor) else torch.zeros(1, d)
        _attempt(f, h)
        _attempt(f.diagnostics.as_dict)
    stats = _attempt(Stats, d, **call["stats_kw"])
    if stats is not None and _attempt(stats.update, X, Y, w) is not None:
        _attempt(ghostsolve.fit, stats, **kw)
        _attempt(ghostsolve.diagnose, stats, ridge=call["ridge"])
        _attempt(ghostsolve.choose_solver, stats, ridge=call["ridge"], dtype=call["dtype"])
        _attempt(Stats.from_state_dict, stats.state_dict())
    _attempt(ghostsolve.ridge_path, X, Y, ridges=[call["ridge"]], weights=w)
    _attempt(ghostsolve.diagnose, X, Y)


def test_statistics_that_overflow_their_dtype_are_refused() -> None:
    X = torch.full((4, 2), 1e10, dtype=torch.float64)
    w = torch.full((4,), 1e300, dtype=torch.float64)
    s = Stats(2)
    with pytest.raises(
        GhostsolveError, match=r"statistics of this chunk overflow dtype=torch.float64.*rescale"
    ):
        s.update(X, X, weights=w)
    assert s.n_rows == 0


def test_objective_on_needs_stats() -> None:
    case = make_case(8, 30, 3)
    f = ghostsolve.fit(case.X, case.Y)
    with pytest.raises(GhostsolveError, match="objective_on needs Stats, got Tensor"):
        f.objective_on(case.X)  # type: ignore[arg-type]
