"""Exceptions and warnings raised by ghostsolve.

Three channels, as listed in every ``Raises`` section:

* :class:`GhostsolveError` (a :class:`ValueError`) for bad input: wrong shapes or dtypes, unknown names,
  non-finite data, a solver that cannot handle the data it was given.
* :class:`NumericalError` (a :class:`GhostsolveError`) for a numerical failure that no documented fallback
  could absorb; its message lists causes and remedies.
* :class:`IllConditionedWarning` (a :class:`UserWarning`) for ill-conditioning that still gives an answer.
"""

from __future__ import annotations

__all__ = ["GhostsolveError", "IllConditionedWarning", "NumericalError"]


class GhostsolveError(ValueError):
    """Bad input to ghostsolve; the message says what was seen and how to fix it."""


class NumericalError(GhostsolveError):
    """A numerical failure (e.g. a factorization of non-finite statistics) with no safe fallback."""


class IllConditionedWarning(UserWarning):
    """The problem is ill-conditioned for the requested precision; the answer may be inaccurate."""
