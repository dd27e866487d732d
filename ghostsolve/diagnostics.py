"""Conditioning reports (:func:`diagnose`) and solver-stability tables (:func:`compare_precisions`)."""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from .crossval import CVResult, FoldedStats, cv_ridge, gcv_ridge
from .errors import GhostsolveError, IllConditionedWarning
from .families import stats_features
from .solvers import SOLVERS, check_ridge, choose_solver, kappa_safe, rank_cutoff, relative_lambda
from .stats import Stats

__all__ = ["Diagnostics", "PrecisionRow", "PrecisionTable", "compare_precisions", "diagnose"]


@dataclass(frozen=True)
class Diagnostics:
    """Conditioning of the calibration rows ``X`` and what it implies for solver and precision.

    Attributes
    ----------
    dim, n_rows
        Hidden size and the number of rows with a nonzero weight.
    ridge : float
        The relative ridge the report assumes.
    eigenvalues : (d,) float64 tensor
        Of ``XᵀX + λI``, ascending.
    condition_gram : float
        ``cond(XᵀX + λI)``; what cholesky and eigh work with.
    condition_x : float
        ``sqrt(condition_gram)``: ``cond(X)`` (for ``λ = 0``), what qr and svd on ``R`` work with.
    effective_rank : int
        Directions kept by the float64 rank policy on ``XᵀX``.
    channel_ratio : float
        Largest channel RMS over the median channel RMS: ≫ 1 flags outlier channels, the usual cause of
        ill-conditioning in LLM activations.
    recommended_solver : str
        What ``solver="auto"`` picks in ``recommended_dtype`` with the raw rows available.
    recommended_dtype : torch.dtype
        float32 when ``qr`` (or cholesky) is safe in float32 (:func:`ghostsolve.solvers.kappa_safe`),
        else float64.
    fast_mode_safe : bool
        Whether float32 chunk products keep the operator accurate to about 1e-3.
    notes : list of str
        Plain-language advice.
    ridge_cv : CVResult or None
        With ``ridge="cv"``/``"gcv"``: the cross-validation curve whose chosen ridge the report assumes.
    """

    dim: int
    n_rows: int
    ridge: float
    eigenvalues: torch.Tensor = field(repr=False)
    condition_gram: float
    condition_x: float
    effective_rank: int
    channel_ratio: float
    recommended_solver: str
    recommended_dtype: torch.dtype
    fast_mode_safe: bool
    notes: tuple[str, ...]
    ridge_cv: CVResult | None = field(default=None, repr=False)

    def __str__(self) -> str:
        lines = [
            f"ghostsolve diagnostics: d={self.dim}, rows={self.n_rows:g}, ridge={self.ridge:g}",
            f"  cond(XᵀX+λI)        {self.condition_gram:.3g}   (cholesky/eigh work with this)",
            f"  cond(X)             {self.condition_x:.3g}   (qr/svd on the TSQR factor work with this)",
            f"  effective rank      {self.effective_rank} of {self.dim}",
            f"  channel RMS max/med {self.channel_ratio:.3g}",
            f"  recommended solver  {self.recommended_solver}",
            f"  recommended dtype   {str(self.recommended_dtype).removeprefix('torch.')}",
            f"  fast mode (fp32 products) safe: {'yes' if self.fast_mode_safe else 'no'}",
        ]
        lines += [f"  - {n}" for n in self.notes]
        if self.ridge_cv is not None:
            lines += ["  " + line for line in str(self.ridge_cv).splitlines()]
        return "\n".join(lines)


def _stats_of(X_or_stats: Any, Y: Any = None) -> Stats:
    from .fit import accumulate

    if isinstance(X_or_stats, FoldedStats):
        if Y is not None:
            raise GhostsolveError("diagnose(stats) takes no Y: the statistics already hold it")
        return X_or_stats.total
    if isinstance(X_or_stats, Stats):
        if Y is not None:
            raise GhostsolveError("diagnose(stats) takes no Y: the statistics already hold it")
        return X_or_stats
    return accumulate(X_or_stats, X_or_stats if Y is None else Y, magnitudes=False, hadamard_magnitudes=False)


