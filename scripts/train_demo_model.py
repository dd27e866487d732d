"""Train ghostsolve's demo language models on the complete works of Shakespeare.

Three presets share one recipe (own byte-level BPE tokenizer, AdamW, warmup + cosine schedule,
random windows with BOS at position 0, last 5% of the text held out):

* ``--family llama`` (default): the demo model shipped as package data in ``ghostsolve/demo_model``
  (12 decoder layers, hidden size 128, vocabulary 4096, tied embeddings, 256 positions).
* ``--family qwen3``: a tiny Qwen3 model (q/k norm, grouped-query attention) in ``tests/models/qwen3-tiny``.
* ``--family olmo2``: a tiny OLMo-2 model (norms after each sublayer, untied head) in
  ``tests/models/olmo2-tiny``.

The run is reproducible: everything random derives from ``--seed``, the tokenizer trainer runs on one
thread, and torch runs on ``--threads`` threads (1 by default; the same thread count on the same
machine gives bit-identical weights).

Usage::

    python scripts/train_demo_model.py                      # the demo model
    python scripts/train_demo_model.py --family qwen3
    python scripts/train_demo_model.py --family olmo2
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# The tokenizers trainer is multi-threaded through rayon; one thread keeps merges reproducible and keeps
# this script from taking cores from everyone else on a shared machine.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

LOG = logging.getLogger("train_demo_model")
REPO = Path(__file__).resolve().parents[1]
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
HELD_OUT_FRACTION = 0.05


@dataclass(frozen=True)
class Preset:
    """Architecture and schedule of one family's model."""

    out_dir: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    max_positions: int
    tie_embeddings: bool
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup: int


PRESETS: dict[str, Preset] = {
    "llama": Preset(
        out_dir="ghostsolve/demo_model",
        vocab_size=4096,
        hidden_size=128,
        intermediate_size=384,
        num_layers=12,
        num_heads=4,
        num_kv_heads=4,
        max_positions=256,
        tie_embeddings=True,
        steps=2000,
        batch_size=8,
        seq_len=256,
        lr=3e-3,
        warmup=100,
    ),
    "qwen3": Preset(
        out_dir="tests/models/qwen3-tiny",
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=192,
        num_layers=8,
        num_heads=4,
        num_kv_heads=2,
        max_positions=256,
        tie_embeddings=True,
        steps=600,
        batch_size=8,
        seq_len=256,
        lr=3e-3,
        warmup=50,
    ),
    "olmo2": Preset(
        out_dir="tests/models/olmo2-tiny",
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=192,
        num_layers=8,
        num_heads=4,
        num_kv_heads=4,
        max_positions=256,
        tie_embeddings=False,
        steps=600,
        batch_size=8,
        seq_len=256,
        lr=3e-3,
        warmup=50,
    ),
}

SAMPLE_PROMPTS = ["", "ROMEO.\n", "To be, or not to be", "KING HENRY.\nNow, my lords,"]


def default_corpus() -> Path:
    env = os.environ.get("GHOSTSOLVE_SHARED_DATA")
    root = Path(env) if env else REPO.parent / "shared" / "data"
    return root / "corpora" / "shakespeare-complete.txt"


def split_text(text: str) -> tuple[str, str]:
    """Training text and the held-out last 5%, cut at a line boundary so no line is split."""
    cut = int(len(text) * (1.0 - HELD_OUT_FRACTION))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return text[:cut], text[cut:]


