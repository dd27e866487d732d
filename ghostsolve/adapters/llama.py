"""Llama-layout adapters: Llama-2/3/3.1, DeepSeek-R1-Distill-Llama and Mistral.

Pre-norm decoder layers (``input_layernorm`` → attention → add; ``post_attention_layernorm`` → MLP
→ add); ``model.layers``, ``model.embed_tokens``, ``model.norm``, ``lm_head``; o_proj in
``self_attn``, down_proj in ``mlp``. The base class already states this layout.
"""

from __future__ import annotations

from typing import ClassVar

from ghostsolve.adapters.base import ModelAdapter

__all__ = ["LlamaAdapter", "MistralAdapter"]


class LlamaAdapter(ModelAdapter):
    """Llama-2/3/3.1 and distilled Llama models (``model_type == "llama"``)."""

    model_types: ClassVar[tuple[str, ...]] = ("llama",)
    family: ClassVar[str] = "Llama"


class MistralAdapter(LlamaAdapter):
    """Mistral-style models: the Llama layout with (optional) sliding-window attention."""

    model_types: ClassVar[tuple[str, ...]] = ("mistral",)
    family: ClassVar[str] = "Mistral"
