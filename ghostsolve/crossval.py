"""Exact cross-validation of the ridge and the rank from sufficient statistics.

Because :class:`~ghostsolve.Stats` are plain sums, K-fold cross-validation needs no stored activations:
keep one ``Stats`` per fold (:class:`FoldedStats`), fit on the sum of the other ``K − 1`` folds and score
the held-out fold from its own statistics,

    f_k(M) = Σ_{rows of fold k} ‖x W − y‖² = tr(Mᵀ G_k M) − 2 tr(Mᵀ B_k) + ‖D_k‖²,

with ``G_k = X_kᵀX_k``, ``B_k = X_kᵀ(Y_k − X_k)`` (the delta form used throughout). Folds must be groups
of whole calibration sequences, never random rows: the tokens of one sequence are strongly correlated,
and a row-level split would score each fold on near-copies of its training rows (see docs/theory.md).
The caller routes each sequence to a fold; this module only takes the fold statistics.

Costs: for ``full`` one eigendecomposition of each training sum serves the whole ridge grid (after
``O(d³)`` rotations per fold, ``O(d²)`` per ridge); ``scalar``/``diagonal``/``hadamard`` cost ``O(d)`` per
ridge; ``symmetric`` and ``lowrank`` (with a fixed rank) refit per ridge; the rank of ``lowrank`` is chosen
for every rank at once from one eigendecomposition per fold.

Choice rule (both parameters): the **one-standard-error rule** on paired fold differences. With ``g*``
the grid value of lowest total held-out objective, ``Δ(g) = Σ_k f_k(g) − f_k(g*)`` and ``SE(g)`` the
standard error of that sum (``sqrt(K)`` times the sample standard deviation of the per-fold differences),
the chosen value is the *simplest* ``g`` (largest ridge; smallest rank) with ``Δ(g) ≤ SE(g)``. Few folds
make the curve noisy near its minimum, and among values the folds cannot tell apart the simpler operator
(closer to plain pruning) is the safer one on unseen text (Hastie, Tibshirani & Friedman, ESL §7.10).
With ample data ``SE`` shrinks faster than the bias a ridge adds, so the chosen ridge tends to 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import GhostsolveError
from .families import FAMILIES, solve_family
from .hadamard import apply_hadamard
from .solvers import make_problem, relative_lambda, ridge_weights
from .stats import Stats, as_rows, as_weights

__all__ = [
    "CV_RIDGES",
    "CVResult",
    "FoldedStats",
    "accumulate_folds",
    "cv_rank",
    "cv_ridge",
    "gcv_ridge",
    "ridge_applies",
]

# Relative ridges tried by ridge="cv"/"gcv": 0 and 1e-8 … 10 in half decades. Below 1e-8 a relative ridge
# changes nothing a float64 solve can see (cond ≤ 1 + d/ridge); above 10 the operator is within a few
# percent of the identity (plain pruning), which the grid's largest values already approach.
CV_RIDGES: tuple[float, ...] = (0.0, *(10.0 ** (k / 2) for k in range(-16, 3)))
# Families whose objective has no ridge (nothing to choose): ridge="cv" fits them with ridge 0 and says so.
_NO_RIDGE = ("identity", "scalar-magnitude", "diagonal-magnitude", "hadamard-magnitude")


def ridge_applies(family: str) -> bool:
    """Whether ``family`` has a ridge to choose (the least-squares families) or not (identity, magnitude)."""
    return family not in _NO_RIDGE


class FoldedStats:
    """K fold :class:`~ghostsolve.Stats` of one boundary, for exact K-fold cross-validation.

    Parameters
    ----------
    dim : int
        Hidden size ``d``.
    n_folds : int, default 5
        ``K``; memory is ``K ×`` that of one ``Stats``.
    **settings
        Keywords of :class:`~ghostsolve.Stats` (``dtype``, ``device``, ``product_dtype``, ``magnitudes``,
        ``hadamard_magnitudes``), shared by every fold. ``qr=True`` is refused: a TSQR factor per fold is
        not needed by the cross-validation, which works on the Gram statistics.

    Notes
    -----
    Everywhere a ``Stats`` is expected for fitting (:func:`ghostsolve.fit`, ``ridge_path``, ``diagnose``,
    ``Fit.objective_on``) a ``FoldedStats`` stands for :attr:`total`, the sum of its folds; its buffers
    (``xtx``, ``n_rows``, …) read as the total's too, computed on each access (bind ``.total`` once when
    reading many).

    Examples
    --------
    >>> fs = FoldedStats(4, n_folds=2)
    >>> X = torch.randn(20, 4); Y = 2 * X
    >>> fs.update(X[:10], Y[:10], fold=0).update(X[10:], Y[10:], fold=1).total.n_rows
    20
    """

    def __init__(self, dim: int, n_folds: int = 5, **settings: Any) -> None:
        if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 1:
            raise GhostsolveError(f"n_folds must be a positive int (e.g. 4 or 5), got {n_folds!r}")
        if settings.get("qr"):
            raise GhostsolveError(
                "FoldedStats(qr=True) is not supported: cross-validation works on the Gram statistics; "
                "keep a separate Stats(dim, qr=True) if the qr solver is wanted for the final fit"
            )
        settings.pop("qr", None)
        self.folds = [Stats(dim, **settings) for _ in range(n_folds)]
        self.dim = self.folds[0].dim

    @property
    def n_folds(self) -> int:
        return len(self.folds)

    @property
    def r_factor(self) -> None:
        """Always None: no TSQR factor is kept (so a distributed reduction has none to gather)."""
        return None

    def __repr__(self) -> str:
        rows = [f.n_rows for f in self.folds]
        return f"FoldedStats(dim={self.dim}, n_folds={self.n_folds}, rows per fold={rows})"

    def __getattr__(self, name: str) -> Any:
        # only reached for names this class lacks: settings read from the first fold, buffers and counts
        # from the summed statistics
        if name in _SETTINGS:
            return getattr(self.folds[0], name)
        if name in _FROM_TOTAL:
            return getattr(self.total, name)
        raise AttributeError(f"'FoldedStats' object has no attribute {name!r}")

    @property
    def total(self) -> Stats:
        """The sum of the folds (a new :class:`~ghostsolve.Stats`): the statistics of all rows."""
        return _summed(self.folds)

    def complement(self, k: int) -> Stats:
        """The sum of every fold but ``k`` (a new :class:`~ghostsolve.Stats`): fold ``k``'s training rows."""
        return _summed([f for i, f in enumerate(self.folds) if i != k])

    def settings(self) -> dict[str, Any]:
        """The :class:`~ghostsolve.Stats` keywords every fold was built with."""
        return self.folds[0].settings()

    def to(self, device: torch.device | str) -> FoldedStats:
        """A copy with every fold on ``device``."""
        return self._with([f.to(device) for f in self.folds])

    def _with(self, folds: list[Stats]) -> FoldedStats:
        out = FoldedStats.__new__(FoldedStats)
        out.folds = folds
        out.dim = folds[0].dim
        return out

    def update(self, X: Any, Y: Any, weights: Any = None, *, fold: int) -> FoldedStats:
        """Add rows of whole sequences to fold ``fold`` (as :meth:`Stats.update`); returns ``self``.

        Raises
        ------
        GhostsolveError
            ``fold`` outside ``[0, n_folds)``; anything :meth:`Stats.update` refuses.
        """
        if isinstance(fold, bool) or not isinstance(fold, int) or not 0 <= fold < self.n_folds:
            raise GhostsolveError(f"fold must be an int in [0, {self.n_folds}), got {fold!r}")
        self.folds[fold].update(X, Y, weights)
        return self

    def merge(self, other: FoldedStats) -> FoldedStats:
        """Fold-by-fold sum with another ``FoldedStats`` of the same ``n_folds`` (a new object)."""
        if not isinstance(other, FoldedStats) or other.n_folds != self.n_folds:
            got = f"{other.n_folds} folds" if isinstance(other, FoldedStats) else type(other).__name__
            raise GhostsolveError(f"can only merge FoldedStats with {self.n_folds} folds, got {got}")
        return self._with([a.merge(b) for a, b in zip(self.folds, other.folds, strict=True)])

    def __add__(self, other: FoldedStats) -> FoldedStats:
        return self.merge(other)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every summed buffer of every fold (live tensors), named ``"fold{k}.{buffer}"``.

        The order is fixed and deterministic: folds ascending, then each fold's buffers in
        :meth:`Stats.tensors` order; fold numbers are zero-padded, so sorting the names (as
        ``ghostsolve.pipeline.distributed.all_reduce_stats`` does) keeps the folds in order too.
        ``torch.distributed.all_reduce(t, op=SUM)`` on each, in one order on every rank, gives the folds
        of all ranks' rows.
        """
        width = len(str(self.n_folds - 1))
        return {
            f"fold{k:0{width}d}.{name}": t
            for k, fold in enumerate(self.folds)
            for name, t in fold.tensors().items()
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain dict for ``torch.save``; inverse of :meth:`from_state_dict`."""
        return {
            "meta": {"kind": "FoldedStats", "n_folds": self.n_folds, "version": 1},
            "folds": [f.state_dict() for f in self.folds],
        }

    @classmethod
    def from_state_dict(
        cls, state: Mapping[str, Any], *, device: torch.device | str | None = None
    ) -> FoldedStats:
        """Rebuild from :meth:`state_dict` output.

        Raises
        ------
        GhostsolveError
            Not a FoldedStats state dict, or a fold that :meth:`Stats.from_state_dict` refuses.
        """
        try:
            meta, folds = state["meta"], list(state["folds"])
            ok = meta["kind"] == "FoldedStats" and int(meta["n_folds"]) == len(folds) >= 1
        except (KeyError, TypeError, ValueError) as exc:
            raise GhostsolveError(f"not a FoldedStats state dict ({exc!r})") from exc
        if not ok:
            raise GhostsolveError(f"not a FoldedStats state dict (meta {meta!r} with {len(folds)} folds)")
        out = cls.__new__(cls)
        out.folds = [Stats.from_state_dict(f, device=device) for f in folds]
        out.dim = out.folds[0].dim
        if len({str(sorted(f.settings().items())) for f in out.folds}) > 1:
            raise GhostsolveError(
                "not a FoldedStats state dict: its folds were built with different settings"
            )
        return out

    def check_statistics(self) -> None:
        """:meth:`Stats.check_statistics` for every fold."""
        for f in self.folds:
            f.check_statistics()


