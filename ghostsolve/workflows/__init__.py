"""Workflows: what the command line does, as library calls that return result objects.

* :func:`prune` — select → evaluate → recover with every method → evaluate each → save one.
* :func:`diagnose_model` — conditioning and solver stability of every removed boundary.
* :func:`demo` — the whole job on the bundled demo model.

The command line only parses arguments, calls these and prints their results.
"""

from __future__ import annotations

from ghostsolve.workflows.demo import DEMO_MODEL_DIR, demo, demo_methods
from ghostsolve.workflows.diagnose import diagnose_model
from ghostsolve.workflows.prune import check_request, prune
from ghostsolve.workflows.results import DiagnoseResult, IntervalDiagnosis, MethodResult, PruneResult

__all__ = [
    "DEMO_MODEL_DIR",
    "DiagnoseResult",
    "IntervalDiagnosis",
    "MethodResult",
    "PruneResult",
    "check_request",
    "demo",
    "demo_methods",
    "diagnose_model",
    "prune",
]