def _precision_advice(kappa: float) -> tuple[torch.dtype, list[str]]:
    """The working precision ``diagnose`` recommends for ``cond(XᵀX + λI) = kappa``, with its reason."""
    safe32 = kappa_safe(torch.float32)
    if kappa <= safe32:
        return torch.float32, ["well conditioned: float32 with any solver is safe"]
    if math.sqrt(kappa) <= safe32:
        return torch.float32, [
            f"float32 is safe only with solver='qr' (cond(X) ≈ {math.sqrt(kappa):.2g}); cholesky in float32 "
            f"works on cond(XᵀX) ≈ {kappa:.2g} > {safe32:.2g}"
        ]
    return torch.float64, [
        f"use float64: even cond(X) ≈ {math.sqrt(kappa):.2g} exceeds the float32 limit {safe32:.2g}"
    ]


def _data_notes(stats: Stats, ridge: float, eff: int, ratio: float) -> list[str]:
    """Advice on the amount of data, its rank and its outlier channels."""
    d = stats.dim
    notes = []
    if stats.n_rows < d and ridge == 0:
        notes.append(
            f"fewer rows ({stats.n_rows:g}) than d={d}: use solver='svd' (minimum norm) or ridge>0, "
            "or collect more calibration tokens"
        )
    elif eff < d:
        notes.append(f"X is numerically rank-deficient ({eff} of {d}); solver='svd' or ridge>0 is advisable")
    if ratio > 100:
        notes.append(
            f"outlier channels: the largest channel RMS is {ratio:.3g}× the median; they dominate XᵀX "
            "and raise its condition number"
        )
    return notes


def _ridge_choice(X_or_stats: Any, stats: Stats, ridge: Any) -> tuple[float, CVResult | None]:
    if not (isinstance(ridge, str) and ridge in ("cv", "gcv")):
        return check_ridge(ridge), None
    if ridge == "gcv":
        cv = gcv_ridge(stats)
    elif isinstance(X_or_stats, FoldedStats):
        cv = cv_ridge(X_or_stats)
    else:
        raise GhostsolveError(
            "diagnose(..., ridge='cv') needs a FoldedStats; with a single Stats use ridge='gcv'"
        )
    return cv.chosen, cv


