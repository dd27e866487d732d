"""One-pass capture against Hugging Face's own output_hidden_states, masks, early stop, failures."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.capture import capture_rows, capture_stats, check_intervals
from tests.model_factories import TINY_FAMILIES, random_batches, tiny_model


def reference_rows(
    model: Any, batches: list[dict[str, torch.Tensor]], start: int, end: int, skip_first: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """X, Y rows from output_hidden_states (index i = input of layer i; the last one pre-norm)."""
    model = copy.deepcopy(model)
    # By default HF replaces the last entry by the final norm's output; the boundary is its input.
    model.config.tie_last_hidden_states = False
    xs, ys = [], []
    with torch.no_grad():
        for batch in batches:
            hs = model(**batch, output_hidden_states=True).hidden_states
            assert len(hs) == model.config.num_hidden_layers + 1
            mask = batch["attention_mask"].bool().clone()
            if skip_first:
                mask[:, 0] = False
            xs.append(hs[start][mask])
            ys.append(hs[end][mask])
    return torch.cat(xs).double(), torch.cat(ys).double()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_capture_equals_output_hidden_states(family: str) -> None:
    model = tiny_model(family)
    batches = random_batches(n_batches=3, batch_size=3, seq_len=10, pad=True)
    intervals = [(0, 1), (2, 4)]  # a start boundary, and an interval ending at the final norm
    stats = capture_stats(model, batches, intervals, progress=False)
    assert set(stats) == set(intervals)
    for start, end in intervals:
        X, Y = reference_rows(model, batches, start, end)
        s = stats[(start, end)]
        assert s.n_rows == X.shape[0] == 3 * (3 * 10) - 3 * (10 // 3)  # padding excluded
        torch.testing.assert_close(s.xtx, X.T @ X, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s.xty, X.T @ Y, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s.yty, (Y * Y).sum(), rtol=1e-10, atol=1e-10)


def test_skip_first_token_excludes_bos_rows() -> None:
    model = tiny_model("llama")
    batches = random_batches(n_batches=2, batch_size=2, seq_len=8)
    stats = capture_stats(model, batches, [(1, 3)], skip_first_token=True, progress=False)[(1, 3)]
    X, Y = reference_rows(model, batches, 1, 3, skip_first=True)
    assert stats.n_rows == 2 * 2 * 7
    torch.testing.assert_close(stats.xty, X.T @ Y, rtol=1e-10, atol=1e-10)


def test_skip_first_token_with_left_padding_skips_first_real_token() -> None:
    model = tiny_model("llama")
    ids = torch.tensor([[0, 0, 1, 5, 6, 7], [1, 8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    stats = capture_stats(
        model, [{"input_ids": ids, "attention_mask": mask}], [(0, 2)], skip_first_token=True, progress=False
    )
    assert stats[(0, 2)].n_rows == 3 + 5


def test_one_forward_per_batch_stopping_before_lm_head() -> None:
    model = tiny_model("qwen3")
    calls = {"embed": 0, "head": 0, "layer3": 0}

    def count(name: str):
        def hook(*_: object) -> None:
            calls[name] += 1

        return hook

    handles = [
        model.model.embed_tokens.register_forward_hook(count("embed")),
        model.lm_head.register_forward_hook(count("head")),
        model.model.layers[3].register_forward_hook(count("layer3")),
    ]
    try:
        capture_stats(model, random_batches(n_batches=4), [(0, 1), (1, 3)], progress=False)
    finally:
        for h in handles:
            h.remove()
    # One pass for both intervals; it stops at the input of layer 3, so neither layer 3 nor lm_head runs.
    assert calls == {"embed": 4, "head": 0, "layer3": 0}


def test_model_is_left_as_it_was() -> None:
    model = tiny_model("olmo2")
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    capture_stats(model, random_batches(), [(1, 2)], progress=False)
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.model.layers)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_half_precision_models_give_fp64_stats() -> None:
    model = tiny_model("llama")
    batches = random_batches()
    reference = capture_stats(model, batches, [(1, 3)], progress=False)[(1, 3)]
    half = copy.deepcopy(model).to(torch.bfloat16)
    stats = capture_stats(half, batches, [(1, 3)], progress=False)[(1, 3)]
    assert stats.xtx.dtype == torch.float64
    # bf16 activations carry ~3 significant digits.
    torch.testing.assert_close(
        stats.xtx, reference.xtx, rtol=3e-2, atol=3e-2 * float(reference.xtx.abs().max())
    )


def test_non_finite_activations_name_the_boundary_and_suggest_fp32() -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(GhostsolveError, match=r"interval \(1, 3\).*input of layer 1.*input of layer 3.*fp32"):
        capture_stats(model, random_batches(), [(1, 3)], progress=False)
    assert all(not m._forward_pre_hooks for m in model.model.layers)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_hook_that_never_fires_is_reported() -> None:
    model = tiny_model("llama")
    # HF runs only layers[:config.num_hidden_layers]: layer 3 never sees the stream.
    model.config.num_hidden_layers = 3
    with pytest.raises(GhostsolveError, match=r"hooks for the input of layer 3 never fired"):
        capture_stats(model, random_batches(), [(3, 4)], progress=False)


def test_all_padding_interval_reports_no_tokens() -> None:
    model = tiny_model("llama")
    ids = torch.randint(3, 90, (2, 1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with pytest.raises(GhostsolveError, match=r"interval \(0, 2\) saw no calibration tokens"):
        capture_stats(model, [batch], [(0, 2)], skip_first_token=True, progress=False)


@pytest.mark.parametrize(
    ("batches", "match"),
    [
        ([], "the batches iterable was empty"),
        ([[1, 2, 3]], "must be a dict with 'input_ids'"),
        (
            [{"input_ids": torch.ones(4, dtype=torch.long)}],
            r"input_ids of a calibration batch is \(4,\); it must be a \(batch, seq\) integer tensor",
        ),
        (
            [{"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 3)}],
            r"attention_mask is \(2, 3\) but input_ids is \(2, 4\)",
        ),
    ],
)
def test_bad_batches(batches: list, match: str) -> None:
    with pytest.raises(GhostsolveError, match=match):
        capture_stats(tiny_model("llama", num_layers=2), batches, [(0, 1)], progress=False)


@pytest.mark.parametrize(
    ("intervals", "match"),
    [
        ([], "no intervals given"),
        ([(2, 2)], r"interval \(2, 2\) is invalid for a model of 4 layers"),
        ([(0, 5)], r"interval \(0, 5\) is invalid"),
        ([(0, 2), (1, 3)], r"intervals \(0, 2\) and \(1, 3\) overlap"),
        ([(1,)], "a pair"),
    ],
)
def test_bad_intervals(intervals: list, match: str) -> None:
    with pytest.raises(GhostsolveError, match=match):
        check_intervals(intervals, 4)


def test_adjacent_intervals_share_a_boundary() -> None:
    model = tiny_model("mistral")
    batches = random_batches(pad=True)
    stats = capture_stats(model, batches, [(0, 2), (2, 4)], progress=False)
    for start, end in [(0, 2), (2, 4)]:
        X, Y = reference_rows(model, batches, start, end)
        torch.testing.assert_close(stats[(start, end)].xty, X.T @ Y, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------
# capture_rows: raw boundary rows
# ---------------------------------------------------------------------------------------------
def first_real_token_rows(
    model: Any, batches: list[dict[str, torch.Tensor]], start: int, end: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference rows from output_hidden_states, dropping padding and each row's first mask-1 position."""
    model = copy.deepcopy(model)
    model.config.tie_last_hidden_states = False
    xs, ys = [], []
    with torch.no_grad():
        for batch in batches:
            hs = model(**batch, output_hidden_states=True).hidden_states
            mask = batch["attention_mask"].bool().clone()
            for row in range(mask.shape[0]):
                mask[row, int(mask[row].long().argmax())] = False
            xs.append(hs[start][mask])
            ys.append(hs[end][mask])
    return torch.cat(xs), torch.cat(ys)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_capture_rows_equal_output_hidden_states(family: str) -> None:
    model = tiny_model(family)
    batches = random_batches(n_batches=3, batch_size=3, seq_len=10, pad=True)
    for start, end in [(0, 1), (2, 4)]:  # the last one ends at the final norm's input
        X, Y = capture_rows(model, batches, (start, end), max_rows=10_000)
        X_ref, Y_ref = reference_rows(model, batches, start, end)
        assert X.shape == Y.shape == X_ref.shape and X.shape[0] == 3 * (3 * 10) - 3 * (10 // 3)
        assert X.dtype == Y.dtype == torch.float32 and X.device.type == "cpu"
        torch.testing.assert_close(X.double(), X_ref, rtol=0, atol=0)
        torch.testing.assert_close(Y.double(), Y_ref, rtol=0, atol=0)


def test_capture_rows_skip_first_real_token_with_left_padding() -> None:
    model = tiny_model("llama")
    ids = torch.tensor([[0, 0, 1, 5, 6, 7], [1, 8, 9, 10, 11, 12], [0, 1, 13, 14, 15, 16]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]])
    batches = [{"input_ids": ids, "attention_mask": mask}]
    X, Y = capture_rows(model, batches, (1, 3), max_rows=100, skip_first_token=True)
    X_ref, Y_ref = first_real_token_rows(model, batches, 1, 3)
    assert X.shape[0] == 3 + 5 + 4
    torch.testing.assert_close(X, X_ref, rtol=0, atol=0)
    torch.testing.assert_close(Y, Y_ref, rtol=0, atol=0)


