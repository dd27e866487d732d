"""Exceptions and warnings raised by ghostsolve.

Three channels, as listed in every ``Raises`` section:

* :class:`GhostsolveError` (a :class:`ValueError`) for bad input: wrong shapes or dtypes, unknown names,
  non-finite data, a solver that cannot handle the data it was given.
* :class:`NonFiniteInputError` (a :class:`GhostsolveError`) for NaN/Inf rows entering the statistics; it
  carries the counts so that a caller feeding chunks can re-word the message for the whole input.
* :class:`NumericalError` (a :class:`GhostsolveError`) for a numerical failure that no documented fallback
  could absorb; its message lists causes and remedies.
* :class:`IllConditionedWarning` (a :class:`UserWarning`) for ill-conditioning that still gives an answer.
* :class:`CalibrationWarning` (a :class:`UserWarning`) for a calibration set too small for what is fitted on
  it: the fit is exact on the calibration rows but will not hold on other text.
"""

from __future__ import annotations

__all__ = [
    "CalibrationWarning",
    "GhostsolveError",
    "IllConditionedWarning",
    "NonFiniteInputError",
    "NumericalError",
]


class GhostsolveError(ValueError):
    """Bad input to ghostsolve; the message says what was seen and how to fix it."""


class NonFiniteInputError(GhostsolveError):
    """NaN/Inf in the rows given to :meth:`ghostsolve.Stats.update`.

    Attributes
    ----------
    bad_rows : int
        How many rows hold a non-finite value.
    n_rows : int
        Rows in the input that was checked.
    first_row : int
        Index of the first bad row within that input.
    where : str
        ``"X"``, ``"Y"`` or ``"weights"``: where the first bad row's non-finite value is.
    """

    def __init__(self, message: str, *, bad_rows: int, n_rows: int, first_row: int, where: str) -> None:
        super().__init__(message)
        self.bad_rows = bad_rows
        self.n_rows = n_rows
        self.first_row = first_row
        self.where = where


class NumericalError(GhostsolveError):
    """A numerical failure (e.g. a factorization of non-finite statistics) with no safe fallback."""


class IllConditionedWarning(UserWarning):
    """The problem is ill-conditioned for the requested precision; the answer may be inaccurate."""


class CalibrationWarning(UserWarning):
    """Fewer calibration tokens than the operator has unknowns: it can fit the calibration rows exactly."""
