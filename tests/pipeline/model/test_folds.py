"""Prune&Comp and ReplaceMe folds: folded weights equal the unfolded operators; post-norm refusal."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.model.folds import fold_prune_comp, fold_replaceme, untie_embeddings
from ghostsolve.pipeline.model.surgery import remove_layers
from ghostsolve.pipeline.recover import recover
from tests.model_factories import random_batches, tiny_model

PRE_NORM = ("llama", "llama-tied", "mistral", "qwen2", "qwen3")
IDS = torch.tensor([[1, 17, 42, 8, 9, 33, 61, 5], [1, 70, 3, 3, 12, 88, 90, 4]])


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def hidden_states(model: nn.Module) -> tuple[torch.Tensor, ...]:
    model = copy.deepcopy(model)
    model.config.tie_last_hidden_states = False
    with torch.no_grad():
        return model(input_ids=IDS, output_hidden_states=True).hidden_states


def eps_free(family: str, **kwargs: object) -> nn.Module:
    # RMSNorm(αx) = RMSNorm(x) only up to its epsilon; a negligible epsilon isolates fp32 rounding.
    return tiny_model(family, rms_norm_eps=1e-12, **kwargs)


@pytest.mark.parametrize("family", PRE_NORM)
def test_prune_comp_scales_the_stream_at_the_cut(family: str) -> None:
    model = eps_free(family)
    folded = copy.deepcopy(model)
    fold_prune_comp(folded, 2, 1.7)
    before, after = hidden_states(model), hidden_states(folded)
    for i in range(3):  # the inputs of layers 0, 1, 2 are all scaled
        torch.testing.assert_close(after[i], 1.7 * before[i], rtol=1e-5, atol=1e-6)
    if family == "llama-tied":  # still tied: the shared weight is scaled, the final norm compensates
        assert folded.lm_head.weight is folded.model.embed_tokens.weight
        torch.testing.assert_close(folded.lm_head.weight, 1.7 * model.lm_head.weight)
        torch.testing.assert_close(folded.model.norm.weight, model.model.norm.weight / 1.7)
    else:
        torch.testing.assert_close(folded.lm_head.weight, model.lm_head.weight)
        torch.testing.assert_close(folded.model.norm.weight, model.model.norm.weight)


@pytest.mark.parametrize("family", PRE_NORM)
@pytest.mark.parametrize("alpha", [0.3, 1.7, 25.0])
def test_prune_comp_at_the_end_leaves_the_logits_unchanged(family: str, alpha: float) -> None:
    # A cut after the last layer scales the stream entering the final norm, which ignores its scale; with a
    # tied lm_head the scaled shared weight must be undone exactly by the final norm's compensation.
    model = eps_free(family)
    folded = copy.deepcopy(model)
    fold_prune_comp(folded, 4, alpha)
    torch.testing.assert_close(logits(folded), logits(model), rtol=1e-5, atol=1e-5)


def test_prune_comp_keeps_a_tied_model_tied_without_an_lm_head_copy(tmp_path) -> None:
    model = eps_free("llama-tied")
    n_params = sum(p.numel() for p in model.parameters())
    fold_prune_comp(model, 2, 1.3)
    assert model.config.tie_word_embeddings is True
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == n_params
    model.save_pretrained(tmp_path / "ckpt")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in set(f.keys())


@pytest.mark.parametrize("family", PRE_NORM)
@pytest.mark.parametrize("drop", [[1, 2], [3], [0, 2]], ids=["middle", "end", "split"])
def test_folded_prune_comp_equals_unfolded_scalar(family: str, drop: list[int]) -> None:
    model = eps_free(family)
    batches = random_batches(n_batches=3, batch_size=2, seq_len=16)
    folded = recover(model, drop, batches, method="prune-comp", progress=False)
    unfolded = recover(model, drop, batches, method="scalar-magnitude", progress=False)
    assert folded.layout == [] and len(unfolded.layout) == len(folded.intervals)
    for interval in folded.intervals:
        fitted = folded.fits[interval]
        assert fitted is not None and fitted.family == "scalar-magnitude"
    torch.testing.assert_close(logits(folded.model), logits(unfolded.model), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(logits(folded.model), logits(remove_layers(copy.deepcopy(model), drop)))


class _MappedMLP(nn.Module):
    """The unfolded ReplaceMe form: the MLP output followed by ``m ↦ m T``."""

    def __init__(self, mlp: nn.Module, transform: torch.Tensor) -> None:
        super().__init__()
        self.mlp = mlp
        self.register_buffer("transform", transform.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) @ self.transform


@pytest.mark.parametrize("family", PRE_NORM)
@pytest.mark.parametrize("drop", [[1, 2], [3], [1, 3]], ids=["middle", "end", "split"])
def test_folded_replaceme_equals_unfolded_map(family: str, drop: list[int]) -> None:
    model = tiny_model(family, mlp_bias=True) if family == "llama" else tiny_model(family)
    batches = random_batches(n_batches=3, batch_size=2, seq_len=16)
    folded = recover(model, drop, batches, method="replaceme", progress=False)
    unfolded = remove_layers(copy.deepcopy(model), drop)
    removed_before = 0
    for start, end in folded.intervals:
        fitted = folded.fits[(start, end)]
        assert fitted is not None
        layer = unfolded.model.layers[start - 1 - removed_before]
        layer.mlp = _MappedMLP(layer.mlp, fitted.weight)
        removed_before += end - start
    torch.testing.assert_close(logits(folded.model), logits(unfolded), rtol=1e-4, atol=1e-5)


def test_replaceme_fold_maps_the_mlp_output() -> None:
    model = tiny_model("llama", mlp_bias=True)
    T = torch.randn(32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    folded = copy.deepcopy(model)
    fold_replaceme(folded, 1, T)
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.model.layers[1].mlp(x).double() @ T
        got = folded.model.layers[1].mlp(x).double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["olmo2", "olmo3"])
@pytest.mark.parametrize("method", ["prune-comp", "replaceme"])
def test_post_norm_models_refuse_folds(family: str, method: str) -> None:
    model = tiny_model(family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(GhostsolveError, match=r"only valid for pre-norm models; OLMo-\d .*ghost operator"):
        recover(model, [1, 2], random_batches(), method=method, progress=False)
    assert len(model.model.layers) == 4
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(GhostsolveError, match="pre-norm"):
        fold_prune_comp(model, 1, 1.5)
    with pytest.raises(GhostsolveError, match="pre-norm"):
        fold_replaceme(model, 1, torch.eye(32))


def test_untie_embeddings_keeps_values() -> None:
    model = tiny_model("llama-tied")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert untie_embeddings(model)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    assert model.config.tie_word_embeddings is False
    assert not untie_embeddings(model)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cut": 1, "alpha": 0.0}, "positive finite number, got 0.0"),
        ({"cut": 1, "alpha": float("nan")}, "positive finite number, got nan"),
        ({"cut": 5, "alpha": 1.1}, r"cut 5 is outside \[0, 4\]"),
    ],
)
def test_prune_comp_bad_input(kwargs: dict, match: str) -> None:
    model = tiny_model("llama")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(GhostsolveError, match=match):
        fold_prune_comp(model, **kwargs)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("index", "transform", "match"),
    [
        (4, torch.eye(32), r"layer_index 4 is outside \[0, 4\)"),
        (1, torch.eye(8), r"transform is \(8, 8\); expected \(32, 32\)"),
        (1, torch.full((32, 32), float("nan")), "holds NaN/Inf"),
    ],
)
def test_replaceme_bad_input(index: int, transform: torch.Tensor, match: str) -> None:
    with pytest.raises(GhostsolveError, match=match):
        fold_replaceme(tiny_model("llama"), index, transform)