def test_capture_rows_respects_max_rows_and_stops_early() -> None:
    model = tiny_model("llama")
    batches = random_batches(n_batches=4, batch_size=2, seq_len=12, pad=True)
    X_ref, Y_ref = reference_rows(model, batches, 1, 3)
    embeds = []
    handle = model.model.embed_tokens.register_forward_hook(lambda *_: embeds.append(1))
    try:
        X, Y = capture_rows(model, batches, (1, 3), max_rows=30)
    finally:
        handle.remove()
    # 12 + 8 rows in the first batch, so the second batch is the last one run.
    assert X.shape == Y.shape == (30, X_ref.shape[1])
    assert len(embeds) == 2
    torch.testing.assert_close(X.double(), X_ref[:30], rtol=0, atol=0)
    torch.testing.assert_close(Y.double(), Y_ref[:30], rtol=0, atol=0)


def test_capture_rows_keeps_the_model_dtype_and_leaves_the_model_as_it_was() -> None:
    model = copy.deepcopy(tiny_model("olmo2")).to(torch.bfloat16)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    X, Y = capture_rows(model, random_batches(), (1, 2), max_rows=5)
    assert X.dtype == Y.dtype == torch.bfloat16 and X.shape == (5, model.config.hidden_size)
    assert model.training and all(m.training for m in model.modules())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("interval", "max_rows", "batches", "match"),
    [
        ((0, 9), 10, None, r"interval \(0, 9\) is invalid for a model of 4 layers"),
        ((1, 2), 0, None, r"max_rows must be a positive integer, got 0"),
        ((1, 2), True, None, r"max_rows must be a positive integer, got True"),
        ((1, 2), 10, [], r"no calibration batches"),
        (
            (1, 2),
            10,
            [{"input_ids": torch.ones(1, 1, dtype=torch.long), "attention_mask": torch.ones(1, 1)}],
            r"interval \(1, 2\) saw no calibration tokens",
        ),
    ],
)
def test_capture_rows_bad_input(interval: Any, max_rows: Any, batches: Any, match: str) -> None:
    model = tiny_model("llama")
    batches = random_batches() if batches is None else batches
    with pytest.raises(GhostsolveError, match=match):
        capture_rows(model, batches, interval, max_rows=max_rows, skip_first_token=True)
