"""Recovery methods: what each one fits, how it changes the pruned model, and its map in the pruned stream.

For a removed interval ``(start, end)`` (``X`` the stream entering ``start``, ``Y`` the stream entering
``end``, row vectors, ``Y ≈ X W`` with ``W = I + M``):

* ``"identity"``: plain pruning, nothing fitted or inserted.
* ``"ghost"`` (the unconstrained ``"full"`` family) and every other family of the core (``"scalar"``,
  ``"diagonal"``, ``"hadamard"``, their ``"-magnitude"`` variants, ``"lowrank"``, ``"symmetric"``): a
  :class:`~ghostsolve.pipeline.model.operators.GhostOperator` inserted where the stream enters the first kept
  layer after the interval (the final norm for an interval reaching the end).
* ``"prune-comp"``: Prune&Comp's scalar ``α = mean|Y| / mean|X|`` folded into the embedding and every
  o_proj/down_proj before the cut (pre-norm models only).
* ``"replaceme"``: ReplaceMe-LS, a least-squares map ``T`` on the MLP output of the last kept layer before the
  cut, folded into its down_proj (pre-norm models, intervals not starting at layer 0).

In the pruned stream of the sequential order each method acts as the map it adds to the model: ``h W`` for
an operator, ``α h`` for Prune&Comp (its fold scales the stream before the cut, exactly up to the norms'
epsilon), ``h + m (T − I)`` for ReplaceMe (``m`` that batch's MLP output of the layer before the cut).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ghostsolve.adapters import ModelAdapter
from ghostsolve.errors import CalibrationWarning, GhostsolveError
from ghostsolve.families import FAMILIES
from ghostsolve.fit import Fit, fit
from ghostsolve.pipeline.capture.consumers import BoundaryStats
from ghostsolve.pipeline.capture.plan import StreamMap
from ghostsolve.pipeline.model.folds import fold_prune_comp, fold_replaceme, require_pre_norm
from ghostsolve.pipeline.model.operators import GhostOperator
from ghostsolve.pipeline.model.surgery import FINAL_NORM, Interval, insert_ghost, interval_label

__all__ = [
    "CV_FOLDS",
    "FOLDED_METHODS",
    "METHODS",
    "ORDERS",
    "FitSettings",
    "Method",
    "check_calibration_size",
    "default_rank",
    "family_of",
    "get_method",
    "validate_method",
]

#: Methods folded into existing weights instead of inserting a module.
FOLDED_METHODS: tuple[str, ...] = ("prune-comp", "replaceme")
#: Every method name the recovery accepts, plain pruning first.
METHODS: tuple[str, ...] = ("identity", "ghost", *(f for f in FAMILIES if f != "identity"), *FOLDED_METHODS)
#: Fitting orders for several intervals.
ORDERS: tuple[str, ...] = ("independent", "sequential")


def default_rank(dim: int) -> int:
    """Rank of the ``"lowrank"`` family when none is given: ``max(1, d // 4)``.

    A quarter of the hidden size stores half the parameters of the full operator as two factors, the middle
    ground the published low-rank patches use.
    """
    return max(1, dim // 4)


#: Cross-validation folds the capture keeps when ``ridge="cv"`` or ``rank="cv"``: whole calibration sequences,
#: five folds (every fit trains on 80% of them; memory 5× the statistics, see docs/scale.md).
CV_FOLDS = 5


@dataclass(frozen=True)
class FitSettings:
    """How each interval's operator is fitted and stored (see :func:`ghostsolve.pipeline.recover.recover`)."""

    ridge: float | str | None = None
    solver: str = "auto"
    rank: int | str | None = None
    compute_dtype: torch.dtype | None = None

    @property
    def folds(self) -> int | None:
        """Cross-validation folds the statistics must keep (None: one ``Stats``)."""
        return CV_FOLDS if "cv" in (self.ridge, self.rank) else None

    def fit(self, stats: BoundaryStats, family: str) -> Fit:
        """``ghostsolve.fit`` of ``family`` on ``stats`` with these settings."""
        kwargs: dict[str, Any] = {"family": family, "solver": self.solver}
        if self.ridge is not None:
            kwargs["ridge"] = self.ridge
        if family == "lowrank":
            kwargs["rank"] = self.rank if self.rank is not None else default_rank(stats.dim)
        return fit(stats, **kwargs)


@dataclass(frozen=True)
class Cut:
    """Where one removed interval sits in the model being pruned, after the earlier removals.

    ``start`` is the interval's first layer in the current numbering (after removal it is also the index of
    the first kept layer after it, the *cut*); ``reaches_end`` says the interval ended at the final norm.
    """

    start: int
    reaches_end: bool


@dataclass(frozen=True)
class Method:
    """One recovery method.

    Attributes
    ----------
    name : str
    family : str or None
        The core family it fits (None: plain pruning).
    statistics : {"none", "residual", "mlp"}
        What it is fitted on: nothing, the boundary statistics, or ReplaceMe's MLP-output statistics.
    """

    name: str
    family: str | None
    statistics: Literal["none", "residual", "mlp"]

    @property
    def kind(self) -> Literal["none", "operator", "prune-comp", "replaceme"]:
        if self.family is None:
            return "none"
        if self.name in FOLDED_METHODS:
            return self.name  # type: ignore[return-value]
        return "operator"

    def apply(
        self, model: nn.Module, adapter: ModelAdapter, cut: Cut, fitted: Fit | None, settings: FitSettings
    ) -> None:
        """Insert or fold ``fitted`` at ``cut`` of ``model`` (already pruned of the interval)."""
        if fitted is None or self.kind == "none":
            return
        if self.kind == "prune-comp":
            fold_prune_comp(model, cut.start, prune_comp_scale(fitted), adapter=adapter)
        elif self.kind == "replaceme":
            fold_replaceme(model, cut.start - 1, fitted.weight, adapter=adapter)
        else:
            ghost = GhostOperator(fitted.delta, compute_dtype=settings.compute_dtype)
            insert_ghost(model, FINAL_NORM if cut.reaches_end else cut.start, ghost, adapter=adapter)

    def stream_map(
        self, fitted: Fit | None, settings: FitSettings, mlp_outputs: Sequence[torch.Tensor] = ()
    ) -> StreamMap | None:
        """The map this method adds to the pruned stream (see the module docstring); None: plain pruning."""
        if fitted is None or self.kind == "none":
            return None
        if self.kind == "prune-comp":
            alpha = prune_comp_scale(fitted)
            return StreamMap(lambda h, index: h * alpha)
        if self.kind == "replaceme":
            change = fitted.weight.to(torch.float64) - torch.eye(fitted.dim, dtype=torch.float64)

            def replaceme(h: torch.Tensor, index: int) -> torch.Tensor:
                m = mlp_outputs[index].to(device=h.device, dtype=torch.float64)
                return (h.to(torch.float64) + m @ change.to(h.device)).to(h.dtype)

            return StreamMap(replaceme)
        ghost = GhostOperator(fitted.delta, compute_dtype=settings.compute_dtype)
        return StreamMap(lambda h, index: ghost(h), (ghost,))


#: Families whose operator has about d² unknowns (d per calibration row of equations): they can interpolate
#: a calibration set of fewer than d tokens.
_SQUARE_FAMILIES = ("full", "lowrank", "symmetric")


def check_calibration_size(
    stats: BoundaryStats, method: Method, interval: Interval, settings: FitSettings
) -> str:
    """A :class:`~ghostsolve.errors.CalibrationWarning` (its text also returned) when ``method`` fits more
    unknowns than the calibration rows give equations and no ridge is set; ``""`` otherwise.

    ``n`` tokens give ``n · d`` equations; the full operator has ``d²`` unknowns, so with ``n < d`` it can
    interpolate the calibration rows (relative residual near 0) and says nothing about other text.
    """
    d, n = stats.dim, int(stats.n_rows)
    ridged = settings.ridge not in (None, 0, 0.0)
    if method.family not in _SQUARE_FAMILIES or n >= d or ridged:
        return ""
    message = (
        f"layers {interval_label(interval)}: {n} calibration tokens for the {d}×{d} operator of "
        f"{method.name!r} ({d * d} unknowns, {n * d} equations): it can fit the calibration rows exactly "
        f"(relative residual near 0) and will not hold on other text; use more calibration tokens (at least "
        f"{10 * d}: --num-calib, --seq-len) or ridge='cv' (--ridge cv)"
    )
    warnings.warn(message, CalibrationWarning, stacklevel=3)
    return message


def prune_comp_scale(fitted: Fit) -> float:
    """Prune&Comp's ``α`` from its ``scalar-magnitude`` fit ``W = α I``."""
    return 1.0 + float(torch.diagonal(fitted.delta).mean())


_STATISTICS: dict[str, Literal["none", "residual", "mlp"]] = {"identity": "none", "replaceme": "mlp"}


def get_method(name: str) -> Method:
    """The :class:`Method` called ``name``.

    Raises
    ------
    GhostsolveError
        Unknown method (the message lists :data:`METHODS`).
    """
    if name not in METHODS:
        raise GhostsolveError(f"unknown recovery method {name!r}; choose one of {', '.join(METHODS)}")
    return Method(name, family_of(name), _STATISTICS.get(name, "residual"))


def family_of(method: str) -> str | None:
    """The core family fitted by ``method`` (None for plain pruning).

    ``"ghost"`` is the unconstrained ``"full"`` family; Prune&Comp fits ``"scalar-magnitude"``; ReplaceMe fits
    ``"full"`` on the MLP-output statistics.
    """
    if method == "identity":
        return None
    if method in ("ghost", "replaceme"):
        return "full"
    if method == "prune-comp":
        return "scalar-magnitude"
    return method


def validate_method(method: str, adapter: ModelAdapter, intervals: Sequence[Interval]) -> None:
    """Check that ``method`` exists and applies to this architecture and these intervals.

    Raises
    ------
    GhostsolveError
        Unknown method (the message lists :data:`METHODS`); a fold on a post-norm model; ReplaceMe for an
        interval starting at layer 0 (no kept layer before the cut to fold into).
    """
    get_method(method)
    if method in FOLDED_METHODS:
        require_pre_norm(adapter, "Prune&Comp" if method == "prune-comp" else "ReplaceMe")
    if method == "replaceme" and any(start == 0 for start, _ in intervals):
        raise GhostsolveError(
            "ReplaceMe folds its map into the down_proj of the last kept layer before the cut, but the "
            "removed "
            "interval starting at layer 0 has no layer before it; keep layer 0 or use another method "
            "(e.g. 'ghost')"
        )
