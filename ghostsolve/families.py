"""Operator families: the subspaces ``W = I + M`` is restricted to, each with its exact optimum.

Every least-squares family minimizes the same objective ``‖X M − (Y − X)‖² + λ‖M‖²`` (``λ`` the absolute
ridge) over its subspace, so their objectives are comparable: ``full`` is the lowest. With ``G = XᵀX``,
``B = Xᵀ(Y − X)`` and ``H`` the normalized Hadamard matrix:

* ``identity``: ``M = 0`` (plain pruning).
* ``scalar``: ``M = m I``, ``m = tr(B) / (tr(G) + d λ)``.
* ``diagonal``: ``M = diag(m)``, ``m_c = B_cc / (G_cc + λ)``.
* ``hadamard``: ``M = H diag(m) Hᵀ``, ``m_c = (HᵀBH)_cc / ((HᵀGH)_cc + λ)`` (diagonal in the rotated basis).
* ``symmetric``: ``M = Mᵀ`` solving the Lyapunov equation ``(G+λI) M + M (G+λI) = B + Bᵀ`` through
  ``G + λI = V diag(e) Vᵀ``: ``(VᵀMV)_ij = (Vᵀ(B+Bᵀ)V)_ij / (e_i + e_j)``.
* ``lowrank``: ``M = U Vᵀ`` of rank ``r``, the reduced-rank (ridge) regression optimum: ``M = M_full P_r``
  with ``P_r`` the projector on the top-``r`` eigenvectors of ``M_fullᵀ (G+λI) M_full = Bᵀ M_full``.
* ``full``: ``(G + λI) M = B``.

The published magnitude rules are their own variants and are *not* least-squares optima (ridge does not
apply to them):

* ``scalar-magnitude`` (Prune&Comp): ``W = α I``, ``α = mean|Y| / mean|X|``.
* ``diagonal-magnitude`` (LinearPatch-D): ``W = diag(α)``, ``α_c = mean|Y_c| / mean|X_c|``.
* ``hadamard-magnitude`` (LinearPatch-R): ``W = H diag(α) Hᵀ`` with ``α_c`` the same ratio of the rotated
  ``X H`` and ``Y H``.

They match first absolute moments per channel; the least-squares member of the same subspace matches the
cross moment ``Σ x_c y_c / Σ x_c²`` instead, so a magnitude rule is never better on the objective and
differs most when ``Y`` has components uncorrelated with ``X`` (noise inflates ``mean|Y|`` but not
``Σ x y``). A channel with ``mean|X_c| = 0`` keeps ``α_c = 1``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from .errors import GhostsolveError
from .hadamard import apply_hadamard, hadamard_matrix
from .solvers import SOLVERS, Problem, Solution, eig_decompose, rank_cutoff, solve, split_r
from .stats import Stats

__all__ = ["CLOSED_FORM", "FAMILIES", "FamilyResult", "solve_family", "stats_features"]

FAMILIES: tuple[str, ...] = (
    "identity",
    "scalar",
    "scalar-magnitude",
    "diagonal",
    "diagonal-magnitude",
    "hadamard",
    "hadamard-magnitude",
    "lowrank",
    "symmetric",
    "full",
)
# Families whose optimum is a formula in the statistics: no solver is involved.
CLOSED_FORM = tuple(f for f in FAMILIES if f not in ("lowrank", "symmetric", "full"))
MAGNITUDE = ("scalar-magnitude", "diagonal-magnitude", "hadamard-magnitude")
# The optional statistics (Stats keyword → families or solvers that need it); everything else a family
# needs (XᵀX, Xᵀ(Y−X), ‖Y−X‖², counts) is always kept.
_FEATURES = {
    "magnitudes": ("scalar-magnitude", "diagonal-magnitude"),
    "hadamard_magnitudes": ("hadamard-magnitude",),
    "qr": ("qr", "svd"),
}


def stats_features(families: Iterable[str], solvers: Iterable[str] = ()) -> dict[str, bool]:
    """The :class:`~ghostsolve.Stats` feature flags that fitting ``families`` with ``solvers`` needs.

    ``magnitudes`` for ``scalar-magnitude``/``diagonal-magnitude``, ``hadamard_magnitudes`` for
    ``hadamard-magnitude``, ``qr`` (the TSQR factor) for the ``qr`` and ``svd`` solvers.

    Raises
    ------
    GhostsolveError
        An unknown family or solver name.
    """
    fams, sols = list(families), list(solvers)
    for name, valid, what in ((fams, FAMILIES, "family"), (sols, SOLVERS, "solver")):
        bad = [n for n in name if n not in valid]
        if bad:
            raise GhostsolveError(f"unknown {what} {bad[0]!r}; valid: {', '.join(valid)}")
    wanted = set(fams) | set(sols)
    return {flag: bool(wanted & set(users)) for flag, users in _FEATURES.items()}


@dataclass
class FamilyResult:
    """``M`` (or its low-rank factors) plus how it was found."""

    delta: torch.Tensor | None
    factors: tuple[torch.Tensor, torch.Tensor] | None
    solver: str
    notes: list[str] = field(default_factory=list)
    eigenvalues: torch.Tensor | None = None
    rank: int | None = None


def _safe_ratio(num: torch.Tensor, den: torch.Tensor, default: float) -> torch.Tensor:
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.full_like(num, default))


def _rotated_diag(A: torch.Tensor) -> torch.Tensor:
    """``diag(Hᵀ A H)`` through two fast transforms."""
    return torch.diagonal(apply_hadamard(apply_hadamard(A).T.contiguous()))


def _hadamard_operator(m: torch.Tensor) -> torch.Tensor:
    H = hadamard_matrix(m.shape[0], dtype=m.dtype, device=m.device)
    return (H * m) @ H.T


def _magnitude_sums(stats: Stats, family: str) -> tuple[torch.Tensor, torch.Tensor]:
    flag = "hadamard_magnitudes" if family == "hadamard-magnitude" else "magnitudes"
    if not getattr(stats, flag):
        raise GhostsolveError(
            f"family={family!r} needs the magnitude sums, but these Stats were built with {flag}=False; "
            f"rebuild them with Stats.for_families(dim, [{family!r}, ...]) or Stats(dim, {flag}=True)"
        )
    if family == "hadamard-magnitude":
        if stats.xh_abs_sum is None or stats.yh_abs_sum is None:
            hadamard_matrix(stats.dim)  # raises the message naming supported sizes
            raise AssertionError("unreachable")  # pragma: no cover
        return stats.xh_abs_sum, stats.yh_abs_sum
    assert stats.x_abs_sum is not None and stats.y_abs_sum is not None
    return stats.x_abs_sum, stats.y_abs_sum


def solve_family(
    family: str, problem: Problem, stats: Stats, solver: str, rank: int | None, *, checked: bool = False
) -> FamilyResult:
    """The optimum ``M`` of ``family`` (see the module docstring) for a resolved ``solver``.

    Raises
    ------
    GhostsolveError
        Unknown family; ``hadamard`` families for an unsupported ``d``.
    """
    d = problem.d
    G, B, lam = problem.G, problem.B, problem.lam
    dt = problem.dtype
    if family == "identity":
        return FamilyResult(torch.zeros(d, d, dtype=dt, device=G.device), None, "closed-form")
    if family == "scalar":
        den = torch.trace(G) + d * lam
        m = torch.trace(B) / den if float(den) > 0 else torch.zeros((), dtype=dt)
        return FamilyResult(m * torch.eye(d, dtype=dt, device=G.device), None, "closed-form")
    if family == "diagonal":
        m = _safe_ratio(torch.diagonal(B), torch.diagonal(G) + lam, 0.0)
        return FamilyResult(torch.diag(m), None, "closed-form")
    if family == "hadamard":
        m = _safe_ratio(_rotated_diag(B), _rotated_diag(G) + lam, 0.0)
        return FamilyResult(_hadamard_operator(m), None, "closed-form")
    if family in MAGNITUDE:
        xs, ys = _magnitude_sums(stats, family)
        xs, ys = xs.to(dt), ys.to(dt)
        if family == "scalar-magnitude":
            alpha = _safe_ratio(ys.sum(), xs.sum(), 1.0)
            return FamilyResult((alpha - 1) * torch.eye(d, dtype=dt, device=G.device), None, "closed-form")
        alpha = _safe_ratio(ys, xs, 1.0)
        if family == "diagonal-magnitude":
            return FamilyResult(torch.diag(alpha - 1), None, "closed-form")
        return FamilyResult(_hadamard_operator(alpha - 1), None, "closed-form")
    if family == "full":
        sol = solve(problem, solver, checked=checked)
        return FamilyResult(sol.M, None, sol.solver, sol.notes, sol.eigenvalues, sol.rank)
    if family == "lowrank":
        assert rank is not None
        sol = solve(problem, solver, checked=checked)
        return _lowrank(sol, problem, rank)
    if family == "symmetric":
        return _symmetric(problem, solver)
    raise GhostsolveError(f"unknown family {family!r}; valid families: {', '.join(FAMILIES)}")


def _lowrank(sol: Solution, p: Problem, rank: int) -> FamilyResult:
    M = sol.M
    K = p.B.T @ M
    K = (K + K.T) / 2
    _, V = torch.linalg.eigh(K)
    Vr = V[:, -rank:].flip(1) if rank else V[:, :0]
    U = M @ Vr
    return FamilyResult(None, (U, Vr), sol.solver, sol.notes, sol.eigenvalues, sol.rank)


def _symmetric(p: Problem, solver: str) -> FamilyResult:
    notes: list[str] = []
    d = p.d
    if solver in ("svd", "qr") and p.R is not None:
        # eigenpairs of G + λI from the SVD of the (ridge-augmented) R: eigenvalues to eps · s_max², not
        # eps · ‖G‖, so small ones stay resolved
        R11, _ = split_r(p)
        _, s, Vh = torch.linalg.svd(R11, full_matrices=True)
        e = torch.zeros(d, dtype=p.dtype, device=s.device)
        e[: s.numel()] = s**2
        V = Vh.T
        cutoff = rank_cutoff(d, p.dtype, from_gram=False) ** 2
        used = "svd"
        if solver == "qr":
            notes.append(
                "family='symmetric' needs eigenpairs of XᵀX+λI; solver='qr' gave them through the SVD of the "
                "TSQR factor R (same stability, no normal equations)"
            )
    else:
        if solver not in ("auto", "eigh", "svd"):
            notes.append(
                f"family='symmetric' solves its Lyapunov equation through eig(XᵀX+λI); solver={solver!r} "
                "does not apply, used eigh"
            )
        e, V, _ = eig_decompose(p)
        e = e + p.lam
        cutoff = rank_cutoff(d, p.dtype, from_gram=True) ** 2
        used = "eigh"
    S = p.B + p.B.T
    St = V.T @ S @ V
    den = e.unsqueeze(0) + e.unsqueeze(1)
    keep = den > cutoff * 2 * float(e.max())
    Mt = torch.where(keep, St / torch.where(keep, den, torch.ones_like(den)), torch.zeros_like(St))
    M = V @ Mt @ V.T
    M = (M + M.T) / 2
    return FamilyResult(
        M, None, used, notes, e.double().clamp_min(0).sort().values, int((e > cutoff * e.max()).sum())
    )
