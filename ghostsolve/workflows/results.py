"""What the workflows return: result objects that print as tables, serialize as the JSON report, and plot.

The prune report is a contract that scripts rely on::

    {"model": str, "removed": [int, ...], "seq_len": int,
     "dense": {"perplexity": float},
     "methods": {NAME: {"perplexity": float, "relative_residual": float | null, "fit_seconds": float,
                        "relative_residuals": {"3-4": float | null, ...}}, ...},
     "saved": NAME | null, "warnings": [str, ...], ...}

``NAME`` is the method name as given; ``warnings`` says, for instance, that the saved method lost to plain
pruning. More keys may be added, never removed or retyped. Interval keys name
layers as ``--drop`` does (``"3-4"`` is layers 3 and 4); non-finite numbers are ``null`` (the one JSON policy
of :mod:`ghostsolve.pipeline.io.jsonio`).
"""

from __future__ import annotations

import datetime
import hashlib
import math
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ghostsolve.pipeline.io.jsonio import interval_label, to_json, write_json
from ghostsolve.pipeline.io.plots import plot_perplexities

__all__ = ["PLAIN_PRUNED", "DiagnoseResult", "IntervalDiagnosis", "MethodResult", "PruneResult", "provenance"]

PLAIN_PRUNED = "identity"
"""The method name of plain pruning (no recovery), drawn as the "pruned" reference."""


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def provenance(command: Sequence[str] | None = None, files: Sequence[str | Path] = ()) -> dict[str, Any]:
    """What a report needs to be reproduced from itself: the versions of ghostsolve, torch and transformers,
    the UTC time, the command line (when a command ran) and every text file read, with its sha256."""
    return {
        "versions": {name: _version(name) for name in ("ghostsolve", "torch", "transformers")},
        "python": platform.python_version(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": None if command is None else list(command),
        "files": [{"path": str(f), "bytes": Path(f).stat().st_size, "sha256": _sha256(Path(f))}
                  for f in files],
    }


@dataclass(frozen=True)
class MethodResult:
    """Evaluation of one recovery method.

    Attributes
    ----------
    perplexity : float or None
        On the evaluation windows (None when the workflow evaluated nothing).
    relative_residual : float or None
        Boundary residual the method leaves on the calibration tokens relative to plain pruning's,
        ``||X W - Y||² / ||X - Y||²`` (1 for ``identity``), averaged over removed intervals.
    fit_seconds : float
        Wall time of the fits (capture excluded when shared).
    relative_residuals : dict
        Per interval, keyed like ``"3-4"`` (the layers, both ends included).
    ridges, ranks : dict
        Per interval, the relative ridge and the rank each fit used (the values cross-validation chose, with
        ``ridge="cv"`` / ``rank="cv"``); None where nothing was fitted or the family has no rank.
    warnings : list of str
        What the fits warned of (a calibration set too small for the operator, ...).
    """

    perplexity: float | None
    relative_residual: float | None
    fit_seconds: float
    relative_residuals: dict[str, float | None] = field(default_factory=dict)
    ridges: dict[str, float | None] = field(default_factory=dict)
    ranks: dict[str, int | None] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, recovery: Any, perplexity: float | None) -> MethodResult:
        """The result of one :class:`~ghostsolve.pipeline.recover.Recovery`, evaluated at ``perplexity``."""
        per = {interval_label(iv): float(v) for iv, v in recovery.relative_residuals.items()}
        finite = [v for v in per.values() if math.isfinite(v)]
        mean = sum(finite) / len(finite) if finite else None
        fits = {interval_label(iv): f for iv, f in recovery.fits.items()}
        ridges = {k: None if f is None else float(f.ridge) for k, f in fits.items()}
        ranks = {k: None if f is None else f.rank for k, f in fits.items()}
        return cls(perplexity, mean, float(recovery.fit_seconds), per, ridges, ranks,  # type: ignore[arg-type]
                   list(getattr(recovery, "warnings", [])))  # fmt: skip

    def ridge_label(self) -> str:
        """The ridge(s) as a table cell: ``-`` (no fit), ``0``, ``3e-04``; per interval: ``0/1e-02``."""
        values = [v for v in self.ridges.values() if v is not None]
        return "/".join("0" if v == 0 else f"{v:.0e}" for v in values) or "-"


def _fmt(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec) if math.isfinite(value) else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join([cells[0].ljust(widths[0]), *rest])

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