_SETTINGS = ("dtype", "device", "qr", "product_dtype", "magnitudes", "hadamard_magnitudes")
_FROM_TOTAL = (
    *("rows", "count", "xtx", "xtd", "yty", "dtd", "x_abs_sum", "y_abs_sum", "xh_abs_sum", "yh_abs_sum"),
    *("n_rows", "weight_sum", "xty"),
)


def _summed(parts: list[Stats]) -> Stats:
    out = parts[0].merge(parts[1]) if len(parts) > 1 else parts[0].to(parts[0].device)
    for part in parts[2:]:
        out = out.merge(part)
    return out


def accumulate_folds(
    X: Any, Y: Any, folds: Any, weights: Any = None, *, n_folds: int | None = None, **settings: Any
) -> FoldedStats:
    """:class:`FoldedStats` of rows ``X``, ``Y`` (``(..., d)``) routed by integer fold labels.

    ``folds`` has the leading shape of ``X`` (or ``(n,)``); label ``k`` sends a row to fold ``k``. Give
    every token of a sequence the same label (e.g. the sequence index modulo ``K``).

    Raises
    ------
    GhostsolveError
        Labels of the wrong shape, non-integer, negative or ``≥ n_folds``.
    """
    X, Y = as_rows(X, "X"), as_rows(Y, "Y")
    d = X.shape[-1]
    if Y.shape != X.shape:
        raise GhostsolveError(
            f"X is {tuple(X.shape)} but Y is {tuple(Y.shape)}; both must be (n_tokens, {d})"
        )
    labels = (
        torch.as_tensor(folds).to(X.device) if not isinstance(folds, torch.Tensor) else folds.to(X.device)
    )
    lead = tuple(X.shape[:-1])
    if (
        labels.is_floating_point()
        or labels.dtype == torch.bool
        or tuple(labels.shape) not in (lead, (math.prod(lead),))
    ):
        raise GhostsolveError(
            f"folds must be integer fold labels of shape {lead} (one per row), got {labels.dtype} "
            f"{tuple(labels.shape)}"
        )
    labels = labels.reshape(-1)
    k = int(labels.max()) + 1 if labels.numel() else 1
    K = k if n_folds is None else n_folds
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= K):
        raise GhostsolveError(
            f"fold labels must lie in [0, {K}); saw {int(labels.min())}…{int(labels.max())}"
        )
    out = FoldedStats(d, K, device=X.device, **settings)
    X2, Y2 = X.reshape(-1, d), Y.reshape(-1, d)
    w = None if weights is None else as_weights(weights, tuple(X.shape), X.device)
    for fold in range(K):
        idx = torch.nonzero(labels == fold).flatten()
        if idx.numel():
            out.update(X2[idx], Y2[idx], None if w is None else w[idx], fold=fold)
    return out


