"""Solvers for the ridge least-squares problem ``min_M ‖X M − (Y − X)‖² + λ‖M‖²``.

All solvers work on the statistics, never on stored rows: the Gram matrix ``G = XᵀX``, the right-hand
side ``B = Xᵀ(Y − X)`` and, for the stable solvers, the TSQR factor ``R`` of ``[X | Y − X]``. The normal
equations are ``(G + λI) M = B``.

Solvers
-------
``cholesky``
    Factor ``G + λI`` once (LAPACK ``?potrf``/``?potrs`` for wide CPU systems, else torch's
    ``cholesky_ex`` and two triangular solves). Fast; its accuracy is
    ``≈ cond(XᵀX) · eps = cond(X)² · eps``. When the factorization fails (``G + λI`` not numerically
    positive definite) it falls back to ``qr`` (when ``R`` is known) or to ``svd``; the fallback is recorded
    in ``Fit.diagnostics.notes``.
``qr``
    Back-substitution with the ``R`` of the streaming TSQR: ``M = R₁₁⁻¹ R₁₂``. Works with ``cond(X)``,
    not its square: the stable choice for ill-conditioned activations in fp32. A ridge is applied by
    re-factoring ``[[R₁₁, R₁₂], [√λ I, 0]]``.
``svd``
    Minimum-norm solution, truncated by the rank policy below; from the SVD of ``R₁₁`` when ``R`` is known,
    otherwise from the eigendecomposition of ``G``. For rank-deficient data (N < d).
``eigh``
    One eigendecomposition ``G = V diag(e) Vᵀ``; then ``M(λ) = V diag(1/(e + λ)) Vᵀ B`` for any ``λ``
    at ``O(d²)`` each (ridge paths, :func:`ghostsolve.fit.ridge_path`).
``auto``
    The decision list of :func:`choose_solver`.

Regularization and rank policy (one place: :func:`rank_cutoff`)
-------------------------------------------------------------
* ``ridge`` is relative: ``λ = ridge · trace(XᵀX) / d`` (mean of the diagonal), so the same ``ridge``
  means the same thing whatever the scale of the activations.
* A direction is dropped by ``svd``/``eigh`` when its singular value of ``X`` is below
  ``rcond · s_max`` with ``rcond = d · eps(dtype)`` for factors of ``X`` itself (``R``), and
  ``rcond = sqrt(d · eps(dtype))`` when working from ``XᵀX`` (its eigenvalues are ``s²`` and carry an
  absolute error ``≈ d · eps · s_max²``, so smaller ``s`` are invisible there — the squaring of the
  condition number in action). ``d · eps`` is the backward error of a stable ``d × d`` factorization;
  we do not follow numpy's ``eps · max(N, d)``, which would tie the cutoff to the amount of calibration data.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.linalg import lapack

from .errors import GhostsolveError, IllConditionedWarning
from .stats import BLAS_MIN_DIM, Stats, all_finite, check_dtype, cpu_array, require_finite

__all__ = [
    "SOLVERS",
    "Problem",
    "Solution",
    "SolverChoice",
    "check_ridge",
    "choose_solver",
    "estimate_condition",
    "kappa_safe",
    "make_problem",
    "rank_cutoff",
    "ridge_weights",
    "solve",
    "split_r",
]

SOLVERS: tuple[str, ...] = ("auto", "cholesky", "qr", "svd", "eigh")
_FULL_RANK = ("cholesky", "qr")
# A solve whose error bound cond · eps exceeds this is called unsafe: 1e-3 leaves three correct digits
# in the operator, below which the fit's objective visibly degrades in our tests.
_SAFE_ERROR = 1e-3
# Below this size an exact eigvalsh costs less than the iterations of the estimate.
_EXACT_COND_MAX_D = 128


def _by_lapack(*ts: torch.Tensor) -> bool:
    """Whether these tensors are solved by scipy's LAPACK: CPU float32/float64 of one dtype, ``d`` at
    least :data:`ghostsolve.stats.BLAS_MIN_DIM`.

    Why not torch there: at those widths the statistics' products ran in scipy's OpenBLAS (see
    ``ghostsolve.stats``), and the first torch operation after them contends with OpenBLAS's
    still-spinning threads on a machine with few cores (a fit right after the products, d = 1024, 2 cores:
    110 ms with torch's Cholesky, 77 ms with LAPACK's);
    LAPACK from the same library avoids the switch. Results agree with torch's to rounding.
    """
    first = ts[0]
    return (
        first.dtype in (torch.float32, torch.float64)
        and first.shape[0] >= BLAS_MIN_DIM
        and all(t.device.type == "cpu" and t.dtype == first.dtype for t in ts)
    )


def cholesky_lower(A: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Lower Cholesky factor ``L`` of symmetric ``A`` (d × d; one triangle read) and LAPACK's ``info``:
    0 on success, ``k > 0`` when the leading minor of order ``k`` is not positive definite (then ``L``
    is not usable). As ``torch.linalg.cholesky_ex``, on the CPU by scipy's LAPACK ``?potrf``."""
    if _by_lapack(A):
        potrf = lapack.dpotrf if A.dtype == torch.float64 else lapack.spotrf
        # A's row-major memory read column-major is Aᵀ, whose upper triangle is A's lower one: factor
        # Aᵀ = UᵀU from it (no transposing copy) and return L = Uᵀ, row-major
        c, info = potrf(A.detach().numpy().T, lower=0, clean=1, overwrite_a=0)
        return torch.from_numpy(c).mT, int(info)
    L, info = torch.linalg.cholesky_ex(A)
    return L, int(info)


