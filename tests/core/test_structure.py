"""Structure of the core modules: no private name crosses a module, no over-long function."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = sorted((Path(__file__).resolve().parents[2] / "ghostsolve").glob("*.py"))
CORE = [p for p in CORE if p.name != "cli.py"]  # the CLI is the top layer, not core
MAX_LINES = 60
# Marker a function carries (in a comment on its def line or the line above) when it may exceed MAX_LINES.
LONG_OK = "long on purpose:"


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _imported_names(tree: ast.Module) -> dict[str, str]:
    """Local name → what it was imported as, for every ``from .x import y`` / ``import x`` of the package."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("ghostsolve")):
            for a in node.names:
                out[a.asname or a.name] = a.name
    return out


@pytest.mark.parametrize("path", CORE, ids=[p.name for p in CORE])
def test_no_private_name_crosses_a_module(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = _imported_names(tree)
    bad = [f"imports {orig}" for orig in names.values() if _private(orig)]
    for node in ast.walk(tree):
        # Stats._something: a private member reached through a name imported from another module
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and _private(node.attr):
            if node.value.id in names:
                bad.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    assert not bad, f"{path.name}: " + "; ".join(bad)


def _code_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> int:
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant):
        body = body[1:]  # the docstring
    seen: set[int] = set()
    for stmt in body:
        seen.update(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
    return sum(1 for i in seen if lines[i - 1].strip() and not lines[i - 1].strip().startswith("#"))


@pytest.mark.parametrize("path", CORE, ids=[p.name for p in CORE])
def test_functions_are_short(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    long = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = _code_lines(node, lines)
            marked = any(LONG_OK in lines[i] for i in (node.lineno - 2, node.lineno - 1) if i >= 0)
            if n > MAX_LINES and not marked:
                long.append(f"{node.name} (line {node.lineno}): {n} lines of code")
    assert not long, f"{path.name}: " + "; ".join(long)


def test_the_checks_can_fail(tmp_path: Path) -> None:
    """The two checks above see what they are meant to see."""
    src = "from .stats import _hidden\nfrom .fit import Fit\n\ndef f():\n    return Fit._x\n"
    tree = ast.parse(src)
    assert _imported_names(tree) == {"_hidden": "_hidden", "Fit": "Fit"}
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES + 1))
    fn = ast.parse(f'def g():\n    """doc."""\n{body}\n').body[0]
    assert isinstance(fn, ast.FunctionDef)
    assert _code_lines(fn, f'def g():\n    """doc."""\n{body}\n'.splitlines()) == MAX_LINES + 1
