"""Selection on scores that cannot rank anything (issue 13, item 1)."""

from __future__ import annotations

import pytest
import torch

from ghostsolve import GhostsolveError
from ghostsolve.pipeline.select import STRATEGIES, select_layers
from tests.model_factories import random_batches, tiny_model


def _overflowing_fp16_model(layer: int = 1):
    """A tiny Llama in float16 whose ``layer``'s MLP output overflows (inf, then NaN downstream)."""
    model = tiny_model("llama", num_layers=4)
    with torch.no_grad():
        model.model.layers[layer].mlp.down_proj.weight.mul_(1e8)
    return model.half()


@pytest.mark.parametrize("strategy", ["block-influence", "angular", "streamline"])
def test_non_finite_scores_are_an_error_naming_the_layer(strategy):
    model = _overflowing_fp16_model(layer=1)
    with pytest.raises(GhostsolveError, match=r"non-finite score.*layer 1.*float16.*--dtype float32"):
        select_layers(model, random_batches(), strategy, 1)


def test_the_same_model_in_float32_selects():
    model = tiny_model("llama", num_layers=4)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1e8)
    selection = select_layers(model, random_batches(), "block-influence", 1)
    assert len(selection.selected) == 1


def test_an_infinite_perplexity_still_ranks_where_it_means_a_broken_removal():
    assert STRATEGIES["ppl"].infinite_ok and not STRATEGIES["block-influence"].infinite_ok
