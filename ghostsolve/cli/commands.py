"""The commands of ``ghostsolve``: each reads its arguments, calls a workflow, and prints the result.

Heavy imports (torch, transformers) happen inside the commands, so ``ghostsolve --help`` and usage errors stay
fast. Under torchrun (``args.dist``) every rank runs the command; rank 0 alone prints and writes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ghostsolve.cli.args import (
    check_drop_args,
    drop_of,
    loading_kwargs,
    methods_of,
    resolve_cli_device,
    selection_options,
    seq_len_of,
)
from ghostsolve.errors import GhostsolveError

__all__ = ["convert_gguf", "convert_llama2c", "demo", "diagnose", "evaluate", "prune", "select"]


# ---------------------------------------------------------------------------------------------
# shared steps
# ---------------------------------------------------------------------------------------------
def _world_size(args: argparse.Namespace) -> int:
    ctx = getattr(args, "dist", None)
    return 1 if ctx is None else int(ctx.world_size)


def _check_shardable(args: argparse.Namespace) -> None:
    """Fail before any sampling when the calibration batches cannot give every rank one."""
    world = _world_size(args)
    batches = -(-args.num_calib // args.batch_size)
    if world > 1 and batches < world:
        raise GhostsolveError(
            f"--num-calib {args.num_calib} in batches of --batch-size {args.batch_size} makes {batches} "
            "batch(es), "
            f"fewer than the {world} processes; every rank needs at least one: use a batch size of at most "
            f"{args.num_calib // world}, more calibration sequences, or fewer processes"
        )


def _check_outputs(args: argparse.Namespace, out: Path | None = None) -> None:
    """Fail before any work if a file or directory the command will write cannot be written.

    Covers ``--report`` and ``--plot`` (their folder must exist) and, when given, the ``--out`` directory
    (refused if it exists without ``--overwrite``, or if it is, contains or lies inside the input model or a
    text file): a typo should not cost a whole run, nor ``--out MODEL --overwrite`` the model.
    """
    from ghostsolve.pipeline.io.atomic import check_destination, refuse_existing, refuse_overlap

    inputs = [getattr(args, "model", None), *_files(args)]
    for label in ("report", "plot"):
        path = getattr(args, label, None)
        if path:
            check_destination(path, what=f"the {label}")
            refuse_overlap(path, inputs)
    if out is not None:
        refuse_existing(out.absolute(), bool(getattr(args, "overwrite", False)), inputs=inputs)


def _load_model(path: str, args: argparse.Namespace) -> tuple[Any, Any]:
    """The model and tokenizer of MODEL: a Hugging Face directory, a ghostsolve checkpoint or a GGUF file."""
    import torch

    from ghostsolve.pipeline.io.checkpoint import load, load_tokenizer
    from ghostsolve.pipeline.io.gguf import is_gguf_file, load_gguf

    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    kwargs = loading_kwargs(args)
    # --layerwise keeps the model in host memory; capture onloads one decoder layer at a time. A device map
    # places the model itself.
    layerwise = getattr(args, "layerwise", False)
    device: str | None = "cpu" if layerwise else resolve_cli_device(args.device, getattr(args, "dist", None))
    if path.endswith(".gguf") or is_gguf_file(path):  # dequantized in memory; convert-gguf does it on disk
        if kwargs:
            raise GhostsolveError(
                f"{', '.join(sorted(kwargs))} do not apply to a GGUF file; convert it with ghostsolve "
                "convert-gguf first and load the directory"
            )
        return load_gguf(path, dtype=dtype, device=device)
    if "device_map" in kwargs:
        device = None
    return load(path, device=device, dtype=dtype, **kwargs), load_tokenizer(path)


def _fit_options(args: argparse.Namespace) -> dict[str, Any]:
    """The fitting flags as keywords of the workflows (``--ridge``, ``--rank``, ``--solver``, dtypes)."""
    import torch

    def dtype(name: str | None) -> Any:
        return None if name is None else getattr(torch, name)

    return {"ridge": args.ridge, "rank": args.rank, "solver": args.solver,
            "product_dtype": dtype(args.product_dtype),
            "compute_dtype": dtype(args.compute_dtype)}  # fmt: skip


def _files(args: argparse.Namespace) -> list[str]:
    """The text files a command reads (calibration, then evaluation)."""
    return [*(getattr(args, "calib_text", None) or []), *(getattr(args, "eval_text", None) or [])]


def _source(files: Any) -> Any:
    return list(files) if files else "self"


def _windows(args: argparse.Namespace, model: Any, tokenizer: Any, seq_len: int) -> tuple[Any, Any]:
    """Calibration windows (computed on rank 0, sent to all) and evaluation windows (rank 0 only)."""
    from ghostsolve.pipeline.data import calibration_windows, evaluation_windows
    from ghostsolve.pipeline.distributed import broadcast_from_main, run_on_main

    progress = not args.no_progress
    calib = broadcast_from_main(calibration_windows, model, tokenizer, _source(args.calib_text),
                                n_windows=args.num_calib, seq_len=seq_len, seed=args.seed,
                                batch_size=args.batch_size, progress=progress)  # fmt: skip
    evalw = run_on_main(evaluation_windows, model, tokenizer, _source(getattr(args, "eval_text", None)),
                        n_windows=getattr(args, "num_eval", None), seq_len=seq_len, seed=args.seed,
                        batch_size=args.batch_size, progress=progress)  # fmt: skip
    return calib, evalw


def _data_description(args: argparse.Namespace, calib: Any, evalw: Any) -> dict[str, Any]:
    return {
        "order": getattr(args, "order", "independent"),
        "calibration": {"source": "text" if args.calib_text else "self", "files": list(args.calib_text or []),
                        "sequences": int(calib.shape[0]), "seq_len": int(calib.shape[1])},
        "evaluation": {"source": "text" if getattr(args, "eval_text", None) else "self",
                       "files": list(getattr(args, "eval_text", None) or []),
                       "windows": 0 if evalw is None else int(evalw.shape[0])},
        "seed": int(args.seed),
    }  # fmt: skip


def _selection_line(selection: Any) -> str:
    return (
        f"selection: layers {selection.selected}, strategy {selection.strategy} "
        f"({selection.score_name}, removes the {selection.removes})"
    )


def _is_main(args: argparse.Namespace) -> bool:
    ctx = getattr(args, "dist", None)
    return ctx is None or ctx.is_main


def _finish_prune(args: argparse.Namespace, result: Any, out: Path | None) -> None:
    if result.selection is not None:
        print(_selection_line(result.selection))
    print(result.format_table())
    print(result.format_timings())
    if out is not None:
        print(f"saved {result.saved}: {out}")
    if args.plot:
        result.plot(args.plot)
        print(f"plot: {args.plot}")
    if args.report:
        result.write_report(args.report)
        print(f"report: {args.report}")


# ---------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------
def prune(args: argparse.Namespace) -> int:
    """``ghostsolve prune``: :func:`ghostsolve.workflows.prune` on a model directory."""
    from ghostsolve.workflows import check_request
    from ghostsolve.workflows import prune as prune_workflow

    methods = methods_of(args.recover)
    options = check_drop_args(args)
    out = Path(args.out) if args.out else None
    _check_outputs(args, out)
    _check_shardable(args)
    model, tokenizer = _load_model(args.model, args)
    seq_len = seq_len_of(args, model)
    drop = drop_of(args)
    check_request(model, methods=methods, drop=drop, select=None if drop else args.select,
                  num_drop=None if drop else args.num_drop, order=args.order, out=out,
                  overwrite=args.overwrite, model_name=args.model)  # fmt: skip
    calib, evalw = _windows(args, model, tokenizer, seq_len)
    capture: dict[str, Any] = {}
    if args.layerwise:  # the model stays on the CPU; each layer in turn runs on --device
        device = resolve_cli_device(args.device, getattr(args, "dist", None))
        capture = {"capture": "layerwise", "device": device}
    result = prune_workflow(
        model, tokenizer, calibration=calib, evaluation=evalw, drop=drop,
        select=None if drop else args.select,
        num_drop=None if drop else args.num_drop, select_options=options, methods=methods, order=args.order,
        skip_first_token=args.skip_first_token, batch_size=args.batch_size, out=out, overwrite=args.overwrite,
        model_name=args.model, progress=not args.no_progress, distributed=getattr(args, "dist", None),
        extra=_data_description(args, calib, evalw), command=args.argv, data_files=_files(args),
        **capture, **_fit_options(args),
    )  # fmt: skip
    if _is_main(args):
        _finish_prune(args, result, out)
    return 0


def evaluate(args: argparse.Namespace) -> int:
    """``ghostsolve eval``: perplexity and lm-eval tasks of a model or checkpoint.

    Perplexity is on ``--eval-text``; without it, on sequences sampled from the evaluated model itself, which
    says how sure the model is of its own text, not how well it models language: the output says so, and a
    pruned model's number is not comparable with what ``prune`` measured on text. With ``--tasks`` and no
    ``--eval-text`` no perplexity is computed, and the output says that too.
    """
    from ghostsolve.pipeline.io.jsonio import write_json
    from ghostsolve.workflows.results import provenance

    _check_outputs(args)
    model, tokenizer = _load_model(args.model, args)
    report: dict[str, Any] = {"model": args.model}
    if args.tasks:
        report["tasks"] = _lm_eval(args, model, tokenizer)
    if args.eval_text or not args.tasks:
        report.update(_eval_perplexity(args, model, tokenizer))
    else:
        report["perplexity"] = None
        report["perplexity_skipped"] = "no --eval-text: pass --eval-text FILE for a text perplexity"
        print(f"perplexity: skipped ({report['perplexity_skipped']})")
    if args.report:
        report["provenance"] = provenance(args.argv, _files(args))
        write_json(report, args.report)
        print(f"report: {args.report}")
    return 0


def _lm_eval(args: argparse.Namespace, model: Any, tokenizer: Any) -> dict[str, Any]:
    from ghostsolve.pipeline.evaluate import lm_eval_tasks

    results = lm_eval_tasks(model, tokenizer, [t for t in args.tasks.split(",") if t.strip()],
                            batch_size=args.batch_size, num_fewshot=args.num_fewshot, limit=args.limit,
                            include_path=args.include_path)  # fmt: skip
    for task, metrics in results.items():
        shown = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        print(f"{task}: {json.dumps(shown, sort_keys=True)}")
    return results


def _eval_perplexity(args: argparse.Namespace, model: Any, tokenizer: Any) -> dict[str, Any]:
    from ghostsolve.pipeline.data import evaluation_windows
    from ghostsolve.pipeline.evaluate import perplexity

    seq_len = seq_len_of(args, model)
    windows = evaluation_windows(model, tokenizer, _source(args.eval_text), n_windows=args.num_eval,
                                 seq_len=seq_len, seed=args.seed, batch_size=args.batch_size,
                                 progress=not args.no_progress)  # fmt: skip
    ppl = perplexity(model, windows, batch_size=args.batch_size, progress=not args.no_progress)
    source = "text" if args.eval_text else "self"
    where = (f"{ppl.n_windows} windows of {ppl.seq_len} tokens of text" if args.eval_text else
             f"{ppl.n_windows} sequences of {ppl.seq_len} tokens sampled from this model itself, seed "
             f"{args.seed} (not text: comparable only between runs on this same model)")  # fmt: skip
    print(f"perplexity {ppl.perplexity:.4f} on {where}  (mean NLL {ppl.nll:.5f} over {ppl.n_tokens} tokens)")
    return {"seq_len": ppl.seq_len, "perplexity": ppl.perplexity, "nll": ppl.nll, "windows": ppl.n_windows,
            "predicted_tokens": ppl.n_tokens, "source": source}  # fmt: skip


def diagnose(args: argparse.Namespace) -> int:
    """``ghostsolve diagnose``: :func:`ghostsolve.workflows.diagnose_model`."""
    from ghostsolve.pipeline.data import calibration_windows
    from ghostsolve.pipeline.distributed import broadcast_from_main
    from ghostsolve.workflows import diagnose_model

    options = check_drop_args(args)
    _check_outputs(args)
    _check_shardable(args)
    model, tokenizer = _load_model(args.model, args)
    seq_len = seq_len_of(args, model)
    drop = drop_of(args)
    calib = broadcast_from_main(calibration_windows, model, tokenizer, _source(args.calib_text),
                                n_windows=args.num_calib, seq_len=seq_len, seed=args.seed,
                                batch_size=args.batch_size, progress=not args.no_progress)  # fmt: skip
    result = diagnose_model(
        model, calibration=calib, drop=drop, select=None if drop else args.select,
        num_drop=None if drop else args.num_drop, select_options=options, batch_size=args.batch_size,
        max_rows=args.max_rows, skip_first_token=args.skip_first_token, progress=not args.no_progress,
        model_name=args.model, distributed=getattr(args, "dist", None),
    )  # fmt: skip
    if result is not None:
        if result.selection is not None:
            print(_selection_line(result.selection))
        print(result.format())
        if args.report:
            result.write_report(args.report)
            print(f"report: {args.report}")
    return 0


def select(args: argparse.Namespace) -> int:
    """``ghostsolve select``: score the layers with a strategy; rank 0 scores while the others wait."""
    from ghostsolve.pipeline.data import batches_from_windows, calibration_windows
    from ghostsolve.pipeline.distributed import broadcast_from_main, run_on_main
    from ghostsolve.pipeline.select.report import format_selection, run_select_command

    options = selection_options(args, args.strategy)
    _check_outputs(args)
    model, tokenizer = _load_model(args.model, args)
    seq_len = seq_len_of(args, model)
    calib = broadcast_from_main(calibration_windows, model, tokenizer, _source(args.calib_text),
                                n_windows=args.num_calib, seq_len=seq_len, seed=args.seed,
                                batch_size=args.batch_size, progress=not args.no_progress)  # fmt: skip
    batches = batches_from_windows(calib, args.batch_size)

    def run() -> None:
        selection = run_select_command(model, batches, args.strategy, args.num_drop, report_path=args.report,
                                       plot_path=args.plot, **options)  # fmt: skip
        print(format_selection(selection))
        if args.plot:
            print(f"plot: {args.plot}")
        if args.report:
            print(f"report: {args.report}")

    run_on_main(run)
    return 0


def demo(args: argparse.Namespace) -> int:
    """``ghostsolve demo``: :func:`ghostsolve.workflows.demo`, then the table and where everything went."""
    from ghostsolve.workflows import demo as demo_workflow

    out = Path(args.out)
    _check_outputs(args, out)
    methods = methods_of(args.recover) if args.recover else None
    if args.select is not None and args.num_drop is None:
        raise GhostsolveError(f"--select {args.select} needs --num-drop N: how many layers to remove")
    if args.select is None and args.num_drop is not None:
        raise GhostsolveError(
            f"--num-drop {args.num_drop} goes with --select STRATEGY; the default removal is the last third "
            "of the layers, or give --drop"
        )
    options = selection_options(args, args.select) if args.select else {}
    if args.batch_size is None:  # one calibration batch per rank
        args.batch_size = max(1, args.num_calib // _world_size(args))
    _check_shardable(args)
    result = demo_workflow(
        out, overwrite=args.overwrite, drop=drop_of(args), select=args.select, num_drop=args.num_drop,
        select_options=options, methods=methods, order=args.order, calibration=_source(args.calib_text),
        num_calib=args.num_calib, evaluation=_source(args.eval_text), num_eval=args.num_eval,
        seq_len=args.seq_len, seed=args.seed, batch_size=args.batch_size,
        skip_first_token=args.skip_first_token,
        progress=not args.no_progress, model_dir=args.model, distributed=getattr(args, "dist", None),
        command=args.argv, data_files=_files(args), **_fit_options(args),
    )  # fmt: skip
    if not _is_main(args):
        return 0
    rule = result.extra.get("removal") if result.selection is None else (
        f"strategy {result.selection.strategy} ({result.selection.score_name}, removes the "
        f"{result.selection.removes})")  # fmt: skip
    print(f"selection: layers {result.removed}, {rule}")
    calib, evalw = result.extra["calibration"], result.extra["evaluation"]
    print(
        f"data: {calib['sequences']} calibration sequences ({calib['source']}), {evalw['sequences']} "
        f"evaluation sequences ({evalw['source']}), {calib['seq_len']} tokens each, seed {args.seed}"
    )
    print(result.format_table())
    if args.report:
        result.write_report(args.report)
    print(f"checkpoint ({result.saved}): {out / 'model'}")
    print(f"plot: {out / 'perplexity.png'}")
    print(f"report: {args.report or out / 'report.json'}")
    print(f"wall time: {result.timings.get('total', 0.0):.1f} s")
    return 0


def convert_gguf(args: argparse.Namespace) -> int:
    """``ghostsolve convert-gguf``: a GGUF file to a plain Hugging Face directory that loads without gguf."""
    from ghostsolve.pipeline.io.gguf import convert_gguf as convert

    out = convert(args.gguf, args.out, overwrite=args.overwrite,
                  dtype=None if args.dtype == "auto" else args.dtype)  # fmt: skip
    print(f"converted: {out}")
    return 0


def convert_llama2c(args: argparse.Namespace) -> int:
    """``ghostsolve convert-llama2c``: a llama2.c checkpoint and tokenizer to a Hugging Face directory."""
    from ghostsolve.pipeline.io.convert_llama2c import convert_llama2c as convert

    out = convert(args.checkpoint, args.tokenizer, args.out, overwrite=args.overwrite)
    print(f"converted: {out}")
    return 0
