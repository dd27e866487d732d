"""Streaming sufficient statistics for the ghost-operator fit.

Everything a family needs is a raw sum over rows, so chunks, shards and processes combine by addition:
``rows`` (rows with nonzero weight, an integer), ``count = Σ w``, ``xtx = Σ w xᵀx`` (d×d),
``xtd = Σ w xᵀ(y − x)`` (d×d), ``yty = Σ w ‖y‖²``,
``dtd = Σ w ‖y − x‖²`` and the magnitude sums ``Σ w |x_c|``, ``Σ w |y_c|`` (also after the normalized
Hadamard rotation, ``Σ w |(x H)_c|``) used by the published "-magnitude" rules. Nothing grows with the number
of rows. ``xty = xtx + xtd`` is derived on access: accumulating ``Xᵀ(Y − X)`` instead of ``XᵀY`` keeps the
right-hand side ``Xᵀ(Y − X)`` of the normal equations free of the cancellation ``XᵀY − XᵀX`` would
suffer when ``Y ≈ X``, which matters most in the fast mode.

Optionally (``qr=True``) the upper-triangular factor ``R`` of the weighted ``[X | Y − X]`` is kept,
updated chunk by chunk (TSQR): the stable input to the ``qr`` and ``svd`` solvers, which never square
the condition number of ``X``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import torch
from scipy.linalg import blas

from .errors import GhostsolveError, NonFiniteInputError, NumericalError
from .hadamard import apply_hadamard, hadamard_supported

__all__ = [
    "BLAS_MIN_DIM",
    "Stats",
    "all_finite",
    "as_rows",
    "as_tensor",
    "as_weights",
    "check_dtype",
    "check_finite",
    "cpu_array",
    "require_finite",
    "resolve_device",
]

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# Buffers that are plain sums; the TSQR factor is not, see ``Stats.tensors``.
_SETTINGS = ("dtype", "device", "qr", "product_dtype", "magnitudes", "hadamard_magnitudes")
_SUMMED = ("rows", "count", "xtx", "xtd", "yty", "dtd", "x_abs_sum", "y_abs_sum", "xh_abs_sum", "yh_abs_sum")


_NUMPY_FLOATS = (np.float64, np.float32, np.float16)


def _from_numpy(a: np.ndarray, name: str) -> torch.Tensor:
    if a.dtype.type not in _NUMPY_FLOATS:
        raise GhostsolveError(
            f"{name} has numpy dtype {a.dtype}; pass float64, float32 or float16 data "
            f"(e.g. {name}.astype(np.float64))"
        )
    if not a.dtype.isnative:
        a = a.astype(a.dtype.newbyteorder("="))  # torch reads native byte order only
    if any(st < 0 for st in a.strides):
        a = np.array(a, order="C", copy=True)  # torch refuses negative strides; the caller's array is kept
    with warnings.catch_warnings():
        # torch warns that a read-only array could be written through the tensor; ghostsolve never writes
        # into its inputs, so the warning would only be noise
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def as_tensor(a: Any, name: str) -> torch.Tensor:
    """``a`` as a float tensor outside any autograd graph, without copying where possible.

    numpy arrays are accepted in any layout (negative strides, either byte order, read-only); a tensor
    that requires grad is detached, so statistics never build a graph.

    Raises
    ------
    GhostsolveError
        When ``a`` is neither a tensor nor an array, or not real floating point.
    """
    if isinstance(a, np.ndarray):
        a = _from_numpy(a, name)
    if not isinstance(a, torch.Tensor):
        raise GhostsolveError(f"{name} must be a torch.Tensor or numpy array, got {type(a).__name__}")
    if a.dtype not in _FLOATS:
        raise GhostsolveError(
            f"{name} has dtype {a.dtype}; pass real floating-point data "
            "(float64, float32, float16 or bfloat16)"
        )
    return a.detach()


def as_rows(a: Any, name: str) -> torch.Tensor:
    """:func:`as_tensor` for row data: at least 2-D ``(..., d)``; 0-D and 1-D input are refused."""
    t = as_tensor(a, name)
    if t.dim() == 0:
        raise GhostsolveError(f"{name} is 0-D (a scalar); pass rows as (n_tokens, hidden_size)")
    if t.dim() == 1:
        raise GhostsolveError(
            f"{name} is 1-D {tuple(t.shape)}; pass rows as (n_tokens, {t.shape[0]}), "
            f"e.g. {name}.reshape(1, -1) for a single row"
        )
    return t


def as_weights(weights: Any, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Row weights for rows ``X`` of ``shape`` ``(..., d)``, flattened to ``(n,)`` on ``device``.

    Boolean and integer masks are read as 0/1 (or integer multiplicity) weights.

    Raises
    ------
    GhostsolveError
        Wrong shape, or a weight that is negative or not finite (the count and the first one are named).
    """
    if isinstance(weights, np.ndarray) and weights.dtype.kind in "biu":
        weights = weights.astype(np.float64)
    if isinstance(weights, torch.Tensor) and (weights.dtype == torch.bool or not weights.is_floating_point()):
        if not weights.is_complex():
            weights = weights.detach().to(torch.float64)
    w = as_tensor(weights, "weights")
    lead = tuple(shape[:-1])
    n = math.prod(lead)
    if tuple(w.shape) not in (lead, (n,)):
        raise GhostsolveError(
            f"weights is {tuple(w.shape)} but X is {tuple(shape)}; weights must be {lead} "
            "(one nonnegative weight per row)"
        )
    w = w.reshape(n).to(device=device)
    bad = ~torch.isfinite(w) | (w < 0)
    if bool(bad.any()):
        first = int(torch.nonzero(bad)[0])
        raise GhostsolveError(
            "weights must be finite and nonnegative (e.g. a 0/1 padding mask): "
            f"{int(bad.sum())} of {n} weights are not finite and ≥ 0; first at row {first}: "
            f"{float(w[first]):g}"
        )
    return w


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a :class:`torch.device` that exists here (default CPU).

    Raises
    ------
    GhostsolveError
        A string that names no device, or a device this torch build or machine does not have.
    """
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise GhostsolveError(
            f"device={device!r} is not a torch device; use 'cpu', 'cuda' or 'cuda:0' ({exc})"
        ) from exc
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as exc:
        raise GhostsolveError(
            f"device={str(device)!r} is not available here (torch.cuda.is_available() is "
            f"{torch.cuda.is_available()}); use device='cpu' or None"
        ) from exc
    return dev


def check_dtype(dtype: torch.dtype, name: str) -> None:
    """Raise :class:`GhostsolveError` unless ``dtype`` is a working precision (float64 or float32)."""
    if dtype not in (torch.float32, torch.float64):
        raise GhostsolveError(
            f"{name}={dtype} is not supported; use torch.float64 (default) or torch.float32"
        )


class Stats:
    """Streaming sufficient statistics of row pairs ``(x, y)`` for fitting ``y ≈ x W``, ``W = I + M``.

    Parameters
    ----------
    dim : int
        Hidden size ``d``.
    dtype : torch.dtype, default float64
        Accumulation precision of every buffer (float64 or float32).
    device : torch.device or str, optional
        Where the buffers live (default CPU). Chunk products are computed on the chunk's own device and
        only the ``(d, 2d)`` result is moved, so GPU activations never travel to the CPU.
    qr : bool, default False
        Also keep the TSQR factor ``R`` (``(k, 2d)``, ``k ≤ 2d``) of the weighted ``[X | Y − X]`` for the
        ``qr``/``svd`` solvers. Costs one QR of ``(n + 2d) × 2d`` per chunk.
    magnitudes : bool, default True
        Also keep the magnitude sums ``x_abs_sum``, ``y_abs_sum`` that only ``scalar-magnitude`` and
        ``diagonal-magnitude`` use (two passes over each chunk); ``magnitudes=False`` skips them, and those
        families then refuse.
    hadamard_magnitudes : bool, optional
        Also keep the Hadamard-rotated sums ``xh_abs_sum``, ``yh_abs_sum`` that only ``hadamard-magnitude``
        uses (two rotations of each chunk); default: the value of ``magnitudes``, as before 0.2. Ignored
        (no buffers) when ``d`` has no supported Hadamard matrix. :meth:`for_families` sets all three
        feature flags from the families (and solvers) a caller will fit.
    product_dtype : torch.dtype, optional
        Precision of the per-chunk products (default: ``dtype``). The *fast mode* is
        ``product_dtype=torch.float32`` with ``dtype=torch.float64``: products of a chunk run at fp32 GEMM
        speed and are summed in fp64. Each chunk product then carries a relative error of about
        ``eps32 · sqrt(n_chunk)``, amplified by ``cond(XᵀX)`` in the solution; it is safe while
        ``cond(XᵀX) · 1e-6`` is well below your tolerance (``Fit.diagnostics.fast_mode_safe`` and
        :func:`ghostsolve.diagnose` say so). Half precisions (fp16/bf16) are accepted but rarely safe.

    Notes
    -----
    Chunk rows may arrive in any float dtype on any device; they are cast inside, the caller's tensors
    are never written. Finiteness is checked on entry: a NaN/Inf here usually means fp16/bf16 overflow in
    the calibration forward pass.

    Examples
    --------
    >>> s = Stats(4)
    >>> X = torch.randn(10, 4); Y = 2 * X
    >>> s.update(X[:6], Y[:6]).update(X[6:], Y[6:]).n_rows
    10
    """

    def __init__(
        self,
        dim: int,
        *,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        qr: bool = False,
        product_dtype: torch.dtype | None = None,
        magnitudes: bool = True,
        hadamard_magnitudes: bool | None = None,
    ) -> None:
        if isinstance(dim, numbers.Integral) and not isinstance(dim, bool):
            dim = int(dim)
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise GhostsolveError(f"dim must be a positive int (the hidden size), got {dim!r}")
        check_dtype(dtype, "dtype")
        if product_dtype is not None and product_dtype not in _FLOATS:
            raise GhostsolveError(f"product_dtype={product_dtype} is not a floating-point dtype")
        self.dim = dim
        self.dtype = dtype
        self.device = resolve_device(device)
        self.qr = bool(qr)
        self.magnitudes = bool(magnitudes)
        self.hadamard_magnitudes = (
            self.magnitudes if hadamard_magnitudes is None else bool(hadamard_magnitudes)
        )
        self.product_dtype = product_dtype if product_dtype is not None else dtype
        kw: dict[str, Any] = {"dtype": dtype, "device": self.device}
        # an exact integer count (int64 all-reduces by SUM like the rest), beside the weighted sum
        self.rows = torch.zeros((), dtype=torch.int64, device=self.device)
        self.count = torch.zeros((), **kw)
        self._xtx_upper_stale = False  # see the xtx property
        self.xtx = torch.zeros(dim, dim, **kw)
        self.xtd = torch.zeros(dim, dim, **kw)
        self.yty = torch.zeros((), **kw)
        self.dtd = torch.zeros((), **kw)
        self.x_abs_sum: torch.Tensor | None = None
        self.y_abs_sum: torch.Tensor | None = None
        self.xh_abs_sum: torch.Tensor | None = None
        self.yh_abs_sum: torch.Tensor | None = None
        if self.magnitudes:
            self.x_abs_sum = torch.zeros(dim, **kw)
            self.y_abs_sum = torch.zeros(dim, **kw)
        if self.hadamard_magnitudes and hadamard_supported(dim):
            self.xh_abs_sum = torch.zeros(dim, **kw)
            self.yh_abs_sum = torch.zeros(dim, **kw)
        self.r_factor: torch.Tensor | None = torch.zeros(0, 2 * dim, **kw) if self.qr else None

    @classmethod
    def for_families(
        cls,
        dim: int,
        families: Iterable[str],
        *,
        solvers: Iterable[str] = (),
        dtype: torch.dtype = torch.float64,
        device: torch.device | str | None = None,
        product_dtype: torch.dtype | None = None,
    ) -> Stats:
        """Statistics holding exactly what fitting ``families`` (with ``solvers``) needs, and no more.

        ``xtx``, ``xtd``, ``yty``, ``dtd`` and the counts are always kept (every least-squares family and
        the objective need them); the magnitude sums only for ``scalar-magnitude``/``diagonal-magnitude``,
        the Hadamard-rotated ones only for ``hadamard-magnitude``, the TSQR factor only for the ``qr`` and
        ``svd`` solvers (see :func:`ghostsolve.families.stats_features`). What is kept is exact: a
        feature is either computed as by ``Stats(...)`` or absent.

        Parameters
        ----------
        dim : int
            Hidden size.
        families : iterable of str
            Names from :data:`ghostsolve.FAMILIES`.
        solvers : iterable of str
            Names from :data:`ghostsolve.SOLVERS` that will be used (``auto`` needs no TSQR factor up
            front: with statistics only it chooses among the solvers that do not).
        dtype, device, product_dtype
            As for :class:`Stats`.

        Raises
        ------
        GhostsolveError
            An unknown family or solver name (the valid ones are listed).

        Examples
        --------
        >>> s = Stats.for_families(8, ["full", "lowrank"])
        >>> (s.magnitudes, s.hadamard_magnitudes, s.qr)
        (False, False, False)
        """
        # families imports this module (for Stats); importing it here keeps the dependency one-way at load
        from .families import stats_features

        return cls(
            dim, dtype=dtype, device=device, product_dtype=product_dtype, **stats_features(families, solvers)
        )

    def settings(self) -> dict[str, Any]:
        """The constructor keywords that build empty statistics like these (``Stats(dim, **settings)``)."""
        return {name: getattr(self, name) for name in _SETTINGS}

    # ------------------------------------------------------------------ properties
    @property
    def n_rows(self) -> int:
        """Number of rows seen with a nonzero weight (the unmasked rows for a 0/1 mask), an ``int``.

        Before version 0.2 this was the weighted sum (a float); that is now :attr:`weight_sum`. The two
        agree for unweighted rows and 0/1 masks.
        """
        return int(self.rows)

    @property
    def weight_sum(self) -> float:
        """``Σ w`` over the rows seen (``n_rows`` for unweighted rows and 0/1 masks)."""
        return float(self.count)

    @property
    def xtx(self) -> torch.Tensor:
        """``Σ w xᵀx`` (d×d), exactly symmetric (the live buffer).

        Chunks on the BLAS path add only the lower triangle of their product (mirroring each chunk's
        product cost ~12 % of the chunk's time at d = 1024); it is mirrored here, once, on the first read
        after such updates. Read it again after further updates rather than keeping an old reference.
        """
        if self._xtx_upper_stale:
            _mirror_lower(self._xtx)
            self._xtx_upper_stale = False
        return self._xtx

    @xtx.setter
    def xtx(self, value: torch.Tensor) -> None:
        self._xtx = value
        self._xtx_upper_stale = False

    def __setstate__(self, state: dict[str, Any]) -> None:
        # objects pickled before ``xtx`` became a property hold it as a plain attribute
        state = dict(state)
        if "xtx" in state:
            state["_xtx"] = state.pop("xtx")
            state["_xtx_upper_stale"] = False
        self.__dict__.update(state)

    @property
    def xty(self) -> torch.Tensor:
        """``Σ w xᵀy`` (d×d), derived as ``xtx + xtd`` (a new tensor)."""
        return self.xtx + self.xtd

    def __repr__(self) -> str:
        return (
            f"Stats(dim={self.dim}, n_rows={self.n_rows}, weight_sum={self.weight_sum:g}, "
            f"dtype={self.dtype}, device={self.device}, "
            f"qr={self.qr}, product_dtype={self.product_dtype}, magnitudes={self.magnitudes}, "
            f"hadamard_magnitudes={self.hadamard_magnitudes})"
        )

    def check_statistics(self) -> None:
        """Raise :class:`NumericalError` when a buffer holds NaN/Inf (e.g. a corrupted state dict).

        Rows are checked on entry (:meth:`update`), so this only fires for statistics built elsewhere:
        :meth:`from_state_dict`, in-place edits, or an all-reduce that overflowed.
        """
        require_finite(
            {**self.tensors(), **({"r_factor": self.r_factor} if self.r_factor is not None else {})}
        )

    # ------------------------------------------------------------------ accumulation
    def update(self, X: Any, Y: Any, weights: Any = None) -> Stats:
        """Add a chunk of rows.

        Parameters
        ----------
        X, Y : (n, d) or (..., d) tensor or numpy array, any float dtype, any device
            Rows entering the removed block and rows after it; leading dimensions are flattened. When
            their dtypes differ both are read at the wider one (``torch.promote_types``).
        weights : (n,) or (...,) tensor, optional
            Nonnegative per-row weights matching the leading dimensions (e.g. a 0/1 padding mask).

        Returns
        -------
        Stats
            ``self``, updated in place (so updates chain).

        Raises
        ------
        GhostsolveError
            Shape mismatch or a non-float dtype; NaN/Inf in X or Y (the count of bad rows and the first
            one); negative or non-finite weights; products that overflow in a half-precision
            ``product_dtype``. On any error the statistics are left unchanged.
        """
        X2, Y2, w = self._rows(X, Y, weights)
        if X2.shape[0] == 0:
            return self
        contrib, blas_path = self._chunk(X2, Y2, w)
        # All contributions were computed before this point, so a failure above leaves self unchanged.
        for name, value in contrib.items():
            if name == "r_factor":
                self.r_factor = value
            elif name == "xtx":
                # the lower triangle is always right; the BLAS path leaves the upper one for the property
                _accumulate(self._xtx, value, by_numpy=blas_path)
                self._xtx_upper_stale |= blas_path
            else:
                _accumulate(getattr(self, name), value, by_numpy=blas_path)
        return self

    def _rows(self, X: Any, Y: Any, weights: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Validated ``(n, d)`` views of ``X`` and ``Y`` and the ``(n,)`` weights (or None)."""
        X = as_rows(X, "X")
        Y = as_rows(Y, "Y")
        d = self.dim
        if X.shape[-1] != d:
            raise GhostsolveError(
                f"X is {tuple(X.shape)} but these Stats have dim={d}; X must be (n_tokens, {d})"
            )
        if Y.shape != X.shape:
            raise GhostsolveError(
                f"X is {tuple(X.shape)} but Y is {tuple(Y.shape)}; both must be (n_tokens, hidden_size={d})"
            )
        if Y.dtype != X.dtype:
            # as if both had been captured at the wider precision (a copy of the narrower one)
            common = torch.promote_types(X.dtype, Y.dtype)
            X, Y = X.to(common), Y.to(common)
        if Y.device != X.device:
            raise GhostsolveError(f"X is on {X.device} but Y is on {Y.device}; put both on one device")
        w = None if weights is None else as_weights(weights, tuple(X.shape), X.device)
        return X.reshape(-1, d), Y.reshape(-1, d), w

    def _chunk(
        self, X: torch.Tensor, Y: torch.Tensor, w: torch.Tensor | None
    ) -> tuple[dict[str, torch.Tensor], bool]:
        """This chunk's part of every buffer, and whether its ``xtx`` holds the lower triangle only."""
        pd, acc = self.product_dtype, self.dtype
        path = _product_path(X.shape[0], self.dim, pd, X.device)
        half = pd in (torch.float16, torch.bfloat16)
        # Optimistic first: rows in the normal range of pd need no scaling, and the products themselves
        # reveal NaN/Inf input (NaN·0 is NaN) and over/underflow, so the common case pays no extra pass.
        # Half precisions have no range to spare and are always normalized.
        shift = self._shift(X, Y, w) if half else 0
        Xp, Dp, xx, xd, dtd = _products(X, Y, w, pd, shift, path)
        if not half and not self._usable(xx, dtd):
            shift = self._shift(X, Y, w)  # raises on NaN/Inf rows, naming them
            Xp, Dp, xx, xd, dtd = _products(X, Y, w, pd, shift, path)
        if half:
            self._check_overflow(xx, xd, dtd, X.shape[0])
        out = self._magnitude_parts(X, Y, w)
        out["count"] = (w.sum() if w is not None else torch.tensor(float(X.shape[0]))).to(acc)
        out["rows"] = (w > 0).sum() if w is not None else torch.tensor(X.shape[0])
        # the parts stay in pd (the accumulators add them in their own precision) unless a shift must be
        # undone first
        out["xtx"], out["xtd"], out["dtd"] = (self._unscaled(t, shift) for t in (xx, xd, dtd))
        # Σ‖y‖² = Σ‖x‖² + 2 Σ x·(y − x) + Σ‖y − x‖²: read off the products instead of another pass
        diag = out["xtx"].diagonal().sum(dtype=acc) + 2 * out["xtd"].diagonal().sum(dtype=acc)
        out["yty"] = diag.to(self.device) + out["dtd"].to(acc)
        if self.qr:
            assert self.r_factor is not None
            rows = _times_pow2(torch.cat([Xp, Dp], dim=1).to(dtype=acc, device=self.device), -shift)
            out["r_factor"] = _tsqr_step(self.r_factor, rows)
        out = {k: v.to(self.device) for k, v in out.items()}
        # Scaled finite rows have float64 products far inside the range; only undoing a shift, float32
        # sums or large weights can leave it, so the (per-buffer) test runs only then.
        risky = shift != 0 or acc != torch.float64 or w is not None
        if risky and not all(bool(torch.isfinite(v.sum())) for v in out.values()):
            raise GhostsolveError(
                f"the statistics of this chunk overflow dtype={acc} (largest |x| or |y| is "
                f"{_largest(X, Y):.3g}, largest weight {float(w.max()) if w is not None else 1.0:.3g}); "
                + ("use dtype=torch.float64 (the default), or " if acc != torch.float64 else "")
                + "rescale X and Y (or the weights) by one constant (the fit is scale-invariant)"
            )
        return out, path == "blas"

    def _usable(self, xx: torch.Tensor, dtd: torch.Tensor) -> bool:
        """Whether unscaled products are finite and their largest ``Σ x_c²`` lies where neither the product
        dtype nor the accumulators lose digits to underflow (else the rows are rescaled and redone)."""
        # NaN/Inf anywhere in X reaches diag(XᵀX), anywhere in Y − X reaches ‖D‖²; and by Cauchy–Schwarz
        # |(XᵀD)_ij| ≤ sqrt((XᵀX)_ii ‖D‖²), so XᵀD is finite when both are: no pass over XᵀD needed
        top = xx.diagonal().max() if xx.numel() else xx.new_zeros(())
        if not math.isfinite(float(top.double() + dtd)):
            return False
        floor = max(2.0 ** (2 * _SAFE_RANGE[t][0]) for t in (self.product_dtype, self.dtype))
        return float(top) >= floor  # all-zero rows also land here: _shift then finds nothing to scale

    def _unscaled(self, t: torch.Tensor, shift: int) -> torch.Tensor:
        """A chunk product ``t`` (scaled by ``2^(2·shift)``) back on the statistics' scale and device."""
        if shift == 0:
            return t.to(self.device)
        return _times_pow2(t.to(dtype=self.dtype, device=self.device), -2 * shift)

    @staticmethod
    def _check_overflow(xx: torch.Tensor, xd: torch.Tensor, dtd: torch.Tensor, n: int) -> None:
        pd = xx.dtype
        # the rows are finite and scaled so that |entries| < 2: only a sum over more rows than a half
        # precision can count overflows, and one reduction detects it
        if bool(torch.isfinite(xx.sum(dtype=torch.float32) + xd.sum(dtype=torch.float32) + dtd)):
            return
        wider = [t for t in (torch.float32, torch.float64) if torch.finfo(t).max > torch.finfo(pd).max]
        raise GhostsolveError(
            f"the chunk products XᵀX, Xᵀ(Y−X) overflowed in product_dtype={pd} over {n} rows; "
            f"use product_dtype={' or '.join(str(t) for t in wider)}, or feed smaller chunks"
        )

    def _shift(self, X: torch.Tensor, Y: torch.Tensor, w: torch.Tensor | None) -> int:
        """Exponent ``k`` such that the rows times ``2^k`` (and ``sqrt(w)``) lie in ``[1, 2)`` at most.

        Scaling by a power of two is exact, so the products of rows near the ends of a low precision's
        range neither overflow nor lose digits to underflow; the sums are scaled back by ``2^(-2k)``.
        Also the one place where non-finite input is detected (a max over the rows is NaN/Inf).
        """
        top = _largest(X, Y)
        if not math.isfinite(top):
            check_finite(X, Y)  # raises, naming the rows
        if w is not None:
            top *= math.sqrt(float(w.max()))
        if top == 0.0:
            return 0
        lo, hi = _SAFE_RANGE.get(self.product_dtype, (-math.inf, math.inf))
        k = 1 - math.frexp(top)[1]  # top · 2^k ∈ [1, 2)
        if self.dtype == torch.float32:
            # fp32 accumulators must hold the squared magnitudes themselves
            e = 2 * math.frexp(top)[1]
            if not -100 <= e <= 100:
                raise GhostsolveError(
                    f"Stats(dtype=torch.float32) cannot hold the statistics of these rows: the largest |x| "
                    f"or |y| is {top:.3g}, and its square is outside float32's range; use "
                    "dtype=torch.float64 "
                    "(the default), or rescale X and Y by one constant (the fit is scale-invariant)"
                )
        return 0 if lo <= -k <= hi else k

    def _magnitude_parts(
        self, X: torch.Tensor, Y: torch.Tensor, w: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        acc = self.dtype

        def l1(a: torch.Tensor) -> torch.Tensor:
            # Column sums of |a| within the chunk in a's precision (at least fp32; torch sums cascade, so
            # the relative error is ~log2(n)·eps for these positive terms), accumulated across chunks in
            # the statistics' dtype. A fp64 reduction of the whole chunk would cost ~10% of the products.
            rt = torch.promote_types(a.dtype, torch.float32)
            part = a.abs().sum(dim=0, dtype=rt) if w is None else w.to(rt) @ a.abs().to(rt)
            return part.to(acc)

        out: dict[str, torch.Tensor] = {}
        if self.magnitudes:
            out["x_abs_sum"] = l1(X)
            out["y_abs_sum"] = l1(Y)
        if self.xh_abs_sum is not None:
            # The rotation runs in the input precision (at least fp32): these sums feed the LinearPatch-R
            # heuristic, and rotation rounding (~1e-7 relative) is far below their sampling spread, while an
            # fp64 rotation would cost about half as much as the products themselves.
            rot = torch.promote_types(X.dtype, torch.float32)
            out["xh_abs_sum"] = l1(apply_hadamard(X.to(rot)))
            out["yh_abs_sum"] = l1(apply_hadamard(Y.to(rot)))
        return out

    # ------------------------------------------------------------------ combination
    def _compatible(self, other: Stats) -> None:
        if not isinstance(other, Stats):
            raise GhostsolveError(f"can only merge Stats with Stats, got {type(other).__name__}")
        if other.dim != self.dim:
            raise GhostsolveError(
                f"cannot merge Stats of dim {self.dim} and {other.dim}; both need one hidden size"
            )
        why = {"magnitudes": "", "hadamard_magnitudes": "", "qr": ": the TSQR factor would be lost"}
        for name, reason in why.items():
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                raise GhostsolveError(
                    f"cannot merge Stats with {name}={mine} and {name}={theirs}{reason}; "
                    f"build both with the same {name} setting"
                )

    def merge(self, other: Stats) -> Stats:
        """A new :class:`Stats` holding the rows of both (neither input changes).

        Sums add; the TSQR factors are stacked and re-factored (``R`` of ``[R_a; R_b]``), which spans the
        same rows up to an orthogonal transform. The result has ``self``'s dtype and device.

        Raises
        ------
        GhostsolveError
            Different ``dim`` or ``qr`` settings.
        """
        self._compatible(other)
        out = self._empty_like()
        for name in _SUMMED:
            a = getattr(self, name)
            if a is None:
                continue
            b = getattr(other, name)
            setattr(out, name, a + b.to(dtype=a.dtype, device=self.device))
        if self.qr:
            assert self.r_factor is not None and other.r_factor is not None
            out.r_factor = _tsqr_step(self.r_factor, other.r_factor.to(dtype=self.dtype, device=self.device))
        return out

    def _empty_like(self) -> Stats:
        return Stats(self.dim, **self.settings())

    def __add__(self, other: Stats) -> Stats:
        return self.merge(other)

    def __radd__(self, other: Any) -> Stats:
        if isinstance(other, int) and other == 0:  # so that sum(list_of_stats) works
            return self.merge(self._empty_like())
        return NotImplemented

    def to(self, device: torch.device | str) -> Stats:
        """A copy with every buffer on ``device``."""
        out = Stats(self.dim, **{**self.settings(), "device": device})
        for name in (*_SUMMED, "r_factor"):
            value = getattr(self, name)
            setattr(out, name, None if value is None else value.to(out.device, copy=True))
        return out

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every summed buffer by name (the live tensors, not copies).

        ``torch.distributed.all_reduce(t, op=SUM)`` on each of them, in the same order on every rank,
        gives the statistics of all ranks' rows. The TSQR factor ``r_factor`` is *not* summable and is not
        included: gather the factors and combine them with :meth:`merge` (which re-factors the stack).
        """
        return {name: getattr(self, name) for name in _SUMMED if getattr(self, name) is not None}

    def state_dict(self) -> dict[str, Any]:
        """Plain dict (tensors and settings) for ``torch.save``; inverse of :meth:`from_state_dict`."""
        state: dict[str, Any] = {name: t.clone() for name, t in self.tensors().items()}
        if self.r_factor is not None:
            state["r_factor"] = self.r_factor.clone()
        state["meta"] = {
            "dim": self.dim,
            "dtype": str(self.dtype).removeprefix("torch."),
            "product_dtype": str(self.product_dtype).removeprefix("torch."),
            "qr": self.qr,
            "magnitudes": self.magnitudes,
            "hadamard_magnitudes": self.hadamard_magnitudes,
            "version": 2,
        }
        return state

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], *, device: torch.device | str | None = None) -> Stats:
        """Rebuild :class:`Stats` from :meth:`state_dict` output.

        Version-1 state dicts (before the integer row count existed) are read with ``rows`` taken as
        ``round(count)``: exact for unweighted rows and 0/1 masks.

        Raises
        ------
        GhostsolveError
            Missing keys or shapes that do not match ``meta["dim"]``.
        """
        try:
            meta = state["meta"]
            dim = int(meta["dim"])
            dtype = getattr(torch, meta["dtype"])
            pdtype = getattr(torch, meta.get("product_dtype", meta["dtype"]))
            qr = bool(meta["qr"])
            magnitudes = bool(meta.get("magnitudes", True))
            hadamard = bool(meta.get("hadamard_magnitudes", magnitudes))
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise GhostsolveError(f"not a Stats state dict (bad or missing 'meta': {exc!r})") from exc
        out = cls(
            dim,
            dtype=dtype,
            device=device,
            qr=qr,
            product_dtype=pdtype,
            magnitudes=magnitudes,
            hadamard_magnitudes=hadamard,
        )
        for name in (*_SUMMED, "r_factor"):
            ref = getattr(out, name)
            if ref is None:
                continue
            if name == "rows" and name not in state and "count" in state:
                state = {**state, "rows": torch.as_tensor(state["count"]).double().round()}
            if name not in state:
                raise GhostsolveError(f"Stats state dict lacks {name!r}; keys seen: {sorted(state)}")
            value = torch.as_tensor(state[name])
            if name != "r_factor" and tuple(value.shape) != tuple(ref.shape):
                raise GhostsolveError(
                    f"Stats state dict entry {name!r} is {tuple(value.shape)}, expected {tuple(ref.shape)}"
                )
            setattr(out, name, value.to(dtype=ref.dtype, device=out.device).clone())
        return out


def cpu_array(t: torch.Tensor) -> np.ndarray | None:
    """``t``'s own memory as a numpy array (detached, no copy) for a CPU float64/32/16 tensor, else None.

    The O(d²) work that follows the statistics' OpenBLAS products (accumulating, mirroring, the
    finiteness checks, the norms of ``fit``) goes through it on the CPU: numpy runs no thread pool, while
    a torch operation right after an OpenBLAS call contends with OpenBLAS's still-spinning threads (a
    torch reduction of a d × d buffer measured ~6 ms instead of 0.3 ms there, on 2 cores).
    """
    return t.detach().numpy() if t.device.type == "cpu" and t.dtype in _NUMPY_OF else None


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite: one reduction (NaN/Inf propagate into the sum), with the
    elementwise test only when the sum itself overflowed (by numpy on the CPU, see :func:`cpu_array`)."""
    a = cpu_array(t)
    if a is not None:
        with np.errstate(over="ignore", invalid="ignore"):  # an overflowing sum is the expected signal
            return bool(np.isfinite(a.sum())) or bool(np.isfinite(a).all())
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def require_finite(buffers: Mapping[str, torch.Tensor]) -> None:
    """Raise :class:`NumericalError` naming the first statistics buffer that holds NaN/Inf."""
    for name, t in buffers.items():
        if not all_finite(t):
            raise NumericalError(
                f"the statistics hold NaN/Inf (in {name}): a corrupted or hand-edited state dict, or an "
                "overflow "
                "in a float32 accumulation; rebuild them from the rows with Stats(dim) (float64 sums)"
            )


