"""``fit``: where statistics, families and solvers meet, and the :class:`Fit` it returns.

Row-vector convention throughout: a hidden state is a row ``x`` of shape ``(d,)``, the operator acts as
``x W`` with ``W = I + M``, and ``fit`` minimizes ``Σ_rows ‖x W − y‖² + λ‖M‖²`` over the chosen family.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import numpy as np
import torch

from .crossval import (
    CV_RIDGES,
    CVResult,
    FoldedStats,
    accumulate_folds,
    cv_rank,
    cv_ridge,
    gcv_ridge,
    ridge_applies,
)
from .errors import GhostsolveError, IllConditionedWarning, NonFiniteInputError
from .families import CLOSED_FORM, FAMILIES, MAGNITUDE, FamilyResult, solve_family, stats_features
from .solvers import (
    SOLVERS,
    Problem,
    check_full_rank,
    check_ridge,
    choose_solver,
    eig_decompose,
    eig_solution,
    eps,
    estimate_condition,
    kappa_safe,
    make_problem,
    rank_cutoff,
)
from .stats import Stats, as_rows, as_tensor, as_weights, check_dtype, check_finite, cpu_array

__all__ = ["Fit", "FitDiagnostics", "fit", "ridge_path"]

# Rows per internal chunk when fit() is given raw X, Y: keeps the extra memory O(chunk · d + d²)
# whatever N is, with GEMMs large enough to run near peak.
CHUNK_ROWS = 4096


class FitDiagnostics:
    """Numerical diagnostics of a :class:`Fit`; the costly ones are computed on first access.

    Attributes
    ----------
    condition_number : float
        ``cond(XᵀX + λI)`` from its eigenvalues (float64; ``O(d³)`` on first access unless the solver
        already had them). ``cond(X)`` is its square root.
    condition_estimate : float
        Cheap estimate of the same (:func:`ghostsolve.solvers.estimate_condition`).
    effective_rank : int
        Directions of ``X`` above the rank cutoff of the working dtype.
    normal_equation_residual : float
        ``‖(XᵀX + λI) M − Xᵀ(Y − X)‖ / ‖XᵀY‖`` (Frobenius, float64, from the statistics); with ``λ = 0``
        this is ``‖Xᵀ(X W − Y)‖ / ‖XᵀY‖``. Machine-precision small for ``full``; not zero for constrained
        families.
    objective_uncertainty : float
        Estimated rounding error ``δ`` of :attr:`Fit.objective` from the precision of the statistics:
        ``c · u · (‖XᵀX‖₁ ‖M‖² + 2 ‖Xᵀ(Y−X)‖ ‖M‖ + ‖Y − X‖²)`` with ``u`` the unit roundoff of the
        statistics' sums or products (whichever is coarser) and ``c = 8 (sqrt(n_rows) + d)``. An objective
        below ``δ`` is not resolved and is reported as the upper bound ``max(value, 0) + δ``.
    skew_share : float
        ``‖M − Mᵀ‖ / (2‖M‖)``: 0 for symmetric ``M``; the share no symmetric family can reach.
    notes : list of str
        Fallbacks and choices made (e.g. ``auto`` picking a solver, cholesky falling back).
    ridge_cv, rank_cv : CVResult or None
        The cross-validation curves when ``ridge``/``rank`` was ``"cv"`` or ``"gcv"``
        (:class:`~ghostsolve.crossval.CVResult`: grid, scores, per-fold scores, chosen value).
    fast_mode_safe : bool
        Whether fp32 chunk products (``Stats(product_dtype=torch.float32)``) keep the operator accurate to
        about 1e-3: ``cond(XᵀX + λI) ≤ 1e-3 / eps32 ≈ 8.4e3`` (estimate). A ridge makes it safer.
    """

    def __init__(
        self,
        stats: Stats,
        lam: float,
        delta: functools.partial[torch.Tensor],
        notes: list[str],
        dtype: torch.dtype,
        eigenvalues: torch.Tensor | None,
        rank: int | None,
        evaluation: Evaluation | None = None,
    ) -> None:
        self._stats = stats
        self._evaluation = evaluation
        self.ridge_cv: CVResult | None = None
        self.rank_cv: CVResult | None = None
        self._lam = lam
        self._delta = delta
        self.notes = list(notes)
        self._dtype = dtype
        self._eigenvalues = eigenvalues
        self._rank = rank

    @functools.cached_property
    def eigenvalues(self) -> torch.Tensor:
        """Eigenvalues of ``XᵀX + λI`` (ascending, float64)."""
        if self._eigenvalues is not None:
            return self._eigenvalues
        G = self._stats.xtx.double().clone()
        G.diagonal().add_(self._lam)
        return torch.linalg.eigvalsh(G).clamp_min(0)

    @functools.cached_property
    def condition_number(self) -> float:
        e = self.eigenvalues
        return math.inf if float(e[0]) <= 0 else float(e[-1] / e[0])

    @functools.cached_property
    def condition_estimate(self) -> float:
        G = self._stats.xtx.double().clone()
        G.diagonal().add_(self._lam)
        return estimate_condition(G)

    @functools.cached_property
    def effective_rank(self) -> int:
        if self._rank is not None:
            return self._rank
        e = self.eigenvalues
        cut = rank_cutoff(e.shape[0], self._dtype, from_gram=True) ** 2
        return int((e > cut * float(e[-1])).sum())

    @property
    def objective_uncertainty(self) -> float:
        return self.evaluation.uncertainty

    @property
    def evaluation(self) -> Evaluation:
        """The objective's raw value, uncertainty and normal-equation residual (float64)."""
        assert self._evaluation is not None
        return self._evaluation

    @functools.cached_property
    def normal_equation_residual(self) -> float:
        if self._evaluation is not None and self._evaluation.ne_residual is not None:
            return self._evaluation.ne_residual
        M = self._delta().double()
        G = self._stats.xtx.double()
        B = self._stats.xtd.double()
        res = G @ M + self._lam * M - B
        den = float(torch.linalg.matrix_norm(self._stats.xty.double()))
        return float(torch.linalg.matrix_norm(res)) / den if den > 0 else float(torch.linalg.matrix_norm(res))

    @functools.cached_property
    def skew_share(self) -> float:
        M = self._delta().double()
        n = float(torch.linalg.matrix_norm(M))
        return float(torch.linalg.matrix_norm(M - M.T)) / (2 * n) if n > 0 else 0.0

    @property
    def fast_mode_safe(self) -> bool:
        return self.condition_estimate <= kappa_safe(torch.float32)

    def as_dict(self) -> dict[str, Any]:
        """Every diagnostic as plain Python values (computes the lazy ones)."""
        return {
            "condition_number": self.condition_number,
            "condition_estimate": self.condition_estimate,
            "effective_rank": self.effective_rank,
            "normal_equation_residual": self.normal_equation_residual,
            "objective_uncertainty": self.objective_uncertainty,
            "skew_share": self.skew_share,
            "fast_mode_safe": self.fast_mode_safe,
            "notes": list(self.notes),
            "ridge_cv": None if self.ridge_cv is None else self.ridge_cv.as_dict(),
            "rank_cv": None if self.rank_cv is None else self.rank_cv.as_dict(),
        }

    def __repr__(self) -> str:
        return "FitDiagnostics(" + ", ".join(f"{k}={v!r}" for k, v in self.as_dict().items()) + ")"


