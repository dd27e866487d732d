"""Collect ``benchmarks/bench_*.py`` as test modules when ``pytest benchmarks`` is run.

pytest's default ``python_files`` (``test_*.py``) would skip them; files that the configured patterns
already match are left to the default collector so nothing is collected twice.
"""

from __future__ import annotations

import fnmatch
from pathlib import Path

import pytest


def pytest_collect_file(file_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if file_path.suffix != ".py" or not file_path.name.startswith("bench_"):
        return None
    if parent.session.isinitpath(file_path):
        return None  # named on the command line: pytest's own collector takes it
    patterns = parent.config.getini("python_files")
    if any(fnmatch.fnmatch(file_path.name, p) for p in patterns):
        return None
    return pytest.Module.from_parent(parent, path=file_path)
