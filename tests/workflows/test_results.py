"""Results table, JSON report contract and perplexity plot."""

from __future__ import annotations

import json
import os
import stat

import pytest

from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.io.jsonio import write_json
from ghostsolve.workflows.results import MethodResult, PruneResult


def write_report(report: dict, path):  # the one JSON policy writes every report
    return write_json(report, path)


def build_report(run: PruneResult) -> dict:
    return run.to_report()


def format_table(run: PruneResult) -> str:
    return run.format_table()


def plot_perplexities(run: PruneResult, path):
    return run.plot(path)


def _run() -> PruneResult:
    return PruneResult(
        model="m",
        removed=[5, 6],
        seq_len=128,
        dense_perplexity=10.0,
        methods={
            "ghost": MethodResult(11.0, 0.25, 0.5, {"5-7": 0.25}),
            "identity": MethodResult(20.0, 1.0, 0.0, {"5-7": 1.0}),
            "replaceme": MethodResult(12.0, float("nan"), 0.1),
        },
        saved="ghost",
        extra={"order": "independent", "model": "ignored: contract keys win"},
    )


def test_report_follows_the_contract(tmp_path):
    path = write_report(build_report(_run()), tmp_path / "r.json")
    report = json.loads(path.read_text())
    assert report["model"] == "m"
    assert report["removed"] == [5, 6]
    assert report["seq_len"] == 128
    assert report["dense"] == {"perplexity": 10.0}
    assert report["saved"] == "ghost"
    assert report["order"] == "independent"
    assert list(report["methods"]) == ["ghost", "identity", "replaceme"]
    for entry in report["methods"].values():
        assert isinstance(entry["perplexity"], float)
        assert entry["relative_residual"] is None or isinstance(entry["relative_residual"], float)
        assert isinstance(entry["fit_seconds"], float)
    assert report["methods"]["replaceme"]["relative_residual"] is None  # NaN is not JSON
    assert report["methods"]["ghost"]["relative_residuals"] == {"5-7": 0.25}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_write_report_errors(tmp_path):
    with pytest.raises(GhostsolveError, match="does not exist"):
        write_report({}, tmp_path / "no" / "r.json")
    # The one JSON policy writes NaN as null: every file stays readable by a strict parser.
    assert json.loads(write_report({"x": float("nan")}, tmp_path / "r.json").read_text()) == {"x": None}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_table_lists_dense_and_every_method():
    text = format_table(_run())
    lines = text.splitlines()
    assert any(line.startswith("dense") and "10.000" in line for line in lines)
    assert any(line.startswith("ghost *") and "11.000" in line and "1.100" in line for line in lines)
    assert any(line.startswith("identity (plain pruned)") and "20.000" in line for line in lines)
    assert "* saved: ghost" in text


def test_plot_writes_a_png_without_touching_the_global_backend(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    path = plot_perplexities(_run(), tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == backend
    with pytest.raises(GhostsolveError, match=r"cannot write the plot to .*folder .* does not exist"):
        plot_perplexities(_run(), tmp_path / "no" / "p.png")


def test_report_and_plot_follow_the_umask_and_leave_no_temporaries(tmp_path):
    old = os.umask(0o022)
    try:
        report = write_report(build_report(_run()), tmp_path / "r.json")
        plot = plot_perplexities(_run(), tmp_path / "p.png")
    finally:
        os.umask(old)
    assert stat.S_IMODE(report.stat().st_mode) == 0o644
    assert stat.S_IMODE(plot.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.png", "r.json"]