@dataclass(frozen=True)
class CVResult:
    """A cross-validation curve and the value it chose.

    Attributes
    ----------
    parameter : str
        ``"ridge"`` (relative ridge) or ``"rank"``.
    method : str
        ``"kfold"`` or ``"gcv"``.
    grid : tuple of float
        The values tried, simplest first (ridges descending, ranks ascending).
    scores : tuple of float
        Total held-out objective ``Σ_k f_k`` per value (``kfold``), or the GCV criterion (``gcv``).
    fold_scores : tuple of tuple of float, or None
        ``f_k`` per fold (rows) and value (columns); None for ``gcv``.
    standard_errors : tuple of float, or None
        ``SE(g)`` of the paired differences to the best value (``kfold``).
    best, chosen : float
        The value of lowest score, and the value the rule chose.
    rule : str
        The choice rule in words.
    """

    parameter: str
    method: str
    grid: tuple[float, ...]
    scores: tuple[float, ...]
    fold_scores: tuple[tuple[float, ...], ...] | None
    standard_errors: tuple[float, ...] | None
    best: float
    chosen: float
    rule: str

    def __str__(self) -> str:
        what = f"{len(self.fold_scores)}-fold CV" if self.fold_scores is not None else "GCV"
        head = f"{self.parameter} by {what}: chosen {self.chosen:g} (best {self.best:g}; {self.rule})"
        rows = []
        for i, (g, sc) in enumerate(zip(self.grid, self.scores, strict=True)):
            se = f" ± {self.standard_errors[i]:.3g}" if self.standard_errors is not None else ""
            mark = "  <- chosen" if g == self.chosen else ("  (best)" if g == self.best else "")
            rows.append(f"    {g:<10g} {sc:.6g}{se}{mark}")
        return "\n".join([head, *rows])

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _folds_of(folded: FoldedStats, what: str) -> list[int]:
    used = [k for k, f in enumerate(folded.folds) if f.n_rows > 0]
    if len(used) < 2:
        raise GhostsolveError(
            f"{what}='cv' needs at least 2 folds holding rows, got {len(used)} of {folded.n_folds}; route "
            "whole calibration sequences to K ≥ 2 folds (FoldedStats(d, n_folds=K)), or use ridge='gcv' "
            "on one Stats"
        )
    return used