@dataclass
class PruneResult:
    """The outcome of :func:`ghostsolve.workflows.prune`.

    Attributes
    ----------
    model : str
        Name or path of the dense model.
    removed : list of int
        Removed layers (0-based).
    seq_len : int
        Tokens per evaluation window (0 when nothing was evaluated).
    dense_perplexity : float or None
    methods : dict
        ``name -> MethodResult`` in the order run.
    saved : str or None
        The method whose model was saved.
    recovery : Recovery or None
        The saved method's recovery (its model in memory), when one was kept.
    selection : Selection or None
        The layer selection, when a strategy chose the layers.
    timings : dict
        Wall seconds of each stage: ``selection``, ``capture``, ``fit``, ``evaluation``, ``save``, ``total``.
    extra : dict
        More report entries (data sources, seeds, settings).
    """

    model: str
    removed: list[int]
    seq_len: int
    dense_perplexity: float | None
    methods: dict[str, MethodResult]
    saved: str | None = None
    recovery: Any = None
    selection: Any = None
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def recovered(self, name: str) -> float | None:
        """Share of the perplexity lost by plain pruning that ``name`` wins back:
        ``(ppl_identity − ppl_name) / (ppl_identity − ppl_dense)`` (None without plain pruning or dense)."""
        plain, method = self.methods.get(PLAIN_PRUNED), self.methods.get(name)
        values = (self.dense_perplexity, plain and plain.perplexity, method and method.perplexity)
        if any(v is None for v in values):
            return None
        dense, pruned, recovered = (float(v) for v in values)  # type: ignore[arg-type]
        return (pruned - recovered) / (pruned - dense) if pruned > dense else None

    def warnings(self) -> list[str]:
        """What the table and the report must not leave unsaid: the saved method's held-out perplexity is
        worse than plain pruning's (``identity``), i.e. the recovery made the model worse."""
        plain, saved = self.methods.get(PLAIN_PRUNED), self.methods.get(self.saved or "")
        if self.saved in (None, PLAIN_PRUNED) or plain is None or saved is None:
            return []
        if plain.perplexity is None or saved.perplexity is None or not saved.perplexity > plain.perplexity:
            return []
        better = min((m.perplexity, n) for n, m in self.methods.items() if m.perplexity is not None)[1]
        return [
            f"the saved method {self.saved} has a worse held-out perplexity ({saved.perplexity:.4g}) than "
            f"plain pruning ({PLAIN_PRUNED}, {plain.perplexity:.4g}): its recovery made the model worse on "
            f"the evaluation windows; save {better} instead (list it first in --recover), or try a ridge "
            "(--ridge), more calibration data, or calibration text closer to the evaluation text"
        ]

    def format_table(self) -> str:
        """A fixed-width table: dense, then each method (the saved one marked ``*``) with its perplexity, its
        ratio to dense, the share of plain pruning's loss it wins back, its boundary residual and fit time."""
        dense = self.dense_perplexity
        header = ("method", "perplexity", "x dense", "loss recovered", "rel. residual", "ridge", "fit s")
        rows = [("dense", _fmt(dense, ".3f"), "1.000" if dense else "-", "-", "-", "-", "-")]
        for name, m in self.methods.items():
            label = f"{name}{' *' if name == self.saved else ''}"
            if name == PLAIN_PRUNED:
                label += " (plain pruned)"
            ratio = m.perplexity / dense if (m.perplexity is not None and dense) else None
            share = self.recovered(name)
            won = "-" if share is None else f"{round(100 * share) + 0:d}%"  # + 0: no "-0%"
            rows.append((label, _fmt(m.perplexity, ".3f"), _fmt(ratio, ".3f"), won,
                         _fmt(m.relative_residual, ".4f"), m.ridge_label(),
                         _fmt(m.fit_seconds, ".3f")))  # fmt: skip
        out = [f"model: {self.model}", f"removed layers: {self.removed}   seq_len: {self.seq_len}",
               *_table(header, rows)]  # fmt: skip
        if self.saved:
            out.append(f"* saved: {self.saved}")
        out.extend(f"warning: {text}" for text in self.warnings())
        out.append(
            "loss recovered: (plain pruned - method) / (plain pruned - dense) perplexity; rel. residual: "
            "boundary residual ||XW - Y||² left on the calibration tokens, relative to plain pruning's "
            "||X - Y||²"
        )
        return "\n".join(out)

    def format_timings(self) -> str:
        """Where the run's wall time went, one line: ``time: selection 1.2 s, capture 3.4 s, ...``."""
        order = ("selection", "capture", "fit", "evaluation", "save", "total")
        parts = [f"{name} {self.timings[name]:.1f} s" for name in order if name in self.timings]
        return "time: " + ", ".join(parts) if parts else "time: -"

    def to_report(self) -> dict[str, Any]:
        """The JSON report (see the module docstring for the contract) as plain data."""
        report: dict[str, Any] = {
            "model": str(self.model),
            "removed": [int(i) for i in self.removed],
            "seq_len": int(self.seq_len),
            "dense": {"perplexity": self.dense_perplexity},
            "methods": {name: {**to_json(m), "loss_recovered": self.recovered(name)}
                        for name, m in self.methods.items()},
            "saved": self.saved,
            "timings": dict(self.timings),
            "warnings": self.warnings(),
        }
        if self.selection is not None:
            report["selection"] = self.selection.to_report()
        for key, value in self.extra.items():
            report.setdefault(key, value)
        return to_json(report)  # type: ignore[no-any-return]

    def write_report(self, path: str | Path) -> Path:
        """Write :meth:`to_report` as JSON, atomically."""
        return write_json(self.to_report(), path)

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """A PNG bar chart of perplexity per method, dense and plain-pruned levels as lines; the default title
        tells the story (how much plain pruning loses, how much of it the saved method wins back)."""
        values = {n: m.perplexity for n, m in self.methods.items() if m.perplexity is not None}
        return plot_perplexities(path, values, dense=float(self.dense_perplexity or math.nan),
                                 highlight=self.saved, title=title or self._story())  # fmt: skip

    def _story(self) -> str:
        title = f"{self.model}: layers {self.removed} removed"
        plain = perplexity_of(self.methods.get(PLAIN_PRUNED))
        share = self.recovered(self.saved) if self.saved else None
        if plain is None or share is None or not self.dense_perplexity:
            return title
        return (f"{title}\nplain pruning {plain / self.dense_perplexity:.2f}x dense; {self.saved} wins back "
                f"{100 * share:.0f}% of the loss")  # fmt: skip


