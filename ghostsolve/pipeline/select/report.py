"""Presenting a layer selection: a text table, the JSON report, a PNG score plot, and the CLI's job.

The JSON report (``ghostsolve select --report FILE.json``) is::

    {"strategy": str, "num_drop": int, "scores": [float or null, ...], "selected": [int, ...],
     "unit": "layer" | "block", "score_name": str, "removes": "lowest" | "highest", "details": {...}}

``selected`` holds the 0-based indices of the layers to remove; ``scores`` is per layer or per block start
as ``unit`` says (see :mod:`ghostsolve.pipeline.select`); a non-finite score is written as ``null`` (the
one JSON policy, :mod:`ghostsolve.pipeline.io.jsonio`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from torch import nn

from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.io.atomic import check_destination
from ghostsolve.pipeline.io.jsonio import write_json
from ghostsolve.pipeline.io.plots import plot_scores
from ghostsolve.pipeline.model.batches import Batch
from ghostsolve.pipeline.select.base import Selection
from ghostsolve.pipeline.select.strategies import STRATEGIES, select_layers

__all__ = [
    "format_selection",
    "options_from_args",
    "plot_selection",
    "run_select_command",
    "strategy_help",
    "write_selection_report",
]


def _chosen_rows(selection: Selection) -> set[int]:
    """Rows of the score table that the selection removed (layers, or the chosen block's start)."""
    if selection.unit == "layer":
        return set(selection.selected)
    return {selection.selected[0]}


def _row_label(selection: Selection, i: int) -> str:
    if selection.unit == "layer":
        return str(i)
    return f"{i}-{i + selection.num_drop - 1}" if selection.num_drop > 1 else str(i)


def format_selection(selection: Selection) -> str:
    """A plain-text table of the scores with the removed rows marked, then the chosen layers.

    Examples
    --------
    >>> from ghostsolve.pipeline.select import Selection
    >>> s = Selection("block-influence", 1, [0.5, 0.1], [1], "layer", "BI", "lowest")
    >>> print(format_selection(s))  # doctest: +NORMALIZE_WHITESPACE
    strategy block-influence: BI (removes the lowest)
    layer        score  removed
        0          0.5
        1          0.1  *
    remove layers (0-based): [1]
    """
    head = "layer" if selection.unit == "layer" else "block"
    width = max(len(head), *(len(_row_label(selection, i)) for i in range(len(selection.scores))))
    chosen = _chosen_rows(selection)
    lines = [
        f"strategy {selection.strategy}: {selection.score_name} (removes the {selection.removes})",
        f"{head:<{width}}  {'score':>11}  removed",
    ]
    for i, score in enumerate(selection.scores):
        value = f"{score:11.5g}" if math.isfinite(score) else f"{'-':>11}"
        mark = "  *" if i in chosen else ""
        lines.append(f"{_row_label(selection, i):>{width}}  {value}{mark}")
    lines.append(f"remove layers (0-based): {selection.selected}")
    return "\n".join(lines)


def write_selection_report(selection: Selection, path: str | Path) -> Path:
    """Write :meth:`Selection.to_report` as JSON, atomically.

    Raises
    ------
    GhostsolveError
        If the parent folder does not exist.
    """
    return write_json(selection.to_report(), path)


def plot_selection(selection: Selection, path: str | Path, *, title: str | None = None) -> Path:
    """A PNG bar chart of the scores per layer (or per block start), removed bars highlighted.

    Raises
    ------
    GhostsolveError
        If matplotlib is missing (install ``ghostsolve[model]``) or the folder does not exist.
    """
    if selection.unit == "layer":
        xlabel = "layer (0-based)"
    else:
        xlabel = f"block start l (removes layers l..l+{selection.num_drop - 1})"
    return plot_scores(
        path, selection.scores, chosen=_chosen_rows(selection), xlabel=xlabel,
        ylabel=f"{selection.score_name}\n(removes the {selection.removes})",
        title=title or f"{selection.strategy}: remove layers {selection.selected}",
    )  # fmt: skip


def run_select_command(
    model: nn.Module,
    batches: Iterable[Batch],
    strategy: str,
    num_drop: int,
    *,
    report_path: str | Path | None = None,
    plot_path: str | Path | None = None,
    **options: Any,
) -> Selection:
    """What ``ghostsolve select`` does after loading the model and the calibration batches.

    Runs :func:`ghostsolve.pipeline.select.select_layers`, then writes the JSON report and the PNG plot
    when their paths are given. The caller prints :func:`format_selection` of the result.

    Raises
    ------
    GhostsolveError
        As :func:`select_layers`; or if a report/plot folder does not exist (checked before the selection
        runs, so a typo does not waste a long calibration pass).
    """
    for label, p in (("report", report_path), ("plot", plot_path)):
        if p is not None:
            check_destination(p, what=f"the {label}")
    selection = select_layers(model, batches, strategy, num_drop, **options)
    if report_path is not None:
        write_selection_report(selection, report_path)
    if plot_path is not None:
        plot_selection(selection, plot_path)
    return selection


def strategy_help() -> str:
    """One line per strategy (name, unit, score, reference) for a command's ``--help`` epilog."""
    width = max(len(name) for name in STRATEGIES)
    lines = ["strategies (0-based layer indices; 'block' rules remove n contiguous layers):"]
    for name, spec in STRATEGIES.items():
        lines.append(
            f"  {name:<{width}}  {spec.unit:<5}  {spec.score_name}, removes the {spec.removes} "
            f"[{spec.reference}]"
        )
    return "\n".join(lines)


def options_from_args(strategy: str, **values: Any) -> dict[str, Any]:
    """The subset of command-line values that ``strategy`` accepts as options, ``None`` values dropped.

    A command offers one flag set for every strategy (``--last-token``, ``--skip-first-token``,
    ``--top-k``...); each strategy takes only its own options (:attr:`Strategy.options`), and a flag left
    at its default (``None``/``False``) is not passed, so the strategy's default applies.

    Raises
    ------
    GhostsolveError
        If ``strategy`` is unknown, or a flag that only other strategies accept was set explicitly.

    Examples
    --------
    >>> options_from_args("angular", last_token=True, skip_first_token=False, top_k=None)
    {'last_token': True}
    """
    if strategy not in STRATEGIES:
        raise GhostsolveError(
            f"unknown selection strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}"
        )
    accepted = STRATEGIES[strategy].options
    chosen = {k: v for k, v in values.items() if v is not None and v is not False}
    # --skip-first-token is a calibration flag shared with recovery; rules that do not use it ignore it.
    stray = sorted(k for k in chosen if k not in accepted and k != "skip_first_token")
    if stray:
        flags = ", ".join("--" + k.replace("_", "-") for k in stray)
        raise GhostsolveError(f"{flags} does not apply to strategy {strategy!r}; it accepts {list(accepted)}")
    return {k: v for k, v in chosen.items() if k in accepted}