def _chol_solve(L: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``(L Lᵀ)⁻¹ B`` (LAPACK ``?potrs`` on the CPU, else two triangular solves; ``torch.cholesky_solve``
    copies ``L`` on every call)."""
    if _by_lapack(L, B):
        potrs = lapack.dpotrs if L.dtype == torch.float64 else lapack.spotrs
        # L's row-major memory read column-major is U = Lᵀ (the upper factor): no copy of L
        x, info = potrs(L.detach().numpy().T, B.detach().numpy(), lower=0)
        if info == 0:
            return torch.from_numpy(np.ascontiguousarray(x))  # row-major, as torch's solves return it
    return torch.linalg.solve_triangular(L.mT, torch.linalg.solve_triangular(L, B, upper=False), upper=True)


def eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def kappa_safe(dtype: torch.dtype) -> float:
    """Largest condition number of the factored matrix for which ``dtype`` is called safe.

    ``1e-3 / eps(dtype)``: about ``8.4e3`` for float32 and ``4.5e12`` for float64. Applied to
    ``cond(XᵀX)`` for cholesky/eigh and to ``cond(X) = sqrt(cond(XᵀX))`` for qr/svd on ``R``.
    """
    return _SAFE_ERROR / eps(dtype)


def rank_cutoff(d: int, dtype: torch.dtype, *, from_gram: bool) -> float:
    """Relative singular-value cutoff of ``X`` (see the module docstring for the policy)."""
    r = d * eps(dtype)
    return math.sqrt(r) if from_gram else r


@dataclass
class Problem:
    """The statistics a solver needs, in the working dtype.

    Attributes
    ----------
    G : (d, d) tensor
        ``XᵀX``.
    B : (d, d) tensor
        ``Xᵀ(Y − X)``.
    lam : float
        Absolute ridge ``λ``.
    n_rows : int
        Rows with a nonzero weight.
    R : (k, 2d) tensor or None
        TSQR factor of ``[X | Y − X]``.
    """

    G: torch.Tensor
    B: torch.Tensor
    lam: float
    n_rows: int
    R: torch.Tensor | None = None
    factor64: torch.Tensor | None = None  # Cholesky factor of G + λI in float64, when already known

    @property
    def d(self) -> int:
        return int(self.G.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.G.dtype


@dataclass
class Solution:
    """A solver's answer: ``M`` and how it was obtained."""

    M: torch.Tensor
    solver: str
    notes: list[str] = field(default_factory=list)
    eigenvalues: torch.Tensor | None = None  # of G + λI, ascending, when the solver computed them
    rank: int | None = None  # directions kept by a truncating solver


@dataclass(frozen=True)
class SolverChoice:
    """What ``solver="auto"`` picks, and why."""

    solver: str
    reason: str
    condition_estimate: float
    # The float64 Cholesky factor of XᵀX + λI when the estimate computed it: fit hands it to the
    # cholesky solve instead of factoring the same matrix twice.
    factor: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        return f"{self.solver}: {self.reason}"


def check_ridge(ridge: Any) -> float:
    """``ridge`` as a float ≥ 0 (any real number type: Python, numpy, a one-element tensor).

    Raises
    ------
    GhostsolveError
        A bool, a non-number, or a negative or non-finite value.
    """
    if isinstance(ridge, bool):
        raise GhostsolveError(f"ridge={ridge} is a bool; pass a number ≥ 0 (e.g. 1e-4), 'cv' or 'gcv'")
    if isinstance(ridge, torch.Tensor) and ridge.numel() == 1 and not ridge.is_complex():
        ridge = float(ridge)
    if not isinstance(ridge, numbers.Real) or not math.isfinite(float(ridge)) or float(ridge) < 0:
        raise GhostsolveError(
            "ridge must be a number ≥ 0, 'cv' or 'gcv' (a ridge relative to mean(diag(XᵀX))), "
            f"got {ridge!r}; try 0 or 1e-4"
        )
    return float(ridge)


def relative_lambda(G: torch.Tensor, ridge: float) -> float:
    """``λ = ridge · mean(diag(G))``."""
    if ridge == 0:
        return 0.0
    return float(ridge) * float(torch.diagonal(G).double().mean())


def make_problem(stats: Stats, dtype: torch.dtype, ridge: float) -> Problem:
    """The :class:`Problem` of ``stats`` in ``dtype`` with relative ``ridge``."""
    lam = relative_lambda(stats.xtx, ridge)
    R = stats.r_factor.to(dtype) if stats.r_factor is not None else None
    return Problem(G=stats.xtx.to(dtype), B=stats.xtd.to(dtype), lam=lam, n_rows=stats.n_rows, R=R)


def _shifted(G: torch.Tensor, lam: float) -> torch.Tensor:
    """``G + λI`` as a new tensor, or ``G`` itself when ``λ = 0`` (every caller only reads it)."""
    if not lam:
        return G
    A = G.clone()
    A.diagonal().add_(lam)
    return A


def estimate_condition(A: torch.Tensor, L: torch.Tensor | None = None, iters: int = 30) -> float:
    """Estimate of ``cond(A)`` for symmetric positive semi-definite ``A`` (d × d), in float64.

    Exact 2-norm condition number (``eigvalsh``) for ``d ≤ 128``. Larger: LAPACK's ``dpocon`` on the
    Cholesky factor (``L`` when given in float64, else computed), the 1-norm estimate ``κ₁`` that
    ``scipy.linalg.solve`` also uses to warn, in ``O(d²)`` after the factorization. ``κ₂ ≤ κ₁ ≤ d · κ₂``
    and the estimator is a lower bound of ``κ₁``; on Gram matrices it lands 1–12× above ``κ₂`` in our
    tests, so thresholds applied to it err on the safe side. ``inf`` when ``A`` is not numerically
    positive definite. ``iters`` is unused since 0.2 (the power/inverse iterations it counted cost about
    a hundred small, latency-bound solves); it is kept so that existing calls work.
    """
    A64 = A.double()
    if A64.shape[0] <= _EXACT_COND_MAX_D:
        e = torch.linalg.eigvalsh(A64)
        return math.inf if float(e[0]) <= 0 else float(e[-1] / e[0])
    if L is None or L.dtype != torch.float64:
        L, info = cholesky_lower(A64)
        if info != 0:
            return math.inf
    return _pocon(L, A64, upper=False)


def _pocon(factor: torch.Tensor, A: torch.Tensor, *, upper: bool) -> float:
    """LAPACK's 1-norm condition estimate of ``A = LLᵀ`` (or ``RᵀR``) from its triangular factor."""
    if not all_finite(factor) or float(factor.diagonal().abs().min()) == 0.0:
        return math.inf
    # ‖A‖₁, on the CPU by numpy (no thread pool; see ghostsolve.stats.cpu_array)
    a = cpu_array(A)
    if a is not None:
        with np.errstate(over="ignore", invalid="ignore"):
            anorm = float(np.abs(a).sum(axis=0).max())
    else:
        anorm = float(A.abs().sum(dim=0).max())
    rcond, info = lapack.dpocon(factor.detach().double().cpu().numpy(), anorm, uplo="U" if upper else "L")
    return math.inf if info != 0 or rcond <= 0 else 1.0 / float(rcond)


def _cond_gram_from_r(R11: torch.Tensor, G: torch.Tensor) -> float:
    """``cond(G)`` for ``G ≈ R₁₁ᵀR₁₁`` read from ``R₁₁`` itself, whose triangular solves resolve
    ``G⁻¹`` to ``cond(X) · eps`` (beyond ``cond(X) ≈ 1e8`` the Gram matrix can no longer tell it)."""
    R = R11.double()
    if R.shape[0] != R.shape[1] or not all_finite(R):
        return math.inf
    if R.shape[0] <= _EXACT_COND_MAX_D:
        s = torch.linalg.svdvals(R)
        return math.inf if float(s[-1]) == 0 else float(s[0] / s[-1]) * float(s[0] / s[-1])
    return _pocon(R, G, upper=True)


def choose_solver(
    stats: Stats, *, dtype: torch.dtype = torch.float64, ridge: float = 0.0, raw_data: bool = False
) -> SolverChoice:
    """The solver ``solver="auto"`` uses for these statistics, with the reason.

    Decision list (first match wins), with ``κ`` the estimated ``cond(XᵀX + λI)`` (float64; as
    ``cond(R₁₁)²`` from the TSQR factor when there is one, else :func:`estimate_condition`) and
    ``κ_safe = 1e-3 / eps(dtype)`` (:func:`kappa_safe`):

    1. ``ridge == 0`` and fewer rows than ``d`` → ``svd`` (XᵀX is singular; minimum-norm solution).
    2. ``κ ≤ κ_safe`` → ``cholesky`` (fast; error ``≈ κ · eps`` is acceptable).
    3. The TSQR factor is available (``Stats(qr=True)``) or ``fit`` holds the raw rows (``raw_data``):
       ``sqrt(κ) ≤ κ_safe`` → ``qr`` (error ``≈ cond(X) · eps``), else ``svd`` (truncated on ``R``).
    4. Otherwise → ``svd`` from the eigendecomposition of XᵀX (truncated at ``sqrt(d · eps)``); a TSQR
       would resolve more directions.

    Parameters
    ----------
    stats : Stats
    dtype : torch.dtype
        Working precision of the solve.
    ridge : float
        Relative ridge.
    raw_data : bool
        Whether the rows themselves are at hand (so a TSQR pass is possible).
    """
    check_dtype(dtype, "dtype")
    ridge = check_ridge(ridge)
    stats.check_statistics()
    d = stats.dim
    if ridge == 0 and stats.n_rows < d:
        return SolverChoice(
            "svd",
            f"fewer rows ({stats.n_rows:g}) than d={d}: XᵀX is singular, use the minimum-norm svd",
            math.inf,
        )
    lam = relative_lambda(stats.xtx, ridge)
    R = stats.r_factor
    if R is not None and R.shape[0] >= d:
        # cond(X) read from R itself: beyond ~1e8 the Gram matrix can no longer tell it
        if lam:
            R = torch.linalg.qr(
                torch.cat(
                    [R[:, :d].double(), math.sqrt(lam) * torch.eye(d, dtype=torch.float64, device=R.device)]
                ),
                mode="r",
            ).R
        kappa = _cond_gram_from_r(R[:d, :d], _shifted(stats.xtx.double(), lam))
        factor = None
    else:
        A = _shifted(stats.xtx.double(), lam)
        factor, info = cholesky_lower(A)
        kappa = estimate_condition(A, factor) if info == 0 else math.inf
        if info != 0:
            factor = None
    safe = kappa_safe(dtype)
    name = str(dtype).removeprefix("torch.")
    if kappa <= safe:
        return SolverChoice(
            "cholesky", f"cond(XᵀX+λI) ≈ {kappa:.2g} ≤ {safe:.2g} (safe in {name})", kappa, factor
        )
    if stats.qr or raw_data:
        if math.sqrt(kappa) <= safe:
            return SolverChoice(
                "qr",
                f"cond(XᵀX+λI) ≈ {kappa:.2g} > {safe:.2g}, but cond(X) ≈ {math.sqrt(kappa):.2g} is safe "
                f"in {name} for TSQR",
                kappa,
            )
        return SolverChoice(
            "svd", f"cond(X) ≈ {math.sqrt(kappa):.2g} > {safe:.2g}: truncated svd on R", kappa
        )
    return SolverChoice(
        "svd",
        f"cond(XᵀX+λI) ≈ {kappa:.2g} > {safe:.2g} in {name} and no TSQR factor: truncated svd of XᵀX "
        "(build Stats(qr=True) for the more accurate qr solver)",
        kappa,
    )


def check_full_rank(solver: str, n_rows: int, d: int, ridge: float) -> None:
    """Raise when ``solver`` needs full column rank that ``n_rows < d`` rows cannot give."""
    if solver in _FULL_RANK and ridge == 0 and n_rows < d:
        raise GhostsolveError(
            f"solver={solver!r} needs at least d={d} rows for a full-rank XᵀX, but only {n_rows:g} rows were "
            "seen; use solver='svd' (minimum-norm) or 'auto', or ridge>0 (e.g. ridge=1e-4), or more "
            "calibration tokens"
        )


def solve(problem: Problem, solver: str, *, checked: bool = False) -> Solution:
    """Solve ``(G + λI) M = B`` with a named solver (not ``auto``).

    Raises
    ------
    GhostsolveError
        ``qr`` without a TSQR factor.

    Warns
    -----
    IllConditionedWarning
        ``cholesky`` succeeded on a system too ill-conditioned for its dtype (skipped with
        ``checked=True``, when :func:`choose_solver` already vetted the conditioning).
    NumericalError
        Non-finite statistics or a failure of the fallback solver.
    """
    require_finite({"xtx": problem.G, "xtd": problem.B})
    if solver == "cholesky":
        return _cholesky(problem, warn=not checked)
    if solver == "qr":
        if problem.R is None:
            raise GhostsolveError(
                "solver='qr' needs the TSQR factor: pass X and Y to fit() or build Stats(dim, qr=True); "
                "with statistics only use solver='svd' or 'eigh'"
            )
        return _qr(problem)
    if solver == "svd":
        return _svd_r(problem) if problem.R is not None else _eig(problem, "svd")
    if solver == "eigh":
        return _eig(problem, "eigh")
    raise GhostsolveError(f"unknown solver {solver!r}; valid solvers: {', '.join(SOLVERS)}")


def _cholesky(p: Problem, warn: bool = True) -> Solution:
    if p.factor64 is not None and p.dtype == torch.float64 and not warn:
        M = _chol_solve(p.factor64, p.B)  # auto factored this very matrix while vetting it
        if all_finite(M):
            return Solution(M, "cholesky")
    A = _shifted(p.G, p.lam)
    L, info = cholesky_lower(A)
    if info == 0:
        M = _chol_solve(L, p.B)
        if all_finite(M):
            if not warn:
                return Solution(M, "cholesky")
            kappa = estimate_condition(A, L if A.dtype == torch.float64 else None)
            if kappa > kappa_safe(A.dtype):
                warnings.warn(
                    f"cholesky on XᵀX+λI with cond ≈ {kappa:.2g} in {A.dtype}: the operator may be "
                    "inaccurate "
                    f"(error ≈ cond · eps = {kappa * eps(A.dtype):.2g}); use solver='qr' or 'auto', "
                    "dtype=torch.float64, or a ridge",
                    IllConditionedWarning,
                    stacklevel=4,
                )
            return Solution(M, "cholesky")
        reason = "the triangular solves produced NaN/Inf"
    else:
        reason = f"leading minor {info} of XᵀX+λI is not positive definite in {A.dtype}"
    fallback = "qr" if p.R is not None else "svd"
    sol = _qr(p) if p.R is not None else _eig(p, "svd")
    sol.notes.insert(
        0,
        f"cholesky failed ({reason}); fell back to {fallback}. Causes: too few or collinear calibration "
        "rows, float32 statistics. Remedies: ridge>0, dtype=torch.float64, more tokens",
    )
    return Solution(sol.M, f"cholesky→{sol.solver}", sol.notes, sol.eigenvalues, sol.rank)


def split_r(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R₁₁, R₁₂)`` of the (ridge-augmented) TSQR factor, each with ``min(k, d)`` rows."""
    assert p.R is not None
    d = p.d
    R = p.R
    if p.lam:
        aug = torch.zeros(d, 2 * d, dtype=R.dtype, device=R.device)
        aug[:, :d].diagonal().fill_(math.sqrt(p.lam))
        R = torch.linalg.qr(torch.cat([R, aug]), mode="r").R
    k = min(R.shape[0], d)
    return R[:k, :d], R[:k, d:]


def _qr(p: Problem) -> Solution:
    R11, R12 = split_r(p)
    d = p.d
    diag = R11.diagonal().abs() if R11.shape[0] == d else torch.zeros(1, dtype=R11.dtype)
    if R11.shape[0] < d or float(diag.min()) <= rank_cutoff(d, p.dtype, from_gram=False) * float(diag.max()):
        sol = _svd_r(p)
        sol.notes.insert(
            0, "qr: R is numerically singular (rank-deficient X); fell back to the minimum-norm svd"
        )
        return Solution(sol.M, "qr→svd", sol.notes, sol.eigenvalues, sol.rank)
    M = torch.linalg.solve_triangular(R11, R12, upper=True)
    return Solution(M, "qr")


def _svd_r(p: Problem) -> Solution:
    R11, R12 = split_r(p)
    d = p.d
    U, s, Vh = torch.linalg.svd(R11, full_matrices=False)
    keep = s > rank_cutoff(d, p.dtype, from_gram=False) * s.max() if s.numel() else s > 0
    inv = torch.where(keep, 1.0 / torch.where(keep, s, torch.ones_like(s)), torch.zeros_like(s))
    M = Vh.T @ (inv.unsqueeze(1) * (U.T @ R12))
    eig = torch.zeros(d, dtype=torch.float64, device=s.device)
    eig[: s.numel()] = s.double() ** 2
    return Solution(M, "svd", eigenvalues=eig.sort().values, rank=int(keep.sum()))


def eig_decompose(p: Problem) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(e, V, VᵀB)`` with ``G = V diag(e) Vᵀ`` (ascending ``e``), for one or many ridges."""
    e, V = torch.linalg.eigh(p.G)
    return e, V, V.T @ p.B


def ridge_weights(e: torch.Tensor, lam: float) -> torch.Tensor:
    """``1/(e + λ)`` for the eigenvalues ``e`` of ``G`` that the rank policy keeps, 0 for the others."""
    d = e.shape[0]
    shifted = e + lam
    top = float(shifted.max()) if d else 0.0
    keep = shifted > rank_cutoff(d, e.dtype, from_gram=True) ** 2 * top
    return torch.where(
        keep, 1.0 / torch.where(keep, shifted, torch.ones_like(shifted)), torch.zeros_like(shifted)
    )


def eig_solution(e: torch.Tensor, V: torch.Tensor, VtB: torch.Tensor, lam: float) -> tuple[torch.Tensor, int]:
    """``M(λ) = V diag(1/(e + λ)) Vᵀ B`` truncated by the rank policy; returns ``(M, kept)``."""
    inv = ridge_weights(e, lam)
    return V @ (inv.unsqueeze(1) * VtB), int((inv > 0).sum())


def _eig(p: Problem, name: str) -> Solution:
    e, V, VtB = eig_decompose(p)
    M, kept = eig_solution(e, V, VtB, p.lam)
    return Solution(M, name, eigenvalues=(e.double() + p.lam).clamp_min(0), rank=kept)
