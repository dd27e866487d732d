"""Streaming statistics: splits, merges, weights, serialization, input safety, error messages."""

from __future__ import annotations

import io
import itertools
import warnings
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ghostsolve
from ghostsolve import GhostsolveError, Stats
from ghostsolve.errors import NonFiniteInputError

from ._problems import Case, cases, make_case


def _same(a: Stats, b: Stats, rtol: float = 1e-12, *, rows: bool = True) -> None:
    """Same statistics; ``rows=False`` skips the row count (weights as multiplicities change only it)."""
    assert a.weight_sum == pytest.approx(b.weight_sum)
    if rows:
        assert a.n_rows == b.n_rows
    for name, t in a.tensors().items():
        if name == "rows" and not rows:
            continue
        u = b.tensors()[name]
        scale = float(t.abs().max()) if t.numel() else 0.0
        assert torch.allclose(t, u, rtol=rtol, atol=rtol * scale), name


@given(case=cases(max_d=12), data=st.data())
def test_streaming_any_split_equals_one_shot(case: Case, data: st.DataObject) -> None:
    cuts = sorted(data.draw(st.lists(st.integers(0, case.n), max_size=5)))
    bounds = [0, *cuts, case.n]
    streamed = Stats(case.d, qr=True)
    for a, b in itertools.pairwise(bounds):
        streamed.update(case.X[a:b], case.Y[a:b])
    whole = Stats(case.d, qr=True).update(case.X, case.Y)
    _same(streamed, whole)
    # TSQR factors differ by row signs; their Gram matrices agree
    R1, R2 = streamed.r_factor, whole.r_factor
    assert R1 is not None and R2 is not None
    assert torch.allclose(R1.T @ R1, R2.T @ R2, rtol=1e-10, atol=1e-10 * float((R2.T @ R2).abs().max()))
    if case.cond_x <= 1e4:  # beyond, the fits amplify the 1e-16 differences of the summation order
        for solver in ("cholesky", "qr", "svd"):
            if case.n < case.d and solver != "svd":
                continue
            f1, f2 = ghostsolve.fit(streamed, solver=solver), ghostsolve.fit(whole, solver=solver)
            assert f1.objective == pytest.approx(f2.objective, rel=1e-6, abs=1e-9 * float(whole.dtd))


@given(case=cases(max_d=10, allow_wide=False), data=st.data())
def test_merge_associative_and_order_independent(case: Case, data: st.DataObject) -> None:
    i, j = sorted(data.draw(st.lists(st.integers(0, case.n), min_size=2, max_size=2)))
    qr = data.draw(st.booleans())
    magnitudes = data.draw(st.booleans())
    parts = [
        Stats(case.d, qr=qr, magnitudes=magnitudes).update(case.X[a:b], case.Y[a:b])
        for a, b in ((0, i), (i, j), (j, case.n))
    ]
    a, b, c = parts
    left, right, rev = (a + b) + c, a + (b + c), c.merge(b).merge(a)
    total = sum(parts)
    assert isinstance(total, Stats)
    whole = Stats(case.d, qr=qr, magnitudes=magnitudes).update(case.X, case.Y)
    for s in (left, right, rev, total):
        assert s.magnitudes == magnitudes
        _same(s, whole)
        if case.cond_x <= 1e4:
            assert ghostsolve.fit(s).objective == pytest.approx(ghostsolve.fit(whole).objective, rel=1e-8)
    # merge returns a new object and leaves its inputs alone
    assert a.n_rows == i and left is not a


def test_all_reduce_of_tensors_equals_merge() -> None:
    case = make_case(0, 60, 8)
    a = Stats(8).update(case.X[:25], case.Y[:25])
    b = Stats(8).update(case.X[25:], case.Y[25:])
    merged = a + b
    for name, t in a.tensors().items():  # what all_reduce(SUM) does on rank 0, in place
        t.add_(b.tensors()[name])
    _same(a, merged)
    assert "r_factor" not in a.tensors()


