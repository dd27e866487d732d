"""PNG plots: perplexity per recovery method, and selection scores per layer or block.

matplotlib is imported lazily and no global backend is set: each figure gets its own Agg canvas
(:func:`new_figure`) and is written atomically (:func:`ghostsolve.pipeline.io.atomic.save_png`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.io.atomic import check_destination, save_png

__all__ = ["new_figure", "plot_perplexities", "plot_scores"]


def new_figure(path: str | Path, figsize: tuple[float, float]) -> Any:
    """A matplotlib ``Figure`` on its own Agg canvas, for a PNG that will be saved to ``path``.

    The folder of ``path`` is checked first, so a bad path fails before any drawing.

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


def _label(value: float, values: Sequence[float]) -> str:
    """A bar label with as many decimals (one to three) as it takes to tell this value from its neighbours;
    values equal to that precision are equal for the reader too."""
    if not math.isfinite(value):
        return str(value)
    others = [v for v in values if v != value and math.isfinite(v)]
    most = 3 if abs(value) < 10 else 2
    for digits in range(1, most + 1):
        text = f"{value:.{digits}f}"
        if all(f"{v:.{digits}f}" != text for v in others):
            return text
    return f"{value:.{most}f}"


def plot_perplexities(
    path: str | Path,
    perplexities: Mapping[str, float],
    *,
    dense: float,
    plain_pruned: str | None = "identity",
    highlight: str | None = None,
    title: str,
) -> Path:
    """A PNG bar chart of perplexity per method, with the dense and plain-pruned levels as lines.

    ``perplexities`` maps method names to perplexity, in the order drawn; ``plain_pruned`` names the plain
    pruning entry (drawn grey, with its level as a line), ``highlight`` the saved method (drawn red). Labels
    carry as many digits as it takes to tell close values apart.

    Raises
    ------
    GhostsolveError
        If matplotlib is missing (install ``ghostsolve[model]``) or the folder does not exist.
    """
    names = list(perplexities)
    values = [float(perplexities[n]) for n in names]
    fig = new_figure(path, (max(7.0, 0.7 * len(names) + 4.0), 4.5))
    ax = fig.add_subplot()
    colors = [
        "tab:gray" if n == plain_pruned else ("tab:red" if n == highlight else "tab:blue") for n in names
    ]
    bars = ax.bar(range(len(names)), values, color=colors)
    ax.bar_label(bars, labels=[_label(v, values) for v in values], fontsize=7, padding=2)
    ax.axhline(dense, color="tab:green", linestyle="--", label=f"dense ({dense:.2f})")
    if plain_pruned is not None and plain_pruned in perplexities:
        level = float(perplexities[plain_pruned])
        ax.axhline(level, color="tab:gray", linestyle=":", label=f"plain pruned ({level:.2f})")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    ax.set_xlabel("recovery method")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title)
    finite = [v for v in [*values, dense] if math.isfinite(v) and v > 0]
    if finite and max(finite) / min(finite) > 20:
        ax.set_yscale("log")
    elif finite:
        # Perplexities of a recovered model sit close to the dense one; a zero baseline would flatten exactly
        # the differences the plot is for.
        span = max(finite) - min(finite)
        ax.set_ylim(max(0.0, min(finite) - 0.5 * span - 0.02 * min(finite)), max(finite) + 0.15 * span + 1e-9)
        ax.set_ylabel("perplexity (lower is better; axis not from 0)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return save_png(fig, path)


def plot_scores(
    path: str | Path,
    scores: Sequence[float],
    *,
    chosen: set[int],
    xlabel: str,
    ylabel: str,
    title: str,
) -> Path:
    """A PNG bar chart of scores (a non-finite one drawn as an "n/a" mark), the ``chosen`` bars highlighted.

    Raises
    ------
    GhostsolveError
        If matplotlib is missing (install ``ghostsolve[model]``) or the folder does not exist.
    """
    n = len(scores)
    values = [s if math.isfinite(s) else 0.0 for s in scores]
    fig = new_figure(path, (max(6.0, 0.35 * n + 2.5), 4.0))
    ax = fig.add_subplot()
    ax.bar(range(n), values, color=["tab:red" if i in chosen else "tab:blue" for i in range(n)])
    for i, score in enumerate(scores):
        if not math.isfinite(score):
            ax.annotate("n/a", (i, 0), ha="center", va="bottom", fontsize=7, color="tab:gray")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_xticks(range(n), [str(i) for i in range(n)], fontsize=7)
    finite = [s for s in scores if math.isfinite(s) and s > 0]
    if finite and max(finite) / min(finite) > 50 and len(finite) == n:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    return save_png(fig, path)
