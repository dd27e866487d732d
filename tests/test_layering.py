"""Layering: core ← adapters ← pipeline ← workflows ← cli, nothing imports upward; inside the pipeline the
arrows of docs/design.md; integrations above pipeline and workflows, imported by nothing of ghostsolve and
importing their engines (vLLM, llm-compressor) lazily; the remote-code files import nothing of ghostsolve; no
private name crosses modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "ghostsolve"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


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


def _files() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def _layer(module: str) -> str:
    """``core``, ``adapters``, ``pipeline.<part>``, ``workflows``, ``integrations`` or ``cli``."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("__main__",):
        return "cli" if parts[-1] == "__main__" else "core"
    if parts[1] == "pipeline":
        return "pipeline" if len(parts) == 2 else f"pipeline.{parts[2]}"
    return parts[1] if parts[1] in ("adapters", "workflows", "integrations", "cli") else "core"


# What each layer may import from ghostsolve (besides itself). Core modules never reach the model side.
ALLOWED: dict[str, set[str]] = {
    "core": {"core"},
    "adapters": {"core"},
    "pipeline.progress": set(),
    "pipeline.model": {"core", "adapters"},
    "pipeline.distributed": {"core"},
    "pipeline.capture": {"core", "adapters", "pipeline.model", "pipeline.progress"},
    "pipeline.evaluate": {"core", "adapters", "pipeline.model", "pipeline.progress"},
    "pipeline.data": {"core", "pipeline.model"},
    "pipeline.io": {"core", "adapters", "pipeline.model"},
    "pipeline.recover": {"core", "adapters", "pipeline.model", "pipeline.capture", "pipeline.distributed"},
    "pipeline.select": {"core", "adapters", "pipeline.model", "pipeline.capture", "pipeline.evaluate",
                        "pipeline.recover", "pipeline.io", "pipeline.progress"},
    "pipeline": set(),
    "workflows": {"core", "adapters", "pipeline.model", "pipeline.capture", "pipeline.evaluate",
        "pipeline.data",
                  "pipeline.io", "pipeline.recover", "pipeline.select", "pipeline.distributed"},
    "cli": {"core", "workflows", "pipeline.io", "pipeline.data", "pipeline.evaluate", "pipeline.distributed",
            "pipeline.select", "pipeline.recover", "cli"},
    # Bridges to other engines (vLLM, llm-compressor): they may use everything below; nothing imports them.
    "integrations": {"core", "adapters", "pipeline.model", "pipeline.capture", "pipeline.evaluate",
                     "pipeline.data", "pipeline.io", "pipeline.recover", "pipeline.select",
                     "pipeline.distributed", "pipeline.progress", "workflows"},
}
# The optional engines the integrations bridge to: never imported at the top of a module vLLM does not import
# itself, and never by anything outside ghostsolve.integrations.
ENGINES = ("vllm", "llmcompressor", "compressed_tensors")
# Imported only by vLLM, after the plugin registered its classes: it may import vLLM at its top.
IMPORTED_BY_ENGINE = {"ghostsolve.integrations.vllm_models"}


def _ghostsolve_targets(path: Path) -> set[str]:
    """The ghostsolve modules a file imports (names of imported objects reduced to their module)."""
    targets = set()
    for name in _imports(path):
        if name == "ghostsolve" or not name.startswith("ghostsolve."):
            continue
        parts = name.split(".")
        while len(parts) > 1 and not (
            (PKG.parent / Path(*parts)).with_suffix(".py").exists() or (PKG.parent / Path(*parts)).is_dir()
        ):
            parts = parts[:-1]
        targets.add(".".join(parts))
    return targets


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(PKG.parent)))
def test_no_upward_imports(path: Path) -> None:
    module = _module_name(path)
    layer = _layer(module)
    bad = []
    for target in _ghostsolve_targets(path):
        other = _layer(target)
        if other != layer and other not in ALLOWED[layer]:
            bad.append(f"{module} ({layer}) imports {target} ({other})")
    if layer == "core":
        bad += [f"{module} imports transformers" for n in _imports(path) if n.split(".")[0] == "transformers"]
    assert not bad, "layering violations:\n" + "\n".join(bad)


def _top_level_imports(path: Path) -> set[str]:
    """Top-level package names imported outside any function body of a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f)}  # fmt: skip
    names = set()
    for node in ast.walk(tree):
        if id(node) in inside:
            continue
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(PKG.parent)))
def test_optional_engines_are_imported_lazily_and_only_by_the_integrations(path: Path) -> None:
    module = _module_name(path)
    engines = {n.split(".")[0] for n in _imports(path)} & set(ENGINES)
    if _layer(module) != "integrations":
        assert not engines, f"{module} imports {sorted(engines)}: only ghostsolve.integrations may"
    elif module not in IMPORTED_BY_ENGINE:
        eager = _top_level_imports(path) & set(ENGINES)
        assert not eager, f"{module} imports {sorted(eager)} at import time; import it inside the function"


def test_no_private_name_is_imported_across_modules() -> None:
    bad = []
    for path in _files():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node,
                ast.ImportFrom) and (node.level or (node.module or "").startswith("ghostsolve")):
                names = [a.name for a in node.names if a.name.startswith("_")]
                bad += [f"{_module_name(path)}: {node.module}.{name}" for name in names]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


@pytest.mark.parametrize("name", ["operators.py", "ghosted.py"])
def test_remote_code_files_import_no_ghostsolve_outside_a_guarded_try(name: str) -> None:
    # A checkpoint ships these files as its remote code: loading it must not need ghostsolve installed.
    tree = ast.parse((PKG / "pipeline" / "model" / name).read_text(encoding="utf-8"))
    guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for n in ast.walk(t)}
    loose = [
        n.module
        for n in ast.walk(tree)
        if isinstance(n,
            ast.ImportFrom) and (n.module or "").startswith("ghostsolve") and id(n) not in guarded
    ]
    assert loose == []


def test_import_ghostsolve_does_not_import_transformers() -> None:
    code = "import sys, ghostsolve; ghostsolve.fit; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
        timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def test_python_dash_m_ghostsolve_runs_the_command_line() -> None:
    out = subprocess.run([sys.executable, "-m", "ghostsolve", "--version"], capture_output=True, text=True,
                         timeout=120, cwd=PKG.parent)  # fmt: skip
    assert out.returncode == 0 and out.stdout.startswith("ghostsolve "), out.stderr
