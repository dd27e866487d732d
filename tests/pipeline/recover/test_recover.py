"""recover / recover_all: fits against independent least squares, orders, one capture, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.model.operators import GhostedLayer, GhostedNorm, GhostOperator
from ghostsolve.pipeline.model.surgery import FINAL_NORM
from ghostsolve.pipeline.recover import (
    FOLDED_METHODS,
    METHODS,
    family_of,
    iter_recoveries,
    recover,
    recover_all,
)
from tests.model_factories import TINY_FAMILIES, random_batches, tiny_model

IDS = torch.tensor([[1, 17, 42, 8, 9, 33], [1, 70, 3, 3, 12, 88]])


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    now = model.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def collect(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], indices: list[int], mlp_layer: int | None = None
) -> list[torch.Tensor]:
    """Unpadded fp64 rows of the stream entering each layer in ``indices`` (the final norm's input for
    the layer count), then, if ``mlp_layer`` is given, of that layer's MLP output; one pass per batch."""
    model = copy.deepcopy(model)
    model.config.tie_last_hidden_states = False
    rows: list[list[torch.Tensor]] = [[] for _ in range(len(indices) + (mlp_layer is not None))]
    mlp_out: list[torch.Tensor] = []
    handle = None
    if mlp_layer is not None:
        handle = model.model.layers[mlp_layer].mlp.register_forward_hook(
            lambda module, args, out: mlp_out.append(out) and None
        )
    with torch.no_grad():
        for batch in batches:
            mask = batch["attention_mask"].bool()
            hs = model(**batch, output_hidden_states=True).hidden_states
            for k, index in enumerate(indices):
                rows[k].append(hs[index][mask])
            if mlp_layer is not None:
                rows[-1].append(mlp_out.pop()[mask])
    if handle is not None:
        handle.remove()
    return [torch.cat(r).double() for r in rows]


def stream(model: nn.Module, batches: list[dict[str, torch.Tensor]], index: int) -> torch.Tensor:
    """Unpadded rows of the stream entering layer ``index`` (the final norm's input at the end)."""
    return collect(model, batches, [index])[0]