def test_weights_mask_and_multiplicity() -> None:
    case = make_case(3, 40, 6)
    mask = torch.zeros(40)
    mask[::3] = 1
    masked = Stats(6).update(case.X, case.Y, weights=mask)
    kept = Stats(6).update(case.X[::3], case.Y[::3])
    _same(masked, kept)
    assert masked.n_rows == 14
    doubled = Stats(6, qr=True).update(case.X, case.Y, weights=torch.full((40,), 2.0))
    twice = Stats(6, qr=True).update(case.X, case.Y).update(case.X, case.Y)
    _same(doubled, twice, rows=False)
    assert doubled.n_rows == 40 and twice.n_rows == 80
    f = ghostsolve.fit(case.X, case.Y, weights=mask)
    g = ghostsolve.fit(case.X[::3], case.Y[::3])
    assert torch.allclose(f.delta, g.delta, atol=1e-10)


def test_leading_dimensions_are_flattened_with_weights() -> None:
    case = make_case(5, 24, 4)
    X3, Y3 = case.X.reshape(2, 12, 4), case.Y.reshape(2, 12, 4)
    mask = torch.ones(2, 12)
    mask[1, 6:] = 0
    s = Stats(4).update(X3, Y3, weights=mask)
    _same(
        s, Stats(4).update(torch.cat([case.X[:12], case.X[12:18]]), torch.cat([case.Y[:12], case.Y[12:18]]))
    )


def test_inputs_are_never_mutated() -> None:
    case = make_case(6, 30, 8)
    X, Y = case.X.half(), case.Y.half()
    w = torch.rand(30)
    copies = [t.clone() for t in (X, Y, w)]
    Stats(8, qr=True).update(X, Y, weights=w)
    ghostsolve.fit(X, Y, weights=w, solver="qr")
    ghostsolve.fit(X, Y, family="hadamard-magnitude")
    for t, c in zip((X, Y, w), copies, strict=True):
        assert torch.equal(t, c)


def test_numpy_and_mixed_precision_inputs() -> None:
    case = make_case(7, 50, 6)
    a = Stats(6).update(case.X.numpy(), case.Y.numpy())
    _same(a, Stats(6).update(case.X, case.Y))
    b = Stats(6).update(case.X.float(), case.Y.float())
    # products are exact in fp64; magnitude sums are taken within a chunk in the input precision
    _same(b, Stats(6).update(case.X.float().double(), case.Y.float().double()), rtol=1e-6)
    for name in ("xtx", "xtd", "dtd"):
        assert torch.allclose(
            getattr(b, name),
            getattr(Stats(6).update(case.X.float().double(), case.Y.float().double()), name),
            rtol=1e-13,
        )


def test_fast_mode_products_in_float32() -> None:
    case = make_case(8, 3000, 16, 10.0)
    fast = Stats(16, product_dtype=torch.float32).update(case.X.float(), case.Y.float())
    ref = Stats(16).update(case.X.float(), case.Y.float())
    assert fast.xtx.dtype == torch.float64
    _same(fast, ref, rtol=1e-5)


def test_state_dict_roundtrip_and_to() -> None:
    case = make_case(9, 40, 12)
    s = Stats(12, qr=True).update(case.X, case.Y)
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    t = Stats.from_state_dict(torch.load(buf))
    _same(s, t, rtol=0)
    assert t.qr and torch.equal(t.r_factor, s.r_factor)  # type: ignore[arg-type]
    u = s.to("cpu")
    u.xtx.zero_()
    assert s.xtx.abs().max() > 0  # a copy
    with pytest.raises(GhostsolveError, match="not a Stats state dict"):
        Stats.from_state_dict({"xtx": s.xtx})
    bad = s.state_dict()
    bad["xtx"] = torch.zeros(3, 3)
    with pytest.raises(GhostsolveError, match=r"entry 'xtx' is \(3, 3\), expected \(12, 12\)"):
        Stats.from_state_dict(bad)
    bad = s.state_dict()
    del bad["xtd"]
    with pytest.raises(GhostsolveError, match="lacks 'xtd'"):
        Stats.from_state_dict(bad)


def test_hadamard_sums_only_for_supported_sizes() -> None:
    assert Stats(12).xh_abs_sum is not None
    assert Stats(14).xh_abs_sum is None and "xh_abs_sum" not in Stats(14).tensors()