def train_tokenizer(train_text: str, vocab_size: int) -> Tokenizer:
    """Byte-level BPE with BOS/EOS/PAD specials; encoding prepends BOS like Llama tokenizers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    # Paragraph-sized chunks: the trainer's input order does not change the merges, and this keeps
    # memory small.
    chunks = train_text.split("\n\n")
    tok.train_from_iterator(chunks, trainer=trainer, length=len(chunks))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def build_model(family: str, preset: Preset, tok: Tokenizer) -> torch.nn.Module:
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Olmo2Config,
        Olmo2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    common: dict[str, Any] = dict(
        vocab_size=tok.get_vocab_size(),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_kv_heads,
        max_position_embeddings=preset.max_positions,
        rms_norm_eps=1e-5,
        tie_word_embeddings=preset.tie_embeddings,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
        initializer_range=0.02,
    )
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common))
    if family == "qwen3":
        cfg = Qwen3Config(**common, head_dim=preset.hidden_size // preset.num_heads)
        return Qwen3ForCausalLM(cfg)
    if family == "olmo2":
        return Olmo2ForCausalLM(Olmo2Config(**common))
    raise ValueError(f"unknown family {family!r}; choose one of {sorted(PRESETS)}")


def lr_at(step: int, preset: Preset) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < preset.warmup:
        return preset.lr * (step + 1) / preset.warmup
    progress = (step - preset.warmup) / max(1, preset.steps - preset.warmup)
    return preset.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


@torch.no_grad()
def held_out_perplexity(model: torch.nn.Module, ids: torch.Tensor, bos_id: int, seq_len: int) -> float:
    """Non-overlapping windows of ``seq_len`` tokens, each BOS + ``seq_len - 1`` text tokens."""
    model.eval()
    body = seq_len - 1
    n_windows = ids.numel() // body
    total_nll, total_tokens = 0.0, 0
    for start in range(0, n_windows, 16):
        rows = []
        for w in range(start, min(n_windows, start + 16)):
            rows.append(torch.cat([torch.tensor([bos_id]), ids[w * body : (w + 1) * body]]))
        batch = torch.stack(rows)
        logits = model(input_ids=batch).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
    model.train()
    return math.exp(total_nll / total_tokens)


def unigram_perplexity(train_ids: torch.Tensor, eval_ids: torch.Tensor, vocab: int) -> float:
    """Perplexity of the add-one unigram model fitted on the training tokens (the no-context baseline)."""
    counts = torch.bincount(train_ids, minlength=vocab).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return math.exp(-float(logp[eval_ids].mean()))


def generate_samples(model: Any, tok: Tokenizer, max_new_tokens: int) -> dict[str, str]:
    model.eval()
    out = {}
    for prompt in SAMPLE_PROMPTS:
        ids = torch.tensor([tok.encode(prompt).ids])
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
        out[prompt] = tok.decode(gen[0].tolist(), skip_special_tokens=True)
    model.train()
    return out


def save(model: Any, tok: Tokenizer, out_dir: Path, figures: dict[str, Any]) -> None:
    """Write everything to a temporary directory beside ``out_dir``, then swap it in."""
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; this folder ships in the package
    model.save_pretrained(tmp, safe_serialization=True)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=model.config.max_position_embeddings,
    )
    hf_tok.save_pretrained(tmp)
    GenerationConfig(
        bos_token_id=model.config.bos_token_id,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
        do_sample=False,
    ).save_pretrained(tmp)
    (tmp / "training_figures.json").write_text(json.dumps(figures, indent=2) + "\n")
    for path in tmp.iterdir():
        path.chmod(0o644)
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}-old")
        if old.exists():
            shutil.rmtree(old)
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)
    # Package data keeps an __init__-free folder; nothing else to write.


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", choices=sorted(PRESETS), default="llama", help="which model to train")
    parser.add_argument("--corpus", type=Path, default=default_corpus(), help="Shakespeare text file")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default: the preset's)")
    parser.add_argument("--seed", type=int, default=1234, help="seed of everything random")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--steps", type=int, default=None, help="override the preset's optimizer steps")
    parser.add_argument("--eval-every", type=int, default=250, help="held-out check every N steps")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for matmuls (CPU AMX)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    preset = PRESETS[args.family]
    if args.steps is not None:
        preset = Preset(**{**asdict(preset), "steps": args.steps})
    out_dir = args.out if args.out is not None else REPO / preset.out_dir
    if not args.corpus.is_file():
        parser.error(f"corpus {args.corpus} not found; pass --corpus or set GHOSTSOLVE_SHARED_DATA")

    t0 = time.perf_counter()
    text = args.corpus.read_text(encoding="utf-8")
    train_text, eval_text = split_text(text)
    tok = train_tokenizer(train_text, preset.vocab_size)
    bos_id = tok.token_to_id(BOS)
    train_ids = torch.tensor(tok.encode(train_text, add_special_tokens=False).ids, dtype=torch.long)
    eval_ids = torch.tensor(tok.encode(eval_text, add_special_tokens=False).ids, dtype=torch.long)
    t_tok = time.perf_counter() - t0
    LOG.info(
        "tokenizer: vocab %d, %d train / %d held-out tokens (%.1fs)",
        tok.get_vocab_size(),
        train_ids.numel(),
        eval_ids.numel(),
        t_tok,
    )

    model = build_model(args.family, preset, tok)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    LOG.info("%s: %d parameters (%.2f MB fp32)", args.family, n_params, n_params * 4 / 2**20)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=preset.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)
    body = preset.seq_len - 1
    eval_slice = eval_ids[: 64 * (preset.max_positions - 1)]
    curve: list[dict[str, float]] = []
    t_train = time.perf_counter()
    running = None
    for step in range(preset.steps):
        starts = torch.randint(0, train_ids.numel() - body, (preset.batch_size,), generator=gen)
        batch = torch.stack(
            [torch.cat([torch.tensor([bos_id]), train_ids[s : s + body]]) for s in starts.tolist()]
        )
        for group in opt.param_groups:
            group["lr"] = lr_at(step, preset)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(input_ids=batch).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        if (step + 1) % 50 == 0 or step == 0:
            elapsed = time.perf_counter() - t_train
            LOG.info(
                "step %d/%d loss %.3f (smoothed %.3f) lr %.2e  %.0f tok/s  %.0fs",
                step + 1,
                preset.steps,
                value,
                running,
                lr_at(step, preset),
                (step + 1) * preset.batch_size * preset.seq_len / elapsed,
                elapsed,
            )
        if (step + 1) % args.eval_every == 0 and step + 1 < preset.steps:
            ppl = held_out_perplexity(model, eval_slice, bos_id, preset.max_positions)
            curve.append({"step": step + 1, "train_loss_smoothed": running, "held_out_ppl_slice": ppl})
            LOG.info("step %d: held-out perplexity (slice) %.2f", step + 1, ppl)
    train_seconds = time.perf_counter() - t_train

    model.eval()
    t_eval = time.perf_counter()
    ppl = held_out_perplexity(model, eval_ids, bos_id, preset.max_positions)
    unigram = unigram_perplexity(train_ids, eval_ids, tok.get_vocab_size())
    samples = generate_samples(model, tok, 48)
    LOG.info(
        "held-out perplexity %.2f (unigram baseline %.2f, %.0fs)", ppl, unigram, time.perf_counter() - t_eval
    )
    for prompt, sample in samples.items():
        LOG.info("sample %r -> %r", prompt, sample)

    figures = {
        "family": args.family,
        "command": "python scripts/train_demo_model.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "seed": args.seed,
        "threads": args.threads,
        "bf16_autocast": args.bf16,
        "preset": asdict(preset),
        "parameters": n_params,
        "train_tokens_in_corpus": int(train_ids.numel()),
        "held_out_tokens": int(eval_ids.numel()),
        "tokens_seen": preset.steps * preset.batch_size * preset.seq_len,
        "epochs_seen": preset.steps * preset.batch_size * preset.seq_len / train_ids.numel(),
        "tokenizer_seconds": round(t_tok, 1),
        "train_seconds": round(train_seconds, 1),
        "final_train_loss_smoothed": running,
        "held_out_perplexity": ppl,
        "held_out_eval": f"non-overlapping windows of {preset.max_positions} tokens (BOS + "
        f"{preset.max_positions - 1} text tokens), last {HELD_OUT_FRACTION:.0%} of the corpus",
        "unigram_perplexity": unigram,
        "curve": curve,
        "samples_greedy": samples,
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
    }
    save(model, tok, out_dir, figures)
    LOG.info("wrote %s (%.1f min total)", out_dir, (time.perf_counter() - t0) / 60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