def check_finite(X: torch.Tensor, Y: torch.Tensor) -> None:
    """Raise :class:`NonFiniteInputError` naming the bad rows when ``X`` or ``Y`` (``(n, d)``) holds NaN/Inf.

    Rows are counted within the tensors given, so a caller that feeds chunks can call it again on the
    whole input to report positions over all rows.
    """
    if bool(torch.isfinite(X).all()) and bool(torch.isfinite(Y).all()):
        return
    bad = ~(torch.isfinite(X).all(dim=-1) & torch.isfinite(Y).all(dim=-1))
    idx = torch.nonzero(bad).flatten()
    first = int(idx[0])
    which = "X" if not bool(torch.isfinite(X[first]).all()) else "Y"
    dtype = (X if which == "X" else Y).dtype
    if dtype in (torch.float16, torch.bfloat16):
        cause = ("fp16/bf16 overflow in the calibration pass? Capture the hidden states in fp32 (or upcast "
                 "bf16→fp32 before the residual add), or drop the rows")  # fmt: skip
    else:
        # A wider capture cannot help: the values were already this wide when they went wrong.
        cause = (f"the rows are already {str(dtype).removeprefix('torch.')}, so this is not a low-precision "
                 "overflow of the capture: the model itself produces NaN/Inf there (NaN/Inf weights, e.g. a "
                 "damaged or fp16-overflowed checkpoint, or activations beyond the float32 range); check the "
                 "weights, or drop the rows")  # fmt: skip
    raise NonFiniteInputError(
        f"non-finite values (NaN/Inf) in {int(idx.numel())} of {X.shape[0]} rows of this chunk; "
        f"first bad row {first} (in {which}, dtype {dtype}). {cause}",
        bad_rows=int(idx.numel()),
        n_rows=int(X.shape[0]),
        first_row=first,
        where=which,
    )