def lstsq(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.lstsq(X, Y, driver="gelsd").solution


# Enough tokens (> d = 32) for a well-posed full fit.
BATCHES = random_batches(n_batches=4, batch_size=4, seq_len=16, pad=True)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_method_on_every_family(family: str) -> None:
    model = tiny_model(family)
    state = state_of(model)
    post_norm = family.startswith("olmo")
    methods = [m for m in METHODS if not (post_norm and m in FOLDED_METHODS)]
    recoveries = recover_all(model, [1, 3], BATCHES, methods, progress=False)
    assert same_state(model, state) and len(model.model.layers) == 4
    for method, rec in recoveries.items():
        assert rec.method == method and rec.removed == (1, 3) and rec.intervals == [(1, 2), (3, 4)]
        assert rec.model.config.num_hidden_layers == 2
        if family_of(method) is None:
            assert rec.layout == [] and all(f is None for f in rec.fits.values())
        elif method in FOLDED_METHODS:
            assert rec.layout == []
        else:
            assert rec.layout == [{"insert_at": 1, "dim": 32}, {"insert_at": FINAL_NORM, "dim": 32}]
            assert isinstance(rec.model.model.layers[1], GhostedLayer)
            assert isinstance(rec.model.model.norm, GhostedNorm)
        out = rec.model.generate(IDS[:1], max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0)
        assert out.shape == (1, 9)
        assert all(r == r for r in rec.relative_residuals.values())  # no NaN


@pytest.mark.parametrize("family", ["llama", "qwen3", "olmo2"])
def test_ghost_equals_least_squares_on_dense_streams(family: str) -> None:
    model = tiny_model(family)
    rec = recover(model, [0, 2, 3], BATCHES, method="ghost", progress=False)
    assert rec.intervals == [(0, 1), (2, 4)]
    for start, end in rec.intervals:
        W = lstsq(stream(model, BATCHES, start), stream(model, BATCHES, end))
        fitted = rec.fits[(start, end)]
        assert fitted is not None
        torch.testing.assert_close(fitted.weight, W, rtol=1e-6, atol=1e-6)
    ghost = rec.model.model.layers[0].ghost
    assert isinstance(ghost, GhostOperator) and ghost.delta.dtype == torch.float32
    assert rec.layout == [{"insert_at": 0, "dim": 32}, {"insert_at": FINAL_NORM, "dim": 32}]


def test_replaceme_equals_least_squares_on_mlp_outputs() -> None:
    model = tiny_model("qwen2")
    rec = recover(model, [2], BATCHES, method="replaceme", progress=False)
    x, y, m = collect(model, BATCHES, [2, 3], mlp_layer=1)
    # ReplaceMe: minimize ‖(x − m) + m T − y‖ over T (x − m is the stream after layer 1's attention).
    T = lstsq(m, y - (x - m))
    fitted = rec.fits[(2, 3)]
    assert fitted is not None
    torch.testing.assert_close(fitted.weight, T, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["ghost", "replaceme"])
def test_sequential_fits_the_recovered_stream_to_the_dense_one(method: str) -> None:
    model = tiny_model("llama")
    drop = [1, 3]
    independent = recover(model, drop, BATCHES, method=method, progress=False)
    sequential = recover(model, drop, BATCHES, method=method, order="sequential", progress=False)
    first, second = sequential.intervals
    # The first interval sees the dense model either way.
    torch.testing.assert_close(sequential.fits[first].weight, independent.fits[first].weight)
    # The second: X from the model recovered up to it (layer 3 is layer 2 there), Y from the dense model.
    y = stream(model, BATCHES, 4)
    if method == "ghost":
        expected = lstsq(stream(sequential.model, BATCHES, 2), y)
    else:
        x, m = collect(sequential.model, BATCHES, [2], mlp_layer=1)
        # The fold has changed layer 1's down_proj already (its output is m T); undo it to get the MLP
        # output and the stream the fit saw.
        T = sequential.fits[second].weight
        m_seen = torch.linalg.solve(T.T, m.T).T
        x_seen = x - m + m_seen
        expected = lstsq(m_seen, y - (x_seen - m_seen))
    got, other = sequential.fits[second].weight, independent.fits[second].weight
    # The ReplaceMe reference is rebuilt through T⁻¹ from fp32 activations: allow for that rounding,
    # which stays far below the difference between the two orders.
    tol = 1e-6 if method == "ghost" else 1e-3
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    assert float((got - expected).norm()) < 0.05 * float((got - other).norm())


def test_one_capture_pass_for_every_method() -> None:
    model = tiny_model("llama")
    calls = []
    handle = model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1) and None)
    try:
        recoveries = recover_all(model, [1, 2], BATCHES, progress=False)
    finally:
        handle.remove()
    assert list(recoveries) == list(METHODS)
    assert len(calls) == len(BATCHES)


def test_identity_alone_needs_no_capture() -> None:
    model = tiny_model("llama")
    calls = []
    handle = model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1) and None)
    try:
        rec = recover(model, [1], BATCHES, method="identity", progress=False)
    finally:
        handle.remove()
    assert calls == [] and rec.relative_residuals == {(1, 2): 1.0}


def test_unconstrained_ghost_has_the_lowest_residual() -> None:
    # ReplaceMe maps the MLP output, not the residual stream, so it lies outside the family x + x M and
    # may legitimately beat ghost; every other method is a member of that family.
    model = tiny_model("qwen3")
    methods = [m for m in METHODS if m != "replaceme"]
    recoveries = recover_all(model, [1, 2], BATCHES, methods, progress=False)
    ghost = recoveries["ghost"].relative_residuals[(1, 3)]
    assert recoveries["identity"].relative_residuals[(1, 3)] == 1.0
    for method, rec in recoveries.items():
        assert ghost <= rec.relative_residuals[(1, 3)] + 1e-9, method