def _choose(grid: Sequence[float], fold_scores: torch.Tensor, parameter: str, method: str) -> CVResult:
    """Apply the one-standard-error rule (module docstring) to ``fold_scores`` (K × G, simplest first)."""
    totals = fold_scores.sum(dim=0)
    best = int(torch.argmin(totals))
    diff = fold_scores - fold_scores[:, best : best + 1]
    K = fold_scores.shape[0]
    se = diff.std(dim=0, correction=1) * math.sqrt(K) if K > 1 else torch.zeros_like(totals)
    within = (diff.sum(dim=0) <= se).nonzero().flatten()
    chosen = int(within[0]) if within.numel() else best
    simpler = "largest ridge" if parameter == "ridge" else "smallest rank"
    return CVResult(
        parameter,
        method,
        tuple(float(g) for g in grid),
        tuple(float(t) for t in totals),
        tuple(tuple(float(v) for v in row) for row in fold_scores),
        tuple(float(v) for v in se),
        float(grid[best]),
        float(grid[chosen]),
        f"one standard error: the {simpler} within one SE of the best",
    )


def _heldout(M: torch.Tensor, held: Stats) -> float:
    G, B = held.xtx.double(), held.xtd.double()
    return max(float((M * (G @ M - 2 * B)).sum()) + float(held.dtd), 0.0)


