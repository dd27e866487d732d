"""Which layers each selection strategy removes, and the held-out perplexity after ghost recovery.

For each model and each ``n`` in ``--num-drop``, every strategy of
:data:`ghostsolve.pipeline.select.STRATEGIES` (plus a few option variants) picks ``n`` layers on the
calibration set; the picked layers are removed and recovered with the ghost operator
(``recover(..., method="ghost")``, fitted on the same calibration set), and the recovered model is
evaluated on held-out text. For reference, the same is done for every contiguous block (the best of them
is the "oracle" among contiguous blocks), and plain pruning (``identity``) is evaluated for each removal
set too.

Data:

* ``demo`` -- the bundled demo model (``ghostsolve/demo_model``), calibrated on 32 random windows of 256
  tokens from the training part of ``../shared/data/corpora/shakespeare-complete.txt`` and evaluated on
  the held-out last 5% of it (the split of ``scripts/train_demo_model.py``), non-overlapping windows.
* ``stories260K`` -- ``../shared/data/models/stories260K`` converted to Hugging Face format; its training
  text (TinyStories) is not available offline, so calibration (32 x 256) and evaluation (64 x 256) are
  sequences sampled from the dense model itself at temperature 1, from disjoint seed streams.

Usage::

    python scripts/measure_selection.py --models demo stories260K --num-drop 2 3 \\
        --json selection_measure.json --markdown selection_table.md
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ghostsolve.pipeline.data import (
    batches_from_windows,
    read_texts,
    sample_windows,
    select_windows,
    self_sampling_seed,
    text_windows,
)
from ghostsolve.pipeline.evaluate import perplexity
from ghostsolve.pipeline.recover import recover
from ghostsolve.pipeline.select import STRATEGIES, select_layers

LOG = logging.getLogger("measure_selection")
REPO = Path(__file__).resolve().parents[1]
HELD_OUT_FRACTION = 0.05  # as scripts/train_demo_model.py

# (label, strategy, options): every registered strategy with its defaults, plus option variants.
VARIANTS: list[tuple[str, str, dict[str, Any]]] = [(name, name, {}) for name in STRATEGIES] + [
    ("angular (last token)", "angular", {"last_token": True}),
    ("recoverable (normalize=block)", "recoverable", {"normalize": "block"}),
]


def shared_data() -> Path:
    import os

    env = os.environ.get("GHOSTSOLVE_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def split_text(text: str) -> tuple[str, str]:
    """The demo model's split: training text and the held-out last 5%, cut at a line boundary."""
    cut = int(len(text) * (1.0 - HELD_OUT_FRACTION))
    newline = text.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    return text[:cut], text[cut:]


