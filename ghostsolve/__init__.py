"""ghostsolve: closed-form linear recovery of layer-pruned language models.

The core (this package's top-level modules) works on torch tensors and never imports transformers. The model
side is reached lazily, on first access, so ``import ghostsolve`` stays light: ``ghostsolve.load`` and
``ghostsolve.save`` (checkpoints, :mod:`ghostsolve.pipeline.io.checkpoint`), and the workflows
``ghostsolve.prune``, ``ghostsolve.diagnose_model`` and ``ghostsolve.demo`` (:mod:`ghostsolve.workflows`).
They are not part of ``__all__`` (a star import would otherwise pull in transformers).

>>> import torch, ghostsolve
>>> X = torch.randn(512, 16, dtype=torch.float64)
>>> f = ghostsolve.fit(X, 1.5 * X, family="scalar")
>>> round(f.relative_residual, 12)
0.0
"""

from __future__ import annotations

from typing import Any

from .crossval import CV_RIDGES, CVResult, FoldedStats
from .diagnostics import Diagnostics, PrecisionTable, compare_precisions, diagnose
from .errors import GhostsolveError, IllConditionedWarning, NonFiniteInputError, NumericalError
from .families import FAMILIES
from .fit import Fit, FitDiagnostics, fit, ridge_path
from .solvers import SOLVERS, SolverChoice, choose_solver
from .stats import Stats

__all__ = [
    "CV_RIDGES",
    "FAMILIES",
    "SOLVERS",
    "CVResult",
    "Diagnostics",
    "Fit",
    "FitDiagnostics",
    "FoldedStats",
    "GhostsolveError",
    "IllConditionedWarning",
    "NonFiniteInputError",
    "NumericalError",
    "PrecisionTable",
    "SolverChoice",
    "Stats",
    "choose_solver",
    "compare_precisions",
    "diagnose",
    "fit",
    "ridge_path",
]

__version__ = "0.1.0"


_LAZY = {
    "load": "ghostsolve.pipeline.io.checkpoint",
    "save": "ghostsolve.pipeline.io.checkpoint",
    "prune": "ghostsolve.workflows",
    "diagnose_model": "ghostsolve.workflows",
    "demo": "ghostsolve.workflows",
}


def __getattr__(name: str) -> Any:
    # Lazy so that `import ghostsolve` never pulls in transformers (the model side needs it).
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ghostsolve' has no attribute {name!r}")
