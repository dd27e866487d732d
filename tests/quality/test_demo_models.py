"""The trained models the project ships: the demo model (package data), tiny Qwen3 and OLMo-2 models."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

import ghostsolve
from tests.conftest import REPO, require_shared

transformers = pytest.importorskip("transformers")

DEMO_DIR = Path(ghostsolve.__file__).resolve().parent / "demo_model"
MODELS = {
    # name: (directory, model_type, minimum decoder layers, maximum safetensors bytes)
    "demo": (DEMO_DIR, "llama", 12, 16 * 2**20),
    "qwen3-tiny": (REPO / "tests" / "models" / "qwen3-tiny", "qwen3", 8, 4 * 2**20),
    "olmo2-tiny": (REPO / "tests" / "models" / "olmo2-tiny", "olmo2", 8, 4 * 2**20),
}
CORPUS = "corpora/shakespeare-complete.txt"
ROUND_TRIP = [
    "ROMEO.\nBut soft! What light through yonder window breaks?",
    "  leading spaces, tabs\tand a trailing newline\n",
    "Naïve café — “quotes”, 日本語 and an emoji 🙂",
    "",
]


@pytest.fixture(scope="module", params=sorted(MODELS))
def shipped(request: pytest.FixtureRequest):
    directory = MODELS[request.param][0]
    assert directory.is_dir(), f"{directory} is missing; train it with scripts/train_demo_model.py"
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    tok = transformers.AutoTokenizer.from_pretrained(directory)
    model.eval()
    return request.param, directory, model, tok


def test_architecture_and_size(shipped) -> None:
    name, directory, model, _ = shipped
    _, model_type, min_layers, max_bytes = MODELS[name]
    assert model.config.model_type == model_type
    assert model.config.num_hidden_layers >= min_layers
    assert len(model.model.layers) == model.config.num_hidden_layers
    assert (directory / "model.safetensors").stat().st_size <= max_bytes
    assert model.dtype == torch.float32
    if model_type == "qwen3":
        assert model.config.num_key_value_heads < model.config.num_attention_heads  # grouped-query
        assert hasattr(model.model.layers[0].self_attn, "q_norm")


def test_training_figures_recorded(shipped) -> None:
    _, directory, _, _ = shipped
    figures = json.loads((directory / "training_figures.json").read_text())
    for key in ("seed", "tokens_seen", "train_seconds", "held_out_perplexity", "unigram_perplexity"):
        assert key in figures
    assert figures["held_out_perplexity"] < figures["unigram_perplexity"]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trips_text(shipped, text: str) -> None:
    _, _, _, tok = shipped
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_greedy_generation_is_not_degenerate(shipped) -> None:
    _, _, model, tok = shipped
    ids = tok("KING HENRY.\nNow, my lords,", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=30, do_sample=False)
    new = out[0, ids.shape[1] :].tolist()
    assert len(new) >= 20  # did not stop at once
    assert len(set(new)) >= 8, tok.decode(new)  # not one token, nor a two-token loop
    assert Counter(new).most_common(1)[0][1] <= len(new) // 2, tok.decode(new)
    text = tok.decode(new, skip_special_tokens=True)
    assert sum(c.isalpha() for c in text) >= 20, text


def test_held_out_perplexity_is_far_below_unigram(shipped) -> None:
    name, _, model, tok = shipped
    text = require_shared(CORPUS).read_text(encoding="utf-8")
    # The training script holds out the last 5% of characters; this slice lies inside it.
    held_out = text[-len(text) // 25 :][:20_000]
    train_slice = text[: len(text) // 10]
    seq = model.config.max_position_embeddings
    ids = torch.tensor(tok(held_out, add_special_tokens=False)["input_ids"])
    body = seq - 1
    windows = torch.stack(
        [
            torch.cat([torch.tensor([tok.bos_token_id]), ids[i : i + body]])
            for i in range(0, len(ids) - body, body)
        ]
    )
    nll, count = 0.0, 0
    with torch.no_grad():
        for chunk in windows.split(16):
            logits = model(chunk).logits
            nll += float(
                torch.nn.functional.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"
                )
            )
            count += chunk[:, 1:].numel()
    ppl = math.exp(nll / count)

    # No-context baseline: add-one unigram frequencies from a training slice, scored on the same tokens.
    train_ids = torch.tensor(tok(train_slice, add_special_tokens=False)["input_ids"])
    counts = torch.bincount(train_ids, minlength=len(tok)).double() + 1.0
    logp = torch.log(counts / counts.sum())
    scored = windows[:, 1:].reshape(-1)
    unigram = math.exp(-float(logp[scored].mean()))
    assert ppl < 0.4 * unigram, f"{name}: held-out perplexity {ppl:.1f} vs unigram {unigram:.1f}"
