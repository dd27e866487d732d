"""OLMo adapters: OLMo-2 and OLMo-3.

These are *post-norm* inside each block: ``h + post_attention_layernorm(attn(h))`` and
``h + post_feedforward_layernorm(mlp(h))``. The sublayers read the raw (unnormalized) stream and
normalize what they write, so

* scaling o_proj/down_proj does not scale what is added to the residual stream (the Prune&Comp fold
  is cancelled), and
* a linear map on the MLP output cannot be folded into down_proj (the norm sits in between), so the
  ReplaceMe fold is not exact.

Ghost operators need neither property and work as on pre-norm models.
"""

from __future__ import annotations

from typing import ClassVar

from ghostsolve.adapters.base import ModelAdapter, NormPlacement

__all__ = ["Olmo2Adapter", "Olmo3Adapter"]


class Olmo2Adapter(ModelAdapter):
    """OLMo-2 (``model_type == "olmo2"``): post-sublayer norms, q/k-norm over all heads."""

    model_types: ClassVar[tuple[str, ...]] = ("olmo2",)
    family: ClassVar[str] = "OLMo-2"
    norm_placement: ClassVar[NormPlacement] = "post"


class Olmo3Adapter(Olmo2Adapter):
    """OLMo-3 (``model_type == "olmo3"``): the OLMo-2 block with per-layer sliding windows."""

    model_types: ClassVar[tuple[str, ...]] = ("olmo3",)
    family: ClassVar[str] = "OLMo-3"