def test_inplace_modifies_the_given_model() -> None:
    model = tiny_model("llama")
    rec = recover(model, [2], BATCHES, method="diagonal", inplace=True, progress=False)
    assert rec.model is model and len(model.model.layers) == 3


def test_compute_dtype_on_a_bf16_model() -> None:
    model = tiny_model("llama", dtype=torch.bfloat16)
    rec = recover(model, [1], BATCHES, method="ghost", compute_dtype=torch.float32, progress=False)
    ghost = rec.model.model.layers[1].ghost
    assert ghost.delta.dtype == torch.float32 and ghost.compute_dtype == torch.float32
    with torch.no_grad():
        assert rec.model(input_ids=IDS).logits.dtype == torch.bfloat16


def _assert_refused_and_untouched(kwargs: dict, match: str) -> None:
    """``recover`` on a 4-layer tiny Llama (default: drop [1, 2], ghost) raises and changes nothing."""
    model = tiny_model("llama")
    state = state_of(model)
    args = {"drop": [1, 2], "method": "ghost", **kwargs}
    drop = args.pop("drop")
    with pytest.raises(GhostsolveError, match=match):
        recover(model, drop, BATCHES, progress=False, **args)
    assert same_state(model, state) and model.config.num_hidden_layers == 4


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"drop": []}, "removal set is empty"),
        ({"drop": [7]}, r"layer indices \[7\] are out of range"),
        ({"drop": [1, 1]}, r"layer indices \[1\] appear more than once"),
        ({"drop": [0, 1, 2, 3]}, "removes all 4 decoder layers"),
        ({"method": "ghostly"}, r"unknown recovery method 'ghostly'; choose one of identity, ghost"),
        ({"order": "random"}, "unknown order 'random'; choose one of independent, sequential"),
        ({"method": "lowrank", "rank": -1}, "rank must be a nonnegative int"),
        ({"method": "replaceme", "drop": [0, 1]}, "interval starting at layer 0 has no layer before it"),
        ({"order": "sequential", "inplace": True, "drop": [0, 2]}, "pass inplace=False"),
    ],
)
def test_bad_input_leaves_the_model_untouched(kwargs: dict, match: str) -> None:
    _assert_refused_and_untouched(kwargs, match)


def test_nan_calibration_is_reported_and_model_untouched() -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[3, 3] = float("nan")
    state = state_of(model)
    with pytest.raises(GhostsolveError, match=r"interval \(1, 2\).*NaN/Inf.*fp32"):
        recover(model, [1], BATCHES, method="ghost", inplace=True, progress=False)
    assert len(model.model.layers) == 4
    now = model.state_dict()
    assert all(torch.equal(now[k].nan_to_num(), state[k].nan_to_num()) for k in state)


def test_one_shot_batches_serve_every_order() -> None:
    # The batches are read into a list once, so a generator serves the two-stream pass as well as a list.
    model = tiny_model("llama")
    for order in ("independent", "sequential"):
        from_list = recover(model, [0, 2], BATCHES, method="ghost", order=order, progress=False)
        from_generator = recover(model, [0, 2], iter(BATCHES), method="ghost", order=order, progress=False)
        for interval, fitted in from_list.fits.items():
            other = from_generator.fits[interval]
            assert fitted is not None and other is not None and torch.equal(fitted.delta, other.delta)


def test_iter_recoveries_yields_in_order() -> None:
    model = tiny_model("mistral")
    names = [name for name, _ in iter_recoveries(model, [2], BATCHES, ["scalar", "ghost"], progress=False)]
    assert names == ["scalar", "ghost"]