# Exponent range (of |x|, base 2) within which a product dtype needs no rescaling: squares and their sums
# over any realistic chunk stay normal and finite. Half precisions are always normalized (their range is
# too small to leave any margin); fp32 keeps 2^±30 of headroom; fp64 practically never needs it.
_SAFE_RANGE: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (-400.0, 400.0),
    torch.float32: (-30.0, 30.0),
    torch.float16: (0.0, 0.0),
    torch.bfloat16: (0.0, 0.0),
}


def _times_pow2(t: torch.Tensor, e: int) -> torch.Tensor:
    """``t · 2^e`` in place, exact unless it over- or underflows (``2.0 ** e`` alone overflows a Python
    float beyond ``e = 1023``, and a zero times an infinite factor would give NaN)."""
    while e:
        step = max(-1000, min(1000, e))
        t.mul_(2.0**step)
        e -= step
    return t


def _largest(X: torch.Tensor, Y: torch.Tensor) -> float:
    """``max(|X|, |Y|)`` as a Python float (NaN/Inf when the rows hold any)."""
    inf = float("inf")
    a, b = float(torch.linalg.vector_norm(X, inf)), float(torch.linalg.vector_norm(Y, inf))
    return a + b if math.isnan(a + b) else max(a, b)  # Python's max drops a NaN in its second argument


