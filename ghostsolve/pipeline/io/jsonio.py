"""The one JSON policy of ghostsolve: every report, checkpoint section and selection file goes through it.

* Non-finite floats (NaN, ±inf) become ``null``: JSON has no such numbers, and a strict parser must be able to
  read every file ghostsolve writes (``allow_nan=False`` enforces it at write time).
* Tensors: a one-element tensor becomes its number; a larger one ``{"shape": [...], "dtype": "float32"}``
  (never its data). ``torch.dtype`` becomes its name (``"bfloat16"``); numpy scalars become Python numbers.
* Dataclasses become dicts of their fields, mappings dicts with string keys, tuples/lists/sets lists, paths
  strings; anything else its ``repr``.
* A removed interval is named as the command line names layers: ``"3-4"`` is layers 3 and 4 (both ends
  included, like ``--drop 3-4``), ``"7"`` the single layer 7. Inside the library an interval is the pair
  ``(start, end)`` with ``end`` exclusive; :func:`interval_label` converts.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ghostsolve.pipeline.io.atomic import write_text
from ghostsolve.pipeline.model.surgery import interval_label

__all__ = ["dumps", "interval_label", "to_json", "write_json"]

_MAX_DEPTH = 12


def to_json(value: Any, _depth: int = 0) -> Any:
    """``value`` as plain JSON data under the policy of the module docstring."""
    if _depth > _MAX_DEPTH:
        return repr(value)
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return to_json(value.item(), _depth + 1)
        return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name), _depth + 1) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {_key(k): to_json(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return [to_json(v, _depth + 1) for v in items]
    item = getattr(value, "item", None)
    if callable(item):  # numpy scalars
        try:
            return to_json(item(), _depth + 1)
        except (TypeError, ValueError):
            pass
    return repr(value)


def _key(key: Any) -> str:
    if isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, int) for k in key):
        return interval_label(key)
    return str(key)


def dumps(value: Any) -> str:
    """``value`` as indented JSON text under the policy (keys in their given order)."""
    return json.dumps(to_json(value), indent=2, allow_nan=False) + "\n"


def write_json(value: Any, path: str | Path, *, what: str = "the report") -> Path:
    """Write ``value`` as JSON to ``path`` atomically (a temporary file beside it, then a rename).

    Raises
    ------
    GhostsolveError
        If the folder of ``path`` does not exist or ``path`` is a directory.
    """
    return write_text(path, dumps(value), what=what)