def test_generation_after_recovery_with_cache() -> None:
    model = tiny_model("qwen3")
    for drop in ([0], [1, 2], [3]):
        rec = recover(model, drop, BATCHES, method="ghost", progress=False)
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(
            rec.model.generate(IDS[:1], use_cache=True, **kwargs),
            rec.model.generate(IDS[:1], use_cache=False, **kwargs),
        )


def test_failing_fit_leaves_an_inplace_model_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    import ghostsolve.pipeline.recover.methods as recover_module

    real_fit = recover_module.fit
    calls = []

    def fit_failing_second(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 2:
            raise GhostsolveError("simulated failure of the second interval's fit")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(recover_module, "fit", fit_failing_second)
    model = tiny_model("llama")
    state = state_of(model)
    with pytest.raises(GhostsolveError, match="simulated failure"):
        recover(model, [0, 2], BATCHES, method="ghost", inplace=True, progress=False)
    assert same_state(model, state) and len(model.model.layers) == 4


def test_unknown_architecture_is_refused_before_anything_changes() -> None:
    model = tiny_model("llama")
    model.config.model_type = "gpt_neox"
    state = state_of(model)
    with pytest.raises(
        GhostsolveError, match=r"no adapter for model_type 'gpt_neox'; known model types: .*llama"
    ):
        recover(model, [1], BATCHES, progress=False)
    assert same_state(model, state) and len(model.model.layers) == 4


# ---------------------------------------------------------------------------------------------
# capture="layerwise": one decoder layer at a time, the same operators as whole-model hooks
# ---------------------------------------------------------------------------------------------
def _relative_gap(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).norm() / expected.norm())


@pytest.mark.parametrize("family", ["llama", "olmo2"])
@pytest.mark.parametrize("order", ["independent", "sequential"])
def test_layerwise_gives_the_operators_of_hooks(family: str, order: str) -> None:
    model = tiny_model(family)
    state = state_of(model)
    methods = ["ghost", "diagonal", "lowrank"]
    drop = [0, 2, 3]  # (0, 1) from the embeddings, (2, 4) up to the final norm
    hooks = recover_all(model, drop, BATCHES, methods, order=order, progress=False)
    layerwise = recover_all(
        model, drop, BATCHES, methods, order=order, capture="layerwise", device="cpu", progress=False
    )
    assert same_state(model, state)
    for method in methods:
        assert layerwise[method].layout == hooks[method].layout
        for interval in hooks[method].intervals:
            expected, got = hooks[method].fits[interval], layerwise[method].fits[interval]
            assert expected is not None and got is not None
            assert _relative_gap(got.delta, expected.delta) <= 1e-10, (method, interval)
        with torch.no_grad():
            torch.testing.assert_close(
                layerwise[method].model(input_ids=IDS).logits, hooks[method].model(input_ids=IDS).logits
            )
    if order == "sequential":
        # The second interval really saw the recovered stream: its operator differs from the dense one's.
        dense = recover(
            model, drop, BATCHES, method="ghost", capture="layerwise", device="cpu", progress=False
        )
        seq, ind = layerwise["ghost"].fits[(2, 4)], dense.fits[(2, 4)]
        assert seq is not None and ind is not None
        assert _relative_gap(seq.delta, ind.delta) > 1e-4


def test_layerwise_sequential_takes_one_pass_and_a_one_shot_iterator() -> None:
    model = tiny_model("llama")
    calls = []
    handle = model.model.embed_tokens.register_forward_hook(lambda *a: calls.append(1) and None)
    try:
        rec = recover(
            model, [0, 2], iter(BATCHES), method="ghost", order="sequential", capture="layerwise",
            device="cpu", progress=False,
        )  # fmt: skip
    finally:
        handle.remove()
    assert len(calls) == len(BATCHES) and rec.order == "sequential"


