"""Inputs go where the embeddings run, not where the model's first parameter happens to sit."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ghostsolve.pipeline.evaluate import perplexity
from ghostsolve.pipeline.model.devices import model_input_device

VOCAB = 5


class _HeadFirst(nn.Module):
    """A model whose first parameter is an unused tensor left on ``meta`` (as offloading leaves them)."""

    def __init__(self) -> None:
        super().__init__()
        self.offloaded = nn.Linear(3, 3, device="meta")
        self.embed = nn.Embedding(VOCAB, VOCAB)

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids: torch.Tensor, **_: Any) -> SimpleNamespace:
        # Fails with a meta/cpu mismatch if the inputs were put on the first parameter's device.
        return SimpleNamespace(logits=self.embed(input_ids))


def test_first_parameter_on_meta_is_skipped() -> None:
    model = _HeadFirst()
    assert next(model.parameters()).device.type == "meta"
    assert model_input_device(model) == torch.device("cpu")
    windows = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(torch.tensor(perplexity(model, windows).perplexity))


def test_accelerate_execution_device_wins() -> None:
    model = _HeadFirst()
    model.embed.to("meta")
    model.embed._hf_hook = SimpleNamespace(execution_device="cuda:1")  # type: ignore[assignment]
    assert model_input_device(model) == torch.device("cuda:1")


def test_adapter_locates_the_embeddings() -> None:
    model = _HeadFirst()
    model.embed._hf_hook = SimpleNamespace(execution_device="cuda:2")  # type: ignore[assignment]
    adapter: Any = SimpleNamespace(embeddings=lambda m: m.embed)
    assert model_input_device(model, adapter) == torch.device("cuda", 2)


def test_a_model_without_parameters_runs_on_the_cpu() -> None:
    assert model_input_device(nn.Identity()) == torch.device("cpu")
    assert model_input_device(object()) == torch.device("cpu")