# How a chunk's products are computed. Measured with benchmarks/bench_core.py::test_product_paths on the
# 2-core CPU of the build machine (chunks of 4096 rows, time relative to the fused GEMM, median of paired
# rounds; the figures are in docs/core.md):
# * "blas": wide rows on the CPU — everything in numpy: the rows, ‖D‖², the lower triangle of XᵀX by BLAS
#   syrk (N·d² flops) and Xᵀ(Y−X) by gemm, from scipy's OpenBLAS on the arrays' own memory (torch exposes
#   no syrk). No torch operation runs between the BLAS calls: a torch elementwise pass wakes torch's
#   OpenMP pool while OpenBLAS's threads still spin (and the reverse), and on few cores the two pools slow
#   each other down; the accumulators add these parts through numpy too (``_accumulate``);
# * "half": [XᵀX | XᵀD] by two torch GEMMs that skip the lower-left quarter of XᵀX (3.5·N·d² flops);
# * "fused": one torch GEMM Xᵀ[X | D] (4·N·d²): below these sizes fewer, larger calls win.
# Below this width the torch paths win inside a model's forward pass: each OpenBLAS call leaves its
# threads spinning for a while, which slows the torch work that follows (stories260K, d = 64: recovery
# 0.8× → 2.1× of a forward pass with OpenBLAS at every width); above it the products dominate.
BLAS_MIN_DIM = 768
_HALF_MIN_D = 256
_HALF_MIN_ROWS = 2048
_NUMPY_OF: dict[torch.dtype, Any] = {
    torch.float64: np.float64,
    torch.float32: np.float32,
    torch.float16: np.float16,
}


