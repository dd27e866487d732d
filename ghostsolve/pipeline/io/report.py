"""Results of a pruning run: the text table, the JSON report and the perplexity bar plot.

The JSON report is a contract that scripts rely on (issue 4)::

    {"model": str, "removed": [int, ...], "seq_len": int,
     "dense": {"perplexity": float},
     "methods": {NAME: {"perplexity": float, "relative_residual": float | null, "fit_seconds": float}, ...},
     "saved": NAME | null}

``NAME`` is the method name as given to ``--recover``. More keys may be added, never removed or retyped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.atomic import check_destination, save_png, write_text

__all__ = [
    "MethodResult",
    "RunResult",
    "build_report",
    "format_table",
    "new_figure",
    "plot_perplexities",
    "write_report",
]

PLAIN_PRUNED = "identity"
"""The method name of plain pruning (no recovery), drawn as the "pruned" reference."""


@dataclass(frozen=True)
class MethodResult:
    """Evaluation of one recovery method.

    Attributes
    ----------
    perplexity : float
    relative_residual : float or None
        Boundary residual the method leaves on the calibration tokens relative to plain pruning's,
        ``||X W - Y||² / ||X - Y||²`` (1 for ``identity``), averaged over removed intervals; ``None`` where
        the method reports none.
    fit_seconds : float
        Wall time of the fit (capture excluded when shared).
    relative_residuals : dict
        Per interval, keyed ``"start-end"`` (end exclusive).
    """

    perplexity: float
    relative_residual: float | None
    fit_seconds: float
    relative_residuals: dict[str, float | None] = field(default_factory=dict)


@dataclass
class RunResult:
    """Everything a table, plot and report need."""

    model: str
    removed: list[int]
    seq_len: int
    dense_perplexity: float
    methods: dict[str, MethodResult]
    saved: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return format(value, spec)


def format_table(result: RunResult) -> str:
    """A fixed-width text table: one row for the dense model, one per method.

    Columns: method, perplexity, ratio to dense, boundary relative residual, fit seconds. The saved method
    is marked with ``*``.
    """
    header = ("method", "perplexity", "x dense", "rel. residual", "fit s")
    rows = [("dense", _fmt(result.dense_perplexity, ".3f"), "1.000", "-", "-")]
    for name, m in result.methods.items():
        label = f"{name}{' *' if name == result.saved else ''}"
        if name == PLAIN_PRUNED:
            label += " (plain pruned)"
        ratio = m.perplexity / result.dense_perplexity if result.dense_perplexity > 0 else float("nan")
        rows.append(
            (
                label,
                _fmt(m.perplexity, ".3f"),
                _fmt(ratio, ".3f"),
                _fmt(m.relative_residual, ".4f"),
                _fmt(m.fit_seconds, ".3f"),
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([first, *rest])

    out = [
        f"model: {result.model}",
        f"removed layers: {result.removed}   seq_len: {result.seq_len}",
        line(header),
        "  ".join("-" * w for w in widths),
        *(line(r) for r in rows),
    ]
    if result.saved:
        out.append(f"* saved: {result.saved}")
    out.append(
        "rel. residual: boundary residual ||XW - Y||² left on the calibration tokens, relative to plain "
        "pruning's ||X - Y||²"
    )
    return "\n".join(out)


def _finite_or_none(value: float | None) -> float | None:
    # JSON has no NaN/Infinity; a non-finite number becomes null rather than invalid JSON.
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def build_report(result: RunResult) -> dict[str, Any]:
    """The JSON report (see the module docstring for the contract) as a dict of plain Python values."""
    report: dict[str, Any] = {
        "model": str(result.model),
        "removed": [int(i) for i in result.removed],
        "seq_len": int(result.seq_len),
        "dense": {"perplexity": float(result.dense_perplexity)},
        "methods": {
            name: {
                "perplexity": float(m.perplexity),
                "relative_residual": _finite_or_none(m.relative_residual),
                "fit_seconds": float(m.fit_seconds),
                "relative_residuals": {k: _finite_or_none(v) for k, v in m.relative_residuals.items()},
            }
            for name, m in result.methods.items()
        },
        "saved": result.saved,
    }
    for key, value in result.extra.items():
        report.setdefault(key, value)
    return report


def write_report(report: Mapping[str, Any], path: str | Path) -> Path:
    """Write ``report`` as indented JSON, atomically (a temporary file in the same folder, then a rename).

    Raises
    ------
    GhostsolveError
        If the parent folder does not exist.
    """
    # allow_nan=False: a NaN would make the file unreadable to strict JSON parsers; fail here instead.
    text = json.dumps(report, indent=2, allow_nan=False) + "\n"
    return write_text(path, text, what="the report")


def new_figure(path: str | Path, figsize: tuple[float, float]) -> Any:
    """A matplotlib ``Figure`` on its own Agg canvas, for a PNG that will be saved to ``path``.

    matplotlib is imported lazily and no global backend is set. The folder of ``path`` is checked first,
    so a bad path fails before any drawing; save the figure with
    :func:`ghostsolve.pipeline.atomic.save_png`.

    Raises
    ------
    GhostsolveError
        If matplotlib is missing (install ``ghostsolve[model]``) or the folder of ``path`` does not exist.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise GhostsolveError(
            f"matplotlib is needed for the plot ({exc}); pip install 'ghostsolve[model]'"
        ) from exc
    check_destination(path, what="the plot")
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def plot_perplexities(result: RunResult, path: str | Path, *, title: str | None = None) -> Path:
    """A PNG bar chart of perplexity per method, with the dense and plain-pruned levels as lines.

    Drawn with :func:`new_figure` (no global matplotlib backend) and written atomically.

    Raises
    ------
    GhostsolveError
        If matplotlib is missing (install ``ghostsolve[model]``) or the folder does not exist.
    """
    names = list(result.methods)
    values = [result.methods[n].perplexity for n in names]
    fig = new_figure(path, (max(7.0, 0.7 * len(names) + 4.0), 4.5))
    ax = fig.add_subplot()
    colors = [
        "tab:gray" if n == PLAIN_PRUNED else ("tab:red" if n == result.saved else "tab:blue") for n in names
    ]
    bars = ax.bar(range(len(names)), values, color=colors)
    ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=7, padding=2)
    ax.axhline(
        result.dense_perplexity,
        color="tab:green",
        linestyle="--",
        label=f"dense ({result.dense_perplexity:.2f})",
    )
    if PLAIN_PRUNED in result.methods:
        pruned = result.methods[PLAIN_PRUNED].perplexity
        ax.axhline(pruned, color="tab:gray", linestyle=":", label=f"plain pruned ({pruned:.2f})")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title or f"{result.model}: layers {result.removed} removed")
    finite = [v for v in [*values, result.dense_perplexity] if math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > 20:
        ax.set_yscale("log")
    elif finite:
        # Perplexities of a recovered model sit close to the dense one; a zero baseline would flatten
        # exactly the differences the plot is for.
        span = max(finite) - min(finite)
        ax.set_ylim(max(0.0, min(finite) - 0.5 * span - 0.02 * min(finite)), max(finite) + 0.15 * span + 1e-9)
        ax.set_ylabel("perplexity (lower is better; axis not from 0)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return save_png(fig, path)