@pytest.mark.parametrize(
    ("dtype", "cause"),
    [
        (torch.float16, r"fp16/bf16 overflow.*fp32"),
        (torch.bfloat16, r"fp16/bf16 overflow.*fp32"),
        # Already wide: recommending a wider capture would be no fix (issue 13, item 10).
        (torch.float32, r"already float32, so this is not a low-precision overflow.*check the weights"),
        (torch.float64, r"already float64, so this is not a low-precision overflow.*check the weights"),
    ],
)
def test_nonfinite_rows_named(dtype: torch.dtype, cause: str) -> None:
    case = make_case(10, 20, 4)
    X = case.X.clone().to(dtype)
    X[7, 1] = float("nan")
    X[12, 0] = float("inf")
    s = Stats(4)
    with pytest.raises(GhostsolveError, match=r"2 of 20 rows.*first bad row 7 \(in X.*" + cause) as caught:
        s.update(X, case.Y.to(dtype))
    assert s.n_rows == 0  # nothing half-done
    if dtype in (torch.float32, torch.float64):
        assert "fp16/bf16 overflow" not in str(caught.value)
    Y = case.Y.clone()
    Y[3] = float("nan")
    with pytest.raises(GhostsolveError, match=r"1 of 20 rows.*first bad row 3 \(in Y"):
        ghostsolve.fit(case.X, Y)


def test_shape_dtype_and_argument_errors() -> None:
    s = Stats(4)
    with pytest.raises(GhostsolveError, match=r"X is \(5, 3\) but these Stats have dim=4"):
        s.update(torch.zeros(5, 3), torch.zeros(5, 3))
    with pytest.raises(GhostsolveError, match=r"X is \(5, 4\) but Y is \(6, 4\); both must be \(n_tokens"):
        s.update(torch.zeros(5, 4), torch.zeros(6, 4))
    with pytest.raises(GhostsolveError, match=r"X has dtype torch.int64; pass real floating-point"):
        s.update(torch.zeros(5, 4, dtype=torch.long), torch.zeros(5, 4))
    with pytest.raises(GhostsolveError, match=r"X must be a torch.Tensor or numpy array, got list"):
        s.update([[0.0] * 4], torch.zeros(1, 4))
    with pytest.raises(GhostsolveError, match=r"weights is \(4,\) but X is \(5, 4\)"):
        s.update(torch.zeros(5, 4), torch.zeros(5, 4), weights=torch.ones(4))
    with pytest.raises(GhostsolveError, match=r"finite and nonnegative.*5 of 5 weights.*first at row 0: -1"):
        s.update(torch.zeros(5, 4), torch.zeros(5, 4), weights=-torch.ones(5))
    with pytest.raises(GhostsolveError, match="dim must be a positive int"):
        Stats(0)
    with pytest.raises(GhostsolveError, match=r"dtype=torch.float16 is not supported; use torch.float64"):
        Stats(4, dtype=torch.float16)
    with pytest.raises(GhostsolveError, match=r"product_dtype=torch.int32 is not a floating-point dtype"):
        Stats(4, product_dtype=torch.int32)
    with pytest.raises(GhostsolveError, match="cannot merge Stats of dim 4 and 5"):
        Stats(4) + Stats(5)
    with pytest.raises(GhostsolveError, match="qr=False and qr=True: the TSQR factor would be lost"):
        Stats(4) + Stats(4, qr=True)
    with pytest.raises(GhostsolveError, match="can only merge Stats with Stats, got int"):
        Stats(4).merge(3)  # type: ignore[arg-type]
    assert s.n_rows == 0


def test_half_precision_products_are_rescaled_exactly() -> None:
    """fp16 products of rows of 200 (whose squares sum past fp16's 65504) are exact after rescaling."""
    X = torch.full((64, 4), 200.0)
    s = Stats(4, product_dtype=torch.float16).update(X, 2 * X)
    assert torch.equal(s.xtx, torch.full((4, 4), 64 * 200.0**2, dtype=torch.float64))
    assert torch.equal(s.xtd, s.xtx) and float(s.dtd) == 64 * 4 * 200.0**2


def test_empty_chunk_is_a_no_op() -> None:
    s = Stats(4).update(torch.zeros(0, 4), torch.zeros(0, 4))
    assert s.n_rows == 0
    with pytest.raises(GhostsolveError, match="hold no rows"):
        ghostsolve.fit(s)
    assert np.isclose(Stats(3).update(torch.ones(2, 3), torch.ones(2, 3)).n_rows, 2)


