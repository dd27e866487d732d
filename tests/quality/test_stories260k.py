"""Recovery quality on a real trained model: stories260K (llama2.c, converted to Hugging Face Llama).

stories260K only knows children's stories, so calibration and evaluation text is sampled from the dense
model itself with fixed seeds (disjoint seeds for the two sets). Perplexity is the exponential of the
mean next-token negative log-likelihood over every position after BOS.

Skipped with a reason when ../shared/data (or the converter) is absent.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from ghostsolve.families import FAMILIES
from ghostsolve.pipeline.data import sample_windows
from ghostsolve.pipeline.recover import recover_all
from tests.model_factories import stories260k_dir

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]

# Families that constrain W (everything but the unconstrained "full" = ghost, and plain pruning).
CONSTRAINED = tuple(f for f in FAMILIES if f not in ("full", "identity"))
REMOVAL_SETS = ([2], [1, 2], [1, 3])
SEQ_LEN = 128


def perplexity(model: nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, :-1].float()
    nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return math.exp(float(nll))


@pytest.fixture(scope="module")
def stories(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, list[dict], torch.Tensor]:
    import transformers

    directory: Path = stories260k_dir(tmp_path_factory)
    model = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    # the project's own data-free sampler (private generator, KV cache), as `--calib self` uses it
    text = sample_windows(model, tokenizer, 40, SEQ_LEN, seed=1234, progress=False)
    calibration, held_out = text[:24], text[24:]  # one sampling call, disjoint rows
    batches = [{"input_ids": calibration[i : i + 8]} for i in range(0, 24, 8)]
    return model, batches, held_out


@pytest.mark.parametrize("drop", REMOVAL_SETS, ids=lambda d: "drop" + "-".join(map(str, d)))
def test_ghost_beats_constrained_families(
    stories: tuple[nn.Module, list[dict], torch.Tensor], drop: list[int]
) -> None:
    model, batches, held_out = stories
    dense = perplexity(model, held_out)
    recoveries = recover_all(model, drop, batches, ("identity", "ghost", *CONSTRAINED), progress=False)
    ppl = {name: perplexity(rec.model, held_out) for name, rec in recoveries.items()}
    ghost = recoveries["ghost"]

    for interval, residual in ghost.relative_residuals.items():
        for family in CONSTRAINED:
            assert residual < recoveries[family].relative_residuals[interval], (interval, family)
        assert residual < 1.0  # plain pruning's residual is 1 by definition

    assert dense < ppl["ghost"] < ppl["identity"], ppl
    best_constrained = min(ppl[f] for f in CONSTRAINED)
    assert ppl["ghost"] < best_constrained, ppl
