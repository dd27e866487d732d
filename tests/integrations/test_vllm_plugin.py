"""The vLLM plugin's own logic, without vLLM: names, the ghost plan read from a checkpoint's config,
weight-name mapping, the split-residual calling convention, and the entry point in pyproject.toml."""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import ghostsolve
from ghostsolve.adapters import get_adapter
from ghostsolve.errors import GhostsolveError
from ghostsolve.integrations.vllm import (
    SERVED,
    GhostPlan,
    ServedGhostedLayer,
    ServedGhostedNorm,
    attach_served_ghosts,
    ghost_plan,
    map_weight_names,
    served_family,
    weight_name_map,
)
from ghostsolve.pipeline.model.operators import GhostOperator, detach_ghost, ghost_of
from ghostsolve.pipeline.recover import recover
from tests.model_factories import random_batches, tiny_model

ROOT = Path(__file__).resolve().parents[2]
V1 = ROOT / "tests" / "models" / "v1-ghosted"
FAMILY_OF = {f.model_type: f for f in SERVED.values()}


def _config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module", params=sorted(FAMILY_OF))
def saved(request, tmp_path_factory) -> tuple[str, Path, Any]:
    """A ghost checkpoint of each served family: 7 layers, drop 0 (an operator at the new layer 0), 2-3 (the
    middle) and 6 (the end: the final norm); and the recovered model."""
    family = request.param
    model = tiny_model(family, num_layers=7)
    rec = recover(model, [0, 2, 3, 6], random_batches(), method="ghost", progress=False)
    out = ghostsolve.save(rec, tmp_path_factory.mktemp(family) / "ckpt")
    return family, out, rec.model


def test_every_served_family_names_what_ghostsolve_save_writes(saved) -> None:
    family, out, _ = saved
    config = _config(out)
    served = served_family(config["architectures"][0])
    assert served is FAMILY_OF[family]
    assert config["model_type"] == served.ghosted_model_type
    assert config["ghostsolve"]["base_architecture"] == served.architecture
    assert get_adapter(tiny_model(family)).model_type == family
    import transformers

    assert getattr(transformers, served.config_class).model_type == family


def test_the_plan_puts_operators_where_the_transformers_model_has_them(saved) -> None:
    _, out, model = saved
    plan = ghost_plan(_config(out))
    expected = {i for i, layer in enumerate(model.model.layers) if ghost_of(layer) is not None}
    assert set(plan.layers) == expected == {0, 1}
    assert plan.norm is not None and ghost_of(model.model.norm) is not None
    for i, ghost in plan.layers.items():
        reference = ghost_of(model.model.layers[i])
        assert reference is not None
        assert ghost.dim == reference.dim and ghost.delta.dtype == reference.delta.dtype
        assert ghost.compute_dtype == reference.compute_dtype
        assert torch.count_nonzero(ghost.delta) == 0  # a placeholder: the weights fill it
    assert plan.format_version == 2


def test_format_2_weight_names_are_the_served_models_own(saved) -> None:
    # vLLM's classes keep transformers' names (they stack q/k/v and gate/up themselves), and the operators
    # are children named `ghost`: the checkpoint's names must reach the served model unchanged.
    _, out, model = saved
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {n for n, _ in map_weight_names(((n, torch.empty(0)) for n in names), 2)} == names
    # The unrecovered layers with the plugin's operators attached: the module tree a served model has.
    served = copy.deepcopy(model)
    for module in [*served.model.layers, served.model.norm]:
        detach_ghost(module)
    attach_served_ghosts(served, ghost_plan(_config(out)))
    assert set(served.state_dict()) == names


