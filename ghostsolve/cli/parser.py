"""The ``ghostsolve`` argument parser: every subcommand, its flags and their help.

Each subcommand's ``func`` is a thin command of :mod:`ghostsolve.cli.commands`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ghostsolve.cli import commands
from ghostsolve.cli.args import positive, rank_of, ridge_of
from ghostsolve.pipeline.data import DEFAULT_SELF_EVAL
from ghostsolve.workflows.demo import (
    DEFAULT_DEMO_OUT,
    DEMO_NUM_CALIB,
    DEMO_NUM_EVAL,
    DEMO_SEQ_LEN,
)

__all__ = ["build_parser", "version"]


def _add_runtime(
    parser: argparse.ArgumentParser, *, batch_size: int | None = 8, threads: int | None = None
) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--device",
        default=None,
        help="where to run: cpu, cuda, cuda:N, or auto (cuda when available, else cpu). Default: auto; "
        "under torchrun, the rank's own device (cuda:LOCAL_RANK with NCCL, cpu with gloo)",
    )
    group.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="model weight dtype; auto keeps the checkpoint's dtype. Statistics are fp64 regardless",
    )
    group.add_argument(
        "--batch-size",
        type=positive,
        default=batch_size,
        help="sequences per forward pass and per sampling batch (default: "
        + (
            f"{batch_size})"
            if batch_size is not None
            else "--num-calib, one batch; under torchrun, --num-calib divided by the number of processes)"
        ),
    )
    group.add_argument(
        "--seed", type=int, default=0, help="seed of window selection and self-sampling (default: 0)"
    )
    group.add_argument(
        "--threads",
        type=positive,
        default=threads,
        help="CPU threads for torch during this command (default: "
        + (
            "torch's own choice)"
            if threads is None
            else f"{threads}: the demo model's matrices are small, and one thread avoids the "
            "synchronisation cost that dominates them, above all on a busy machine)"
        ),
    )
    group.add_argument("--no-progress", action="store_true", help="hide progress bars")
    group.add_argument("-v", "--verbose", action="store_true", help="log progress details to stderr")
    group.add_argument(
        "--traceback", action="store_true", help="on error, show the full traceback instead of one line"
    )


def _add_loading(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model loading (passed to from_pretrained)")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="allow the model's own code from its directory or hub repository")  # fmt: skip
    group.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of MODEL")
    group.add_argument(
        "--device-map",
        default=None,
        help="accelerate device map (auto, balanced, sequential...): the model is spread over the visible "
        "devices and --device is not used for it",
    )
    group.add_argument(
        "--model-args",
        default=None,
        metavar="K=V,...",
        help="more from_pretrained keywords, lm-eval style: attn_implementation=sdpa,low_cpu_mem_usage=true",
    )


def _add_fitting(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("fitting (see docs/core.md)")
    group.add_argument(
        "--ridge",
        type=ridge_of,
        default=None,
        help="relative ridge of the least-squares fits: a number >= 0 (lambda = ridge * mean(diag(X^T X))), "
        "cv (5-fold cross-validation over whole calibration sequences) or gcv (default: cv; 0 for the "
        "unregularised optimum; with lowrank/symmetric at large d, cv refits every fold and grid ridge: "
        "prefer gcv there)",
    )
    group.add_argument(
        "--rank", type=rank_of, default=None, help="lowrank family: the rank, an integer or cv (default d/4)"
    )
    group.add_argument(
        "--solver",
        default="auto",
        choices=["auto", "cholesky", "qr", "svd", "eigh"],
        help="solver of the full, lowrank and symmetric fits (default: auto, a decision list: docs/core.md)",
    )
    group.add_argument(
        "--product-dtype",
        default=None,
        choices=["float32", "float64"],
        help="precision of the per-chunk statistics products; float32 is the fast mode, summed in float64 "
        "(default: float64)",
    )
    group.add_argument(
        "--compute-dtype",
        default=None,
        choices=["float32", "float64"],
        help="matmul dtype of the inserted operators, e.g. float32 for a bf16 model (default: the model's)",
    )


def _add_calibration(parser: argparse.ArgumentParser, *, required: bool) -> None:
    group = parser.add_argument_group("calibration data")
    source = group.add_mutually_exclusive_group(required=required)
    source.add_argument(
        "--calib-text",
        nargs="+",
        metavar="FILE",
        help="text file(s) for calibration, tokenized once and cut into windows of --seq-len tokens",
    )
    source.add_argument(
        "--calib",
        choices=["self"],
        help="'self': data-free calibration on sequences sampled from the dense model itself (seeded)",
    )
    group.add_argument(
        "--num-calib",
        type=positive,
        default=32,
        help="calibration sequences (windows drawn at random, seeded, from the text; default: 32)",
    )
    group.add_argument(
        "--skip-first-token",
        action="store_true",
        help="exclude each window's first token (BOS / attention sink) from the calibration statistics",
    )


def _add_evaluation(
    parser: argparse.ArgumentParser,
    *,
    num_eval_default: int | None,
    seq_len_default: int | None = None,
    self_source: str = "the dense model (a seed stream disjoint from calibration's)",
) -> None:
    group = parser.add_argument_group("evaluation data")
    group.add_argument(
        "--eval-text",
        nargs="+",
        metavar="FILE",
        help="text file(s) for perplexity: non-overlapping windows of --seq-len tokens, BOS first in each "
        "window where the tokenizer has one, exp of the mean NLL over all predicted tokens. Without it, "
        f"perplexity is measured on sequences sampled from {self_source}",
    )
    group.add_argument(
        "--num-eval",
        type=positive,
        default=num_eval_default,
        help="evaluation windows: the first N of the text, or N self-sampled sequences (default: "
        + (
            f"all windows of the text, {DEFAULT_SELF_EVAL} when self-sampled"
            if num_eval_default is None
            else str(num_eval_default)
        )
        + ")",
    )
    group.add_argument(
        "--seq-len",
        type=positive,
        default=seq_len_default,
        help="tokens per window for calibration and evaluation (default: "
        + (
            "min(2048, the model's maximum positions))"
            if seq_len_default is None
            else f"{seq_len_default}, a short context that keeps the demo fast; the model has 256)"
        ),
    )


def _add_output(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output")
    group.add_argument("--out", metavar="DIR", help="write the checkpoint here (atomically)")
    group.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    group.add_argument(
        "--report",
        metavar="FILE.json",
        help="write the JSON report: model, removed, seq_len, dense.perplexity; per method perplexity, "
        "loss_recovered, relative_residual, the ridge/rank used, fit_seconds, warnings; saved, timings, "
        "provenance",
    )


# ---------------------------------------------------------------------------------------------
# selection (issue 5): the `select` command and `prune --select S --num-drop N`. `prune` puts --drop
# and --select in one mutually exclusive group; `_resolve_drop` is the one place where a removal set
# is decided from the arguments.
# ---------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """An argument parser whose epilog can be built when help is shown.

    The strategy list lives in :mod:`ghostsolve.pipeline.select`, which imports torch; building it only for
    ``--help`` keeps ``ghostsolve --version`` and usage errors fast.
    """

    epilog_factory: Callable[[], str] | None = None

    def format_help(self) -> str:
        if self.epilog_factory is not None:
            self.epilog = self.epilog_factory()
        return super().format_help()


def _strategy_epilog() -> str:
    from ghostsolve.pipeline.select.report import strategy_help

    return strategy_help()


def _add_strategy_options(parser: argparse.ArgumentParser) -> None:
    """Options of individual strategies; each applies only to the strategies named in its help."""
    group = parser.add_argument_group("selection strategy options (each applies to the strategies named)")
    group.add_argument(
        "--last-token",
        action="store_true",
        default=None,
        help="angular: use only each sequence's last token, as Gromov et al. do",
    )
    group.add_argument(
        "--top-k", type=positive, default=None, help="recoverable-ppl: blocks re-ranked (default: 3)"
    )
    group.add_argument("--keep-first", type=int, default=None, help="taylor: never remove the first N layers")
    group.add_argument("--keep-last", type=int, default=None, help="taylor: never remove the last N layers")
    group.add_argument(
        "--normalize",
        choices=["stream", "block"],
        default=None,
        help="recoverable rules: divide the fit residual by the stream energy (default) or by the block's "
        "own change",
    )


def _add_selection_commands(subparsers: Any, prune_parser: argparse.ArgumentParser, drop_group: Any) -> None:
    """Add ``select`` to ``subparsers`` and ``--select`` (with ``--num-drop``) to ``prune``."""
    drop_group.add_argument(
        "--select",
        metavar="STRATEGY",
        help="choose the layers to remove with a selection strategy (see `ghostsolve select --help`); "
        "needs --num-drop",
    )
    prune_parser.add_argument(
        "--num-drop", type=positive, default=None, help="with --select: how many layers to remove"
    )
    _add_strategy_options(prune_parser)

    sel = subparsers.add_parser(
        "select",
        help="score the layers with a selection strategy and choose the ones to remove",
        description="Score every decoder layer (or every block of --num-drop contiguous layers) of MODEL "
        "on calibration data with a selection strategy, print the scores and the chosen 0-based layer "
        "indices, and optionally write a JSON report and a PNG plot of the scores. Under torchrun, rank 0 "
        "does the scoring and writing.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sel.epilog_factory = _strategy_epilog
    sel.add_argument("model", metavar="MODEL", help="a local model directory, a .gguf file, or a hub id")
    sel.add_argument("--strategy", required=True, metavar="S", help="selection strategy (listed below)")
    sel.add_argument("--num-drop", type=positive, required=True, help="how many layers to remove")
    sel.add_argument(
        "--report",
        metavar="FILE.json",
        help='write {"strategy", "num_drop", "scores", "selected" (0-based), "unit", "score_name", '
        '"removes", "details"} as JSON',
    )
    sel.add_argument("--plot", metavar="FILE.png", help="write a bar plot of the scores, chosen ones marked")
    sel.add_argument(
        "--seq-len", type=positive, default=None, help="tokens per calibration window (default: model's)"
    )
    _add_calibration(sel, required=True)
    _add_strategy_options(sel)
    _add_loading(sel)
    _add_runtime(sel)
    sel.set_defaults(func=commands.select)


def _add_prune(sub: Any) -> tuple[argparse.ArgumentParser, Any]:
    """The ``prune`` subcommand."""
    prune = sub.add_parser(
        "prune",
        help="remove layers, fit recoveries, evaluate each, save the first",
        description="Remove decoder layers from MODEL, fit every requested recovery on calibration data "
        "(one capture pass), evaluate each by perplexity, print the table, and save the first method "
        "listed in --recover to --out.",
    )
    prune.add_argument("model", metavar="MODEL", help="a local model directory, a .gguf file, or a hub id")
    drop_group = prune.add_mutually_exclusive_group(required=False)
    drop_group.add_argument(
        "--drop",
        metavar="LAYERS",
        help="0-based layers to remove: 5-7 (both ends included), 3,9 or 3,5-7",
    )
    prune.add_argument(
        "--recover",
        default="ghost,identity",
        metavar="METHODS",
        help="comma-separated recovery methods, the first is saved (default: ghost,identity; identity is "
        "plain pruning)",
    )
    prune.add_argument(
        "--order",
        choices=["independent", "sequential"],
        default="independent",
        help="for several removed intervals: fit each on the dense model's activations (independent) or "
        "on the already recovered model's (sequential)",
    )
    prune.add_argument(
        "--layerwise",
        action="store_true",
        help="keep the model in host memory and capture layer by layer, one decoder layer on --device at a "
        "time (for models larger than the accelerator; sampling and evaluation then run on the CPU)",
    )
    prune.add_argument("--plot", metavar="FILE.png", help="also write a bar plot of perplexity per method")
    _add_calibration(prune, required=True)
    _add_evaluation(prune, num_eval_default=None)
    _add_fitting(prune)
    _add_output(prune)
    _add_loading(prune)
    _add_runtime(prune)
    prune.set_defaults(func=commands.prune)
    return prune, drop_group


def _add_eval(sub: Any) -> None:
    """The ``eval`` subcommand."""
    ev = sub.add_parser(
        "eval",
        help="perplexity (and lm-eval tasks) of a model or checkpoint",
        description="Measure the perplexity of MODEL_OR_DIR (a Hugging Face model or a ghostsolve "
        "checkpoint) and optionally run lm-evaluation-harness tasks on it in memory.",
    )
    ev.add_argument("model", metavar="MODEL_OR_DIR",
                    help="model directory, ghostsolve checkpoint, .gguf file or hub id")  # fmt: skip
    ev.add_argument(
        "--tasks",
        metavar="TASKS",
        help="comma-separated lm-eval tasks (e.g. arc_easy,hellaswag); needs pip install 'ghostsolve[eval]'",
    )
    ev.add_argument("--num-fewshot", type=int, default=None, help="lm-eval few-shot examples")
    ev.add_argument("--limit", type=float, default=None, help="lm-eval examples per task (quick runs)")
    ev.add_argument("--include-path", metavar="DIR", help="folder of extra (local) lm-eval task YAML files")
    ev.add_argument("--report", metavar="FILE.json", help="write the results as JSON")
    _add_evaluation(
        ev,
        num_eval_default=None,
        self_source="MODEL_OR_DIR itself (seeded; comparable only between runs on the same model)",
    )
    _add_loading(ev)
    _add_runtime(ev)
    ev.set_defaults(func=commands.evaluate, calib_text=None)


def _add_diagnose(sub: Any) -> None:
    """The ``diagnose`` subcommand."""
    diag = sub.add_parser(
        "diagnose",
        help="conditioning and fp32/fp64 solver stability per removed boundary",
        description="Capture the boundary statistics of the removal set and print, per boundary, the "
        "conditioning of the calibration activations and the fp32-versus-fp64 solver comparison.",
    )
    diag.add_argument("model", metavar="MODEL", help="a local model directory, a .gguf file, or a hub id")
    diag_drop = diag.add_mutually_exclusive_group(required=True)
    diag_drop.add_argument("--drop", metavar="LAYERS", help="layers to remove: 5-7, 3,9 or 3,5-7")
    diag_drop.add_argument(
        "--select", metavar="STRATEGY", help="choose the layers with a selection strategy; needs --num-drop"
    )
    diag.add_argument("--num-drop", type=positive, default=None, help="with --select: how many layers")
    _add_strategy_options(diag)
    diag.add_argument("--report", metavar="FILE.json", help="write the diagnostics as JSON")
    diag.add_argument(
        "--max-rows",
        type=positive,
        default=4096,
        help="calibration tokens used for the fp32/fp64 solver comparison, which refits from raw rows "
        "(default: 4096; conditioning uses every calibration token)",
    )
    diag.add_argument(
        "--seq-len", type=positive, default=None, help="tokens per calibration window (default: model's)"
    )
    _add_calibration(diag, required=True)
    _add_loading(diag)
    _add_runtime(diag)
    diag.set_defaults(func=commands.diagnose)


def _add_demo(sub: Any) -> None:
    """The ``demo`` subcommand."""
    demo = sub.add_parser(
        "demo",
        help="the whole job on the bundled demo model (about a minute on 2 CPU cores)",
        description="Load the bundled demo model (a 12-layer Llama trained on Shakespeare), sample "
        "calibration and evaluation text from it (seeded, disjoint) unless --calib-text/--eval-text are "
        "given, remove its last four layers (plain pruning almost triples the perplexity), recover them "
        "with every method, print the table (dense, plain pruned, each method, the share of the loss each "
        "one wins back), and write the plot, the report and the ghost-recovered checkpoint to --out.",
    )
    demo.add_argument(
        "--out",
        default=DEFAULT_DEMO_OUT,
        metavar="DIR",
        help=f"output folder (default: ./{DEFAULT_DEMO_OUT})",
    )
    demo.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    demo.add_argument("--report", metavar="FILE.json", help="also write the JSON report here")
    removal = demo.add_mutually_exclusive_group()
    removal.add_argument(
        "--drop",
        metavar="LAYERS",
        help="layers to remove, 0-based, both ends included (default: the last third, 8-11 of the bundled "
        "model's 12: plain pruning breaks the model there and a linear map repairs most of it)",
    )
    removal.add_argument(
        "--select",
        metavar="STRATEGY",
        help="choose the layers with a selection strategy instead (see `ghostsolve select --help`); needs "
        "--num-drop",
    )
    demo.add_argument("--num-drop", type=positive, default=None, help="with --select: how many layers")
    demo.add_argument(
        "--recover",
        default=None,
        metavar="METHODS",
        help="comma-separated methods to run (default: every method; must include ghost)",
    )
    demo.add_argument(
        "--order", choices=["independent", "sequential"], default="independent", help="fitting order"
    )
    demo.add_argument("--model", help=argparse.SUPPRESS)  # another demo-sized model, for tests
    source = demo.add_argument_group("data").add_mutually_exclusive_group()
    source.add_argument(
        "--calib-text", nargs="+", metavar="FILE", help="calibrate on text instead of samples"
    )
    source.add_argument("--calib", choices=["self"], help="self-sampled calibration (the default)")
    demo.add_argument(
        "--num-calib",
        type=positive,
        default=DEMO_NUM_CALIB,
        help=f"calibration sequences (default: {DEMO_NUM_CALIB})",
    )
    demo.add_argument(
        "--skip-first-token", action="store_true", help="exclude the BOS position from the statistics"
    )
    _add_evaluation(demo, num_eval_default=DEMO_NUM_EVAL, seq_len_default=DEMO_SEQ_LEN)
    _add_fitting(demo)
    _add_runtime(demo, batch_size=None, threads=1)
    demo.set_defaults(func=commands.demo)


def _add_convert_gguf(sub: Any) -> None:
    """The ``convert-gguf`` subcommand."""
    gguf = sub.add_parser(
        "convert-gguf",
        help="convert a GGUF file to a Hugging Face directory (safetensors, tokenizer): no gguf needed then",
        description="Dequantize a GGUF file (Llama, Qwen2/3, Mistral architectures; the quantizations "
        "transformers can read) and write a plain Hugging Face directory: safetensors weights, tokenizer, "
        "generation config. Every command also takes a .gguf file as MODEL directly; converting once saves "
        "the dequantization at every load. Needs pip install 'ghostsolve[gguf]'.",
    )
    gguf.add_argument("gguf", metavar="FILE.gguf", help="the GGUF file")
    gguf.add_argument("--out", required=True, metavar="DIR", help="output directory")
    gguf.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    gguf.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                      help="weight dtype of the output (auto: float32, as dequantized)")  # fmt: skip
    gguf.add_argument("--traceback", action="store_true", help="on error, show the full traceback")
    gguf.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    gguf.set_defaults(func=commands.convert_gguf)


def _add_convert_llama2c(sub: Any) -> None:
    """The ``convert-llama2c`` subcommand."""
    conv = sub.add_parser(
        "convert-llama2c",
        help="convert a llama2.c checkpoint and tokenizer to a Hugging Face Llama directory",
        description="Convert a llama2.c checkpoint (.bin) and its tokenizer (.bin) into a Hugging Face "
        "Llama model directory with a fast tokenizer.",
    )
    conv.add_argument("checkpoint", metavar="CHECKPOINT", help="llama2.c model file, e.g. stories260K.bin")
    conv.add_argument("tokenizer", metavar="TOKENIZER", help="llama2.c tokenizer file, e.g. tok512.bin")
    conv.add_argument("--out", required=True, metavar="DIR", help="output directory")
    conv.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    conv.add_argument("--traceback", action="store_true", help="on error, show the full traceback")
    conv.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    conv.set_defaults(func=commands.convert_llama2c)


def build_parser() -> argparse.ArgumentParser:
    """The ``ghostsolve`` argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="ghostsolve",
        description="Remove decoder layers from a causal language model and recover it with closed-form "
        "linear operators fitted on a small calibration set.",
        epilog="Start with `ghostsolve demo`: it runs the whole job on a bundled model in about a minute.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    prune, drop_group = _add_prune(sub)
    _add_eval(sub)
    _add_diagnose(sub)
    _add_demo(sub)
    _add_convert_gguf(sub)
    _add_convert_llama2c(sub)
    _add_selection_commands(sub, prune, drop_group)
    return parser


def version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ghostsolve")
    except PackageNotFoundError:
        return "unknown"