def diagnose(X_or_stats: Any, Y: Any = None, *, ridge: float | str = 0.0) -> Diagnostics:
    """Conditioning report with a recommended solver and precision.

    Parameters
    ----------
    X_or_stats : (n_tokens, d) tensor or array, Stats, or FoldedStats
        Calibration rows (only ``X`` matters for conditioning) or their statistics.
    Y : (n_tokens, d), optional
        Ignored for conditioning, except by ``ridge="gcv"``; accepted for symmetry with
        :func:`ghostsolve.fit`.
    ridge : float, "cv" or "gcv"
        Relative ridge the report should assume; ``"cv"`` (a ``FoldedStats``) or ``"gcv"`` chooses it as
        :func:`ghostsolve.fit` would, and the report prints the whole curve.

    Returns
    -------
    Diagnostics
        Printable.

    Raises
    ------
    GhostsolveError
        Bad input as in :class:`ghostsolve.Stats.update`, or no rows.

    Notes
    -----
    Computes the full eigendecomposition of ``XᵀX`` in float64: ``O(d³)``, seconds for ``d`` in the
    thousands.
    """
    stats = _stats_of(X_or_stats, Y)
    stats.check_statistics()
    if stats.n_rows <= 0:
        raise GhostsolveError("the statistics hold no rows (n_rows=0); nothing to diagnose")
    ridge, cv = _ridge_choice(X_or_stats, stats, ridge)
    d = stats.dim
    G = stats.xtx.double().clone()
    lam = relative_lambda(G, ridge)
    G.diagonal().add_(lam)
    e = torch.linalg.eigvalsh(G).clamp_min(0)
    kappa = math.inf if float(e[0]) <= 0 else float(e[-1] / e[0])
    cut = rank_cutoff(d, torch.float64, from_gram=True) ** 2
    eff = int((e > cut * float(e[-1])).sum())
    rms = torch.diagonal(stats.xtx).double().clamp_min(0).sqrt()
    med = float(rms.median())
    ratio = float(rms.max()) / med if med > 0 else math.inf
    dtype, notes = _precision_advice(kappa)
    # the solver for the recommended dtype, so that the header and the notes give one consistent advice
    choice = choose_solver(stats, dtype=dtype, ridge=ridge, raw_data=True)
    notes += _data_notes(stats, ridge, eff, ratio)
    safe32 = kappa_safe(torch.float32)
    fast_ok = kappa <= safe32
    notes.append(
        "fast mode (Stats(product_dtype=torch.float32)) is "
        + ("safe here" if fast_ok else f"not safe: cond(XᵀX+λI) ≈ {kappa:.2g} > {safe32:.2g}; a ridge helps")
    )
    return Diagnostics(
        dim=d,
        n_rows=stats.n_rows,
        ridge=float(ridge),
        eigenvalues=e,
        condition_gram=kappa,
        condition_x=math.sqrt(kappa),
        effective_rank=eff,
        channel_ratio=ratio,
        recommended_solver=choice.solver,
        recommended_dtype=dtype,
        fast_mode_safe=fast_ok,
        notes=tuple(notes),
        ridge_cv=cv,
    )


@dataclass(frozen=True)
class PrecisionRow:
    """One cell of :class:`PrecisionTable`.

    ``objective_gap`` is ``(f(M) − f(M_ref)) / f(M_ref)`` with ``f`` evaluated in float64 on the
    reference statistics (negative values are rounding); ``normal_equation_residual`` is
    ``‖(XᵀX+λI)M − Xᵀ(Y−X)‖ / ‖XᵀY‖`` in float64; ``seconds`` covers the statistics of the row's
    precision (built once per precision and shared by its solvers) and the solve.
    """

    solver: str
    dtype: torch.dtype
    solver_used: str
    objective_gap: float
    normal_equation_residual: float
    seconds: float
    warned: bool
    error: str | None = None


@dataclass(frozen=True)
class PrecisionTable:
    """Solver × dtype comparison; ``str(table)`` is a text table."""

    rows: tuple[PrecisionRow, ...]
    reference_objective: float
    family: str
    ridge: float

    def __str__(self) -> str:
        head = (
            f"compare_precisions: family={self.family}, ridge={self.ridge:g}, reference = float64 svd, "
            f"objective {self.reference_objective:.6g}"
        )
        cols = f"{'solver':<9} {'dtype':<8} {'used':<14} {'obj. gap':>10} {'NE resid':>10} {'time s':>8}"
        lines = [head, cols, "-" * len(cols)]
        for r in self.rows:
            dt = str(r.dtype).removeprefix("torch.")
            if r.error is not None:
                lines.append(f"{r.solver:<9} {dt:<8} error: {r.error}")
                continue
            flag = "  (ill-conditioned warning)" if r.warned else ""
            lines.append(
                f"{r.solver:<9} {dt:<8} {r.solver_used:<14} {r.objective_gap:>10.2e} "
                f"{r.normal_equation_residual:>10.2e} {r.seconds:>8.3f}{flag}"
            )
        return "\n".join(lines)

    def as_dicts(self) -> list[dict[str, Any]]:
        """Rows as plain dicts (dtype as a string), e.g. for JSON."""
        out = []
        for r in self.rows:
            d = dict(r.__dict__)
            d["dtype"] = str(r.dtype).removeprefix("torch.")
            out.append(d)
        return out


