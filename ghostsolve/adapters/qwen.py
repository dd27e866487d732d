"""Qwen adapters: Qwen2 / Qwen2.5 and Qwen3.

Same pre-norm layout as Llama. Qwen2 adds q/k/v biases, Qwen3 adds per-head q/k RMSNorm inside the
attention; both use grouped-query attention and a ``layer_types`` list (full or sliding attention per
layer), which layer removal must shorten.
"""

from __future__ import annotations

from typing import ClassVar

from ghostsolve.adapters.base import ModelAdapter

__all__ = ["Qwen2Adapter", "Qwen3Adapter"]


class Qwen2Adapter(ModelAdapter):
    """Qwen2 and Qwen2.5 (``model_type == "qwen2"``)."""

    model_types: ClassVar[tuple[str, ...]] = ("qwen2",)
    family: ClassVar[str] = "Qwen2"


class Qwen3Adapter(ModelAdapter):
    """Qwen3 dense models (``model_type == "qwen3"``), with q/k-norm."""

    model_types: ClassVar[tuple[str, ...]] = ("qwen3",)
    family: ClassVar[str] = "Qwen3"
