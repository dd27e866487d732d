"""Layer-by-layer capture equals whole-model capture; accelerate-dispatched models capture correctly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.capture import capture_stats, capture_stats_layerwise
from ghostsolve.pipeline.model.operators import GhostOperator
from ghostsolve.pipeline.model.surgery import insert_ghost
from ghostsolve.stats import Stats
from tests.model_factories import random_batches, tiny_model

# OLMo-3 alternates sliding-window and full attention: each layer gets its own mask, so it checks that
# the arguments are recorded per layer rather than once for layer 0.
FAMILIES = ("llama", "qwen3", "olmo2", "olmo3")
# Every kind of boundary: from the embeddings, mid-model, up to the final norm.
INTERVALS = [(0, 1), (2, 4)]


def _batches(**kwargs: Any) -> list[dict[str, torch.Tensor]]:
    """Right-padded batches plus one left-padded batch (the first real token is not at position 0)."""
    batches = random_batches(pad=True, **kwargs)
    ids = torch.randint(3, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0
    ids[0, 4] = ids[1, 0] = 1
    batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


# Stats sums the per-chunk magnitude columns in the input precision (fp32 here; documented in
# ghostsolve/stats.py), so those agree to fp32 rounding; the fp64 products agree to fp64 rounding.
MAGNITUDE_RTOL = 1e-6


def _assert_same_stats(got: dict, expected: dict, rtol: float = 1e-12) -> None:
    assert list(got) == list(expected)
    for interval, stats in expected.items():
        assert got[interval].n_rows == stats.n_rows > 0
        for name, tensor in stats.tensors().items():
            other = got[interval].tensors()[name].to(tensor.device)
            scale = float(tensor.abs().max())
            tol = max(rtol, MAGNITUDE_RTOL) if name.endswith("_abs_sum") else rtol
            assert float((other - tensor).abs().max()) <= tol * scale, (interval, name)


def _reference(model: Any, batches: list[dict], intervals: list[tuple[int, int]]) -> dict:
    """Independent reference: stream entering each layer from ``output_hidden_states`` and the final norm's
    input from a hook, masked by hand."""
    entering_norm: list[torch.Tensor] = []
    handle = model.model.norm.register_forward_pre_hook(lambda m, args: entering_norm.append(args[0]))
    stats = {iv: Stats(model.config.hidden_size) for iv in intervals}
    try:
        with torch.no_grad():
            for batch in batches:
                entering_norm.clear()
                hidden = model(**batch, output_hidden_states=True).hidden_states
                streams = [*hidden[:-1], entering_norm[0]]
                keep = batch["attention_mask"].bool()
                for start, end in intervals:
                    stats[(start, end)].update(streams[start][keep], streams[end][keep])
    finally:
        handle.remove()
    return stats


@pytest.mark.parametrize("family", FAMILIES)
def test_layerwise_equals_whole_model(family: str) -> None:
    model = tiny_model(family, num_layers=4)
    batches = _batches()
    got = capture_stats_layerwise(model, batches, INTERVALS, device="cpu", progress=False)
    _assert_same_stats(got, capture_stats(model, batches, INTERVALS, progress=False))
    _assert_same_stats(got, _reference(model, batches, INTERVALS))


@pytest.mark.parametrize("family", ["llama", "olmo3"])
def test_layerwise_skips_the_first_real_token_like_capture(family: str) -> None:
    model = tiny_model(family, num_layers=4)
    batches = _batches()
    kwargs: dict[str, Any] = {"skip_first_token": True, "progress": False}
    got = capture_stats_layerwise(model, batches, [(1, 3)], device="cpu", **kwargs)
    expected = capture_stats(model, batches, [(1, 3)], **kwargs)
    _assert_same_stats(got, expected)
    n_real = sum(int(b["attention_mask"].sum()) for b in batches)
    assert got[(1, 3)].n_rows == n_real - 2 * len(batches)


def test_layerwise_sees_inserted_ghosts_like_capture() -> None:
    # A partly recovered model (as in the sequential order): boundaries are taken after the ghosts.
    model = tiny_model("qwen3", num_layers=4)
    gen = torch.Generator().manual_seed(2)
    insert_ghost(model, 1, GhostOperator(0.05 * torch.randn(32, 32, generator=gen)))
    insert_ghost(model, "final_norm", GhostOperator(0.05 * torch.randn(32, 32, generator=gen)))
    batches = _batches()
    intervals = [(1, 2), (3, 4)]
    got = capture_stats_layerwise(model, batches, intervals, device="cpu", progress=False)
    _assert_same_stats(got, capture_stats(model, batches, intervals, progress=False))


def test_layerwise_accepts_plain_id_tensors_and_places_stats(monkeypatch: pytest.MonkeyPatch) -> None:
    from ghostsolve.pipeline.capture import consumers

    monkeypatch.setattr(consumers, "CHUNK_ROWS", 5)  # several Stats updates per batch
    model = tiny_model("llama", num_layers=3)
    ids = [b["input_ids"] for b in random_batches()]
    got = capture_stats_layerwise(
        model, ids, [(1, 2)], device="cpu", offload_device="cpu", stats_device="cpu", progress=False
    )
    expected = capture_stats(model, [{"input_ids": i} for i in ids], [(1, 2)], progress=False)
    _assert_same_stats(got, expected)
    assert got[(1, 2)].device == torch.device("cpu") and got[(1, 2)].dtype == torch.float64


def _snapshot(model: Any) -> tuple[dict[str, torch.Tensor], dict[str, bool], list[str]]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    patched = [n for n, m in model.named_modules() if "forward" in m.__dict__]
    return state, modes, patched


def _assert_unchanged(model: Any, snapshot: tuple) -> None:
    state, modes, patched = snapshot
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) and now[k].device == v.device for k, v in state.items())
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert [n for n, m in model.named_modules() if "forward" in m.__dict__] == patched


def test_model_is_unchanged_after_success_and_failure() -> None:
    model = tiny_model("llama", num_layers=4)
    model.train()  # restored afterwards, although the capture runs in eval mode
    snapshot = _snapshot(model)
    capture_stats_layerwise(model, random_batches(), [(1, 3)], device="cpu", progress=False)
    _assert_unchanged(model, snapshot)

    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] = float("inf")
    snapshot = _snapshot(model)
    with pytest.raises(GhostsolveError, match=r"interval \(1, 3\) \(from the input of layer 1 to the input "
                       r"of layer 3\) failed: non-finite values"):  # fmt: skip
        capture_stats_layerwise(model, random_batches(), [(1, 3)], device="cpu", progress=False)
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize(
    ("batches", "intervals", "match"),
    [
        ([], [(1, 2)], r"no calibration batches: the batches iterable was empty"),
        ([[1, 2, 3]], [(1, 2)], r"a calibration batch is a list; it must be a dict with 'input_ids'"),
        ([{"input_ids": torch.ones(5, dtype=torch.long)}], [(1, 2)],
         r"input_ids of a calibration batch is \(5,\); it must be a \(batch, seq\) integer tensor"),
        ([{"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 3)}], [(1, 2)],
         r"attention_mask is \(2, 3\) but input_ids is \(2, 4\); they must match"),
        ([{"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.zeros(2, 4)}], [(1, 2)],
         r"interval \(1, 2\) saw no calibration tokens \(every position was padding"),
        (None, [], r"no intervals given"),
        (None, [(2, 5)], r"interval \(2, 5\) is invalid for a model of 4 layers"),
        (None, [(0, 2), (1, 3)], r"intervals \(0, 2\) and \(1, 3\) overlap"),
    ],
)  # fmt: skip
def test_bad_input(batches: Any, intervals: list, match: str) -> None:
    model = tiny_model("llama", num_layers=4)
    with pytest.raises(GhostsolveError, match=match):
        capture_stats_layerwise(
            model, random_batches() if batches is None else batches, intervals, device="cpu", progress=False
        )


def test_meta_weights_without_accelerate_are_refused() -> None:
    import transformers

    from tests.model_factories import tiny_config

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama"))
    with pytest.raises(GhostsolveError, match=r"has its weights on the meta device \(not loaded\)"):
        capture_stats_layerwise(model, random_batches(), [(1, 2)], device="cpu", progress=False)


def test_layer_split_over_devices_is_refused() -> None:
    model = tiny_model("llama", num_layers=3)
    model.model.layers[1].mlp.to("meta")
    with pytest.raises(GhostsolveError, match=r"decoder layer 1 has tensors on several devices"):
        capture_stats_layerwise(model, random_batches(), [(1, 2)], device="cpu", progress=False)


# ------------------------------------------------------------------------------------------ accelerate
@pytest.fixture(scope="module")
def saved_qwen3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    model = tiny_model("qwen3", num_layers=4)
    path = tmp_path_factory.mktemp("qwen3")
    model.save_pretrained(path)
    return path, model


def _offloaded_map() -> dict[str, str]:
    return {
        "model.embed_tokens": "cpu",
        "model.rotary_emb": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "cpu",
        "model.layers.3": "disk",
        "model.norm": "disk",
        "lm_head": "cpu",
    }


@pytest.mark.parametrize("device_map", ["explicit", "auto"])
def test_accelerate_offloaded_model_captures_correctly(
    saved_qwen3: tuple[Path, Any], tmp_path: Path, device_map: str
) -> None:
    import transformers

    path, dense = saved_qwen3
    batches = _batches()
    expected = capture_stats(dense, batches, INTERVALS, progress=False)
    kwargs: dict[str, Any] = {"device_map": _offloaded_map()}
    if device_map == "auto":
        # A CPU budget below the model's size forces accelerate to place the rest on disk.
        kwargs = {"device_map": "auto", "max_memory": {"cpu": "60KB"}}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, offload_folder=tmp_path / "offload", **kwargs
    )
    assert "disk" in set(model.hf_device_map.values())
    assert any(p.device.type == "meta" for p in model.parameters())  # really offloaded
    _assert_same_stats(capture_stats(model, batches, INTERVALS, progress=False), expected)
    _assert_same_stats(
        capture_stats_layerwise(model, batches, INTERVALS, device="cpu", progress=False), expected
    )
    assert any(p.device.type == "meta" for p in model.parameters())  # left offloaded


def _cpu_offloaded(family: str) -> tuple[Any, list[dict[str, torch.Tensor]], dict]:
    from accelerate import cpu_offload

    model = tiny_model(family, num_layers=4)
    batches = _batches()
    expected = capture_stats(model, batches, INTERVALS, progress=False)
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert all(p.device.type == "meta" for p in model.parameters())  # every weight lives in the hooks
    return model, batches, expected


def test_accelerate_cpu_offload_model_captures_layerwise() -> None:
    model, batches, expected = _cpu_offloaded("olmo2")
    _assert_same_stats(
        capture_stats_layerwise(model, batches, INTERVALS, device="cpu", progress=False), expected
    )


def test_accelerate_cpu_offload_model_captures_whole() -> None:
    model, batches, expected = _cpu_offloaded("olmo2")
    _assert_same_stats(capture_stats(model, batches, INTERVALS, progress=False), expected)


# ------------------------------------------------------------------------------- sequential order, one pass
@pytest.mark.parametrize("family", ["llama", "olmo2"])
def test_on_interval_gives_the_sequential_order_of_recover(family: str) -> None:
    import ghostsolve
    from ghostsolve.pipeline.recover import recover

    model = tiny_model(family, num_layers=6)
    batches = _batches()
    drop = [1, 3, 4, 5]  # intervals (1, 2) and (3, 6): the second reaches the final norm
    expected = recover(model, drop, batches, method="ghost", order="sequential", progress=False)

    fits: dict[tuple[int, int], Any] = {}
    seen: list[tuple[int, int]] = []

    def refit(interval: tuple[int, int], stats: Stats) -> GhostOperator:
        seen.append(interval)
        fits[interval] = ghostsolve.fit(stats, family="full")
        return GhostOperator(fits[interval].delta)  # what recover inserts

    got = capture_stats_layerwise(
        model, batches, [(1, 2), (3, 6)], device="cpu", progress=False, on_interval=refit
    )
    assert seen == [(1, 2), (3, 6)] and list(got) == seen
    for interval in seen:
        reference = expected.fits[interval]
        assert reference is not None
        rel = float((fits[interval].weight - reference.weight).norm() / reference.weight.norm())
        assert rel <= 1e-10, (interval, rel)
    # The second interval really saw the recovered stream: its X differs from the dense model's.
    dense = capture_stats(model, batches, [(3, 6)], progress=False)[(3, 6)]
    assert float((dense.xtx - got[(3, 6)].xtx).abs().max()) > 1e-3 * float(dense.xtx.abs().max())


def test_on_interval_returning_none_is_plain_pruning() -> None:
    model = tiny_model("qwen3", num_layers=5)
    batches = _batches()
    got = capture_stats_layerwise(
        model, batches, [(1, 2), (3, 5)], device="cpu", progress=False, on_interval=lambda iv, s: None
    )
    # X of (3, 5) comes from the model without layer 1: what the plainly pruned model computes.
    from ghostsolve.pipeline.model.surgery import remove_layers

    pruned = remove_layers(tiny_model("qwen3", num_layers=5), [1])
    expected = _reference(pruned, batches, [(2, 4)])[(2, 4)]
    dense_y = _reference(model, batches, [(3, 5)])[(3, 5)]
    assert got[(3, 5)].n_rows == expected.n_rows
    for name in ("xtx", "x_abs_sum"):
        tensor = getattr(expected, name)
        assert float((getattr(got[(3, 5)], name) - tensor).abs().max()) <= 1e-12 * float(tensor.abs().max())
    # ... while Y stays the dense model's stream.
    assert torch.allclose(got[(3, 5)].y_abs_sum, dense_y.y_abs_sum, rtol=1e-12, atol=0)


def test_on_interval_must_return_a_shape_preserving_map() -> None:
    model = tiny_model("llama", num_layers=4)
    with pytest.raises(GhostsolveError, match=r"on_interval returned a map that turned hidden states "
                       r"\(2, 12, 32\) into \(2, 12\)"):  # fmt: skip
        capture_stats_layerwise(
            model, random_batches(), [(0, 1), (2, 3)], device="cpu", progress=False,
            on_interval=lambda iv, s: (lambda h: h.sum(-1)),
        )  # fmt: skip
