"""Perplexity: the peers' convention, checked against hand-computed values."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.data import text_windows
from ghostsolve.pipeline.evaluate import default_seq_len, perplexity
from tests.pipeline._tiny import TEXT, tiny_llama, tiny_tokenizer


class Bigram(nn.Module):
    """p(next | current) from a fixed table of probabilities; logits = log p."""

    def __init__(self, probs: torch.Tensor) -> None:
        super().__init__()
        self.log_probs: torch.Tensor
        self.register_buffer("log_probs", probs.log())

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.log_probs[input_ids])


# Rows: current token 0..3; columns: next token.
PROBS = torch.tensor(
    [
        [0.25, 0.50, 0.125, 0.125],
        [0.50, 0.25, 0.125, 0.125],
        [0.25, 0.25, 0.25, 0.25],
        [0.125, 0.125, 0.25, 0.50],
    ],
    dtype=torch.float64,
)


def test_perplexity_matches_a_hand_computed_value():
    # Window 1: 0->1 (1/2), 1->0 (1/2), 0->2 (1/8). Window 2: 3->3 (1/2), 3->2 (1/4), 2->1 (1/4).
    # Mean NLL = ln2 * (1 + 1 + 3 + 1 + 2 + 2) / 6 = ln2 * 10/6, so perplexity = 2 ** (5/3).
    windows = torch.tensor([[0, 1, 0, 2], [3, 3, 2, 1]])
    result = perplexity(Bigram(PROBS), windows, batch_size=1, progress=False)
    assert result.n_tokens == 6
    assert result.n_windows == 2 and result.seq_len == 4
    assert result.nll == pytest.approx(math.log(2) * 10 / 6, rel=1e-6)
    assert result.perplexity == pytest.approx(2 ** (5 / 3), rel=1e-6)


def test_windows_do_not_see_each_other_and_batch_size_does_not_matter():
    windows = torch.tensor([[0, 1, 0, 2], [3, 3, 2, 1], [2, 0, 1, 1]])
    one = perplexity(Bigram(PROBS), windows, batch_size=1, progress=False)
    three = perplexity(Bigram(PROBS), windows, batch_size=3, progress=False)
    assert one.perplexity == pytest.approx(three.perplexity, rel=1e-12)


def test_padding_is_neither_predicted_nor_counted():
    windows = torch.tensor([[0, 1, 0, 2], [3, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    result = perplexity(Bigram(PROBS), windows, attention_mask=mask, progress=False)
    # Predicted: 1/2, 1/2, 1/8 and 3->3 (1/2): NLL = ln2 * 6 / 4.
    assert result.n_tokens == 4
    assert result.perplexity == pytest.approx(2**1.5, rel=1e-6)


def test_a_model_with_zero_weights_has_perplexity_equal_to_its_vocabulary():
    model = tiny_llama(97, layers=2)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    windows = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(0))
    assert perplexity(model, windows, progress=False).perplexity == pytest.approx(97.0, rel=1e-6)


def test_text_perplexity_equals_the_model_loss_on_each_window():
    # Independent reference: transformers' own shifted cross-entropy (labels=input_ids) per window.
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), layers=2)
    windows = text_windows(TEXT * 2, tok, 16)
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    expected = math.exp(sum(losses) / len(losses))
    assert perplexity(model, windows, batch_size=4, progress=False).perplexity == pytest.approx(
        expected, rel=1e-5
    )


def test_model_mode_is_restored():
    model = Bigram(PROBS).train()
    perplexity(model, torch.tensor([[0, 1, 2]]), progress=False)
    assert model.training


def test_default_seq_len():
    assert default_seq_len(SimpleNamespace(max_position_embeddings=64)) == 64
    assert default_seq_len(SimpleNamespace(config=SimpleNamespace(max_position_embeddings=131072))) == 2048
    assert default_seq_len(SimpleNamespace()) == 2048


def test_perplexity_errors():
    model = Bigram(PROBS)
    with pytest.raises(GhostsolveError, match=r"expected \(n_windows >= 1, seq_len >= 2\)"):
        perplexity(model, torch.tensor([[1]]), progress=False)
    with pytest.raises(GhostsolveError, match="expected token ids"):
        perplexity(model, torch.zeros(2, 3), progress=False)
    with pytest.raises(GhostsolveError, match="they must match"):
        perplexity(
            model, torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 4), progress=False
        )
    with pytest.raises(GhostsolveError, match="batch_size is 0"):
        perplexity(model, torch.zeros(2, 3, dtype=torch.long), batch_size=0, progress=False)
    with pytest.raises(GhostsolveError, match="every window is padding"):
        perplexity(
            model, torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.zeros(1, 3), progress=False
        )
    nan_model = Bigram(torch.full((4, 4), float("nan")))
    with pytest.raises(GhostsolveError, match="non-finite logits"):
        perplexity(nan_model, torch.zeros(1, 3, dtype=torch.long), progress=False)