def test_magnitudes_can_be_skipped() -> None:
    case = make_case(11, 50, 12)
    lean = Stats(12, magnitudes=False).update(case.X, case.Y)
    full = Stats(12).update(case.X, case.Y)
    assert lean.x_abs_sum is None and lean.xh_abs_sum is None
    assert set(lean.tensors()) == {"rows", "count", "xtx", "xtd", "yty", "dtd"}
    for name, t in lean.tensors().items():
        assert torch.allclose(t, full.tensors()[name], rtol=1e-13), name
    assert ghostsolve.fit(lean).objective == pytest.approx(ghostsolve.fit(full).objective, rel=1e-12)
    for family in ("scalar-magnitude", "diagonal-magnitude", "hadamard-magnitude"):
        with pytest.raises(
            GhostsolveError, match=rf"family='{family}' needs the magnitude sums.*magnitudes=False"
        ):
            ghostsolve.fit(lean, family=family)
    with pytest.raises(GhostsolveError, match="magnitudes=True and magnitudes=False"):
        full + lean
    again = Stats.from_state_dict(lean.state_dict())
    assert not again.magnitudes and again.x_abs_sum is None
    # fit(X, Y) builds only what the family needs, with the same result
    assert ghostsolve.fit(case.X, case.Y, family="diagonal-magnitude").weight.shape == (12, 12)


def test_nonfinite_rows_named_without_magnitudes() -> None:
    case = make_case(12, 20, 4)
    X = case.X.clone()
    X[5, 2] = float("-inf")
    with pytest.raises(GhostsolveError, match=r"1 of 20 rows.*first bad row 5 \(in X"):
        Stats(4, magnitudes=False).update(X, case.Y)


def test_nonfinite_rows_counted_over_the_whole_input() -> None:
    """fit(X, Y) feeds chunks; the error names the row within all of X (a structured exception, not text)."""
    from ghostsolve.errors import NonFiniteInputError
    from ghostsolve.fit import accumulate

    case = make_case(13, 20, 4)
    Y = case.Y.clone()
    Y[13, 1] = float("nan")
    Y[17, 0] = float("inf")
    with pytest.raises(NonFiniteInputError, match=r"2 of 20 rows.*first bad row 13 \(in Y") as info:
        accumulate(case.X, Y, chunk_rows=8)
    err = info.value
    assert (err.bad_rows, err.n_rows, err.first_row, err.where) == (2, 20, 13, "Y")
    assert isinstance(info.value, GhostsolveError)


