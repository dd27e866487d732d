"""Streaming sufficient statistics for the ghost-operator fit.

Everything a family needs is a raw sum over rows, so chunks, shards and processes combine by addition:
``count = Σ w``, ``xtx = Σ w xᵀx`` (d×d), ``xtd = Σ w xᵀ(y − x)`` (d×d), ``yty = Σ w ‖y‖²``,
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
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .errors import GhostsolveError, NonFiniteInputError
from .hadamard import apply_hadamard, hadamard_supported

__all__ = ["Stats", "as_tensor", "check_dtype", "check_finite"]

_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
# Buffers that are plain sums; the TSQR factor is not, see ``Stats.tensors``.
_SUMMED = ("count", "xtx", "xtd", "yty", "dtd", "x_abs_sum", "y_abs_sum", "xh_abs_sum", "yh_abs_sum")


def as_tensor(a: Any, name: str) -> torch.Tensor:
    """``a`` as a float tensor without copying (numpy arrays accepted); raise on non-float input."""
    if isinstance(a, np.ndarray):
        a = torch.from_numpy(a)
    if not isinstance(a, torch.Tensor):
        raise GhostsolveError(f"{name} must be a torch.Tensor or numpy array, got {type(a).__name__}")
    if a.dtype not in _FLOATS:
        raise GhostsolveError(
            f"{name} has dtype {a.dtype}; pass real floating-point data "
            "(float64, float32, float16 or bfloat16)"
        )
    return a


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
        Also keep the magnitude sums (``x_abs_sum``, ``y_abs_sum`` and their Hadamard-rotated versions) that
        only the ``-magnitude`` families use. They cost a few passes over each chunk (about a third of the
        product time at ``d = 1024``); ``magnitudes=False`` skips them, and those families then refuse.
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
    10.0
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
    ) -> None:
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise GhostsolveError(f"dim must be a positive int (the hidden size), got {dim!r}")
        check_dtype(dtype, "dtype")
        if product_dtype is not None and product_dtype not in _FLOATS:
            raise GhostsolveError(f"product_dtype={product_dtype} is not a floating-point dtype")
        self.dim = dim
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.qr = bool(qr)
        self.magnitudes = bool(magnitudes)
        self.product_dtype = product_dtype if product_dtype is not None else dtype
        kw: dict[str, Any] = {"dtype": dtype, "device": self.device}
        self.count = torch.zeros((), **kw)
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
        if self.magnitudes and hadamard_supported(dim):
            self.xh_abs_sum = torch.zeros(dim, **kw)
            self.yh_abs_sum = torch.zeros(dim, **kw)
        self.r_factor: torch.Tensor | None = torch.zeros(0, 2 * dim, **kw) if self.qr else None

    # ------------------------------------------------------------------ properties
    @property
    def n_rows(self) -> float:
        """Number of rows seen, counted with their weights (unmasked rows for a 0/1 mask)."""
        return float(self.count)

    @property
    def xty(self) -> torch.Tensor:
        """``Σ w xᵀy`` (d×d), derived as ``xtx + xtd`` (a new tensor)."""
        return self.xtx + self.xtd

    def __repr__(self) -> str:
        return (
            f"Stats(dim={self.dim}, n_rows={self.n_rows:g}, dtype={self.dtype}, device={self.device}, "
            f"qr={self.qr}, product_dtype={self.product_dtype}, magnitudes={self.magnitudes})"
        )

    # ------------------------------------------------------------------ accumulation
    def update(self, X: Any, Y: Any, weights: Any = None) -> Stats:
        """Add a chunk of rows.

        Parameters
        ----------
        X, Y : (n, d) or (..., d) tensor or numpy array, any float dtype, any device
            Rows entering the removed block and rows after it; leading dimensions are flattened.
        weights : (n,) or (...,) tensor, optional
            Nonnegative per-row weights matching the leading dimensions (e.g. a 0/1 padding mask).

        Returns
        -------
        Stats
            ``self``, updated in place (so updates chain).

        Raises
        ------
        GhostsolveError
            Shape or dtype mismatch; NaN/Inf in X or Y (the count of bad rows and the first one); negative
            or non-finite weights; products that overflow in a half-precision ``product_dtype``. On any
            error the statistics are left unchanged.
        """
        X = as_tensor(X, "X")
        Y = as_tensor(Y, "Y")
        d = self.dim
        if X.shape[-1:] != (d,) or X.dim() < 1:
            raise GhostsolveError(
                f"X is {tuple(X.shape)} but these Stats have dim={d}; X must be (n_tokens, {d})"
            )
        if Y.shape != X.shape:
            raise GhostsolveError(
                f"X is {tuple(X.shape)} but Y is {tuple(Y.shape)}; both must be (n_tokens, hidden_size={d})"
            )
        if Y.dtype != X.dtype:
            raise GhostsolveError(
                f"X has dtype {X.dtype} but Y has dtype {Y.dtype}; capture both at one precision"
            )
        if Y.device != X.device:
            raise GhostsolveError(f"X is on {X.device} but Y is on {Y.device}; put both on one device")
        X2 = X.reshape(-1, d)
        Y2 = Y.reshape(-1, d)
        n = X2.shape[0]
        w = None
        if weights is not None:
            w = as_tensor(weights, "weights")
            if tuple(w.shape) not in (tuple(X.shape[:-1]), (n,)):
                raise GhostsolveError(
                    f"weights is {tuple(w.shape)} but X is {tuple(X.shape)}; weights must be "
                    f"{tuple(X.shape[:-1])} (one nonnegative weight per row)"
                )
            w = w.reshape(n).to(device=X.device)
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise GhostsolveError(
                    "weights must be finite and nonnegative (e.g. a 0/1 padding mask); "
                    f"min seen {float(w.min()):g}"
                )
        if n == 0:
            return self
        contrib = self._chunk(X2, Y2, w)
        # All contributions were computed before this point, so a failure above leaves self unchanged.
        for name, value in contrib.items():
            if name == "r_factor":
                self.r_factor = value
            else:
                getattr(self, name).add_(value)
        return self

    def _chunk(self, X: torch.Tensor, Y: torch.Tensor, w: torch.Tensor | None) -> dict[str, torch.Tensor]:
        d = self.dim
        pd = self.product_dtype
        n = X.shape[0]
        Z = torch.empty(n, 2 * d, dtype=pd, device=X.device)
        Xp, Dp = Z[:, :d], Z[:, d:]
        Xp.copy_(X)
        Dp.copy_(Y)
        Dp.sub_(Xp)
        wp = None if w is None else w.to(pd)
        out: dict[str, torch.Tensor] = {}
        acc = self.dtype

        def l1(a: torch.Tensor) -> torch.Tensor:
            # Column sums of |a| within the chunk in a's precision (at least fp32; torch sums cascade, so
            # the relative error is ~log2(n)·eps for these positive terms), accumulated across chunks in
            # the statistics' dtype. A fp64 reduction of the whole chunk would cost ~10% of the products.
            if wp is None:
                part = a.abs().sum(dim=0, dtype=torch.promote_types(a.dtype, torch.float32))
            else:
                part = wp @ a.abs().to(pd)
            return part.to(acc)

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
        out["count"] = (w.sum() if w is not None else torch.tensor(float(n))).to(self.dtype)
        if wp is not None:
            Z.mul_(wp.sqrt().unsqueeze(1))
        dtd = torch.linalg.vector_norm(Dp).square()
        P = _gram_products(Z, d)
        # A NaN/Inf in X or Y reaches the products (NaN·0 is NaN), and the sum of finite fp32/fp64 products
        # cannot overflow: one reduction tests everything; the row-by-row test runs only on failure.
        total = P.sum(dtype=torch.promote_types(P.dtype, torch.float32))
        if not (bool(torch.isfinite(total)) and bool(torch.isfinite(dtd))):
            check_finite(X, Y)  # raises, naming the rows, when the input is to blame
            raise GhostsolveError(
                f"the chunk products XᵀX, Xᵀ(Y−X) overflowed in product_dtype={pd} although the inputs are "
                "finite; use product_dtype=torch.float32 or torch.float64"
            )
        P = P.to(dtype=self.dtype, device=self.device)
        out["xtx"] = P[:, :d]
        out["xtd"] = P[:, d:]
        out["dtd"] = dtd.to(dtype=self.dtype, device=self.device)
        # Σ‖y‖² = Σ‖x‖² + 2 Σ x·(y − x) + Σ‖y − x‖²: read off the products instead of another pass
        out["yty"] = torch.trace(out["xtx"]) + 2 * torch.trace(out["xtd"]) + out["dtd"]
        if self.qr:
            assert self.r_factor is not None
            out["r_factor"] = _tsqr_step(self.r_factor, Z.to(dtype=self.dtype, device=self.device))
        return {k: v.to(self.device) for k, v in out.items()}

    # ------------------------------------------------------------------ combination
    def _compatible(self, other: Stats) -> None:
        if not isinstance(other, Stats):
            raise GhostsolveError(f"can only merge Stats with Stats, got {type(other).__name__}")
        if other.dim != self.dim:
            raise GhostsolveError(
                f"cannot merge Stats of dim {self.dim} and {other.dim}; both need one hidden size"
            )
        why = {"magnitudes": "", "qr": ": the TSQR factor would be lost"}
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
            setattr(out, name, a + b.to(dtype=self.dtype, device=self.device))
        if self.qr:
            assert self.r_factor is not None and other.r_factor is not None
            out.r_factor = _tsqr_step(self.r_factor, other.r_factor.to(dtype=self.dtype, device=self.device))
        return out

    def _empty_like(self) -> Stats:
        return Stats(
            self.dim,
            dtype=self.dtype,
            device=self.device,
            qr=self.qr,
            product_dtype=self.product_dtype,
            magnitudes=self.magnitudes,
        )

    def __add__(self, other: Stats) -> Stats:
        return self.merge(other)

    def __radd__(self, other: Any) -> Stats:
        if isinstance(other, int) and other == 0:  # so that sum(list_of_stats) works
            return self.merge(self._empty_like())
        return NotImplemented

    def to(self, device: torch.device | str) -> Stats:
        """A copy with every buffer on ``device``."""
        out = Stats(
            self.dim,
            dtype=self.dtype,
            device=device,
            qr=self.qr,
            product_dtype=self.product_dtype,
            magnitudes=self.magnitudes,
        )
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
            "version": 1,
        }
        return state

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], *, device: torch.device | str | None = None) -> Stats:
        """Rebuild :class:`Stats` from :meth:`state_dict` output.

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
        except (KeyError, TypeError, AttributeError) as exc:
            raise GhostsolveError(f"not a Stats state dict (bad or missing 'meta': {exc!r})") from exc
        out = cls(dim, dtype=dtype, device=device, qr=qr, product_dtype=pdtype, magnitudes=magnitudes)
        for name in (*_SUMMED, "r_factor"):
            ref = getattr(out, name)
            if ref is None:
                continue
            if name not in state:
                raise GhostsolveError(f"Stats state dict lacks {name!r}; keys seen: {sorted(state)}")
            value = torch.as_tensor(state[name])
            if name != "r_factor" and tuple(value.shape) != tuple(ref.shape):
                raise GhostsolveError(
                    f"Stats state dict entry {name!r} is {tuple(value.shape)}, expected {tuple(ref.shape)}"
                )
            setattr(out, name, value.to(dtype=dtype, device=out.device).clone())
        return out


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
    raise NonFiniteInputError(
        f"non-finite values (NaN/Inf) in {int(idx.numel())} of {X.shape[0]} rows of this chunk; "
        f"first bad row {first} (in {which}, dtype {X.dtype}). fp16/bf16 overflow in the calibration pass? "
        "Capture the hidden states in fp32 (or upcast bf16→fp32 before the residual add), "
        "or drop the rows",
        bad_rows=int(idx.numel()),
        n_rows=int(X.shape[0]),
        first_row=first,
        where=which,
    )