def test_format_1_weight_names_map_back_to_the_base_names() -> None:
    from safetensors import safe_open

    with safe_open(str(V1 / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert any(".layer." in n for n in names) and "model.norm.norm.weight" in names
    mapped = {weight_name_map(1)(n) for n in names}
    loaded = ghostsolve.load(V1)
    assert loaded.config.tie_word_embeddings  # the lm_head is the embedding: not stored
    assert mapped == set(loaded.state_dict()) - {"lm_head.weight"}
    plan = ghost_plan(_config(V1))  # format 1 recorded no layout: the served one is assumed
    assert plan.format_version == 1 and set(plan.layers) == {1} and plan.norm is not None


# -------------------------------------------------------------------------------------------------------
# the split-residual convention, on stand-ins for vLLM's layer and norm
# -------------------------------------------------------------------------------------------------------
class _FusedNorm(nn.Module):
    """vLLM's RMSNorm contract: ``norm(x)`` → tensor; ``norm(x, r)`` → ``(norm(x + r), x + r)``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> Any:
        if residual is not None:
            x = x + residual
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
        return out if residual is None else (out, x)


class _SplitLayer(nn.Module):
    """vLLM's decoder-layer contract: ``layer(positions, h, r)`` → ``(h', r')`` with stream ``h + r``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.input_layernorm, self.post_norm = _FusedNorm(d), _FusedNorm(d)
        self.attn, self.mlp = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None):
        if residual is None:
            residual, hidden_states = hidden_states, self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states, residual = self.post_norm(self.attn(hidden_states), residual)
        return self.mlp(hidden_states), residual


class _SplitModel(nn.Module):
    """vLLM's model loop over split-residual layers, then ``norm(hidden_states, residual)``."""

    def __init__(self, layers: list[nn.Module], norm: nn.Module) -> None:
        super().__init__()
        inner = nn.Module()
        inner.add_module("layers", nn.ModuleList(layers))
        inner.add_module("norm", norm)
        self.add_module("model", inner)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        positions, residual = torch.arange(h.shape[0]), None
        for layer in self.model.layers:  # type: ignore[union-attr]
            h, residual = layer(positions, h, residual)
        out, _ = self.model.norm(h, residual)  # type: ignore[operator]
        return out


def _reference(model: _SplitModel, plan: GhostPlan, h: torch.Tensor) -> torch.Tensor:
    """The same model on the unsplit stream: ``s ↦ layer(ghost(s))``, summing the pair after each layer."""
    positions = torch.arange(h.shape[0])
    stream = h
    for i, layer in enumerate(model.model.layers):  # type: ignore[union-attr, arg-type]
        if i in plan.layers:
            stream = plan.layers[i](stream)
        out, residual = layer(positions, stream, None)
        stream = out + residual
    if plan.norm is not None:
        stream = plan.norm(stream)
    return model.model.norm(stream)  # type: ignore[operator]


def _random_plan(d: int, layers: list[int], norm: bool, seed: int) -> GhostPlan:
    g = torch.Generator().manual_seed(seed)
    plan = GhostPlan(layers={i: GhostOperator(0.3 * torch.randn(d, d, generator=g)) for i in layers})
    plan.norm = GhostOperator(0.3 * torch.randn(d, d, generator=g)) if norm else None
    return plan


@pytest.mark.parametrize(("layers", "norm"), [([0], False), ([1, 2], True), ([], True), ([0, 1, 2], True)])
def test_served_ghosts_apply_the_operator_to_the_whole_split_stream(layers: list[int], norm: bool) -> None:
    torch.manual_seed(0)
    d = 16
    model = _SplitModel([_SplitLayer(d) for _ in range(3)], _FusedNorm(d))
    plan = _random_plan(d, layers, norm, seed=1)
    h = torch.randn(5, d)
    expected = _reference(model, plan, h)
    ghosted = copy.deepcopy(model)
    attach_served_ghosts(ghosted, plan)
    torch.testing.assert_close(ghosted(h), expected, rtol=1e-5, atol=1e-6)
    for i, layer in enumerate(ghosted.model.layers):  # type: ignore[union-attr, arg-type]
        assert isinstance(layer, ServedGhostedLayer) == (i in layers)
        assert type(layer).__name__ == "_SplitLayer"  # the base class's name: vLLM's plans match on it
    assert isinstance(ghosted.model.norm, ServedGhostedNorm) == norm
    # Without operators the stand-in differs: the test sees whether they are applied at all.
    if layers or norm:
        assert not torch.allclose(model(h), expected)


def test_absent_pipeline_stages_are_skipped() -> None:
    class Missing(nn.Module):  # vLLM's PPMissingLayer stand-in
        pass

    model = _SplitModel([_SplitLayer(8), Missing()], Missing())
    attach_served_ghosts(model, _random_plan(8, [0, 1], True, seed=0), absent=(Missing,))
    assert isinstance(model.model.layers[0], ServedGhostedLayer)  # type: ignore[index]
    assert type(model.model.layers[1]) is Missing and type(model.model.norm) is Missing  # type: ignore[index]


# -------------------------------------------------------------------------------------------------------
# refusals
# -------------------------------------------------------------------------------------------------------
def _ghosted_config(saved) -> dict[str, Any]:
    return _config(saved[1])


def test_a_config_without_a_section_is_refused(saved) -> None:
    config = _ghosted_config(saved)
    del config["ghostsolve"]
    with pytest.raises(GhostsolveError, match=r"no 'ghostsolve' section.*ghostsolve\.save"):
        ghost_plan(config)


def test_a_plain_checkpoint_is_refused(saved) -> None:
    config = _ghosted_config(saved)
    config["ghostsolve"].update(checkpoint_kind="plain", ghosts=[])
    with pytest.raises(GhostsolveError, match=r"'plain' checkpoint.*needs no plugin"):
        ghost_plan(config)


def test_a_foreign_layout_is_refused(saved) -> None:
    config = _ghosted_config(saved)
    config["ghostsolve"]["layout"] = {"layers_path": "transformer.h", "final_norm_path": "transformer.ln_f"}
    with pytest.raises(GhostsolveError, match=r"under \{'layers_path': 'transformer.h'.*model.layers"):
        ghost_plan(config)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"module": "model.layers.9"}, "names a layer the model does not have"),
        ({"module": "model.layers.0.__class__"}, "not a plain dotted module path"),
        ({"delta_dtype": "int8"}, "unknown delta_dtype 'int8'"),
        ({"dim": 0}, "dim must be a positive int"),
    ],
)
def test_a_bad_entry_is_refused(saved, change: dict[str, Any], match: str) -> None:
    config = _ghosted_config(saved)
    config["ghostsolve"]["ghosts"][0].update(change)
    with pytest.raises(GhostsolveError, match="cannot serve this checkpoint: .*" + match):
        ghost_plan(config)