def _product_path(n: int, d: int, pd: torch.dtype, device: torch.device) -> str:
    if device.type == "cpu" and pd in (torch.float32, torch.float64) and d >= BLAS_MIN_DIM:
        return "blas"
    return "half" if d >= _HALF_MIN_D and n >= _HALF_MIN_ROWS else "fused"


def _row_factor(w: torch.Tensor | None, shift: int, dtype: torch.dtype) -> torch.Tensor | None:
    """``sqrt(w) · 2^shift`` as an ``(n, 1)`` column, formed in float64 (neither part overflows alone)."""
    if w is None:
        return None
    return _times_pow2(w.double().sqrt(), shift).unsqueeze(1).to(dtype)


def _scaled_rows(
    X: torch.Tensor, Y: torch.Tensor, w: torch.Tensor | None, pd: torch.dtype, shift: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, Y − X) · 2^shift`` (rows times ``sqrt(w)``) in ``pd``, the halves of one ``(n, 2d)`` buffer."""
    n, d = X.shape
    wide = torch.promote_types(X.dtype, pd)
    factor = _row_factor(w, shift, wide)
    if wide != pd:
        # a narrower product dtype: scale in the input's precision first, so that the cast cannot overflow
        Xw, Dw = X.to(wide, copy=True), Y.to(wide).sub(X)
        _scale_rows(Xw, Dw, factor, shift)
        return _halves(torch.cat([Xw.to(pd), Dw.to(pd)], dim=1))
    # pd is at least as wide as the input: the cast and the difference are computed in pd
    Xp, Dp = _halves(torch.empty(n, 2 * d, dtype=pd, device=X.device))
    Xp.copy_(X)
    Dp.copy_(Y)
    Dp.sub_(Xp)  # a same-dtype sub is the fast kernel
    _scale_rows(Xp, Dp, factor, shift)
    return Xp, Dp


# NaN/Inf rows and overflow show in the products, which the caller checks (as on the torch paths):
# numpy's warnings about them are silenced
@np.errstate(over="ignore", invalid="ignore")
def _numpy_rows(
    X: torch.Tensor, Y: torch.Tensor, w: torch.Tensor | None, pd: torch.dtype, shift: int
) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`_scaled_rows`, by numpy, as two C-ordered arrays (the first is ``X``'s own memory, read
    only, when nothing needs casting or scaling: the fast mode on float32 rows then makes one pass)."""
    if X.dtype not in _NUMPY_OF:  # bfloat16, which numpy lacks: widening to pd (float32/64) is exact
        X, Y = X.to(pd), Y.to(pd)
    Xn, Yn = X.numpy(), Y.numpy()
    wide = np.promote_types(Xn.dtype, _NUMPY_OF[pd])
    factor = _row_factor(w, shift, torch.float64 if wide == np.float64 else torch.float32)
    if factor is None and shift == 0 and wide == Xn.dtype and Xn.flags.c_contiguous:
        Dn = np.subtract(Yn, Xn, order="C")
    else:
        # cast, then subtract in the wider dtype (three passes measured faster than a casting subtract)
        Xn = np.array(Xn, dtype=wide, order="C")
        Dn = np.array(Yn, dtype=wide, order="C")
        np.subtract(Dn, Xn, out=Dn)
        for a in (Xn, Dn):
            if factor is not None:
                np.multiply(a, factor.numpy(), out=a)
            elif shift:
                np.ldexp(a, shift, out=a)  # exact: a power of two
    if wide != _NUMPY_OF[pd]:  # a narrower product dtype: scaled first, so that the cast cannot overflow
        Xn, Dn = Xn.astype(_NUMPY_OF[pd]), Dn.astype(_NUMPY_OF[pd])
    return Xn, Dn


