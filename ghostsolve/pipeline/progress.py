"""The one progress-bar helper of the pipeline (tqdm on stderr; off with ``enabled=False``)."""

from __future__ import annotations

from collections.abc import Iterable, Sized
from typing import TypeVar

from tqdm.auto import tqdm

__all__ = ["progress_bar"]

T = TypeVar("T")


def progress_bar(items: Iterable[T], enabled: bool | None, desc: str, *, unit: str = "batch") -> Iterable[T]:
    """``items`` wrapped in a tqdm bar that disappears when done (``leave=False``).

    ``enabled=None`` shows the bar only on a terminal (tqdm's own rule), for inner loops whose callers did not
    say.
    """
    total = len(items) if isinstance(items, Sized) else None
    disable = None if enabled is None else not enabled
    return tqdm(items, total=total, desc=desc, unit=unit, disable=disable, leave=False)