@pytest.mark.parametrize("order", ["independent", "sequential"])
def test_layerwise_statistics_are_summed_across_ranks(order: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import ghostsolve.pipeline.recover.recovery as recover_module
    from ghostsolve.pipeline.distributed import DistributedContext

    reduced: list[tuple[int, int]] = []

    def record(stats_by_interval: dict) -> dict:
        reduced.extend(stats_by_interval)
        return stats_by_interval

    monkeypatch.setattr(recover_module, "all_reduce_stats", record)
    kwargs = dict(method="ghost", order=order, capture="layerwise", device="cpu", progress=False)
    # Without a distributed context no collective runs, even where a process group might exist.
    recover(tiny_model("llama"), [0, 2], BATCHES, **kwargs)
    assert reduced == []
    two_ranks = DistributedContext(rank=0, world_size=2, local_rank=0, backend="gloo",
        device=torch.device("cpu"))
    recover(tiny_model("llama"), [0, 2], BATCHES, distributed=two_ranks, **kwargs)
    assert sorted(reduced) == [(0, 1), (2, 3)]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"capture": "offload"}, "unknown capture 'offload'; choose one of hooks, layerwise"),
        ({"device": "cpu"}, r"device='cpu' is the execution device of capture='layerwise'.*capture='hooks'"),
    ],
)
def test_layerwise_refusals(kwargs: dict, match: str) -> None:
    _assert_refused_and_untouched(kwargs, match)


@pytest.mark.parametrize("order", ["independent", "sequential"])
@pytest.mark.parametrize("method", ["replaceme", "prune-comp", "ghost"])
def test_every_method_works_in_every_order_with_either_capture(method: str, order: str) -> None:
    # One two-stream pass serves the sequential order in both engines: the same statistics, the same maps.
    model = tiny_model("llama", num_layers=5)
    drop = [1, 3]
    hooks = recover(model, drop, BATCHES, method=method, order=order, progress=False)
    layerwise = recover(model, drop, BATCHES, method=method, order=order, capture="layerwise", device="cpu",
                        progress=False)  # fmt: skip
    for interval, expected in hooks.fits.items():
        got = layerwise.fits[interval]
        assert expected is not None and got is not None
        assert _relative_gap(got.delta, expected.delta) <= 1e-6
    assert torch.allclose(rec_logits(layerwise.model), rec_logits(hooks.model), rtol=1e-4, atol=1e-5)


def rec_logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_layerwise_prune_comp_in_independent_order_matches_hooks() -> None:
    model = tiny_model("llama")
    hooks = recover(model, [1], BATCHES, method="prune-comp", progress=False)
    layerwise = recover(
        model, [1], BATCHES, method="prune-comp", capture="layerwise", device="cpu", progress=False
    )
    expected, got = hooks.fits[(1, 2)], layerwise.fits[(1, 2)]
    assert expected is not None and got is not None
    # α = mean|Y| / mean|X| comes from the magnitude sums, which Stats adds per chunk in the input
    # precision (fp32 here; see ghostsolve/stats.py), and the two captures chunk differently.
    assert _relative_gap(got.delta, expected.delta) <= 1e-6


def test_too_few_calibration_tokens_for_the_operator_are_warned_of() -> None:
    from ghostsolve.errors import CalibrationWarning

    # 2 windows of 10 tokens: 20 rows for a 32×32 operator (1024 unknowns, 640 equations).
    few = [{"input_ids": torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(0))}]
    model = tiny_model("llama")
    with pytest.warns(CalibrationWarning, match=r"layers 1: 20 calibration tokens for the 32×32 operator of "
                      r"'ghost' \(1024 unknowns, 640 equations\).*at least 320.*ridge='cv'"):  # fmt: skip
        rec = recover(model, [1], few, method="ghost", progress=False)
    assert rec.warnings and "20 calibration tokens" in rec.warnings[0]
    # A ridge makes the problem well posed, and the closed-form families have d unknowns at most.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        recover(model, [1], few, method="ghost", ridge=1e-2, progress=False)
        recover(model, [1], few, method="diagonal", progress=False)