def _full_curve(train: Stats, held: Stats, grid: Sequence[float]) -> list[float]:
    """``f_k(M(λ))`` for every relative ridge, from one eigendecomposition of the training Gram matrix."""
    e, V = torch.linalg.eigh(train.xtx.double())
    Bh = V.T @ train.xtd.double()
    Gk = V.T @ held.xtx.double() @ V
    P = Gk * (Bh @ Bh.T)  # f_k = sᵀ P s − 2 sᵀ q + ‖D_k‖² with s = 1/(e + λ)
    q = (Bh * (V.T @ held.xtd.double())).sum(dim=1)
    out = []
    for r in grid:
        s = ridge_weights(e, relative_lambda(train.xtx, r))
        out.append(max(float(s @ P @ s - 2 * s @ q) + float(held.dtd), 0.0))
    return out


def _diagonal_curve(train: Stats, held: Stats, grid: Sequence[float], family: str) -> list[float]:
    """The same for ``scalar``, ``diagonal`` and ``hadamard``: ``O(d)`` per ridge after the diagonals."""

    def parts(s: Stats) -> tuple[torch.Tensor, torch.Tensor]:
        G, B = s.xtx.double(), s.xtd.double()
        if family == "hadamard":  # diag(HᵀAH) through two fast transforms
            G = apply_hadamard(apply_hadamard(G).T.contiguous())
            B = apply_hadamard(apply_hadamard(B).T.contiguous())
        g, b = torch.diagonal(G), torch.diagonal(B)
        return (g.sum(0, keepdim=True), b.sum(0, keepdim=True)) if family == "scalar" else (g, b)

    (g, b), (gk, bk) = parts(train), parts(held)
    weight = train.dim if family == "scalar" else 1  # the scalar's λ‖mI‖² = d λ m²
    out = []
    for r in grid:
        den = g + weight * relative_lambda(train.xtx, r)
        m = torch.where(den > 0, b / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))
        out.append(max(float((m * m * gk - 2 * m * bk).sum()) + float(held.dtd), 0.0))
    return out


def _refit_curve(
    train: Stats, held: Stats, grid: Sequence[float], family: str, rank: int | None
) -> list[float]:
    """Any other least-squares family (symmetric, lowrank): refit per ridge through the eigendecomposition
    of the training Gram matrix, as fit(stats, solver="eigh") would, and score the held-out fold."""
    out = []
    for r in grid:
        res = solve_family(family, make_problem(train, torch.float64, r), train, "eigh", rank)
        if res.delta is not None:
            M = res.delta
        else:
            assert res.factors is not None
            M = res.factors[0] @ res.factors[1].T
        out.append(_heldout(M, held))
    return out


def cv_ridge(
    folded: FoldedStats,
    *,
    family: str = "full",
    grid: Sequence[float] = CV_RIDGES,
    rank: int | None = None,
) -> CVResult:
    """Choose the relative ridge of ``family`` by exact K-fold cross-validation on ``folded``.

    Every fit and score is float64 from the statistics. ``lowrank`` with a fixed ``rank`` refits per
    ridge; see the module docstring for the costs and the choice rule.

    Raises
    ------
    GhostsolveError
        Fewer than 2 folds with rows; a family without a ridge; a negative grid value.
    """
    if family not in FAMILIES or not ridge_applies(family):
        raise GhostsolveError(
            f"family={family!r} has no ridge to cross-validate; valid: "
            + ", ".join(f for f in FAMILIES if ridge_applies(f))
        )
    values = sorted({float(g) for g in grid}, reverse=True)  # simplest (largest ridge) first
    if not values or values[-1] < 0 or not all(math.isfinite(v) for v in values):
        raise GhostsolveError(f"ridge grid must hold finite values ≥ 0, got {list(grid)!r}")
    scores = []
    for k in _folds_of(folded, "ridge"):
        train, held = folded.complement(k), folded.folds[k]
        if family == "full":
            scores.append(_full_curve(train, held, values))
        elif family in ("scalar", "diagonal", "hadamard"):
            scores.append(_diagonal_curve(train, held, values, family))
        else:
            scores.append(_refit_curve(train, held, values, family, rank))
    return _choose(values, torch.tensor(scores, dtype=torch.float64), "ridge", "kfold")


