"""``fit``: where statistics, families and solvers meet, and the :class:`Fit` it returns.

Row-vector convention throughout: a hidden state is a row ``x`` of shape ``(d,)``, the operator acts as
``x W`` with ``W = I + M``, and ``fit`` minimizes ``Σ_rows ‖x W − y‖² + λ‖M‖²`` over the chosen family.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import GhostsolveError, NonFiniteInputError
from .families import CLOSED_FORM, FAMILIES, MAGNITUDE, FamilyResult, solve_family
from .solvers import (
    SOLVERS,
    Problem,
    check_full_rank,
    choose_solver,
    eig_decompose,
    eig_solution,
    estimate_condition,
    kappa_safe,
    make_problem,
    rank_cutoff,
)
from .stats import Stats, as_tensor, check_dtype, check_finite

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
        ``‖(XᵀX + λI) M − Xᵀ(Y − X)‖ / ‖XᵀY‖`` (Frobenius, float64); with ``λ = 0`` this is
        ``‖Xᵀ(X W − Y)‖ / ‖XᵀY‖``. Machine-precision small for ``full``; not zero for constrained families.
    skew_share : float
        ``‖M − Mᵀ‖ / (2‖M‖)``: 0 for symmetric ``M``; the share no symmetric family can reach.
    notes : list of str
        Fallbacks and choices made (e.g. ``auto`` picking a solver, cholesky falling back).
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
    ) -> None:
        self._stats = stats
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

    @functools.cached_property
    def normal_equation_residual(self) -> float:
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
            "skew_share": self.skew_share,
            "fast_mode_safe": self.fast_mode_safe,
            "notes": list(self.notes),
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
    n_rows : float
        Weighted number of rows the statistics hold.
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
    n_rows: float
    dim: int
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

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """``h W`` for ``h`` of shape ``(..., d)``, in ``h``'s dtype and device.

        Computed as ``h + h M`` so the identity part is exact in low precision.

        Raises
        ------
        GhostsolveError
            When ``h.shape[-1] != d``.
        """
        if h.shape[-1] != self.dim:
            raise GhostsolveError(
                f"h is {tuple(h.shape)} but this Fit has d={self.dim}; h must be (..., {self.dim})"
            )
        if self._factors is not None:
            U, V = (t.to(dtype=h.dtype, device=h.device) for t in self._factors)
            return h + (h @ U) @ V.T
        return h + h @ self.delta.to(dtype=h.dtype, device=h.device)

    def objective_on(self, stats: Stats) -> float:
        """``Σ ‖x W − y‖²`` of this operator on the rows summarized by other ``stats`` (e.g. held out)."""
        if stats.dim != self.dim:
            raise GhostsolveError(f"stats have dim {stats.dim} but this Fit has d={self.dim}")
        return _objective(stats, self._delta, self._factors)

    def __repr__(self) -> str:
        return (
            f"Fit(family={self.family!r}, solver={self.solver!r}, dtype={self.dtype}, ridge={self.ridge:g}, "
            f"rank={self.rank}, d={self.dim}, n_rows={self.n_rows:g}, objective={self.objective:.6g}, "
            f"relative_residual={self.relative_residual:.6g})"
        )


def _objective(
    stats: Stats, delta: torch.Tensor | None, factors: tuple[torch.Tensor, torch.Tensor] | None
) -> float:
    """``Σ ‖x M − (y − x)‖²`` in float64, through ``R`` when known (no cancellation), else the Gram form."""
    d = stats.dim
    dev = stats.device
    if stats.r_factor is not None:
        R = stats.r_factor.double()
        if factors is not None:
            U, V = (t.to(dtype=torch.float64, device=dev) for t in factors)
            fitted = (R[:, :d] @ U) @ V.T
        else:
            assert delta is not None
            fitted = R[:, :d] @ delta.to(dtype=torch.float64, device=dev)
        return float(torch.linalg.matrix_norm(fitted - R[:, d:]) ** 2)
    M = (factors[0] @ factors[1].T) if factors is not None else delta
    assert M is not None
    M = M.to(dtype=torch.float64, device=dev)
    G = stats.xtx.double()
    B = stats.xtd.double()
    # ‖XM − D‖² = tr(MᵀGM) − 2 tr(MᵀB) + ‖D‖²; rounding can leave a tiny negative value at an exact fit.
    value = float((M * (G @ M - 2 * B)).sum() + stats.dtd.double())
    return max(value, 0.0)


def _validate(family: str, solver: str, ridge: float, dtype: torch.dtype, rank: int | None) -> None:
    if family not in FAMILIES:
        raise GhostsolveError(f"unknown family {family!r}; valid families: {', '.join(FAMILIES)}")
    if solver not in SOLVERS:
        raise GhostsolveError(f"unknown solver {solver!r}; valid solvers: {', '.join(SOLVERS)}")
    check_dtype(dtype, "dtype")
    if not isinstance(ridge, (int, float)) or not math.isfinite(ridge) or ridge < 0:
        raise GhostsolveError(
            f"ridge must be a finite number ≥ 0 (relative to mean(diag(XᵀX))), got {ridge!r}; try 0 or 1e-4"
        )
    if family == "lowrank":
        if rank is None or isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise GhostsolveError(f"family='lowrank' needs rank=r, an int with 0 ≤ r ≤ d; got rank={rank!r}")
    elif rank is not None:
        raise GhostsolveError(f"rank={rank!r} is only used by family='lowrank' (got family={family!r})")


def accumulate(
    X: Any,
    Y: Any,
    weights: Any = None,
    *,
    dtype: torch.dtype = torch.float64,
    qr: bool = False,
    magnitudes: bool = True,
    chunk_rows: int = CHUNK_ROWS,
) -> Stats:
    """:class:`Stats` of all rows of ``X`` and ``Y`` (``(..., d)``), fed in chunks of ``chunk_rows``.

    Raises
    ------
    GhostsolveError
        As :meth:`Stats.update`.
    """
    X = as_tensor(X, "X")
    Y = as_tensor(Y, "Y")
    if X.dim() < 1 or X.shape[-1] < 1:
        raise GhostsolveError(f"X is {tuple(X.shape)}; it must be (n_tokens, hidden_size)")
    if Y.shape != X.shape:
        d = X.shape[-1]
        raise GhostsolveError(
            f"X is {tuple(X.shape)} but Y is {tuple(Y.shape)}; both must be (n_tokens, hidden_size={d})"
        )
    d = X.shape[-1]
    stats = Stats(d, dtype=dtype, device=X.device, qr=qr, magnitudes=magnitudes)
    X2, Y2 = X.reshape(-1, d), Y.reshape(-1, d)
    w = None
    if weights is not None:
        w = as_tensor(weights, "weights")
        if tuple(w.shape) not in (tuple(X.shape[:-1]), (X2.shape[0],)):
            raise GhostsolveError(
                f"weights is {tuple(w.shape)} but X is {tuple(X.shape)}; "
                f"weights must be {tuple(X.shape[:-1])}"
            )
        w = w.reshape(-1)
    try:
        for start in range(0, X2.shape[0], chunk_rows):
            sl = slice(start, start + chunk_rows)
            stats.update(X2[sl], Y2[sl], None if w is None else w[sl])
    except NonFiniteInputError:
        check_finite(X2, Y2)  # re-raise with row numbers counted over all of X, not the chunk
        raise
    return stats


def fit(
    X_or_stats: Any,
    Y: Any = None,
    *,
    family: str = "full",
    solver: str = "auto",
    ridge: float = 0.0,
    dtype: torch.dtype = torch.float64,
    rank: int | None = None,
    weights: Any = None,
) -> Fit:
    """Fit the operator ``W = I + M`` minimizing ``Σ_rows ‖x W − y‖² + λ‖M‖²`` over a family.

    Parameters
    ----------
    X_or_stats : (n_tokens, d) tensor or array, or Stats
        Rows entering the first removed layer (any float dtype; leading dims are flattened), or
        precomputed statistics (then ``Y`` and ``weights`` must be None).
    Y : (n_tokens, d) tensor or array, optional
        Rows entering the first kept layer after the removed block.
    family : str, default "full"
        One of :data:`FAMILIES` (see :mod:`ghostsolve.families`).
    solver : str, default "auto"
        One of :data:`SOLVERS` (see :mod:`ghostsolve.solvers`); used by ``full``, ``lowrank`` and
        ``symmetric``. ``auto`` follows :func:`ghostsolve.solvers.choose_solver`.
    ridge : float, default 0
        Relative ridge: ``λ = ridge · mean(diag(XᵀX))``.
    dtype : torch.float64 or torch.float32
        Working precision. With raw ``X, Y`` the statistics are accumulated in it too; with ``Stats``
        they are cast to it for the solve.
    rank : int, optional
        Rank ``r`` of ``lowrank`` (``0 ≤ r ≤ d``; ``r = d`` equals ``full``).
    weights : (n_tokens,) tensor, optional
        Nonnegative row weights (e.g. a padding mask); only with raw ``X, Y``.

    Returns
    -------
    Fit

    Raises
    ------
    GhostsolveError
        Unknown family or solver (lists the valid ones); shape or dtype mismatch; NaN/Inf rows; fewer
        rows than ``d`` with ``cholesky``/``qr`` and no ridge; ``rank > d``; ``qr`` on ``Stats`` without a
        TSQR factor; an unsupported ``d`` for the hadamard families.
    NumericalError
        Non-finite statistics.

    Warns
    -----
    IllConditionedWarning
        When ``cholesky`` succeeds on a system too ill-conditioned for ``dtype``.

    Examples
    --------
    >>> X = torch.randn(256, 8, dtype=torch.float64)
    >>> W_true = torch.eye(8) + 0.1 * torch.randn(8, 8, dtype=torch.float64)
    >>> f = fit(X, X @ W_true)
    >>> bool(torch.allclose(f.weight, W_true))
    True
    """
    _validate(family, solver, ridge, dtype, rank)
    raw: tuple[Any, Any, Any] | None = None
    uses_solver = family not in CLOSED_FORM
    if isinstance(X_or_stats, Stats):
        if Y is not None or weights is not None:
            raise GhostsolveError("fit(stats) takes no Y or weights: they are already in the statistics")
        stats = X_or_stats
    else:
        if Y is None:
            raise GhostsolveError("fit(X, Y) needs Y (n_tokens, d), or pass a Stats object instead of X")
        raw = (X_or_stats, Y, weights)
        # only what the family needs: the magnitude sums cost a third of the products
        stats = accumulate(
            *raw, dtype=dtype, qr=uses_solver and solver in ("qr", "svd"), magnitudes=family in MAGNITUDE
        )
    d = stats.dim
    if rank is not None and rank > d:
        raise GhostsolveError(f"rank={rank} exceeds d={d}; use rank ≤ {d} (rank={d} equals family='full')")
    if stats.n_rows <= 0:
        raise GhostsolveError("the statistics hold no rows (n_rows=0); feed rows with Stats.update first")
    notes: list[str] = []
    resolved = solver
    checked = False
    if not uses_solver:
        if solver != "auto":
            notes.append(f"family={family!r} has a closed form; solver={solver!r} was not used")
        resolved = "closed-form"
    elif family == "symmetric":
        if solver == "auto":
            resolved = "svd" if stats.r_factor is not None else "eigh"
    else:
        if solver == "auto":
            choice = choose_solver(stats, dtype=dtype, ridge=ridge, raw_data=raw is not None)
            resolved = choice.solver
            checked = True
            notes.append(f"auto chose {choice}")
            if resolved in ("qr", "svd") and stats.r_factor is None and raw is not None:
                stats = accumulate(*raw, dtype=dtype, qr=True, magnitudes=False)
        check_full_rank(resolved, stats.n_rows, d, ridge)
    problem = make_problem(stats, dtype, ridge)
    res = solve_family(family, problem, stats, resolved, rank, checked=checked)
    return _make_fit(family, res, stats, problem, dtype, ridge, rank, notes)


def _make_fit(
    family: str,
    res: FamilyResult,
    stats: Stats,
    problem: Problem,
    dtype: torch.dtype,
    ridge: float,
    rank: int | None,
    notes: list[str],
) -> Fit:
    objective = _objective(stats, res.delta, res.factors)
    dtd = float(stats.dtd)
    if dtd > 0:
        rel = objective / dtd
    else:
        rel = 0.0 if objective == 0 else math.inf
    if family in ("scalar-magnitude", "diagonal-magnitude", "hadamard-magnitude") and ridge:
        notes.append(f"family={family!r} is a magnitude rule; ridge={ridge:g} does not apply to it")

    def delta() -> torch.Tensor:
        if res.delta is not None:
            return res.delta
        assert res.factors is not None
        return res.factors[0] @ res.factors[1].T

    diag = FitDiagnostics(
        stats, problem.lam, functools.partial(delta), [*notes, *res.notes], dtype, res.eigenvalues, res.rank
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
        _delta=res.delta,
        _factors=res.factors,
    )


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
    """
    for r in ridges:
        _validate("full", "eigh", r, dtype, None)
    if isinstance(X_or_stats, Stats):
        if Y is not None or weights is not None:
            raise GhostsolveError(
                "ridge_path(stats) takes no Y or weights: they are already in the statistics"
            )
        stats = X_or_stats
    else:
        if Y is None:
            raise GhostsolveError("ridge_path(X, Y) needs Y (n_tokens, d), or pass a Stats object")
        stats = accumulate(X_or_stats, Y, weights, dtype=dtype, magnitudes=False)
    if stats.n_rows <= 0:
        raise GhostsolveError("the statistics hold no rows (n_rows=0); feed rows with Stats.update first")
    base = make_problem(stats, dtype, 0.0)
    e, V, VtB = eig_decompose(base)
    fits = []
    for r in ridges:
        problem = make_problem(stats, dtype, r)
        M, kept = eig_solution(e, V, VtB, problem.lam)
        res = FamilyResult(M, None, "eigh", [], (e.double() + problem.lam).clamp_min(0), kept)
        fits.append(
            _make_fit("full", res, stats, problem, dtype, r, None, [f"ridge path over {len(ridges)} ridges"])
        )
    return fits
