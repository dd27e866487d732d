"""Recovery of a pruned model: the methods (:mod:`.methods`) and the algorithm that fits and applies them
(:mod:`.recovery`)."""

from __future__ import annotations

from ghostsolve.pipeline.recover.methods import (
    FOLDED_METHODS,
    METHODS,
    ORDERS,
    FitSettings,
    Method,
    default_rank,
    family_of,
    get_method,
    validate_method,
)
from ghostsolve.pipeline.recover.recovery import (
    CAPTURES,
    Recovery,
    iter_recoveries,
    recover,
    recover_all,
    stats_spec,
)

__all__ = [
    "CAPTURES",
    "FOLDED_METHODS",
    "METHODS",
    "ORDERS",
    "FitSettings",
    "Method",
    "Recovery",
    "default_rank",
    "family_of",
    "get_method",
    "iter_recoveries",
    "recover",
    "recover_all",
    "stats_spec",
    "validate_method",
]
