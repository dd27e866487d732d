"""Fixtures of the real-model tests: the reference LLM, SmolLM2-135M-Instruct, from the local cache.

The cache is made by ``nox -s realmodel`` (``scripts/get_reference_model.py``); the tests never download.
Without it every test here skips with the reason and the command that obtains it. The cache folder is
``$GHOSTSOLVE_REFERENCE_MODEL``, else ``$XDG_CACHE_HOME/ghostsolve/smollm2-135m-instruct``
(``~/.cache/...``): the script's :func:`cache_dir` decides, so tests and scripts agree.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "get_reference_model.py"


def reference_script() -> ModuleType:
    """``scripts/get_reference_model.py`` as a module (scripts/ is not a package), imported once."""
    name = "get_reference_model"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    assert spec is not None and spec.loader is not None, SCRIPT
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclass resolves annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def reference_model() -> Any:
    """The cache's :class:`ReferenceModel` (paths of the GGUF file and the converted directory)."""
    script = reference_script()
    found = script.find_reference_model()
    if found is None:
        problems = script.cache_problems(hashes=False)
        pytest.skip(
            f"needs the reference model SmolLM2-135M-Instruct in {script.cache_dir()} "
            f"({problems[0] if problems else 'incomplete'}); obtain it with {script.OBTAIN_COMMAND}, "
            f"or set {script.ENV_VAR} to a cache made by it"
        )
    return found


@pytest.fixture(scope="session")
def smollm2(reference_model: Any) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of the converted directory, float32, eval mode (loaded once per session)."""
    from transformers import AutoTokenizer

    from ghostsolve.pipeline.io.checkpoint import load

    model = load(reference_model.hf_dir, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(reference_model.hf_dir)
    return model, tokenizer