def perplexity_of(method: MethodResult | None) -> float | None:
    """The perplexity of a method's result (None when there is no result or no evaluation)."""
    return None if method is None else method.perplexity


@dataclass
class IntervalDiagnosis:
    """Conditioning (every calibration token) and the fp32/fp64 solver table (raw rows) of one boundary."""

    interval: tuple[int, int]
    diagnostics: Any
    precisions: Any
    precision_rows: int

    def format(self) -> str:
        start, end = self.interval
        head = f"boundary {start}->{end} (layers {interval_label(self.interval)} removed)"
        body = "\n".join("  " + line for line in str(self.diagnostics).splitlines())
        table = "\n".join("    " + line for line in str(self.precisions).splitlines())
        return f"{head}\n{body}\n  solver stability on {self.precision_rows} tokens:\n{table}"

    def to_report(self) -> dict[str, Any]:
        conditioning = {k: v for k, v in vars(self.diagnostics).items() if k != "eigenvalues"}
        return to_json({"conditioning": conditioning, "precisions": self.precisions.as_dicts(),
                        "precision_rows": self.precision_rows})  # type: ignore[no-any-return]  # fmt: skip


@dataclass
class DiagnoseResult:
    """The outcome of :func:`ghostsolve.workflows.diagnose_model`: one diagnosis per removed interval."""

    model: str
    removed: list[int]
    intervals: list[IntervalDiagnosis]
    selection: Any = None

    def format(self) -> str:
        return "\n".join(d.format() for d in self.intervals)

    def to_report(self) -> dict[str, Any]:
        report: dict[str, Any] = {
            "model": self.model,
            "removed": list(self.removed),
            "intervals": {interval_label(d.interval): d.to_report() for d in self.intervals},
        }
        if self.selection is not None:
            report["selection"] = self.selection.to_report()
        return to_json(report)  # type: ignore[no-any-return]

    def write_report(self, path: str | Path) -> Path:
        return write_json(self.to_report(), path)


def mean_of(values: Mapping[Any, float]) -> float | None:
    """The mean of the finite values (None when there is none)."""
    finite = [float(v) for v in values.values() if math.isfinite(float(v))]
    return sum(finite) / len(finite) if finite else None