@dataclass(frozen=True, eq=False)
class Fit:
    """A fitted operator ``W = I + M`` and how it was obtained.

    Attributes
    ----------
    family, solver : str
        The family; the solver actually used (``"closed-form"`` for formula families, ``"cholesky→svd"``
        style when a fallback happened).
    dtype : torch.dtype
        Working precision of the solve.
    ridge : float
        Relative ridge as given; ``lam`` is the absolute ``λ = ridge · mean(diag(XᵀX))``.
    rank : int or None
        Rank of a ``lowrank`` fit.
    objective : float
        ``Σ_rows ‖x W − y‖²`` from the statistics (float64; without the ridge penalty).
    relative_residual : float
        ``objective / Σ_rows ‖y − x‖²`` (1 for ``identity``). When ``Y == X`` exactly there is nothing to
        recover: 0 if the fit is exact too, ``inf`` otherwise.
    diagnostics : FitDiagnostics
    n_rows : int
        Rows with a nonzero weight the statistics hold (before 0.2: the weighted sum, now
        :attr:`weight_sum`).
    weight_sum : float
        ``Σ w`` over those rows (equal to ``n_rows`` for unweighted rows and 0/1 masks).
    """

    family: str
    solver: str
    dtype: torch.dtype
    ridge: float
    lam: float
    rank: int | None
    objective: float
    relative_residual: float
    diagnostics: FitDiagnostics = field(repr=False)
    n_rows: int
    dim: int
    weight_sum: float = 0.0
    _delta: torch.Tensor | None = field(repr=False, default=None)
    _factors: tuple[torch.Tensor, torch.Tensor] | None = field(repr=False, default=None)

    @property
    def delta(self) -> torch.Tensor:
        """``M = W − I``, shape ``(d, d)`` in :attr:`dtype` (materialized from the factors for lowrank)."""
        if self._delta is not None:
            return self._delta
        assert self._factors is not None
        U, V = self._factors
        return U @ V.T

    @property
    def weight(self) -> torch.Tensor:
        """``W = I + M``, shape ``(d, d)``; apply as ``x @ W`` to rows."""
        M = self.delta
        return M + torch.eye(self.dim, dtype=M.dtype, device=M.device)

    @property
    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(U, V)`` with ``M = U Vᵀ`` (each ``(d, r)``) for ``lowrank``; ``None`` otherwise."""
        return self._factors

    @overload
    def __call__(self, h: torch.Tensor) -> torch.Tensor: ...

    @overload
    def __call__(self, h: np.ndarray) -> np.ndarray: ...

    def __call__(self, h: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """``h W`` for ``h`` of shape ``(..., d)``, in ``h``'s dtype, device and kind.

        A tensor gives a tensor (differentiable in ``h``); a numpy array gives a numpy array of its dtype.
        Computed as ``h + h M`` so the identity part is exact in low precision.

        Raises
        ------
        GhostsolveError
            When ``h`` is not a float tensor or array, or ``h.shape[-1] != d``.
        """
        if isinstance(h, np.ndarray):
            out = self(as_tensor(h, "h"))
            return out.numpy().astype(h.dtype, copy=False)
        if not isinstance(h, torch.Tensor) or not h.is_floating_point():
            raise GhostsolveError(
                f"h must be a float torch.Tensor or numpy array (..., {self.dim}), got "
                f"{type(h).__name__}{' of dtype ' + str(h.dtype) if isinstance(h, torch.Tensor) else ''}"
            )
        if h.dim() == 0 or h.shape[-1] != self.dim:
            raise GhostsolveError(
                f"h is {tuple(h.shape)} but this Fit has d={self.dim}; h must be (..., {self.dim})"
            )
        if self._factors is not None:
            U, V = (t.to(dtype=h.dtype, device=h.device) for t in self._factors)
            return h + (h @ U) @ V.T
        return h + h @ self.delta.to(dtype=h.dtype, device=h.device)

    def objective_on(self, stats: Stats | FoldedStats) -> float:
        """``Σ ‖x W − y‖²`` of this operator on the rows summarized by other ``stats`` (e.g. held out)."""
        if isinstance(stats, FoldedStats):
            stats = stats.total
        if not isinstance(stats, Stats):
            raise GhostsolveError(f"objective_on needs Stats, got {type(stats).__name__}")
        if stats.dim != self.dim:
            raise GhostsolveError(f"stats have dim {stats.dim} but this Fit has d={self.dim}")
        stats.check_statistics()
        return evaluate(stats, self.delta, 0.0).objective

    def __repr__(self) -> str:
        return (
            f"Fit(family={self.family!r}, solver={self.solver!r}, dtype={self.dtype}, ridge={self.ridge:g}, "
            f"rank={self.rank}, d={self.dim}, n_rows={self.n_rows}, objective={self.objective:.6g}, "
            f"relative_residual={self.relative_residual:.6g})"
        )


@dataclass(frozen=True)
class Evaluation:
    """An operator measured on statistics (float64): what :attr:`Fit.objective` and its checks report.

    Attributes
    ----------
    value : float
        ``Σ ‖x M − (y − x)‖²`` as computed: through ``R`` when known, else ``tr(Mᵀ(GM − 2B)) + ‖D‖²``, or,
        for a solve certified by ``auto`` (float64 cholesky with ``cond ≤ κ_safe``), from the normal
        equations as ``‖D‖² − tr(MᵀB) − λ‖M‖²`` (see :func:`evaluate`).
    uncertainty : float
        Estimated rounding error ``δ`` of ``value`` (see :class:`FitDiagnostics`).
    ne_residual : float or None
        ``‖(G + λI) M − B‖ / ‖XᵀY‖``; None when not computed (a certified solve).
    low_precision : bool
        Whether the statistics were summed or multiplied in less than float64.
    g_norm1, m_norm, b_norm, c_norm : float
        ``‖XᵀX‖₁``, ``‖M‖``, ``‖Xᵀ(Y−X)‖``, ``‖XᵀY‖`` (Frobenius but the first), for the checks.
    """

    value: float
    uncertainty: float
    ne_residual: float | None
    low_precision: bool
    g_norm1: float = 0.0
    m_norm: float = 0.0
    b_norm: float = 0.0
    c_norm: float = 0.0

    @property
    def resolved(self) -> bool:
        return self.value >= self.uncertainty

    @property
    def objective(self) -> float:
        """``value`` when resolved, else the upper bound ``max(value, 0) + δ``: never below the truth."""
        return self.value if self.resolved else max(self.value, 0.0) + self.uncertainty


def evaluate(stats: Stats, M: torch.Tensor, lam: float, *, certified: bool = False) -> Evaluation:
    """Objective, its rounding uncertainty and the normal-equation residual of ``M`` on ``stats``.

    One ``d × d`` product ``G M`` in float64 serves both the Gram-form objective and the residual. With
    ``certified=True`` (a float64 cholesky solve whose conditioning ``auto`` vetted) the product is
    skipped: ``tr(MᵀGM) = tr(MᵀB) − λ‖M‖² + tr(MᵀR)`` with ``R`` the normal-equation residual, which a
    backward-stable solve keeps below ``c · eps · ‖G‖‖M‖``; that bound on ``|tr(MᵀR)|`` is added to the
    uncertainty, so the reported objective stays honest.
    """
    dev = stats.device
    M = M.to(dtype=torch.float64, device=dev)
    G = stats.xtx.double()
    B = stats.xtd.double()
    dtd = float(stats.dtd)
    u = max(eps(stats.dtype), eps(stats.product_dtype)) / 2
    c = 8 * (math.sqrt(max(stats.n_rows, 1)) + stats.dim)
    m_norm, b_norm, c_norm = _frobenius(M), _frobenius(B), _frobenius(G, B)
    g1 = _norm1(G)  # ‖G‖₁ ≥ ‖G‖₂ for symmetric G, O(d²)
    delta = c * u * (g1 * m_norm * m_norm + 2 * b_norm * m_norm + abs(dtd))
    ne: float | None = None
    if certified and stats.r_factor is None:
        value = dtd - _inner(M, B) - lam * m_norm * m_norm
        delta += c * eps(torch.float64) * g1 * m_norm * m_norm
    else:
        GM = G @ M
        if stats.r_factor is not None:
            # through R: a sum of squares, no cancellation
            R = stats.r_factor.double()
            d = stats.dim
            value = float(torch.linalg.matrix_norm(R[:, :d] @ M - R[:, d:]) ** 2)
        else:
            value = float((M * (GM - 2 * B)).sum()) + dtd
        ne = float(torch.linalg.matrix_norm(GM.add_(M, alpha=lam).sub_(B)))
        ne = ne / c_norm if c_norm > 0 else ne
    return Evaluation(value, delta, ne, u > eps(torch.float64), g1, m_norm, b_norm, c_norm)


# The O(d²) reductions of `evaluate` run right after the statistics' OpenBLAS products and LAPACK solve:
# on the CPU by numpy (measured 37 ms instead of 4 ms for `evaluate` at d = 1024 on 2 cores with torch
# there; see ghostsolve.stats.cpu_array). Overflow gives inf and NaN input NaN, as in torch: numpy's
# warnings about them are silenced.
@np.errstate(over="ignore", invalid="ignore")
def _frobenius(t: torch.Tensor, plus: torch.Tensor | None = None) -> float:
    """``‖t‖_F``, or ``‖t + plus‖_F``."""
    a = cpu_array(t)
    if a is None:
        return float(torch.linalg.matrix_norm(t if plus is None else t + plus))
    return float(np.linalg.norm(a if plus is None else a + plus.detach().numpy()))


@np.errstate(over="ignore", invalid="ignore")
def _norm1(t: torch.Tensor) -> float:
    a = cpu_array(t)
    return float(t.abs().sum(dim=0).max()) if a is None else float(np.abs(a).sum(axis=0).max())


@np.errstate(over="ignore", invalid="ignore")
def _inner(a: torch.Tensor, b: torch.Tensor) -> float:
    """``Σ a ⊙ b`` of two float64 matrices."""
    an = cpu_array(a)
    return float((a * b).sum()) if an is None else float(np.vdot(an, b.detach().numpy()))


def _validate(family: str, solver: str, dtype: torch.dtype, rank: Any) -> int | str | None:
    """Check the names and the rank; returns the rank as an int (or None)."""
    if family not in FAMILIES:
        raise GhostsolveError(f"unknown family {family!r}; valid families: {', '.join(FAMILIES)}")
    if solver not in SOLVERS:
        raise GhostsolveError(f"unknown solver {solver!r}; valid solvers: {', '.join(SOLVERS)}")
    check_dtype(dtype, "dtype")
    if family == "lowrank":
        if isinstance(rank, numbers.Integral) and not isinstance(rank, bool) and int(rank) >= 0:
            return int(rank)
        if rank == "cv":
            return "cv"
        raise GhostsolveError(
            f"family='lowrank' needs rank=r, an int with 0 ≤ r ≤ d, or rank='cv'; got rank={rank!r}"
        )
    if rank is not None:
        raise GhostsolveError(f"rank={rank!r} is only used by family='lowrank' (got family={family!r})")
    return None


def accumulate(
    X: Any,
    Y: Any,
    weights: Any = None,
    *,
    dtype: torch.dtype = torch.float64,
    qr: bool = False,
    magnitudes: bool = True,
    hadamard_magnitudes: bool | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> Stats:
    """:class:`Stats` of all rows of ``X`` and ``Y`` (``(..., d)``), fed in chunks of ``chunk_rows``.

    Raises
    ------
    GhostsolveError
        As :meth:`Stats.update`; a :class:`NonFiniteInputError` counts its rows over all of ``X``.
    """
    X = as_rows(X, "X")
    Y = as_rows(Y, "Y")
    d = X.shape[-1]
    if Y.shape != X.shape:
        raise GhostsolveError(
            f"X is {tuple(X.shape)} but Y is {tuple(Y.shape)}; both must be (n_tokens, hidden_size={d})"
        )
    if d < 1:
        raise GhostsolveError(f"X is {tuple(X.shape)}; it must be (n_tokens, hidden_size ≥ 1)")
    stats = Stats(
        d, dtype=dtype, device=X.device, qr=qr, magnitudes=magnitudes, hadamard_magnitudes=hadamard_magnitudes
    )
    X2, Y2 = X.reshape(-1, d), Y.reshape(-1, d)
    w = None if weights is None else as_weights(weights, tuple(X.shape), X.device)
    try:
        for start in range(0, X2.shape[0], chunk_rows):
            sl = slice(start, start + chunk_rows)
            stats.update(X2[sl], Y2[sl], None if w is None else w[sl])
    except NonFiniteInputError:
        check_finite(X2, Y2)  # re-raise with row numbers counted over all of X, not the chunk
        raise
    return stats


def _statistics(
    X_or_stats: Any,
    Y: Any,
    weights: Any,
    features: dict[str, bool],
    caller: str = "fit",
    folds: Any = None,
) -> tuple[Stats, tuple[Any, Any, Any] | None, FoldedStats | None]:
    """The statistics to fit from, the raw rows when they were given (for a second TSQR pass), and the
    fold statistics when there are folds (a ``FoldedStats``, or raw rows with ``folds`` labels)."""
    raw, folded = None, None
    if isinstance(X_or_stats, (Stats, FoldedStats)):
        if Y is not None or weights is not None or folds is not None:
            raise GhostsolveError(
                f"{caller}(stats) takes no Y, weights or folds: they are already in the statistics"
            )
        X_or_stats.check_statistics()
        folded = X_or_stats if isinstance(X_or_stats, FoldedStats) else None
        stats = X_or_stats.total if isinstance(X_or_stats, FoldedStats) else X_or_stats
    else:
        if Y is None:
            raise GhostsolveError(
                f"{caller}(X, Y) needs Y (n_tokens, d), or pass a Stats object instead of X"
            )
        raw = (X_or_stats, Y, weights)
        # Exact (float64) statistics whatever the working dtype: the objective is then evaluated on what
        # the rows really are, and a float32 solve is judged by its own error, not the statistics'.
        mag, hmag = features["magnitudes"], features["hadamard_magnitudes"]
        if folds is not None:
            folded = accumulate_folds(X_or_stats, Y, folds, weights, magnitudes=mag, hadamard_magnitudes=hmag)
            stats = folded.total
        else:
            stats = accumulate(*raw, qr=features["qr"], magnitudes=mag, hadamard_magnitudes=hmag)
    if stats.n_rows <= 0:
        raise GhostsolveError("the statistics hold no rows (n_rows=0); feed rows with Stats.update first")
    return stats, raw, folded


def fit(
    X_or_stats: Any,
    Y: Any = None,
    *,
    family: str = "full",
    solver: str = "auto",
    ridge: float | str = 0.0,
    dtype: torch.dtype = torch.float64,
    rank: int | str | None = None,
    weights: Any = None,
    folds: Any = None,
    ridge_grid: Sequence[float] = CV_RIDGES,
) -> Fit:
    """Fit the operator ``W = I + M`` minimizing ``Σ_rows ‖x W − y‖² + λ‖M‖²`` over a family.

    Parameters
    ----------
    X_or_stats : (n_tokens, d) tensor or array, Stats, or FoldedStats
        Rows entering the first removed layer (any float dtype; leading dims are flattened), or
        precomputed statistics (then ``Y``, ``weights`` and ``folds`` must be None). A
        :class:`~ghostsolve.crossval.FoldedStats` is fitted as the sum of its folds; its folds serve
        ``ridge="cv"`` and ``rank="cv"``.
    Y : (n_tokens, d) tensor or array, optional
        Rows entering the first kept layer after the removed block.
    family : str, default "full"
        One of :data:`FAMILIES` (see :mod:`ghostsolve.families`).
    solver : str, default "auto"
        One of :data:`SOLVERS` (see :mod:`ghostsolve.solvers`); used by ``full``, ``lowrank`` and
        ``symmetric``. ``auto`` follows :func:`ghostsolve.solvers.choose_solver`.
    ridge : float, "cv" or "gcv", default 0
        Relative ridge: ``λ = ridge · mean(diag(XᵀX))``; any real number type (numpy scalars too).
        ``"cv"`` chooses it on ``ridge_grid`` by exact K-fold cross-validation over the folds (a
        ``FoldedStats``, or ``folds`` labels with raw rows), ``"gcv"`` by generalised cross-validation
        of the full operator on the summed statistics (see :mod:`ghostsolve.crossval` for the rule). The
        chosen value is :attr:`Fit.ridge`; the curve is ``Fit.diagnostics.ridge_cv``. Families without a
        ridge (identity, the magnitude rules) are fitted as they are, with a note. ``lowrank`` with
        ``rank="cv"`` takes the ridge chosen for ``full``; ``gcv`` is the full operator's criterion for
        every family.
    dtype : torch.float64 or torch.float32
        Working precision of the solve. With raw ``X, Y`` the statistics are always exact float64 sums
        of float64 products (so :attr:`Fit.objective` measures the operator on the rows themselves);
        with ``Stats`` they are cast to ``dtype`` for the solve.
    rank : int or "cv", optional
        Rank ``r`` of ``lowrank`` (``0 ≤ r ≤ d``; ``r = d`` equals ``full``); ``"cv"`` chooses it among
        ``0…d`` by K-fold cross-validation (curve in ``Fit.diagnostics.rank_cv``).
    weights : (n_tokens,) tensor, optional
        Nonnegative row weights (e.g. a padding mask); only with raw ``X, Y``.
    folds : (n_tokens,) integer tensor, optional
        With raw ``X, Y``: the fold of each row, ``0…K−1`` (give all tokens of a sequence one label).
    ridge_grid : sequence of float
        Relative ridges tried by ``ridge="cv"``/``"gcv"`` (default :data:`~ghostsolve.crossval.CV_RIDGES`:
        0 and 1e-8…10 in half decades).

    Returns
    -------
    Fit

    Raises
    ------
    GhostsolveError
        Unknown family or solver (lists the valid ones); shape or dtype mismatch; NaN/Inf rows; fewer
        rows than ``d`` with ``cholesky``/``qr`` and no ridge; ``rank > d``; ``qr`` on ``Stats`` without a
        TSQR factor; an unsupported ``d`` for the hadamard families; ``ridge="cv"`` or ``rank="cv"``
        without at least two folds holding rows.
    NumericalError
        Non-finite statistics (e.g. from a corrupted state dict).

    Warns
    -----
    IllConditionedWarning
        When ``cholesky`` succeeds on a system too ill-conditioned for ``dtype``; when a truncating solver
        (``eigh``, ``svd``) drops directions the rows span; when the normal-equation residual is far above
        the level of ``dtype``; when the objective is below what low-precision statistics resolve.

    Examples
    --------
    >>> X = torch.randn(256, 8, dtype=torch.float64)
    >>> W_true = torch.eye(8) + 0.1 * torch.randn(8, 8, dtype=torch.float64)
    >>> f = fit(X, X @ W_true)
    >>> bool(torch.allclose(f.weight, W_true))
    True
    """
    rank_in = _validate(family, solver, dtype, rank)
    lam_in = ridge if isinstance(ridge, str) and ridge in ("cv", "gcv") else check_ridge(ridge)
    # only what the family (and an explicitly named solver) needs: see Stats.for_families
    features = stats_features([family], [solver] if family not in CLOSED_FORM else [])
    stats, raw, folded = _statistics(X_or_stats, Y, weights, features, folds=folds)
    d = stats.dim
    if isinstance(rank_in, int) and rank_in > d:
        raise GhostsolveError(f"rank={rank_in} exceeds d={d}; use rank ≤ {d} (rank={d} equals family='full')")
    lam_rel, rank_, cv = _cross_validate(family, lam_in, rank_in, stats, folded, ridge_grid)
    resolved, checked, notes, stats, factor = _resolve_solver(family, solver, stats, dtype, lam_rel, raw)
    problem = make_problem(stats, dtype, lam_rel)
    problem.factor64 = factor
    res = solve_family(family, problem, stats, resolved, rank_, checked=checked)
    # auto vetted cond(XᵀX+λI) ≤ κ_safe(float64) and cholesky succeeded: backward stable, residual bounded
    certified = checked and family == "full" and res.solver == "cholesky" and dtype == torch.float64
    notes = [*cv.pop("notes"), *notes]
    out = _make_fit(family, res, stats, problem, dtype, lam_rel, rank_, notes, certified)
    out.diagnostics.ridge_cv, out.diagnostics.rank_cv = cv["ridge"], cv["rank"]
    _warn_if_suspect(out, res, stats)
    return out


def _cross_validate(
    family: str,
    ridge: float | str,
    rank: int | str | None,
    stats: Stats,
    folded: FoldedStats | None,
    grid: Sequence[float],
) -> tuple[float, int | None, dict[str, Any]]:
    """The ridge and rank to fit with, after any ``"cv"``/``"gcv"`` choice, and the curves and notes."""
    out: dict[str, Any] = {"ridge": None, "rank": None, "notes": []}
    if isinstance(ridge, str) and not ridge_applies(family):
        out["notes"].append(f"family={family!r} has no ridge; ridge={ridge!r} fitted it without one")
        ridge = 0.0
    if ridge == "gcv":
        out["ridge"] = gcv_ridge(stats, grid=grid)
    elif ridge == "cv":
        if folded is None:
            raise GhostsolveError(
                "ridge='cv' needs folds: pass a FoldedStats, or raw X, Y with folds=<fold label per row>; "
                "with a single Stats use ridge='gcv'"
            )
        fixed = rank if isinstance(rank, int) else None
        out["ridge"] = cv_ridge(
            folded,
            family=family if fixed is not None or family != "lowrank" else "full",
            grid=grid,
            rank=fixed,
        )
    if out["ridge"] is not None:
        ridge = out["ridge"].chosen
        out["notes"].append(f"ridge {ridge:g} chosen by {out['ridge'].method} ({out['ridge'].rule})")
    assert isinstance(ridge, float)
    if rank == "cv":
        if folded is None:
            raise GhostsolveError(
                "rank='cv' needs folds: pass a FoldedStats, or raw X, Y with folds=<fold label per row>"
            )
        out["rank"] = cv_rank(folded, ridge=ridge)
        rank = int(out["rank"].chosen)
        out["notes"].append(f"rank {rank} chosen by kfold ({out['rank'].rule})")
    assert rank is None or isinstance(rank, int)
    return ridge, rank, out


def _resolve_solver(
    family: str, solver: str, stats: Stats, dtype: torch.dtype, ridge: float, raw: tuple[Any, Any, Any] | None
) -> tuple[str, bool, list[str], Stats, torch.Tensor | None]:
    """The solver actually used, whether ``auto`` vetted the conditioning, notes, the statistics
    (rebuilt with a TSQR factor when ``auto`` wants one and the rows are at hand), and the float64
    Cholesky factor ``auto`` already computed (or None)."""
    notes: list[str] = []
    if family in CLOSED_FORM:
        if solver != "auto":
            notes.append(f"family={family!r} has a closed form; solver={solver!r} was not used")
        return "closed-form", False, notes, stats, None
    if family == "symmetric":
        if solver == "auto":
            return ("svd" if stats.r_factor is not None else "eigh"), False, notes, stats, None
        return solver, False, notes, stats, None
    resolved, checked, factor = solver, False, None
    if solver == "auto":
        choice = choose_solver(stats, dtype=dtype, ridge=ridge, raw_data=raw is not None)
        resolved, checked, factor = choice.solver, True, choice.factor
        notes.append(f"auto chose {choice}")
        if resolved in ("qr", "svd") and stats.r_factor is None and raw is not None:
            stats = accumulate(*raw, qr=True, magnitudes=False, hadamard_magnitudes=False)
    check_full_rank(resolved, stats.n_rows, stats.dim, ridge)
    return resolved, checked, notes, stats, factor


def _make_fit(
    family: str,
    res: FamilyResult,
    stats: Stats,
    problem: Problem,
    dtype: torch.dtype,
    ridge: float,
    rank: int | None,
    notes: list[str],
    certified: bool = False,
) -> Fit:
    M = res.delta if res.delta is not None else _product(res.factors)
    ev = evaluate(stats, M, problem.lam, certified=certified)
    objective = ev.objective
    dtd = float(stats.dtd)
    if dtd > 0:
        rel = objective / dtd
    else:
        rel = 0.0 if objective == 0 else math.inf
    if family in MAGNITUDE and ridge:
        notes.append(f"family={family!r} is a magnitude rule; ridge={ridge:g} does not apply to it")
    if not ev.resolved and ev.value != objective:
        notes.append(
            f"objective {ev.value:.3g} is below its rounding uncertainty {ev.uncertainty:.3g}; reported as "
            "the upper bound max(value, 0) + uncertainty"
        )
    diag = FitDiagnostics(
        stats,
        problem.lam,
        functools.partial(_same, M),
        [*notes, *res.notes],
        dtype,
        res.eigenvalues,
        res.rank,
        ev,
    )
    return Fit(
        family=family,
        solver=res.solver,
        dtype=dtype,
        ridge=float(ridge),
        lam=problem.lam,
        rank=rank,
        objective=objective,
        relative_residual=rel,
        diagnostics=diag,
        n_rows=stats.n_rows,
        dim=stats.dim,
        weight_sum=stats.weight_sum,
        _delta=res.delta,
        _factors=res.factors,
    )


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _product(factors: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    assert factors is not None
    return factors[0] @ factors[1].T


# A normal-equation residual this many times the backward-error level of the working dtype is not
# rounding: the solution is wrong (a solver failure), not merely inaccurate. The level itself is the
# generous c · eps · (‖G‖₁‖M‖ + ‖B‖) / ‖XᵀY‖ (c as in the objective's uncertainty), which correct solves
# in our tests stay below by one to three orders of magnitude.
_NE_FAR = 10.0


def _suspect(f: Fit, res: FamilyResult, stats: Stats) -> list[str]:
    """Why a solve or its objective cannot be trusted (empty when it can); see :func:`fit`'s Warns."""
    d, dtype = stats.dim, f.dtype
    ev = f.diagnostics.evaluation
    out = []
    spanned = min(stats.n_rows, d)
    if res.rank is not None and res.rank < spanned and f.family in ("full", "lowrank", "symmetric"):
        out.append(
            f"{res.solver} in {dtype} kept {res.rank} of {d} directions (the rest lie below its rank "
            f"cutoff); "
            f"the operator ignores {spanned - res.rank} directions the rows span: use solver='qr' or "
            "'auto', dtype=torch.float64, or a ridge"
        )
    elif f.family == "full" and ev.ne_residual is not None and (stats.n_rows >= d or f.lam > 0):
        # (with fewer rows than d and no ridge the minimum-norm solve leaves, by design, what XᵀX cannot
        # see; a certified cholesky solve has no residual computed: its conditioning already bounds it)
        c = 8 * (math.sqrt(max(stats.n_rows, 1)) + d)
        scale = ev.g_norm1 * ev.m_norm + ev.b_norm
        level = c * eps(dtype) * scale / ev.c_norm if ev.c_norm > 0 else 0.0
        if level > 0 and ev.ne_residual > _NE_FAR * level:
            out.append(
                f"the normal-equation residual {ev.ne_residual:.2g} is {ev.ne_residual / level:.3g}× the "
                f"level {level:.2g} of {dtype}: the solve failed; use solver='qr' or 'svd', or "
                "dtype=torch.float64"
            )
    if ev.low_precision and not ev.resolved:
        out.append(
            f"the objective ({ev.value:.3g}) is below what these statistics resolve (±{ev.uncertainty:.3g}, "
            f"dtype={stats.dtype}, product_dtype={stats.product_dtype}); it is reported as its upper bound. "
            "Build the statistics in float64 (Stats(dim)) for an exact value"
        )
    return out