@pytest.mark.parametrize("path", ["fused", "half", "blas"])  # the three ways a chunk's products are computed
@pytest.mark.parametrize(("n", "d"), [(40, 16), (300, 64)])
@pytest.mark.parametrize("pd", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_every_product_path_matches_numpy(
    monkeypatch: pytest.MonkeyPatch, path: str, n: int, d: int, pd: torch.dtype
) -> None:
    import ghostsolve.stats as stats_module

    monkeypatch.setattr(stats_module, "_product_path", lambda *_: path)  # the CPU takes "blas" on its own
    g = torch.Generator().manual_seed(n + d)
    X = torch.randn(n, d, generator=g)
    Y = X + 0.3 * torch.randn(n, d, generator=g)
    w = torch.rand(n, generator=g)
    for weights in (None, w):
        s = Stats(d, product_dtype=pd, magnitudes=False)
        s.update(X[: n // 3], Y[: n // 3], None if weights is None else weights[: n // 3])
        s.update(X[n // 3 :], Y[n // 3 :], None if weights is None else weights[n // 3 :])
        Xn, Dn = X.double().numpy(), (Y.double() - X.double()).numpy()
        if weights is not None:
            Xn, Dn = Xn * np.sqrt(w.double().numpy())[:, None], Dn * np.sqrt(w.double().numpy())[:, None]
        tol = 1e-12 if pd == torch.float64 else 3e-5
        for got, ref in ((s.xtx, Xn.T @ Xn), (s.xtd, Xn.T @ Dn)):
            np.testing.assert_allclose(got.numpy(), ref, rtol=0, atol=tol * np.abs(ref).max())
        assert torch.allclose(s.xtx, s.xtx.T, rtol=0, atol=tol * float(s.xtx.abs().max()))
        assert float(s.dtd) == pytest.approx(float((Dn**2).sum()), rel=tol)
        assert float(s.yty) == pytest.approx(float(((Xn + Dn) ** 2).sum()), rel=tol)


@given(case=cases(max_d=12), data=st.data())
def test_xtx_is_exactly_symmetric_whenever_read(case: Case, data: st.DataObject) -> None:
    # the BLAS path (wide CPU rows; forced here) sums one triangle of XᵀX and mirrors it when read:
    # reading between updates, merging, serializing and all-reducing must all see exactly symmetric sums
    import ghostsolve.stats as stats_module

    cuts = sorted(data.draw(st.lists(st.integers(0, case.n), max_size=4)))
    reads = data.draw(st.lists(st.booleans(), min_size=len(cuts) + 1, max_size=len(cuts) + 1))
    with mock.patch.object(stats_module, "_product_path", lambda *_: "blas"):
        s = Stats(case.d, magnitudes=False)
        for (a, b), read in zip(itertools.pairwise([0, *cuts, case.n]), reads, strict=True):
            s.update(case.X[a:b], case.Y[a:b])
            if read:
                assert torch.equal(s.xtx, s.xtx.T)
        whole = Stats(case.d, magnitudes=False).update(case.X, case.Y)
    for t in (s.tensors()["xtx"], s.state_dict()["xtx"], s.merge(whole).xtx, s.to("cpu").xtx, s.xtx):
        assert torch.equal(t, t.T)
    ref = case.X.double().T @ case.X.double()
    assert torch.allclose(s.xtx, ref, rtol=1e-12, atol=1e-12 * float(ref.abs().max()))
    assert torch.allclose(s.xty, s.xtx + s.xtd, rtol=0, atol=0)


def test_xtx_read_once_then_updated_stays_right(monkeypatch: pytest.MonkeyPatch) -> None:
    import ghostsolve.stats as stats_module

    monkeypatch.setattr(stats_module, "_product_path", lambda *_: "blas")
    case = make_case(21, 200, 9)
    s = Stats(9, magnitudes=False).update(case.X[:50], case.Y[:50])
    held = s.xtx  # the live buffer: mirrored now
    s.update(case.X[50:], case.Y[50:])
    whole = Stats(9, magnitudes=False).update(case.X, case.Y)
    assert torch.allclose(s.xtx, whole.xtx, rtol=1e-12, atol=1e-12) and held is s.xtx


def test_for_families_keeps_only_what_is_needed() -> None:
    case = make_case(14, 60, 12)
    lean = Stats.for_families(12, ["full", "lowrank", "symmetric", "diagonal", "hadamard"])
    assert (lean.magnitudes, lean.hadamard_magnitudes, lean.qr) == (False, False, False)
    assert lean.x_abs_sum is None and lean.xh_abs_sum is None and lean.r_factor is None
    plain = Stats.for_families(12, ["diagonal-magnitude"])
    assert (plain.magnitudes, plain.hadamard_magnitudes) == (True, False) and plain.xh_abs_sum is None
    rot = Stats.for_families(12, ["hadamard-magnitude"], solvers=["qr"])
    assert (rot.magnitudes, rot.hadamard_magnitudes, rot.qr) == (False, True, True)
    full = Stats(12, qr=True).update(case.X, case.Y)
    for s, families in (
        (lean, ["full", "hadamard"]),
        (plain, ["diagonal-magnitude"]),
        (rot, ["hadamard-magnitude"]),
    ):
        s.update(case.X, case.Y)
        for family in families:
            a, b = ghostsolve.fit(s, family=family), ghostsolve.fit(full, family=family)
            assert torch.allclose(a.delta, b.delta, rtol=1e-12, atol=1e-12), family
    with pytest.raises(
        GhostsolveError,
        match=r"family='hadamard-magnitude' needs the magnitude sums.*hadamard_magnitudes=False",
    ):
        ghostsolve.fit(plain, family="hadamard-magnitude")
    with pytest.raises(GhostsolveError, match=r"unknown family 'ghost'; valid: identity"):
        Stats.for_families(12, ["ghost"])
    with pytest.raises(GhostsolveError, match=r"unknown solver 'lu'; valid: auto"):
        Stats.for_families(12, ["full"], solvers=["lu"])
    with pytest.raises(GhostsolveError, match="hadamard_magnitudes=True and hadamard_magnitudes=False"):
        Stats(12) + Stats(12, hadamard_magnitudes=False)
    again = Stats.from_state_dict(plain.state_dict())
    assert again.settings() == plain.settings()
    assert (
        Stats(12).hadamard_magnitudes and not Stats(12, magnitudes=False).hadamard_magnitudes
    )  # as before 0.2


@pytest.mark.parametrize("pd", [None, torch.float32], ids=["fp64", "fast"])
def test_wide_rows_fit_as_numpy_lstsq(pd: torch.dtype | None) -> None:
    # at d ≥ BLAS_MIN_DIM the CPU takes the OpenBLAS path (one triangle of XᵀX, mirrored when read) and
    # `auto` factors with scipy's LAPACK: the whole chain must give lstsq's operator
    from ghostsolve.stats import BLAS_MIN_DIM, _product_path

    d, n = BLAS_MIN_DIM, 2 * BLAS_MIN_DIM + 37
    assert _product_path(n, d, pd or torch.float64, torch.device("cpu")) == "blas"
    g = torch.Generator().manual_seed(11)
    X = torch.randn(n, d, generator=g)
    Y = X + 0.2 * X @ torch.randn(d, d, generator=g) / d**0.5 + 0.1 * torch.randn(n, d, generator=g)
    s = Stats.for_families(d, ["full"], product_dtype=pd)
    for a in range(0, n, 500):
        s.update(X[a : a + 500], Y[a : a + 500])
    assert torch.equal(s.xtx, s.xtx.T)
    M = ghostsolve.fit(s).delta.double()
    Xn, Dn = X.double().numpy(), (Y.double() - X.double()).numpy()
    ref = np.linalg.lstsq(Xn, Dn, rcond=None)[0]
    tol = 1e-9 if pd is None else 1e-4
    assert np.abs(M.numpy() - ref).max() <= tol * np.abs(ref).max()


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_wide_rows_near_the_float32_range_are_rescaled_exactly(scale: float) -> None:
    # fp32 products of 1e±30-scale rows would under/overflow: the BLAS path rescales them by a power of
    # two (numpy's ldexp, exact) and must land on the float64 statistics to fp32 product accuracy
    from ghostsolve.stats import BLAS_MIN_DIM

    d, n = BLAS_MIN_DIM, 1200
    g = torch.Generator().manual_seed(5)
    X = torch.randn(n, d, generator=g) * scale
    Y = X + 0.1 * scale * torch.randn(n, d, generator=g)
    w = torch.rand(n, generator=g)
    for weights in (None, w):
        fast = Stats.for_families(d, ["full"], product_dtype=torch.float32).update(X, Y, weights=weights)
        exact = Stats.for_families(d, ["full"]).update(X.double(), Y.double(), weights=weights)
        for name in ("xtx", "xtd"):
            a, b = getattr(fast, name), getattr(exact, name)
            assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max()), name
        assert float(fast.dtd) == pytest.approx(float(exact.dtd), rel=1e-5)
        assert torch.equal(fast.xtx, fast.xtx.T)


def test_stats_pickled_before_xtx_was_a_property_still_load() -> None:
    import pickle

    case = make_case(22, 40, 6)
    s = Stats(6).update(case.X, case.Y)
    old = dict(s.__dict__)  # what a pickle of version 0.2 held: a plain ``xtx`` attribute, no flag
    old["xtx"] = old.pop("_xtx")
    del old["_xtx_upper_stale"]
    restored = Stats.__new__(Stats)
    restored.__setstate__(old)
    assert torch.equal(restored.xtx, s.xtx) and "xtx" not in restored.__dict__
    again = pickle.loads(pickle.dumps(restored))
    _same(again.update(case.X, case.Y), Stats(6).update(torch.cat([case.X] * 2), torch.cat([case.Y] * 2)))


def test_wide_nonfinite_rows_raise_without_numpy_warnings() -> None:
    # the BLAS path computes in numpy; NaN/Inf rows must give the library's error, not a RuntimeWarning
    from ghostsolve.stats import BLAS_MIN_DIM, all_finite

    d = BLAS_MIN_DIM
    X = torch.randn(64, d)
    Y = X.clone()
    Y[3, 5] = float("inf")
    X[9, 1] = float("-inf")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = Stats.for_families(d, ["full"])
        with pytest.raises(NonFiniteInputError, match="first bad row 3"):
            s.update(X, Y)
        assert s.n_rows == 0 and float(s.xtx.abs().sum()) == 0.0
        assert all_finite(torch.tensor([3e38, 3e38]))  # the sum overflows; the entries are finite
        assert not all_finite(torch.tensor([float("inf"), float("-inf")]))
        assert not all_finite(torch.tensor([1.0, float("nan")]))
