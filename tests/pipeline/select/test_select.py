"""Layer selection: every score against an independent reference computation, planted redundancy, errors.

References are computed here without the module's hooks: hidden states come from Hugging Face's
``output_hidden_states`` on a copy of the model whose final norm is replaced by the identity (so that the last
entry is the final-norm *input*), removal from :func:`ghostsolve.pipeline.model.surgery.remove_layers`, the
NLL from the model's own ``labels=`` loss, least squares from ``torch.linalg.lstsq`` on materialized rows.
"""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ghostsolve import GhostsolveError
from ghostsolve.adapters import get_adapter
from ghostsolve.pipeline.data import batches_from_windows, sample_windows
from ghostsolve.pipeline.model.surgery import remove_layers
from ghostsolve.pipeline.select import STRATEGIES, Selection, select_layers
from ghostsolve.pipeline.select.report import (
    format_selection,
    plot_selection,
    run_select_command,
    write_selection_report,
)
from tests.model_factories import random_batches, tiny_model

FAMILIES = ("llama", "qwen3", "olmo2")


# ---------------------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------------------
def reference_states(model: nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """``h_0 .. h_L`` of one batch, ``(batch, tokens, d)`` each: layer inputs, then the final-norm input."""
    probe = copy.deepcopy(model)
    get_adapter(probe).set_final_norm(probe, nn.Identity())
    with torch.no_grad():
        out = probe(**batch, output_hidden_states=True, use_cache=False)
    return list(out.hidden_states)


def reference_mask(
    batch: dict[str, torch.Tensor], *, skip_first: bool = False, last: bool = False
) -> torch.Tensor:
    mask = batch["attention_mask"].bool().clone()
    if last:
        # right padding in these batches: the last real token is at (number of real tokens - 1)
        out = torch.zeros_like(mask)
        for r in range(mask.shape[0]):
            out[r, int(mask[r].sum()) - 1] = True
        return out
    if skip_first:
        mask[:, 0] = False  # no left padding here, so the first real token is position 0
    return mask


def reference_cosines(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], offset: int, **mask_opts: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over tokens of per-token cos(h_l, h_{l+offset}) and of arccos(.)/pi, for every start l."""
    cos_all: list[torch.Tensor] = []
    for batch in batches:
        states = reference_states(model, batch)
        mask = reference_mask(batch, **mask_opts)
        per_start = [
            F.cosine_similarity(states[l].double(), states[l + offset].double(), dim=-1)[mask]
            for l in range(len(states) - offset)
        ]
        cos_all.append(torch.stack(per_start))
    cos = torch.cat(cos_all, dim=1)
    return cos.mean(dim=1), (torch.arccos(cos.clamp(-1, 1)) / math.pi).mean(dim=1)


def labels_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)


def reference_ppl(model: nn.Module, batches: list[dict[str, torch.Tensor]], removed: list[int]) -> float:
    """Perplexity of a copy with ``removed`` really removed, from the model's own mean loss per batch."""
    pruned = remove_layers(copy.deepcopy(model), removed) if removed else model
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            labels = labels_of(batch)
            n = int((labels[:, 1:] != -100).sum())
            total += float(pruned(**batch, labels=labels, use_cache=False).loss) * n
            count += n
    return math.exp(total / count)


def self_sampled_batches(model: nn.Module, *, n: int = 16, seq_len: int = 24, seed: int = 0) -> list[Any]:
    """Calibration text drawn from the model itself: the dense model is then the best predictor of it."""
    tok = SimpleNamespace(bos_token_id=1, eos_token_id=2)
    windows = sample_windows(model, tok, n, seq_len, seed=seed, progress=False)
    return batches_from_windows(windows, 8)


def planted(model: nn.Module, layers: list[int]) -> nn.Module:
    """Zero o_proj and down_proj of ``layers``: each then passes the residual stream through unchanged."""
    adapter = get_adapter(model)
    with torch.no_grad():
        for i in layers:
            layer = adapter.layers(model)[i]
            adapter.o_proj(layer).weight.zero_()
            adapter.down_proj(layer).weight.zero_()
    return model


# ---------------------------------------------------------------------------------------------------------
# each score against its reference
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("skip_first", [False, True])
def test_block_influence_matches_reference(family: str, skip_first: bool) -> None:
    model = tiny_model(family, num_layers=5)
    batches = random_batches(pad=True)
    sel = select_layers(model, batches, "block-influence", 2, skip_first_token=skip_first)
    cos, _ = reference_cosines(model, batches, 1, skip_first=skip_first)
    expected = (1 - cos).tolist()
    assert sel.unit == "layer" and len(sel.scores) == 5
    assert sel.scores == pytest.approx(expected, abs=1e-9)
    assert sel.selected == sorted(sorted(range(5), key=lambda i: expected[i])[:2])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("last_token", [False, True])
def test_angular_matches_reference(family: str, last_token: bool) -> None:
    model = tiny_model(family, num_layers=5)
    batches = random_batches(pad=True)
    sel = select_layers(model, batches, "angular", 2, last_token=last_token)
    _, angle = reference_cosines(model, batches, 2, last=last_token)
    assert sel.unit == "block" and len(sel.scores) == 4  # starts 0..3 of 5 layers, blocks of 2
    assert sel.scores == pytest.approx(angle.tolist(), abs=1e-9)
    start = int(torch.argmin(angle))
    assert sel.selected == [start, start + 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_streamline_matches_reference(family: str) -> None:
    model = tiny_model(family, num_layers=5)
    batches = random_batches(pad=True)
    sel = select_layers(model, batches, "streamline", 3)
    cos, _ = reference_cosines(model, batches, 3)
    assert sel.scores == pytest.approx(cos.tolist(), abs=1e-9)
    start = int(torch.argmax(cos))
    assert sel.selected == [start, start + 1, start + 2]
    assert sel.removes == "highest"


def test_last_block_compares_final_norm_input_not_output() -> None:
    """The last boundary is the final norm's input; HF's last hidden state (after the norm) would differ."""
    model = tiny_model("llama", num_layers=4)
    # A norm with unit weight only rescales each token, which no cosine sees; trained norms are not flat.
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.linspace(0.2, 3.0, 32))
    batches = random_batches(pad=True)
    sel = select_layers(model, batches, "block-influence", 1)
    with torch.no_grad():
        after_norm = [model(**b, output_hidden_states=True).hidden_states for b in batches]
    cos_after = torch.cat(
        [
            F.cosine_similarity(h[3].double(), h[4].double(), dim=-1)[b["attention_mask"].bool()]
            for h, b in zip(after_norm, batches, strict=True)
        ]
    ).mean()
    cos_ref, _ = reference_cosines(model, batches, 1)
    assert sel.scores[3] == pytest.approx(1 - float(cos_ref[3]), abs=1e-9)
    assert abs(sel.scores[3] - (1 - float(cos_after))) > 1e-3


@pytest.mark.parametrize("family", ["llama", "olmo2"])
def test_ppl_matches_reference_removal(family: str) -> None:
    model = tiny_model(family, num_layers=4)
    batches = random_batches(pad=True)
    sel = select_layers(model, batches, "ppl", 2)
    expected = [reference_ppl(model, batches, [l]) for l in range(4)]
    assert sel.scores == pytest.approx(expected, rel=1e-5)
    assert sel.details["dense_perplexity"] == pytest.approx(reference_ppl(model, batches, []), rel=1e-5)
    assert sel.selected == sorted(sorted(range(4), key=lambda i: expected[i])[:2])


def test_sleb_is_greedy_against_reference() -> None:
    model = tiny_model("qwen3", num_layers=5)
    batches = random_batches(pad=True)
    sel = select_layers(model, batches, "sleb", 3)
    removed: list[int] = []
    for r in range(3):
        row = {l: reference_ppl(model, batches, [*removed, l]) for l in range(5) if l not in removed}
        got = sel.details["rounds"][r]
        for l, value in row.items():
            assert got[l] == pytest.approx(value, rel=1e-5)
        assert all(got[l] is None for l in removed)
        removed.append(min(row, key=lambda l: (row[l], l)))
    assert sel.details["removal_order"] == removed
    assert sel.selected == sorted(removed)
    assert sel.scores == pytest.approx(sel.details["rounds"][0])


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_taylor_matches_reference(family: str) -> None:
    model = tiny_model(family, num_layers=6)
    batches = random_batches(pad=True)
    sel = select_layers(model, batches, "taylor", 2, keep_first=1, keep_last=1)
    ref = copy.deepcopy(model)
    ref.zero_grad()
    n_total = sum(int((labels_of(b)[:, 1:] != -100).sum()) for b in batches)
    for batch in batches:
        labels = labels_of(batch)
        n = int((labels[:, 1:] != -100).sum())
        (ref(**batch, labels=labels, use_cache=False).loss * n / n_total).backward()
    layers = get_adapter(ref).layers(ref)
    expected = [
        math.fsum(float((p.detach().double() * p.grad.double()).abs().sum()) for p in layer.parameters())  # type: ignore[union-attr]
        for layer in layers
    ]
    assert sel.scores == pytest.approx(expected, rel=1e-4)
    order = [l for l in sorted(range(6), key=lambda i: expected[i]) if 1 <= l <= 4]
    assert sel.selected == sorted(order[:2])
    assert sel.details["candidates"] == [1, 2, 3, 4]


def test_taylor_plus_default_keeps_scale_with_depth() -> None:
    model = tiny_model("llama", num_layers=6)
    sel = select_layers(model, random_batches(), "taylor", 1)
    # ceil(6 * 4/32) = 1 first and ceil(6 * 2/32) = 1 last layer kept, as 4 and 2 of LLaMA-7B's 32
    assert (sel.details["keep_first"], sel.details["keep_last"]) == (1, 1)
    assert sel.selected[0] not in (0, 5)


@pytest.mark.parametrize("normalize", ["stream", "block"])
def test_recoverable_matches_lstsq_reference(normalize: str) -> None:
    model = tiny_model("llama", num_layers=5)
    batches = random_batches(n_batches=8, batch_size=4, seq_len=16, pad=True)  # ~400 rows > d = 32
    sel = select_layers(model, batches, "recoverable", 2, normalize=normalize)
    states = [reference_states(model, b) for b in batches]
    masks = [b["attention_mask"].bool() for b in batches]
    expected = []
    for l in range(4):
        X = torch.cat([s[l][m] for s, m in zip(states, masks, strict=True)]).double()
        Y = torch.cat([s[l + 2][m] for s, m in zip(states, masks, strict=True)]).double()
        W = torch.linalg.lstsq(X, Y, driver="gelsd").solution
        err = float(((X @ W - Y) ** 2).sum())
        expected.append(
            err / float((Y**2).sum()) if normalize == "stream" else err / float(((Y - X) ** 2).sum())
        )
    assert sel.scores == pytest.approx(expected, rel=1e-6, abs=1e-12)
    start = min(range(4), key=lambda i: expected[i])
    assert sel.selected == [start, start + 1]


def test_recoverable_groups_candidates_under_a_memory_budget() -> None:
    model = tiny_model("llama", num_layers=5)
    batches = random_batches(pad=True)
    one = select_layers(model, batches, "recoverable", 1)
    # 16 d^2 bytes per candidate at d = 32; a budget of two candidates needs ceil(5 / 2) = 3 passes
    split = select_layers(model, batches, "recoverable", 1, max_stats_bytes=2 * 16 * 32 * 32)
    assert one.details["passes"] == 1 and split.details["passes"] == 3
    assert split.scores == pytest.approx(one.scores, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# a planted redundant layer is found by every strategy
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted_models() -> dict[int, tuple[nn.Module, list[Any]]]:
    out = {}
    for n, layers in ((1, [3]), (2, [3, 4])):
        # initializer_range=0.2 (twice the factories' default) makes every unplanted layer matter clearly,
        # so the perplexity rules' margins stand well above the sampling noise of 16 x 24 tokens.
        model = planted(tiny_model("llama", num_layers=6, seed=1, initializer_range=0.2), layers)
        out[n] = (model, self_sampled_batches(model))
    return out


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
@pytest.mark.parametrize("n", [1, 2])
def test_planted_redundant_layers_found_by_every_strategy(
    strategy: str, n: int, planted_models: dict[int, tuple[nn.Module, list[Any]]]
) -> None:
    model, batches = planted_models[n]
    sel = select_layers(model, batches, strategy, n)
    assert sel.selected == [3, 4][:n]


# ---------------------------------------------------------------------------------------------------------
# iterative rules, invariants, the model left unmodified
# ---------------------------------------------------------------------------------------------------------
ITERATIVE = ("sleb", "recoverable-greedy")


@pytest.mark.parametrize("strategy", ITERATIVE)
@pytest.mark.parametrize("num_drop", [2, 5])
def test_iterative_rules_never_remove_a_layer_twice(strategy: str, num_drop: int) -> None:
    model = tiny_model("llama", num_layers=6)
    sel = select_layers(model, random_batches(pad=True), strategy, num_drop)
    order = sel.details["removal_order"]
    assert len(order) == len(set(order)) == num_drop
    assert sel.selected == sorted(order)
    for r, row in enumerate(sel.details["rounds"]):
        assert [l for l, v in enumerate(row) if v is None] == sorted(order[:r])


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_selection_leaves_the_model_unmodified(strategy: str) -> None:
    model = tiny_model("qwen2", num_layers=4)
    model.train()
    flags = [p.requires_grad for p in model.parameters()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = random_batches(pad=True)
    sel = select_layers(model, batches, strategy, 2)
    assert len(sel.selected) == 2 and sel.selected == sorted(set(sel.selected))
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


# ---------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------
def test_unknown_strategy() -> None:
    with pytest.raises(
        GhostsolveError, match=r"unknown selection strategy 'shortgpt'; choose one of block-influence"
    ):
        select_layers(tiny_model("llama"), random_batches(), "shortgpt", 1)


@pytest.mark.parametrize("num_drop", [0, 4, -1, 1.5, True, "2"])
def test_bad_num_drop(num_drop: Any) -> None:
    with pytest.raises(GhostsolveError, match=r"num_drop must be an int with 1 <= num_drop < 4 .*got"):
        select_layers(tiny_model("llama", num_layers=4), random_batches(), "angular", num_drop)


def test_unknown_option() -> None:
    with pytest.raises(
        GhostsolveError, match=r"'block-influence' does not accept option\(s\) \['last_token'\]"
    ):
        select_layers(tiny_model("llama"), random_batches(), "block-influence", 1, last_token=True)


def test_empty_and_malformed_batches() -> None:
    model = tiny_model("llama")
    with pytest.raises(GhostsolveError, match="no calibration batches"):
        select_layers(model, [], "angular", 1)
    with pytest.raises(GhostsolveError, match=r"input_ids of a calibration batch is \(12,\); it must be"):
        select_layers(model, [torch.arange(12)], "angular", 1)
    with pytest.raises(GhostsolveError, match="must be a dict with 'input_ids'"):
        select_layers(model, [[1, 2, 3]], "angular", 1)  # type: ignore[list-item]
    bad = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 4)}
    with pytest.raises(
        GhostsolveError, match=r"attention_mask is \(2, 4\) but input_ids is \(2, 5\)"
    ):
        select_layers(model, [bad], "angular", 1)


def test_fully_masked_batches() -> None:
    batch = {"input_ids": torch.ones(2, 5, dtype=torch.long), "attention_mask": torch.zeros(2, 5)}
    with pytest.raises(GhostsolveError, match="contain no unmasked tokens"):
        select_layers(tiny_model("llama"), [batch], "block-influence", 1)
    with pytest.raises(GhostsolveError, match="no token was predicted"):
        select_layers(tiny_model("llama"), [batch], "ppl", 1)


def test_taylor_heuristic_leaving_too_few_candidates() -> None:
    with pytest.raises(
        GhostsolveError,
        match=r"keeps the first 2 and last 1 of 4 layers .* leaving 1 candidates for num_drop=2",
    ):
        select_layers(
            tiny_model("llama", num_layers=4), random_batches(), "taylor", 2, keep_first=2, keep_last=1
        )
    with pytest.raises(GhostsolveError, match=r"keep_first and keep_last must be >= 0, got -1 and 0"):
        select_layers(
            tiny_model("llama", num_layers=4), random_batches(), "taylor", 1, keep_first=-1, keep_last=0
        )


def test_bad_recoverable_options() -> None:
    model = tiny_model("llama")
    with pytest.raises(GhostsolveError, match=r"normalize must be 'stream' .* got 'rows'"):
        select_layers(model, random_batches(), "recoverable", 1, normalize="rows")
    with pytest.raises(GhostsolveError, match=r"top_k must be a positive int, got 0"):
        select_layers(model, random_batches(), "recoverable-ppl", 1, top_k=0)


def test_unknown_model_family() -> None:
    model = tiny_model("llama")
    model.config.model_type = "gpt_neox"
    with pytest.raises(GhostsolveError, match="no adapter for model_type 'gpt_neox'"):
        select_layers(model, random_batches(), "angular", 1)


# ---------------------------------------------------------------------------------------------------------
# report, table, plot, the CLI's job
# ---------------------------------------------------------------------------------------------------------
def test_report_table_and_plot(tmp_path: Any) -> None:
    model = tiny_model("llama", num_layers=4)
    report, plot = tmp_path / "sel.json", tmp_path / "sel.png"
    sel = run_select_command(model, random_batches(), "angular", 2, report_path=report, plot_path=plot)
    data = json.loads(report.read_text())
    assert {k: data[k] for k in ("strategy", "num_drop", "selected")} == {
        "strategy": "angular",
        "num_drop": 2,
        "selected": sel.selected,
    }
    assert data["scores"] == pytest.approx(sel.scores) and data["unit"] == "block"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = format_selection(sel)
    start = sel.selected[0]
    assert f"{start}-{start + 1}" in table and table.count("*") == 1
    assert f"remove layers (0-based): {sel.selected}" in table


def test_report_writes_non_finite_scores_as_null(tmp_path: Any) -> None:
    sel = Selection("recoverable-ppl", 1, [math.nan, 2.0], [1], "block", "ppl", "lowest", {"x": math.inf})
    data = json.loads(write_selection_report(sel, tmp_path / "r.json").read_text())
    assert data["scores"] == [None, 2.0] and data["details"] == {"x": None}
    plot_selection(sel, tmp_path / "r.png")
    assert "-" in format_selection(sel).splitlines()[2]


def test_report_to_missing_folder_fails_before_the_pass(tmp_path: Any) -> None:
    with pytest.raises(GhostsolveError, match=r"cannot write the report to .* does not exist"):
        run_select_command(tiny_model("llama"), [], "angular", 1, report_path=tmp_path / "no" / "r.json")


def test_recoverable_ppl_matches_recover_then_reference_ppl() -> None:
    from ghostsolve.pipeline.recover import recover

    model = tiny_model("llama", num_layers=5)
    batches = random_batches(n_batches=6, batch_size=4, seq_len=16, pad=True)
    sel = select_layers(model, batches, "recoverable-ppl", 2, top_k=2)
    screen = select_layers(model, batches, "recoverable", 2)
    shortlist = sorted(range(4), key=lambda i: screen.scores[i])[:2]
    assert sel.details["shortlist"] == shortlist
    assert sel.details["relative_residuals"] == pytest.approx(screen.scores)
    expected = {}
    for start in shortlist:
        recovered = recover(model, [start, start + 1], batches, method="ghost", progress=False).model
        expected[start] = reference_ppl(recovered, batches, [])
    for start in range(4):
        if start in expected:
            assert sel.scores[start] == pytest.approx(expected[start], rel=1e-5)
        else:
            assert math.isnan(sel.scores[start])
    best = min(expected, key=lambda s: (expected[s], s))
    assert sel.selected == [best, best + 1]


def test_options_from_args_passes_only_what_a_strategy_accepts() -> None:
    from ghostsolve.pipeline.select.report import options_from_args, strategy_help

    assert options_from_args("angular", last_token=True, skip_first_token=False, top_k=None) == {
        "last_token": True
    }
    # --skip-first-token is shared with recovery: ignored by rules without it, passed to those with it
    assert options_from_args("ppl", last_token=False, skip_first_token=True, top_k=None) == {}
    assert options_from_args("recoverable-ppl", skip_first_token=True, top_k=5) == {
        "skip_first_token": True,
        "top_k": 5,
    }
    with pytest.raises(GhostsolveError, match=r"--top-k does not apply to strategy 'angular'"):
        options_from_args("angular", top_k=2)
    with pytest.raises(GhostsolveError, match="unknown selection strategy 'bi'"):
        options_from_args("bi")
    assert all(name in strategy_help() for name in STRATEGIES)


def test_recoverable_greedy_is_greedy_on_ghost_recovered_perplexity() -> None:
    from ghostsolve.pipeline.recover import recover

    model = tiny_model("llama", num_layers=4)
    batches = random_batches(n_batches=4, batch_size=4, seq_len=16, pad=True)
    sel = select_layers(model, batches, "recoverable-greedy", 2)
    removed: list[int] = []
    for r in range(2):
        row = {}
        for l in range(4):
            if l not in removed:
                recovered = recover(model, sorted([*removed, l]), batches, method="ghost", progress=False)
                row[l] = reference_ppl(recovered.model, batches, [])
        got = sel.details["rounds"][r]
        for l, value in row.items():
            assert got[l] == pytest.approx(value, rel=1e-5)
        removed.append(min(row, key=lambda l: (row[l], l)))
    assert sel.details["removal_order"] == removed
    assert sel.selected == sorted(removed)