def _warn_if_suspect(f: Fit, res: FamilyResult, stats: Stats) -> None:
    for message in _suspect(f, res, stats):
        f.diagnostics.notes.append(message)
        warnings.warn(message, IllConditionedWarning, stacklevel=3)


def ridge_path(
    X_or_stats: Any,
    Y: Any = None,
    *,
    ridges: Sequence[float],
    dtype: torch.dtype = torch.float64,
    weights: Any = None,
) -> list[Fit]:
    """``full`` fits for several relative ridges from one eigendecomposition of ``XᵀX``.

    Each extra ridge costs ``O(d³)`` matrix products but no new factorization
    (``M(λ) = V diag(1/(e + λ)) Vᵀ B``).

    Parameters
    ----------
    X_or_stats, Y, dtype, weights
        As :func:`fit`.
    ridges : sequence of float
        Relative ridges (each ≥ 0).

    Returns
    -------
    list of Fit
        In the order of ``ridges``, each with ``solver="eigh"``.

    Raises
    ------
    GhostsolveError
        As :func:`fit`.
    NumericalError
        Non-finite statistics.
    """
    _validate("full", "eigh", dtype, None)
    values = [check_ridge(r) for r in ridges]
    stats, _, _ = _statistics(X_or_stats, Y, weights, stats_features(["full"]), caller="ridge_path")
    base = make_problem(stats, dtype, 0.0)
    e, V, VtB = eig_decompose(base)
    fits = []
    for r in values:
        problem = make_problem(stats, dtype, r)
        M, kept = eig_solution(e, V, VtB, problem.lam)
        res = FamilyResult(M, None, "eigh", [], (e.double() + problem.lam).clamp_min(0), kept)
        fits.append(
            _make_fit("full", res, stats, problem, dtype, r, None, [f"ridge path over {len(values)} ridges"])
        )
    return fits
