"""Shared test fixtures: the location of ../shared/data and hypothesis profiles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

REPO = Path(__file__).resolve().parents[1]

settings.register_profile(
    "default",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("thorough", max_examples=400, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def shared_data_dir() -> Path:
    """``$GHOSTSOLVE_SHARED_DATA`` or ``../shared/data`` beside the checkout (may not exist)."""
    env = os.environ.get("GHOSTSOLVE_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def require_shared(relative: str) -> Path:
    """Path of a file under the shared data folder, or skip the calling test with the reason."""
    path = shared_data_dir() / relative
    if not path.exists():
        pytest.skip(
            f"needs {relative} from the shared data folder ({path} is absent); "
            "set GHOSTSOLVE_SHARED_DATA to a copy of it to run this test"
        )
    return path


@pytest.fixture
def shared_data() -> Path:
    """The shared data folder; skips the test when it is absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"needs the shared data folder ({path} is absent); set GHOSTSOLVE_SHARED_DATA")
    return path
