"""Adapter contract: one test class run against every adapter on tiny random models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ghostsolve.adapters import (
    ADAPTERS,
    LlamaAdapter,
    ModelAdapter,
    Olmo2Adapter,
    get_adapter,
    known_model_types,
    register_adapter,
    resolve_path,
)
from ghostsolve.errors import GhostsolveError
from tests.model_factories import TINY_FAMILIES, tiny_config, tiny_model

EXPECTED_NORM = {
    "llama": "pre",
    "llama-tied": "pre",
    "mistral": "pre",
    "qwen2": "pre",
    "qwen3": "pre",
    "olmo2": "post",
    "olmo3": "post",
}


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family_model(request: pytest.FixtureRequest) -> tuple[str, nn.Module]:
    return request.param, tiny_model(request.param)


class TestAdapterContract:
    """Every registered family answers the same facts, and they point at the right modules."""

    def test_registry_covers_families(self, family_model: tuple[str, nn.Module]) -> None:
        _, model = family_model
        adapter = get_adapter(model)
        assert model.config.model_type in adapter.model_types
        assert isinstance(adapter, ADAPTERS[model.config.model_type])
        # The config alone is enough, too.
        assert type(get_adapter(model.config)) is type(adapter)

    def test_layers_and_ends(self, family_model: tuple[str, nn.Module]) -> None:
        _, model = family_model
        adapter = get_adapter(model)
        layers = adapter.layers(model)
        assert isinstance(layers, nn.ModuleList)
        assert len(layers) == model.config.num_hidden_layers
        assert isinstance(adapter.embeddings(model), nn.Embedding)
        assert adapter.embeddings(model) is model.get_input_embeddings()
        assert adapter.lm_head(model) is model.get_output_embeddings()
        assert adapter.final_norm(model) is model.model.norm

    def test_residual_writers(self, family_model: tuple[str, nn.Module]) -> None:
        _, model = family_model
        adapter = get_adapter(model)
        d = model.config.hidden_size
        for layer in adapter.layers(model):
            o_proj, down_proj = adapter.o_proj(layer), adapter.down_proj(layer)
            assert isinstance(o_proj, nn.Linear) and o_proj.out_features == d
            assert isinstance(down_proj, nn.Linear) and down_proj.out_features == d
            assert down_proj.in_features == model.config.intermediate_size
            assert adapter.attention(layer) is layer.self_attn
            assert adapter.mlp(layer) is layer.mlp

    def test_layer_idx_attribute(self, family_model: tuple[str, nn.Module]) -> None:
        _, model = family_model
        adapter = get_adapter(model)
        for i, layer in enumerate(adapter.layers(model)):
            assert getattr(adapter.attention(layer), adapter.layer_idx_attr) == i

    def test_norm_placement(self, family_model: tuple[str, nn.Module]) -> None:
        family, model = family_model
        adapter = get_adapter(model)
        assert adapter.norm_placement == EXPECTED_NORM[family]
        assert adapter.is_pre_norm == (EXPECTED_NORM[family] == "pre")
        layer = adapter.layers(model)[0]
        # Post-norm blocks have no input norm; pre-norm blocks have no post-feedforward norm.
        assert hasattr(layer, "input_layernorm") == adapter.is_pre_norm
        assert hasattr(layer, "post_feedforward_layernorm") == (not adapter.is_pre_norm)

    def test_tied_embeddings(self, family_model: tuple[str, nn.Module]) -> None:
        family, model = family_model
        assert get_adapter(model).tied_embeddings(model) == (family == "llama-tied")

    def test_hidden_states_argument(self, family_model: tuple[str, nn.Module]) -> None:
        _, model = family_model
        adapter = get_adapter(model)
        seen: list[torch.Tensor] = []

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            h = kwargs.get(adapter.hidden_states_kwarg)
            seen.append(h if h is not None else args[adapter.hidden_states_arg_position])

        handle = adapter.layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            ids = torch.tensor([[1, 5, 6, 7]])
            model(input_ids=ids)
        finally:
            handle.remove()
        emb = adapter.embeddings(model)(ids)
        assert len(seen) == 1 and torch.equal(seen[0], emb)

    def test_per_layer_config_keys_exist_when_lists(self, family_model: tuple[str, nn.Module]) -> None:
        _, model = family_model
        adapter = get_adapter(model)
        for key in adapter.per_layer_config_keys:
            value = getattr(model.config, key, None)
            if value is not None:
                assert len(value) == model.config.num_hidden_layers


def test_unknown_model_type_lists_known_and_how_to_add() -> None:
    config = tiny_config("llama")
    config.model_type = "gpt_neox"
    with pytest.raises(
        GhostsolveError, match=r"no adapter for model_type 'gpt_neox'.*llama.*register_adapter"
    ):
        get_adapter(config)


def test_object_without_model_type() -> None:
    with pytest.raises(GhostsolveError, match=r"has no config\.model_type"):
        get_adapter(nn.Linear(2, 2))


def test_known_model_types() -> None:
    assert {"llama", "mistral", "qwen2", "qwen3", "olmo2"} <= set(known_model_types())


def test_register_adapter_roundtrip() -> None:
    class ToyAdapter(LlamaAdapter):
        model_types = ("toy-llama",)
        family = "Toy"

    try:
        register_adapter(ToyAdapter)
        config = tiny_config("llama")
        config.model_type = "toy-llama"
        assert isinstance(get_adapter(config), ToyAdapter)
        with pytest.raises(GhostsolveError, match="already have adapters"):
            register_adapter(type("Other", (LlamaAdapter,), {"model_types": ("toy-llama",)}))
    finally:
        ADAPTERS.pop("toy-llama", None)


def test_register_adapter_rejects_bad_classes() -> None:
    with pytest.raises(GhostsolveError, match="expects a ModelAdapter subclass"):
        register_adapter(object)  # type: ignore[arg-type]
    with pytest.raises(GhostsolveError, match="model_types is empty"):
        register_adapter(type("Empty", (ModelAdapter,), {}))


def test_resolve_path_names_missing_part() -> None:
    model = tiny_model("llama", num_layers=2)
    with pytest.raises(GhostsolveError, match=r"no attribute path 'model.blocks' \(missing 'blocks'"):
        resolve_path(model, "model.blocks")


def test_wrong_layout_is_reported() -> None:
    class Broken(Olmo2Adapter):
        layers_path = "model.embed_tokens"

    model = tiny_model("olmo2", num_layers=2)
    with pytest.raises(GhostsolveError, match=r"not an nn\.ModuleList"):
        Broken("olmo2").layers(model)
