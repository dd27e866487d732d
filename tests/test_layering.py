"""Layering: core never imports the model side; adapters never import pipeline; pipeline never imports cli."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ghostsolve"


def _imports(path: Path) -> set[str]:
    """Absolute module names imported by a file (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    rel = path.relative_to(PKG.parent).with_suffix("")
    package = list(rel.parts[:-1])  # the package a relative import starts from (also for __init__)
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in node.names)
            elif node.module:
                out.add(node.module)
                out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _files(sub: str | None) -> list[Path]:
    if sub is None:
        return sorted(p for p in PKG.glob("*.py"))
    folder = PKG / sub
    return sorted(folder.rglob("*.py")) if folder.is_dir() else []


def _lazy_ok(path: Path, name: str) -> bool:
    # ghostsolve/__init__.py resolves `load` lazily inside __getattr__; that import runs only on access.
    return path == PKG / "__init__.py" and name.startswith("ghostsolve.pipeline.io.checkpoint")


RULES = [
    (None, ("transformers", "ghostsolve.adapters", "ghostsolve.pipeline", "ghostsolve.cli")),
    ("adapters", ("ghostsolve.pipeline", "ghostsolve.cli")),
    ("pipeline", ("ghostsolve.cli",)),
]


@pytest.mark.parametrize(("layer", "forbidden"), RULES, ids=["core", "adapters", "pipeline"])
def test_no_upward_imports(layer: str | None, forbidden: tuple[str, ...]) -> None:
    bad = []
    for path in _files(layer):
        if layer is None and path.name == "cli.py":
            continue  # a top-level cli module is the top layer, not core
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden) and not _lazy_ok(path, name):
                bad.append(f"{path.relative_to(PKG.parent)} imports {name}")
    assert not bad, "layering violations:\n" + "\n".join(bad)


def test_lazy_load_is_the_only_pipeline_import_in_init() -> None:
    names = _imports(PKG / "__init__.py")
    assert {n for n in names if n.startswith("ghostsolve.pipeline")} <= {
        "ghostsolve.pipeline.io.checkpoint",
        "ghostsolve.pipeline.io.checkpoint.load",
    }


def test_import_ghostsolve_does_not_import_transformers() -> None:
    code = "import sys, ghostsolve; ghostsolve.fit; print('transformers' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False", out.stderr