def test_an_unserved_architecture_is_refused_with_the_served_list() -> None:
    match = r"does not serve 'GhostsolveOlmo2ForCausalLM'.*GhostsolveLlama"
    with pytest.raises(GhostsolveError, match=match):
        served_family("GhostsolveOlmo2ForCausalLM")


def test_a_layer_beyond_the_model_is_refused() -> None:
    model = _SplitModel([_SplitLayer(8)], _FusedNorm(8))
    with pytest.raises(GhostsolveError, match=r"operators at layers \[3\], but the model has 1"):
        attach_served_ghosts(model, _random_plan(8, [3], False, seed=0))


# -------------------------------------------------------------------------------------------------------
# packaging: the entry point vLLM looks up, the optional extras, and no hard dependency
# -------------------------------------------------------------------------------------------------------
def _pyproject() -> dict[str, Any]:
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_the_entry_point_names_register() -> None:
    project = _pyproject()["project"]
    target = project["entry-points"]["vllm.general_plugins"]["ghostsolve"]
    module, _, attr = target.partition(":")
    assert getattr(importlib.import_module(module), attr) is ghostsolve.integrations.vllm.register
    extras = project["optional-dependencies"]
    assert any(r.startswith("vllm") for r in extras["vllm"])
    assert any(r.startswith("llmcompressor") for r in extras["llmcompressor"])
    assert not any(r.startswith(("vllm", "llmcompressor")) for r in project["dependencies"])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_register_without_vllm_says_so() -> None:
    with pytest.raises(ImportError, match="vllm"):
        ghostsolve.integrations.vllm.register()