def _precision_row(
    stats: Stats,
    ref_stats: Stats,
    ref: Any,
    solver: str,
    dtype: torch.dtype,
    family: str,
    ridge: float,
    shared_seconds: float,
) -> PrecisionRow:
    """One solver in one precision, measured on the float64 reference statistics."""
    from .fit import fit

    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", IllConditionedWarning)
            f = fit(stats, family=family, solver=solver, ridge=ridge, dtype=dtype)
    except GhostsolveError as exc:
        seconds = shared_seconds + time.perf_counter() - t0
        return PrecisionRow(solver, dtype, "-", math.nan, math.nan, seconds, False, str(exc))
    seconds = shared_seconds + time.perf_counter() - t0
    M = f.delta.double().to(ref_stats.device)
    obj = f.objective_on(ref_stats)
    gap = (obj - ref.objective) / ref.objective if ref.objective > 0 else obj
    res = float(torch.linalg.matrix_norm(ref_stats.xtx @ M + ref.lam * M - ref_stats.xtd))
    xty_norm = float(torch.linalg.matrix_norm(ref_stats.xty))
    warned = any(issubclass(w.category, IllConditionedWarning) for w in caught)
    return PrecisionRow(
        solver, dtype, f.solver, gap, res / xty_norm if xty_norm > 0 else res, seconds, warned
    )


def compare_precisions(
    X: Any,
    Y: Any,
    *,
    family: str = "full",
    ridge: float = 0.0,
    solvers: tuple[str, ...] = SOLVERS,
    weights: Any = None,
) -> PrecisionTable:
    """Fit with every solver in float32 and float64 and compare with a float64 SVD reference.

    Parameters
    ----------
    X, Y : (n_tokens, d) tensors or arrays
        Calibration rows (raw rows, so that each precision accumulates its own statistics).
    family : str
        ``full`` (default), ``lowrank`` is not supported here (it needs a rank), others work.
    ridge : float
        Relative ridge for every fit.
    solvers : tuple of str
        Which solvers to try (default: all of :data:`ghostsolve.SOLVERS`).
    weights : (n_tokens,), optional
        Row weights.

    Returns
    -------
    PrecisionTable
        One row per (solver, dtype): relative objective gap to the reference, normal-equation residual,
        time; a solver that refuses the data (e.g. cholesky with fewer rows than ``d``) shows its error.

    Raises
    ------
    GhostsolveError
        Bad input (as :func:`ghostsolve.fit`), or an unknown solver.
    """
    from .fit import accumulate, fit

    for s in solvers:
        if s not in SOLVERS:
            raise GhostsolveError(f"unknown solver {s!r}; valid solvers: {', '.join(SOLVERS)}")
    features = stats_features([family])
    features.pop("qr")
    ref_stats = accumulate(X, Y, weights, dtype=torch.float64, qr=True, **features)
    ref = fit(ref_stats, family=family, solver="svd", ridge=ridge)
    ref_obj = ref.objective
    rows = []
    for dtype in (torch.float32, torch.float64):
        built: dict[bool, tuple[Stats | str, float]] = {}
        for s in solvers:
            # statistics of this precision (sums and products), shared by its solvers; with the TSQR
            # factor only for the solvers that use it, as fit(X, Y, solver=s) would build them
            qr = s in ("qr", "svd", "auto")
            if qr not in built:
                t0 = time.perf_counter()
                try:
                    made: Stats | str = accumulate(X, Y, weights, dtype=dtype, qr=qr, **features)
                except GhostsolveError as exc:
                    made = str(exc)
                built[qr] = (made, time.perf_counter() - t0)
            stats, shared = built[qr]
            if isinstance(stats, str):
                rows.append(PrecisionRow(s, dtype, "-", math.nan, math.nan, shared, False, stats))
            else:
                rows.append(_precision_row(stats, ref_stats, ref, s, dtype, family, ridge, shared))
    return PrecisionTable(tuple(rows), ref_obj, family, float(ridge))
