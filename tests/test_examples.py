"""The examples in examples/ run as documented and print what they promise."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *argv])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_fit_example_prints_every_family(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import ghostsolve

    _run("fit_example.py", [], monkeypatch)
    out = capsys.readouterr().out
    for family in ghostsolve.FAMILIES:
        assert family in out


def test_prune_example_saves_a_checkpoint_that_loads_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _run("prune_example.py", [str(tmp_path)], monkeypatch)
    out = capsys.readouterr().out
    assert "ghost" in out and "identity" in out
    assert (tmp_path / "report.json").is_file()
    assert (tmp_path / "pruned" / "config.json").is_file()
    assert "9 decoder layers" in out  # 12 layers, 3 removed