def _products(
    X: torch.Tensor, Y: torch.Tensor, w: torch.Tensor | None, pd: torch.dtype, shift: int, path: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scaled rows ``Xp``, ``Dp`` and their ``XᵀX``, ``XᵀD`` (in pd) and ``‖D‖²`` (float64).

    On the ``"blas"`` path ``XᵀX`` holds its lower triangle only (zeros above), see ``Stats.xtx``.
    """
    if path == "blas":
        Xn, Dn = _numpy_rows(X, Y, w, pd, shift)
        # per-row sums of squares in pd (short sums), then summed in float64: as accurate as the products
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught by the caller
            sq = float(np.einsum("ij,ij->i", Dn, Dn).astype(np.float64).sum())
        dtd = torch.tensor(sq, dtype=torch.float64)
        xx, xd = _blas_products(Xn, Dn)
        return torch.from_numpy(Xn), torch.from_numpy(Dn), xx, xd, dtd
    Xp, Dp = _scaled_rows(X, Y, w, pd, shift)
    dtd = torch.linalg.vector_norm(Dp, dim=1).double().square().sum()
    xx, xd = _gram_products(Xp, Dp, path)
    return Xp, Dp, xx, xd, dtd


def _halves(Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = Z.shape[1] // 2
    return Z[:, :d], Z[:, d:]


def _scale_rows(Xp: torch.Tensor, Dp: torch.Tensor, factor: torch.Tensor | None, shift: int) -> None:
    for t in (Xp, Dp):
        if factor is not None:
            t.mul_(factor)
        else:
            _times_pow2(t, shift)


def _blas_products(Xn: np.ndarray, Dn: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tril(XᵀX), XᵀD)`` of C-ordered float32/float64 rows by OpenBLAS syrk and gemm, as row-major tensors.

    Only the lower triangle of ``XᵀX`` is formed (zeros above): mirroring it per chunk would cost ~12 %
    of the chunk at d = 1024, so ``Stats`` mirrors its sum once, when read.
    """
    d = Xn.shape[1]
    syrk, gemm = (blas.dsyrk, blas.dgemm) if Xn.dtype == np.float64 else (blas.ssyrk, blas.sgemm)
    c = np.zeros((d, d), dtype=Xn.dtype, order="F")  # calloc: the untouched triangle stays zero
    # Xnᵀ is the Fortran-ordered (d, n) view of the row-major rows: BLAS reads them without a copy. The
    # column-major upper triangle, transposed, is the row-major lower one: contiguous for the accumulator.
    lower = torch.from_numpy(syrk(1.0, Xn.T, beta=0.0, c=c, trans=0, lower=0, overwrite_c=1)).mT
    # gemm's column-major DᵀX is XᵀD row-major (a transposed read by the accumulator costs ~4×)
    return lower, torch.from_numpy(gemm(1.0, Dn.T, Xn.T, trans_b=1)).T


def _gram_products(Xp: torch.Tensor, Dp: torch.Tensor, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(XᵀX, XᵀD)`` by torch GEMMs (``"half"`` or ``"fused"``, see ``_product_path``), in the rows' dtype.

    ``Xp`` and ``Dp`` are the two halves of one ``(n, 2d)`` buffer; ``XᵀX`` is symmetric to rounding (the
    solvers read one triangle).
    """
    d = Xp.shape[1]
    Z = Xp.as_strided((Xp.shape[0], 2 * d), Xp.stride())  # the (n, 2d) buffer both halves live in
    if path == "fused":
        P = Xp.T @ Z
        return P[:, :d], P[:, d:]
    h = d // 2
    P = torch.empty(d, 2 * d, dtype=Z.dtype, device=Z.device)
    P[:h] = Z[:, :h].T @ Z
    P[h:, h:] = Z[:, h:d].T @ Z[:, h:]
    P[h:, :h] = P[:h, h:d].T
    return P[:, :d], P[:, d:]


def _mirror_lower(t: torch.Tensor) -> None:
    """Copy the strict lower triangle of square ``t`` onto its upper one, in place (CPU: by numpy, see
    :func:`cpu_array`)."""
    a = cpu_array(t)
    if a is not None:
        np.copyto(a, a.T.copy(), where=~np.tri(a.shape[0], dtype=bool))
    else:
        low = t.tril(-1)
        t.tril_()
        t.add_(low.mT)


def _accumulate(acc: torch.Tensor, part: torch.Tensor, *, by_numpy: bool) -> None:
    """``acc += part``; ``by_numpy`` (the ``"blas"`` path) adds CPU matrices through numpy, so torch's
    thread pool stays asleep between that path's BLAS calls (see :func:`cpu_array`)."""
    a, p = (cpu_array(acc), cpu_array(part)) if by_numpy and acc.dim() else (None, None)
    if a is not None and p is not None:
        with np.errstate(over="ignore", invalid="ignore"):  # as torch's add_: inf/NaN, no warning
            np.add(a, p, out=a)
    else:
        acc.add_(part)


def _tsqr_step(R: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """R factor of ``[R; rows]``, trimmed to at most ``2d`` rows (upper trapezoidal)."""
    stacked = torch.cat([R, rows], dim=0)
    Rn = torch.linalg.qr(stacked, mode="r").R
    k = min(stacked.shape[0], stacked.shape[1])
    return Rn[:k].contiguous()


def n_chunks(n: int, chunk_rows: int) -> int:
    """Number of chunks of at most ``chunk_rows`` rows covering ``n`` rows."""
    return max(1, math.ceil(n / chunk_rows))
