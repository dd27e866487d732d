"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s bench``, ``nox -s demo``."""

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
    # The eval extra brings lm-eval, so the lm-evaluation-harness bridge is tested too.
    _install(session, "dev,eval")
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