def load_demo(args: argparse.Namespace) -> tuple[Any, torch.Tensor, torch.Tensor, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = REPO / "ghostsolve" / "demo_model"
    model = AutoModelForCausalLM.from_pretrained(path).float().eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    seq_len = int(model.config.max_position_embeddings)
    train, held = split_text(read_texts(shared_data() / "corpora" / "shakespeare-complete.txt"))
    calib = select_windows(text_windows(train, tokenizer, seq_len), args.num_calib, seed=args.seed)
    evalw = text_windows(held, tokenizer, seq_len, max_windows=args.max_eval)
    data = (
        f"calibration: {calib.shape[0]} random windows x {seq_len} tokens of the training 95% of "
        f"shakespeare-complete.txt (seed {args.seed}); evaluation: {evalw.shape[0]} non-overlapping "
        f"windows x {seq_len} of the held-out last 5%"
    )
    return model, calib, evalw, data


def load_stories(args: argparse.Namespace, workdir: Path) -> tuple[Any, torch.Tensor, torch.Tensor, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ghostsolve.pipeline.io.convert_llama2c import convert_llama2c

    source = shared_data() / "models" / "stories260K"
    out = convert_llama2c(source / "stories260K.bin", source / "tok512.bin", workdir / "stories260K-hf")
    model = AutoModelForCausalLM.from_pretrained(out).float().eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    seq_len = 256
    calib = sample_windows(
        model,
        tokenizer,
        args.num_calib,
        seq_len,
        seed=self_sampling_seed(args.seed, "calibration"),
        progress=False,
    )
    n_eval = args.max_eval or 64
    evalw = sample_windows(
        model, tokenizer, n_eval, seq_len, seed=self_sampling_seed(args.seed, "evaluation"), progress=False
    )
    data = (
        f"self-sampled from the dense model (temperature 1): calibration {calib.shape[0]} x {seq_len} "
        f"tokens, evaluation {evalw.shape[0]} x {seq_len} tokens, disjoint seed streams (seed {args.seed})"
    )
    return model, calib, evalw, data


class Evaluator:
    """Held-out perplexity of ghost-recovered and plainly pruned models, cached by removal set."""

    def __init__(self, model: Any, calib: torch.Tensor, evalw: torch.Tensor, batch_size: int) -> None:
        self.model = model
        self.batches = batches_from_windows(calib, batch_size)
        self.evalw = evalw
        self.batch_size = batch_size
        self.cache: dict[tuple[int, ...], dict[str, float]] = {}

    def ppl(self, model: Any) -> float:
        return perplexity(model, self.evalw, batch_size=self.batch_size, progress=False).perplexity

    def __call__(self, removed: list[int], *, plain: bool = True) -> dict[str, float]:
        """``{"ghost": ppl, "identity": ppl}``; ``plain=False`` skips plain pruning until it is asked for."""
        key = tuple(sorted(removed))
        scores = self.cache.setdefault(key, {})
        if "ghost" not in scores:
            ghost = recover(self.model, list(key), self.batches, method="ghost", progress=False)
            scores["ghost"] = self.ppl(ghost.model)
            LOG.info("removed %s: ghost %.3f", list(key), scores["ghost"])
        if plain and "identity" not in scores:
            pruned = recover(self.model, list(key), self.batches, method="identity", progress=False)
            scores["identity"] = self.ppl(pruned.model)
            LOG.info("removed %s: plain %.3f", list(key), scores["identity"])
        return dict(scores)


def measure_model(
    name: str, model: Any, calib: torch.Tensor, evalw: torch.Tensor, args: argparse.Namespace, data: str
) -> dict[str, Any]:
    evaluate = Evaluator(model, calib, evalw, args.batch_size)
    num_layers = int(model.config.num_hidden_layers)
    dense = evaluate.ppl(model)
    LOG.info("%s: %d layers, dense held-out perplexity %.3f", name, num_layers, dense)
    result: dict[str, Any] = {
        "model": name,
        "num_layers": num_layers,
        "dense_perplexity": dense,
        "data": data,
        "seed": args.seed,
        "by_n": {},
    }
    for n in args.num_drop:
        blocks = {
            start: evaluate(list(range(start, start + n)), plain=False) for start in range(num_layers - n + 1)
        }
        best = min(blocks, key=lambda s: blocks[s]["ghost"])
        blocks[best] = evaluate(list(range(best, best + n)))
        rows = []
        for label, strategy, options in VARIANTS:
            t0 = time.perf_counter()
            sel = select_layers(model, evaluate.batches, strategy, n, **options)
            seconds = time.perf_counter() - t0
            scores = evaluate(sel.selected)
            rows.append({"label": label, "selected": sel.selected, "select_seconds": seconds, **scores})
            LOG.info(
                "%s n=%d %s -> %s ghost %.3f (%.1fs)", name, n, label, sel.selected, scores["ghost"], seconds
            )
        result["by_n"][str(n)] = {
            "rows": rows,
            "blocks": {str(s): evaluate.cache[tuple(range(s, s + n))] for s in blocks},
            "best_block": list(range(best, best + n)),
            "best_block_ghost": blocks[best]["ghost"],
        }
        if args.json:  # after every n, so a long run that is stopped keeps what it measured
            args.json.write_text(json.dumps([*args.done, result], indent=2) + "\n")
    return result


def markdown(results: list[dict[str, Any]]) -> str:
    lines = []
    for res in results:
        lines.append(
            f"### {res['model']} ({res['num_layers']} layers, dense perplexity {res['dense_perplexity']:.3f})"
        )
        lines.append("")
        lines.append(f"Data: {res['data']}.")
        lines.append("")
        ns = list(res["by_n"])
        header = "| strategy | " + " | ".join(f"n={n}: layers | ghost ppl | plain ppl" for n in ns) + " |"
        lines.append(header)
        lines.append("|" + "---|" * (1 + 3 * len(ns)))
        labels = [r["label"] for r in res["by_n"][ns[0]]["rows"]]
        for i, label in enumerate(labels):
            cells = [label]
            for n in ns:
                row = res["by_n"][n]["rows"][i]
                cells += [str(row["selected"]), f"{row['ghost']:.3f}", f"{row['identity']:.3f}"]
            lines.append("| " + " | ".join(cells) + " |")
        cells = ["best contiguous block (oracle)"]
        for n in ns:
            b = res["by_n"][n]
            cells += [
                str(b["best_block"]),
                f"{b['best_block_ghost']:.3f}",
                f"{b['blocks'][str(b['best_block'][0])]['identity']:.3f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


NEW_RULES = ("recoverable", "recoverable-ppl", "recoverable-greedy")


def is_published(label: str) -> bool:
    return not label.startswith("recoverable")


def summary(results: list[dict[str, Any]]) -> str:
    """Per model and n: each new rule against the best and the median published rule (ghost perplexity)."""
    lines = []
    for res in results:
        for n, b in res["by_n"].items():
            published = sorted((r for r in b["rows"] if is_published(r["label"])), key=lambda r: r["ghost"])
            best = published[0]
            median = (
                published[len(published) // 2]["ghost"]
                if len(published) % 2
                else (published[len(published) // 2 - 1]["ghost"] + published[len(published) // 2]["ghost"])
                / 2
            )
            for rule in NEW_RULES:
                row = next((r for r in b["rows"] if r["label"] == rule), None)
                if row is None:
                    continue
                lines.append(
                    f"{res['model']} seed {res.get('seed', 0)} n={n}: {rule} {row['selected']} "
                    f"{row['ghost']:.3f}; best published {best['label']} {best['selected']} "
                    f"{best['ghost']:.3f} ({(row['ghost'] / best['ghost'] - 1) * 100:+.1f}%); "
                    f"median published {median:.3f} ({(row['ghost'] / median - 1) * 100:+.1f}%)"
                )
    return "\n".join(lines)


def aggregate(results: list[dict[str, Any]]) -> str:
    """Mean held-out ghost perplexity per strategy over seeds, per model and n (markdown)."""
    by_model: dict[str, list[dict[str, Any]]] = {}
    for res in results:
        by_model.setdefault(res["model"], []).append(res)
    lines = []
    for model, runs in by_model.items():
        ns = list(runs[0]["by_n"])
        seeds = [r.get("seed", 0) for r in runs]
        lines.append(f"#### {model}: mean over seeds {seeds}")
        lines.append("")
        lines.append("| strategy | " + " | ".join(f"n={n}: mean ghost ppl | picks" for n in ns) + " |")
        lines.append("|" + "---|" * (1 + 2 * len(ns)))
        labels = [r["label"] for r in runs[0]["by_n"][ns[0]]["rows"]]
        for i, label in enumerate(labels):
            cells = [label]
            for n in ns:
                vals = [run["by_n"][n]["rows"][i]["ghost"] for run in runs]
                picks = sorted({str(run["by_n"][n]["rows"][i]["selected"]) for run in runs})
                cells += [f"{sum(vals) / len(vals):.3f}", " ".join(picks)]
            lines.append("| " + " | ".join(cells) + " |")
        cells = ["best contiguous block (oracle)"]
        for n in ns:
            vals = [run["by_n"][n]["best_block_ghost"] for run in runs]
            picks = sorted({str(run["by_n"][n]["best_block"]) for run in runs})
            cells += [f"{sum(vals) / len(vals):.3f}", " ".join(picks)]
        lines.append("| " + " | ".join(cells) + " |")
        dense = [run["dense_perplexity"] for run in runs]
        lines.append("")
        lines.append(f"Dense perplexity, mean over seeds: {sum(dense) / len(dense):.3f}.")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", nargs="+", default=["demo", "stories260K"], choices=["demo", "stories260K"]
    )
    parser.add_argument("--num-drop", nargs="+", type=int, default=[2, 3])
    parser.add_argument("--num-calib", type=int, default=32)
    parser.add_argument("--max-eval", type=int, default=None, help="cap on evaluation windows")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    parser.add_argument(
        "--render",
        nargs="+",
        type=Path,
        default=None,
        metavar="JSON",
        help="measure nothing: print the tables and summary of earlier --json outputs (several seeds)",
    )
    args = parser.parse_args()
    if args.render:
        merged: dict[tuple[str, int], dict[str, Any]] = {}
        for path in args.render:
            for res in json.loads(path.read_text()):
                key = (res["model"], res.get("seed", 0))
                if key in merged:  # runs split by --num-drop
                    merged[key]["by_n"].update(res["by_n"])
                else:
                    merged[key] = res
        loaded = list(merged.values())
        print(markdown(loaded))
        print(aggregate(loaded))
        print(summary(loaded))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            if name == "demo":
                model, calib, evalw, data = load_demo(args)
            else:
                model, calib, evalw, data = load_stories(args, Path(tmp))
            args.done = results
            res = measure_model(name, model, calib, evalw, args, data)
            results.append(res)
            if args.json:
                args.json.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    print(table)
    print(summary(results))


if __name__ == "__main__":
    main()