def _gram_products(Z: torch.Tensor, d: int) -> torch.Tensor:
    """``[XᵀX | XᵀD]`` (d × 2d) for ``Z = [X | D]``, computing only half of the symmetric XᵀX.

    The first half of the rows of XᵀX comes with XᵀD in one GEMM; the second half needs only the
    columns right of the diagonal block. Total ``3.5 n d²`` flops instead of ``4 n d²`` (a symmetric
    rank-k update would reach ``3 n d²``, but BLAS syrk runs far below GEMM speed in practice).
    """
    if d < 256:
        return Z[:, :d].T @ Z
    h = d // 2
    P = torch.empty(d, 2 * d, dtype=Z.dtype, device=Z.device)
    P[:h] = Z[:, :h].T @ Z
    P[h:, h:] = Z[:, h:d].T @ Z[:, h:]
    P[h:, :h] = P[:h, h:d].T
    return P


def _tsqr_step(R: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """R factor of ``[R; rows]``, trimmed to at most ``2d`` rows (upper trapezoidal)."""
    stacked = torch.cat([R, rows], dim=0)
    Rn = torch.linalg.qr(stacked, mode="r").R
    k = min(stacked.shape[0], stacked.shape[1])
    return Rn[:k].contiguous()


def n_chunks(n: int, chunk_rows: int) -> int:
    """Number of chunks of at most ``chunk_rows`` rows covering ``n`` rows."""
    return max(1, math.ceil(n / chunk_rows))
