"""Layer removal, ghost insertion and the wrapper modules: exact equivalences on tiny models."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from ghostsolve.adapters import get_adapter
from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.model.operators import (
    GhostedLayer,
    GhostedNorm,
    GhostOperator,
    attach_ghost,
    ghost_of,
)
from ghostsolve.pipeline.model.surgery import (
    FINAL_NORM,
    apply_ghost_layout,
    ghost_layout,
    insert_ghost,
    intervals_of,
    removal_set,
    remove_layers,
)
from tests.model_factories import TINY_FAMILIES, tiny_model

IDS = torch.tensor([[1, 17, 42, 8, 9, 33, 61, 5], [1, 70, 3, 3, 12, 88, 90, 4]])


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def snapshot(model: nn.Module) -> tuple[int, dict[str, torch.Tensor], dict]:
    return (
        len(get_adapter(model).layers(model)),
        {k: v.clone() for k, v in model.state_dict().items()},
        model.config.to_dict(),
    )


def assert_unchanged(model: nn.Module, snap: tuple[int, dict[str, torch.Tensor], dict]) -> None:
    n, state, config = snap
    assert len(get_adapter(model).layers(model)) == n
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert model.config.to_dict() == config


def pruned_reference(model: nn.Module, drop: list[int]) -> nn.Module:
    """Plain pruning built without ghostsolve: keep the other layers, renumber by hand."""
    ref = copy.deepcopy(model)
    kept = [i for i in range(ref.config.num_hidden_layers) if i not in drop]
    ref.model.layers = nn.ModuleList([ref.model.layers[i] for i in kept])
    ref.config.num_hidden_layers = len(kept)
    if getattr(ref.config, "layer_types", None) is not None:
        ref.config.layer_types = [ref.config.layer_types[i] for i in kept]
    for new, layer in enumerate(ref.model.layers):
        layer.self_attn.layer_idx = new
    return ref


# ------------------------------------------------------------------ removal sets
@given(st.sets(st.integers(0, 30), min_size=1, max_size=30))
def test_intervals_partition_the_set(removed: set[int]) -> None:
    intervals = intervals_of(sorted(removed))
    covered = [i for s, e in intervals for i in range(s, e)]
    assert covered == sorted(removed)
    # Maximal: consecutive intervals are separated by at least one kept layer.
    for (_, e0), (s1, _) in itertools.pairwise(intervals):
        assert s1 > e0


def test_removal_set_sorts() -> None:
    assert removal_set([9, 3], 12) == (3, 9)
    assert removal_set(range(5, 8), 12) == (5, 6, 7)


@pytest.mark.parametrize(
    ("drop", "match"),
    [
        ([], r"removal set is empty; pass at least one layer index in \[0, 4\)"),
        ([4], r"layer indices \[4\] are out of range: the model has 4 decoder layers"),
        ([-1], r"layer indices \[-1\] are out of range"),
        ([1, 1], r"layer indices \[1\] appear more than once"),
        ([0, 1, 2, 3], "removes all 4 decoder layers; keep at least one"),
        ([1.5], "layer indices must be integers"),
        ("12", "must be an iterable of layer indices"),
    ],
)
def test_bad_removal_sets_leave_model_untouched(drop: object, match: str) -> None:
    model = tiny_model("qwen3")
    snap = snapshot(model)
    with pytest.raises(GhostsolveError, match=match):
        remove_layers(model, drop)  # type: ignore[arg-type]
    assert_unchanged(model, snap)


# ------------------------------------------------------------------ exact equivalences
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_zero_ghosts_without_removal_change_no_logit(family: str) -> None:
    model = tiny_model(family)
    before = logits(model)
    for i in range(model.config.num_hidden_layers):
        insert_ghost(model, i, GhostOperator.zeros(model.config.hidden_size))
    insert_ghost(model, FINAL_NORM, GhostOperator.zeros(model.config.hidden_size))
    assert torch.equal(logits(model), before)


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("drop", [[0], [1, 2], [3], [0, 2]])
def test_identity_operator_equals_plain_pruning(family: str, drop: list[int]) -> None:
    model = tiny_model(family)
    reference = logits(pruned_reference(model, drop))
    pruned = remove_layers(copy.deepcopy(model), drop)
    assert torch.equal(logits(pruned), reference)
    for _start, end in intervals_of(drop):
        new_end = end - sum(1 for i in drop if i < end)
        at = FINAL_NORM if end == model.config.num_hidden_layers else new_end
        insert_ghost(pruned, at, GhostOperator.zeros(model.config.hidden_size))
    assert torch.equal(logits(pruned), reference)


def test_ghost_applies_w_at_the_first_kept_layer() -> None:
    model = tiny_model("llama")
    d = model.config.hidden_size
    delta = 0.1 * torch.randn(d, d, generator=torch.Generator().manual_seed(3))
    pruned = remove_layers(copy.deepcopy(model), [1, 2])
    insert_ghost(pruned, 1, GhostOperator(delta))
    seen: dict[str, torch.Tensor] = {}

    def keep_input(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        seen["in"] = out  # what the ghosted layer works on: its operator's output

    def keep_output(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        seen["out0"] = out

    ghost = ghost_of(pruned.model.layers[1])
    assert ghost is not None
    handle = ghost.register_forward_hook(keep_input)
    previous = pruned.model.layers[0].register_forward_hook(keep_output)
    try:
        logits(pruned)
    finally:
        handle.remove()
        previous.remove()
    out0 = seen["out0"][0] if isinstance(seen["out0"], tuple) else seen["out0"]
    expected = out0 @ (torch.eye(d) + delta)
    torch.testing.assert_close(seen["in"], expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ generation with a KV cache
@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("drop", [[0], [1, 2], [3], [0, 2]], ids=["start", "middle", "end", "split"])
def test_generate_with_cache_after_removal(family: str, drop: list[int]) -> None:
    model = tiny_model(family)
    pruned = remove_layers(copy.deepcopy(model), drop)
    d = model.config.hidden_size
    gen = torch.Generator().manual_seed(1)
    for _start, end in intervals_of(drop):
        new_end = end - sum(1 for i in drop if i < end)
        at = FINAL_NORM if end == model.config.num_hidden_layers else new_end
        insert_ghost(pruned, at, GhostOperator(0.2 * torch.randn(d, d, generator=gen)))
    prompt = IDS[:1, :5]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = pruned.generate(prompt, use_cache=True, **kwargs)
    without = pruned.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(with_cache, without)
    for new_idx, layer in enumerate(pruned.model.layers):
        assert layer.self_attn.layer_idx == new_idx


def test_layer_types_follow_the_kept_layers() -> None:
    model = tiny_model("olmo3")  # alternates sliding/full attention
    types = list(model.config.layer_types)
    remove_layers(model, [0, 3])
    assert model.config.layer_types == [types[1], types[2]]
    assert model.config.num_hidden_layers == 2
    # A ghosted layer is still the layer, with its per-layer attributes (4.x models read attention_type).
    attention = model.model.layers[0].self_attn
    insert_ghost(model, 0, GhostOperator.zeros(model.config.hidden_size))
    assert model.model.layers[0].self_attn is attention
    assert model.model.layers[0].self_attn.sliding_window == (8 if types[1] == "sliding_attention" else None)


# ------------------------------------------------------------------ module behaviour
@given(
    st.integers(1, 3),
    st.integers(1, 6),
    st.integers(1, 12),
    st.integers(0, 2**31 - 1),
)
def test_ghost_operator_is_h_times_w(batch: int, seq: int, d: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    delta = torch.randn(d, d, generator=gen, dtype=torch.float64)
    h = torch.randn(batch, seq, d, generator=gen, dtype=torch.float64)
    op = GhostOperator(delta, dtype=torch.float64)
    expected = h @ (torch.eye(d, dtype=torch.float64) + delta)
    torch.testing.assert_close(op(h), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(op.weight(), torch.eye(d, dtype=torch.float64) + delta)


def test_ghost_operator_dtypes() -> None:
    delta = 0.01 * torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    h = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    native = GhostOperator(delta)
    assert native.delta.dtype == torch.float32 and not native.delta.requires_grad
    assert native(h).dtype == torch.bfloat16
    fp32 = GhostOperator(delta, compute_dtype=torch.float32)
    expected = h + (h.float() @ delta).to(torch.bfloat16)
    assert torch.equal(fp32(h), expected)


@pytest.mark.parametrize(
    ("delta", "kwargs", "match"),
    [
        (torch.zeros(3, 4), {}, r"square \(d, d\) delta, got shape \(3, 4\)"),
        (torch.zeros(3, 3, dtype=torch.long), {}, "floating-point tensor"),
        (torch.zeros(3, 3), {"compute_dtype": torch.int32}, "compute_dtype must be a floating dtype"),
    ],
)
def test_ghost_operator_bad_input(delta: torch.Tensor, kwargs: dict, match: str) -> None:
    with pytest.raises(GhostsolveError, match=match):
        GhostOperator(delta, **kwargs)


def test_ghosted_layer_positional_and_keyword() -> None:
    wrapped = attach_ghost(nn.Identity(), GhostOperator(torch.eye(4)))
    assert isinstance(wrapped, (GhostedLayer, nn.Identity))
    h = torch.ones(1, 2, 4)
    assert torch.equal(wrapped(h), 2 * h)
    wrapped_kw = attach_ghost(_KeywordLayer(), GhostOperator(torch.eye(4)))
    assert torch.equal(wrapped_kw(hidden_states=h, scale=3.0), 6 * h)
    with pytest.raises(GhostsolveError, match="found no hidden states"):
        wrapped_kw(scale=1.0)


class _KeywordLayer(nn.Module):
    def forward(self, hidden_states: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return hidden_states * scale


def test_ghosted_modules_stay_what_they_were() -> None:
    norm = nn.LayerNorm(4)
    weight = norm.weight
    wrapped = attach_ghost(norm, GhostOperator.zeros(4), kind="norm")
    assert wrapped is norm and isinstance(norm, (GhostedNorm, nn.LayerNorm))
    assert type(norm).__name__ == "LayerNorm" and norm.weight is weight
    assert norm.normalized_shape == (4,)
    with pytest.raises(AttributeError):
        _ = norm.no_such_attribute
    with pytest.raises(GhostsolveError, match="already holds a ghost operator"):
        attach_ghost(norm, GhostOperator.zeros(4), kind="norm")


def test_state_dict_keys_and_reload_through_layout() -> None:
    model = tiny_model("qwen3")
    d = model.config.hidden_size
    pruned = remove_layers(copy.deepcopy(model), [1, 3])
    gen = torch.Generator().manual_seed(0)
    insert_ghost(pruned, 1, GhostOperator(0.1 * torch.randn(d, d, generator=gen)))
    insert_ghost(pruned, FINAL_NORM, GhostOperator(0.1 * torch.randn(d, d, generator=gen)))
    keys = set(pruned.state_dict())
    # The base model's names are kept; the operators add their own.
    assert {"model.layers.1.ghost.delta", "model.norm.ghost.delta", "model.norm.weight"} <= keys
    assert "model.layers.1.self_attn.q_proj.weight" in keys
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    layout = ghost_layout(pruned)
    assert layout == [{"insert_at": 1, "dim": d}, {"insert_at": FINAL_NORM, "dim": d}]

    fresh = tiny_model("qwen3", num_layers=2, seed=123)
    apply_ghost_layout(fresh, layout)
    assert set(fresh.state_dict()) == keys
    fresh.load_state_dict(pruned.state_dict())
    assert torch.equal(logits(fresh), logits(pruned))


def test_to_and_compile_with_ghosts() -> None:
    model = tiny_model("llama")
    d = model.config.hidden_size
    pruned = remove_layers(model, [1])
    insert_ghost(
        pruned, 1, GhostOperator(0.1 * torch.randn(d, d, generator=torch.Generator().manual_seed(0)))
    )
    eager = logits(pruned)
    double = copy.deepcopy(pruned).to(torch.float64)
    assert double.model.layers[1].ghost.delta.dtype == torch.float64
    torch.testing.assert_close(logits(double).float(), eager, rtol=1e-4, atol=1e-4)
    compiled = torch.compile(pruned, backend="aot_eager")
    torch.testing.assert_close(logits(compiled), eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("layout", "match"),
    [
        ([{"insert_at": 9, "dim": 32}], r"position 9 is neither a layer index in \[0, 4\)"),
        ([{"insert_at": 1, "dim": 32}, {"insert_at": 1, "dim": 32}], "position 1 appears twice"),
        ([{"insert_at": 1, "dim": 0}], "dim must be a positive int"),
        ([{"where": 1}], "dicts with 'insert_at' and 'dim'"),
    ],
)
def test_apply_ghost_layout_bad_input(layout: list, match: str) -> None:
    model = tiny_model("llama")
    snap = snapshot(model)
    with pytest.raises(GhostsolveError, match=match):
        apply_ghost_layout(model, layout)
    assert_unchanged(model, snap)


def test_insert_ghost_bad_input() -> None:
    model = tiny_model("llama")
    with pytest.raises(GhostsolveError, match=r"ghost operator is 8×8 but the hidden size is 32"):
        insert_ghost(model, 0, GhostOperator.zeros(8))
    with pytest.raises(GhostsolveError, match=r"insert_at must be a layer index in \[0, 4\)"):
        insert_ghost(model, 4, GhostOperator.zeros(32))
    insert_ghost(model, 0, GhostOperator.zeros(32))
    with pytest.raises(GhostsolveError, match="layer 0 already holds a ghost"):
        insert_ghost(model, 0, GhostOperator.zeros(32))
    insert_ghost(model, FINAL_NORM, GhostOperator.zeros(32))
    with pytest.raises(GhostsolveError, match="final norm already holds"):
        insert_ghost(model, FINAL_NORM, GhostOperator.zeros(32))
    with pytest.raises(GhostsolveError, match=r"already holds ghosts at positions \['0'\]"):
        apply_ghost_layout(model, [{"insert_at": 0, "dim": 32}])


def test_config_disagreeing_with_layers_is_refused() -> None:
    model = tiny_model("llama")
    model.config.num_hidden_layers = 3
    with pytest.raises(GhostsolveError, match="num_hidden_layers is 3 but the model holds 4"):
        remove_layers(model, [0])