def cv_rank(folded: FoldedStats, *, ridge: float = 0.0, ranks: Sequence[int] | None = None) -> CVResult:
    """Choose the rank of ``lowrank`` (at relative ``ridge``) by exact K-fold cross-validation.

    For each fold, one full solve ``M`` on the training sum and one eigendecomposition of ``BᵀM`` give the
    held-out objective of every rank ``r`` at once: with ``Q`` its eigenvectors (descending),
    ``f_k(M Q_r Q_rᵀ) = Σ_{i≤r} (Qᵀ Mᵀ G_k M Q)_ii − 2 Σ_{i≤r} (Qᵀ Mᵀ B_k Q)_ii + ‖D_k‖²``.

    Raises
    ------
    GhostsolveError
        Fewer than 2 folds with rows; ranks outside ``[0, d]``.
    """
    d = folded.dim
    grid = sorted({int(r) for r in (range(d + 1) if ranks is None else ranks)})
    if not grid or grid[0] < 0 or grid[-1] > d:
        raise GhostsolveError(f"ranks must lie in [0, {d}], got {list(ranks or [])!r}")
    scores = []
    for k in _folds_of(folded, "rank"):
        train, held = folded.complement(k), folded.folds[k]
        e, V = torch.linalg.eigh(train.xtx.double())
        B = train.xtd.double()
        M = V @ (ridge_weights(e, relative_lambda(train.xtx, ridge)).unsqueeze(1) * (V.T @ B))
        K_ = B.T @ M
        _, Q = torch.linalg.eigh((K_ + K_.T) / 2)
        MQ = M @ Q.flip(1)
        a = (MQ * (held.xtx.double() @ MQ)).sum(dim=0)  # (Qᵀ Mᵀ G_k M Q)_ii
        c = (MQ * (held.xtd.double() @ Q.flip(1))).sum(dim=0)  # (Qᵀ Mᵀ B_k Q)_ii
        cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(a - 2 * c, dim=0)])
        scores.append([max(float(cum[r]) + float(held.dtd), 0.0) for r in grid])
    return _choose(grid, torch.tensor(scores, dtype=torch.float64), "rank", "kfold")


def gcv_ridge(stats: Stats, *, grid: Sequence[float] = CV_RIDGES) -> CVResult:
    """Choose the relative ridge of ``full`` by generalised cross-validation on one ``Stats``.

    ``GCV(λ) = n · RSS(λ) / (n − df(λ))²`` (Golub, Heath & Wahba 1979) with ``n`` the weighted row count,
    ``RSS(λ) = ‖X M(λ) − D‖²`` summed over the ``d`` outputs (which share one hat matrix
    ``X (G + λI)⁻¹ Xᵀ``) and ``df(λ) = Σ e_i / (e_i + λ)`` over the kept eigenvalues of ``G``; all from one
    eigendecomposition. GCV treats rows as independent, so on correlated tokens it tends to under-
    regularize; prefer K-fold on whole sequences when folds are available. Ties go to the larger ridge.

    Raises
    ------
    GhostsolveError
        No rows.
    """
    if stats.n_rows <= 0:
        raise GhostsolveError("the statistics hold no rows (n_rows=0); nothing to cross-validate")
    values = sorted({float(g) for g in grid}, reverse=True)
    e, V = torch.linalg.eigh(stats.xtx.double())
    norms = (V.T @ stats.xtd.double()).square().sum(dim=1)  # ‖(VᵀB)_i‖²
    n = stats.weight_sum
    scores = []
    for r in values:
        s = ridge_weights(e, relative_lambda(stats.xtx, r))
        rss = max(float(stats.dtd) - float(((2 * s - s * s * e) * norms).sum()), 0.0)
        df = float((e * s).sum())
        # rss/(n − df) · n/(n − df): the same value without forming (n − df)² (which overflows a float)
        scores.append(rss / (n - df) * (n / (n - df)) if n - df > 0 else math.inf)
    t = torch.tensor(scores, dtype=torch.float64)
    best = int(torch.argmin(t))
    # ties (to rounding) go to the simpler model: values are sorted largest ridge first
    chosen = int((t <= t[best] * (1 + 1e-12)).nonzero()[0])
    return CVResult(
        "ridge",
        "gcv",
        tuple(values),
        tuple(scores),
        None,
        None,
        values[best],
        values[chosen],
        "lowest GCV; ties to the larger ridge",
    )
