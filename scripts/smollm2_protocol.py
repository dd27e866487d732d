"""The Ghosted Layers protocol on SmolLM2-135M-Instruct, reduced to fit two shared CPU cores.

Every run removes layers (streamline or block influence), recovers them with every method from one shared
capture (:func:`ghostsolve.pipeline.recover.iter_recoveries`) and evaluates each recovered model with
:func:`ghostsolve.pipeline.evaluate.perplexity` on fixed evaluation windows. One JSON line per (setting, seed,
method, evaluation set) is appended to ``docs/data/smollm2_protocol.jsonl`` as soon as it is measured, so a
run can be stopped at any time; run again, it skips what the file already holds. ``render`` writes
``docs/results_smollm2.md``'s tables and ``docs/figures/smollm2_*.png`` from the file alone.

Usage::

    python scripts/smollm2_protocol.py run [--groups a,b,c,d,e] [--threads 1]
    python scripts/smollm2_protocol.py render

Settings (``SETTINGS``), in priority order:

a. 7 of 30 layers removed by streamline, 32 calibration windows, calibration seeds 0-4;
b. 4 and 10 of 30 by streamline, seed 0;
c. 7 of 30 by block influence (ShortGPT), independent and sequential order, seed 0;
d. calibration windows 4, 8, 16, 64 (32 is a.'s seed 0) for identity, ghost, lowrank, replaceme;
e. 7 of 30 by streamline evaluated on Shakespeare, and data-free calibration (``--calib self``), for the
   methods of d.;
f. 10 and 7 of 30 by streamline with each window's first token left out of the fit (ghost, ReplaceMe).

Windows are 256 tokens. Calibration: ``calibration_windows`` from WikiText-2 validation, seeded. Evaluation:
the non-overlapping 256-token windows of WikiText-2 test, PTB test and the complete Shakespeare, of which
``select_windows(..., 16, seed=0)`` picks the same 16 for every run.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "docs" / "data" / "smollm2_protocol.jsonl"
DOC = REPO / "docs" / "results_smollm2.md"
FIGURES = REPO / "docs" / "figures"
SEQ_LEN = 256
#: 8 windows per set, not 16: on two cores shared by five jobs a 16-window evaluation took 90 s per method and
#: set, which left room for only ~3 of the settings below before the deadline.
EVAL_WINDOWS = 8
EVAL_SEED = 0
BATCH = 8

#: Evaluation sets: name -> file under the shared data folder.
EVAL_FILES = {
    "wikitext2": "wikitext-2/wiki.test.raw",
    "ptb": "ptb/ptb.test.txt",
    "shakespeare": "corpora/shakespeare-complete.txt",
}
CALIB_FILE = "wikitext-2/wiki.valid.tokens"

#: Every method the library registers, except "full" (the same operator as "ghost") and "scalar-magnitude"
#: (Prune&Comp's scale as an inserted operator; "prune-comp" folds the same scale into the weights).
METHODS = ("identity", "ghost", "diagonal-magnitude", "hadamard-magnitude", "replaceme", "prune-comp",
           "scalar", "diagonal", "hadamard", "lowrank", "symmetric")  # fmt: skip
LABELS = {
    "identity": "plain pruning", "ghost": "ghost (full)", "diagonal-magnitude": "LinearPatch-D",
    "hadamard-magnitude": "LinearPatch-R", "replaceme": "ReplaceMe-LS", "prune-comp": "Prune&Comp",
    "scalar": "scalar", "diagonal": "diagonal", "hadamard": "hadamard", "lowrank": "lowrank (r = 144)",
    "symmetric": "symmetric", "dense": "dense",
}  # fmt: skip
SWEEP_METHODS = ("identity", "ghost", "lowrank", "replaceme")


@dataclass(frozen=True)
class Setting:
    """One pruning run: a selection, a calibration set, and what is evaluated."""

    group: str
    select: str
    num_drop: int
    seed: int = 0
    n_calib: int = 32
    order: str = "independent"
    calib: str = "wikitext2"
    methods: tuple[str, ...] = METHODS
    evals: tuple[str, ...] = ("wikitext2", "ptb")
    skip_first_token: bool = False

    @property
    def name(self) -> str:
        return (f"{self.select}-{self.num_drop}-{self.order}-c{self.n_calib}-{self.calib}-s{self.seed}"
                f"-{'+'.join(self.evals)}{'-skip1' if self.skip_first_token else ''}")  # fmt: skip


def settings() -> list[Setting]:
    """Every setting, in priority order."""
    out = [Setting("a", "streamline", 7, seed=s) for s in range(5)]
    out += [Setting("b", "streamline", k) for k in (4, 10)]
    out += [Setting("c", "block-influence", 7, order=o) for o in ("independent", "sequential")]
    out += [Setting("d", "streamline", 7, n_calib=n, methods=SWEEP_METHODS) for n in (4, 8, 16, 64)]
    # e. with the sweep's four methods only: the whole list did not fit the time left on the shared machine.
    out += [Setting("e", "streamline", 7, methods=SWEEP_METHODS, evals=("shakespeare",)),
            Setting("e", "streamline", 7, calib="self", methods=SWEEP_METHODS,
                    evals=("wikitext2", "ptb", "shakespeare"))]
    # f. a diagnostic added after b.: 10 and 7 of 30 with each window's first token left out of the fit.
    out += [Setting("f", "streamline", k, methods=("ghost", "replaceme"), skip_first_token=True)
            for k in (10, 7)]
    return out


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of the jsonl file; a torn last line (a run killed mid-write) is skipped."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def done_keys(records: Iterable[dict[str, Any]]) -> set[tuple[str, str, str]]:
    """``(setting, method, eval)`` of every record held."""
    return {(r["setting"], r["method"], r["eval"]) for r in records}


def missing(setting: Setting, done: set[tuple[str, str, str]]) -> list[tuple[str, str]]:
    """``(method, eval)`` pairs of ``setting`` not yet measured (methods that cannot apply are recorded as
    skipped, so they count as done)."""
    return [(m, e) for m in setting.methods for e in setting.evals if (setting.name, m, e) not in done]


def append(path: Path, record: dict[str, Any]) -> None:
    from ghostsolve.pipeline.io.jsonio import to_json

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps(to_json(record), allow_nan=False) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


# ----------------------------------------------------------------------------------------------------- run


def shared_data() -> Path:
    env = os.environ.get("GHOSTSOLVE_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


@dataclass
class Context:
    model: Any
    tokenizer: Any
    evals: dict[str, Any] = field(default_factory=dict)

    def windows(self, name: str) -> Any:
        from ghostsolve.pipeline.data import read_texts, select_windows, text_windows

        if name not in self.evals:
            every = text_windows(read_texts(shared_data() / EVAL_FILES[name]), self.tokenizer, SEQ_LEN)
            self.evals[name] = select_windows(every, EVAL_WINDOWS, seed=EVAL_SEED)
        return self.evals[name]


def _load() -> Context:
    sys.path.insert(0, str(REPO / "scripts"))
    from get_reference_model import require_reference_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref = require_reference_model()
    model = AutoModelForCausalLM.from_pretrained(ref.hf_dir).eval()
    return Context(model, AutoTokenizer.from_pretrained(ref.hf_dir))


def _base(setting: Setting) -> dict[str, Any]:
    return {"setting": setting.name, "group": setting.group, "select": setting.select,
            "num_drop": setting.num_drop, "order": setting.order, "n_calib": setting.n_calib,
            "calib": setting.calib, "seed": setting.seed, "seq_len": SEQ_LEN,
            "skip_first_token": setting.skip_first_token,
            "eval_windows": EVAL_WINDOWS}  # fmt: skip


def _evaluate(ctx: Context, model: Any, name: str, desc: str) -> dict[str, Any]:
    from ghostsolve.pipeline.evaluate import perplexity

    tic = time.perf_counter()
    ppl = perplexity(model, ctx.windows(name), batch_size=BATCH, progress=False, desc=desc)
    return {"perplexity": ppl.perplexity, "nll": ppl.nll, "n_tokens": ppl.n_tokens,
            "eval_seconds": round(time.perf_counter() - tic, 2), "load": os.getloadavg()[0]}  # fmt: skip


def run_dense(ctx: Context, evals: Iterable[str], log: logging.Logger) -> None:
    done = done_keys(read_records(DATA))
    for name in evals:
        if ("dense", "dense", name) in done:
            continue
        record = {"setting": "dense", "group": "dense", "method": "dense", "eval": name, "seq_len": SEQ_LEN,
                  "eval_windows": EVAL_WINDOWS, **_evaluate(ctx, ctx.model, name, "dense")}  # fmt: skip
        append(DATA, record)
        log.info("dense %s: %.3f", name, record["perplexity"])


def run_setting(ctx: Context, setting: Setting, log: logging.Logger) -> None:
    from ghostsolve.adapters import get_adapter
    from ghostsolve.errors import GhostsolveError
    from ghostsolve.pipeline.data import batches_from_windows, calibration_windows
    from ghostsolve.pipeline.model.surgery import intervals_of
    from ghostsolve.pipeline.recover import iter_recoveries, validate_method
    from ghostsolve.pipeline.select import select_layers

    todo = missing(setting, done_keys(read_records(DATA)))
    if not todo:
        log.info("%s: done already", setting.name)
        return
    tic = time.perf_counter()
    source: Any = "self" if setting.calib == "self" else [shared_data() / CALIB_FILE]
    calibration = calibration_windows(ctx.model, ctx.tokenizer, source, n_windows=setting.n_calib,
                                      seq_len=SEQ_LEN, seed=setting.seed, batch_size=16,
                                      progress=False)  # fmt: skip
    sampling = time.perf_counter() - tic
    batches = batches_from_windows(calibration, BATCH)
    tic = time.perf_counter()
    selection = select_layers(ctx.model, batches, setting.select, setting.num_drop)
    select_seconds = time.perf_counter() - tic
    drop = list(selection.selected)
    intervals = intervals_of(drop)
    log.info("%s: removes %s (selection %.0f s)", setting.name, drop, select_seconds)
    base = {**_base(setting), "removed": drop, "intervals": [list(iv) for iv in intervals],
            "select_seconds": round(select_seconds, 2), "sampling_seconds": round(sampling, 2)}  # fmt: skip
    wanted = {m for m, _ in todo}
    methods = []
    adapter = get_adapter(ctx.model)
    for name in setting.methods:
        if name not in wanted:
            continue
        try:
            validate_method(name, adapter, intervals)
        except GhostsolveError as exc:
            for ev in setting.evals:
                append(DATA, {**base, "method": name, "eval": ev, "perplexity": None, "skipped": str(exc)})
            log.info("%s: %s does not apply", setting.name, name)
            continue
        methods.append(name)
    for name, recovery in iter_recoveries(ctx.model, drop, batches, methods, order=setting.order,
                                          skip_first_token=setting.skip_first_token,
                                          progress=False):  # fmt: skip
        residuals = [v for v in recovery.relative_residuals.values() if math.isfinite(v)]
        common = {**base, "method": name,
                  "relative_residual": sum(residuals) / len(residuals) if residuals else None,
                  "fit_seconds": round(recovery.fit_seconds, 3),
                  "capture_seconds": round(recovery.capture_seconds, 2),
                  "warnings": len(recovery.warnings)}  # fmt: skip
        for ev in setting.evals:
            if (name, ev) not in todo:
                continue
            record = {**common, "eval": ev, **_evaluate(ctx, recovery.model, ev, name)}
            append(DATA, record)
            log.info("%s %s %s: %.3f", setting.name, name, ev, record["perplexity"])
        del recovery


def run(groups: Sequence[str], log: logging.Logger, pick: Sequence[int] | None = None) -> None:
    ctx = _load()
    every = settings()
    chosen = [every[i] for i in pick] if pick else [s for s in every if s.group in groups]
    for setting in chosen:
        run_dense(ctx, setting.evals, log)
        tic = time.perf_counter()
        run_setting(ctx, setting, log)
        log.info("%s: %.0f s, load %.2f", setting.name, time.perf_counter() - tic, os.getloadavg()[0])


# -------------------------------------------------------------------------------------------------- render


def _ppl(records: Iterable[dict[str, Any]], **match: Any) -> list[float]:
    return [r["perplexity"] for r in records
            if r.get("perplexity") is not None and all(r.get(k) == v for k, v in match.items())]  # fmt: skip


def _avg_by_seed(records: list[dict[str, Any]], evals: Sequence[str], **match: Any) -> list[float]:
    """Per seed, the mean perplexity over ``evals`` (seeds with every set measured)."""
    seeds = sorted({r["seed"] for r in records if all(r.get(k) == v for k, v in match.items())
                    and "seed" in r})  # fmt: skip
    out = []
    for seed in seeds:
        values = [_ppl(records, **match, seed=seed, eval=e) for e in evals]
        if all(len(v) == 1 for v in values):
            out.append(statistics.fmean(v[0] for v in values))
    return out


def mean_std(values: Sequence[float]) -> str:
    """``m ± s (n)``: mean and sample standard deviation; ``m`` alone for one value; ``—`` for none."""
    if not values:
        return "—"
    fmt = _fmt(statistics.fmean(values))
    if len(values) == 1:
        return fmt
    return f"{fmt} ± {_fmt(statistics.stdev(values))} ({len(values)})"


def _fmt(value: float) -> str:
    return f"{value:.1f}" if value >= 100 else f"{value:.2f}"


def _dense(records: list[dict[str, Any]], ev: str) -> list[float]:
    return _ppl(records, setting="dense", eval=ev)


def headline(records: list[dict[str, Any]]) -> tuple[list[str], dict[str, list[float]]]:
    """Table a: mean ± std over calibration seeds, per evaluation set and their average."""
    rows = ["| method | WikiText-2 | PTB | average | rel. residual |", "| --- | ---: | ---: | ---: | ---: |"]
    dense = [_dense(records, e) for e in ("wikitext2", "ptb")]
    if all(dense):
        avg = statistics.fmean(d[0] for d in dense)
        rows.append(f"| dense | {_fmt(dense[0][0])} | {_fmt(dense[1][0])} | {_fmt(avg)} | — |")
    a = [r for r in records if r.get("group") == "a"]
    avgs: dict[str, list[float]] = {}
    for m in METHODS:
        cells = [mean_std(_ppl(a, method=m, eval=e)) for e in ("wikitext2", "ptb")]
        avgs[m] = _avg_by_seed(a, ("wikitext2", "ptb"), method=m)
        res = [r["relative_residual"] for r in a if r["method"] == m and r["eval"] == "wikitext2"
               and r.get("relative_residual") is not None]  # fmt: skip
        res_cell = f"{statistics.fmean(res):.3f}" if res else "—"
        if any(c != "—" for c in cells):
            rows.append(f"| {LABELS[m]} | {cells[0]} | {cells[1]} | {mean_std(avgs[m])} | {res_cell} |")
    return rows, avgs


def _one(records: list[dict[str, Any]], setting_match: dict[str, Any], method: str,
         evals: Sequence[str]) -> float | None:  # fmt: skip
    values = [_ppl(records, **setting_match, method=method, eval=e) for e in evals]
    if not all(values):
        return None
    return statistics.fmean(v[0] for v in values)


def _cell(value: float | None) -> str:
    return "—" if value is None else _fmt(value)


def _skip_note(records: list[dict[str, Any]], **match: Any) -> list[str]:
    notes = sorted({f"{LABELS[r['method']]}: {r['skipped']}" for r in records if r.get("skipped")
                    and all(r.get(k) == v for k, v in match.items())})  # fmt: skip
    return [f"Not applicable — {n}" for n in notes]


def _removed(records: list[dict[str, Any]], **match: Any) -> str:
    found = sorted({tuple(r["removed"]) for r in records if "removed" in r
                    and all(r.get(k) == v for k, v in match.items())})  # fmt: skip
    return "; ".join(str(list(f)) for f in found) or "—"


def render(path: Path = DATA, doc: Path = DOC, figures: Path = FIGURES) -> str:
    """The markdown tables and the plots from the jsonl file; returns the tables' markdown."""
    records = read_records(path)
    out: list[str] = []
    rows, avgs = headline(records)
    a_seeds = sorted({r["seed"] for r in records if r.get("group") == "a"})
    out += ["## a. 7 of 30 layers removed by streamline, 32 calibration windows (headline)", "",
            f"Calibration seeds measured: {a_seeds or 'none'}; layers removed: "
            f"{_removed(records, group='a')}. Cells: mean ± sample std (n seeds) of the perplexity; "
            "`average` is the mean over seeds of the per-seed mean of WikiText-2 and PTB; `rel. residual` is "
            "‖XW − Y‖² / ‖Y − X‖² on the calibration tokens (1 = plain pruning), averaged over seeds.", "",
            *rows, ""]  # fmt: skip
    ratio_rows = ["| method | 4 of 30 | 7 of 30 | 10 of 30 |", "| --- | ---: | ---: | ---: |"]
    ratio: dict[str, list[float | None]] = {}
    for m in METHODS:
        ratio[m] = [_one(records, {"group": g, "num_drop": k, "seed": 0}, m, ("wikitext2", "ptb"))
                    for g, k in (("b", 4), ("a", 7), ("b", 10))]  # fmt: skip
        if any(v is not None for v in ratio[m]):
            ratio_rows.append(f"| {LABELS[m]} | " + " | ".join(_cell(v) for v in ratio[m]) + " |")
    out += ["## b. Removal ratio (streamline, seed 0)", "",
            "Mean of WikiText-2 and PTB perplexity. Layers removed: "
            f"4 → {_removed(records, group='b', num_drop=4)}, 7 → {_removed(records, group='a', seed=0)}, "
            f"10 → {_removed(records, group='b', num_drop=10)}.", "",
            *ratio_rows, "", *_skip_note(records, group="b"), ""]  # fmt: skip
    bi_rows = ["| method | independent | sequential |", "| --- | ---: | ---: |"]
    for m in METHODS:
        cells = [_one(records, {"group": "c", "order": o}, m, ("wikitext2", "ptb"))
                 for o in ("independent", "sequential")]  # fmt: skip
        if any(v is not None for v in cells):
            bi_rows.append(f"| {LABELS[m]} | " + " | ".join(_cell(v) for v in cells) + " |")
    out += ["## c. Block influence (ShortGPT), 7 of 30, seed 0: independent against sequential order", "",
            f"Mean of WikiText-2 and PTB perplexity. Layers removed: {_removed(records, group='c')} "
            "(non-contiguous: several intervals).", "", *bi_rows, "", *_skip_note(records, group="c"), ""]
    sizes = (4, 8, 16, 32, 64)
    sweep: dict[str, list[float | None]] = {}
    sweep_rows = ["| method | " + " | ".join(f"{n} × 256" for n in sizes) + " |",
                  "| --- |" + " ---: |" * len(sizes)]  # fmt: skip
    for m in SWEEP_METHODS:
        sweep[m] = [_one(records, {"group": "a" if n == 32 else "d", "n_calib": n, "seed": 0}, m,
                         ("wikitext2", "ptb")) for n in sizes]  # fmt: skip
        if any(v is not None for v in sweep[m]):
            sweep_rows.append(f"| {LABELS[m]} | " + " | ".join(_cell(v) for v in sweep[m]) + " |")
    out += ["## d. Calibration size (7 of 30 by streamline, seed 0)", "",
            "Mean of WikiText-2 and PTB perplexity against the number of 256-token calibration windows "
            "(tokens = windows × 256; the full operator has d² = 331,776 unknowns, d = 576 per token). "
            "The 32-window column is a.'s seed 0.", "", *sweep_rows, ""]  # fmt: skip
    gen_rows = ["| method | calib text: WikiText-2 | PTB | Shakespeare | calib self: WikiText-2 | PTB | "
                "Shakespeare |", "| --- |" + " ---: |" * 6]  # fmt: skip
    for m in METHODS:
        by_text = [_one(records, {"group": "a", "seed": 0}, m, ("wikitext2",)),
                _one(records, {"group": "a", "seed": 0}, m, ("ptb",)),
                _one(records, {"group": "e", "calib": "wikitext2"}, m, ("shakespeare",))]
        self_ = [_one(records, {"group": "e", "calib": "self"}, m, (e,))
                 for e in ("wikitext2", "ptb", "shakespeare")]  # fmt: skip
        if any(v is not None for v in self_ + by_text[2:]):
            gen_rows.append(f"| {LABELS[m]} | " + " | ".join(_cell(v) for v in by_text + self_) + " |")
    dense_cells = [_cell(_dense(records, e)[0] if _dense(records, e) else None)
                   for e in ("wikitext2", "ptb", "shakespeare")]  # fmt: skip
    out += ["## e. Generalisation: other text, and data-free calibration (7 of 30 by streamline, seed 0)", "",
            "Calibrated on 32 windows of WikiText-2 validation (text) or on 32 sequences of 256 tokens "
            "sampled from the dense model (`--calib self`), evaluated on WikiText-2, PTB and Shakespeare. "
            "Dense: "
            f"{' / '.join(dense_cells)}. Layers removed with self calibration: "
            f"{_removed(records, group='e', calib='self')}.", "", *gen_rows, ""]  # fmt: skip
    skip_rows = ["| layers removed | method | WikiText-2, every token | PTB, every token | WikiText-2, first "
                 "token left out | PTB, first token left out |", "| --- | --- |" + " ---: |" * 4]  # fmt: skip
    for k, every_token in ((10, {"group": "b", "num_drop": 10}), (7, {"group": "a", "seed": 0})):
        for m in ("ghost", "replaceme"):
            cells = [_one(records, every_token, m, (e,)) for e in ("wikitext2", "ptb")]
            cells += [_one(records, {"group": "f", "num_drop": k}, m, (e,)) for e in ("wikitext2", "ptb")]
            if any(v is not None for v in cells[2:]):
                skip_rows.append(f"| {k} of 30 | {LABELS[m]} | " + " | ".join(_cell(v) for v in cells) + " |")
    if len(skip_rows) > 2:
        out += ["## f. Each window's first token left out of the fit (`skip_first_token`), seed 0", "",
                "The same removals and calibration windows as b.'s 10 of 30 and a.'s 7 of 30 (streamline, "
                "seed 0); only the rows of the statistics change (the first position of every window is not "
                "used to fit).", "",
                *skip_rows, ""]  # fmt: skip
    text = "\n".join(out)
    _plots(records, avgs, ratio, sweep, figures)
    if doc is not None:
        _write_doc(doc, text)
    return text


BEGIN, END = "<!-- tables: begin (scripts/smollm2_protocol.py render) -->", "<!-- tables: end -->"


def _write_doc(doc: Path, tables: str) -> None:
    """Replace the generated part of ``doc`` (between the markers), keeping the hand-written text."""
    from ghostsolve.pipeline.io.atomic import write_text

    body = doc.read_text() if doc.exists() else f"# SmolLM2-135M: the protocol\n\n{BEGIN}\n{END}\n"
    if BEGIN not in body or END not in body:
        body += f"\n{BEGIN}\n{END}\n"
    head, rest = body.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    write_text(doc, f"{head}{BEGIN}\n\n{tables}\n{END}{tail}", what="the results document")


def _plots(records: list[dict[str, Any]], avgs: dict[str, list[float]], ratio: dict[str, list[float | None]],
           sweep: dict[str, list[float | None]], figures: Path) -> None:  # fmt: skip
    from ghostsolve.pipeline.io.atomic import save_png
    from ghostsolve.pipeline.io.plots import new_figure

    figures.mkdir(parents=True, exist_ok=True)
    dense = [_dense(records, e) for e in ("wikitext2", "ptb")]
    dense_avg = statistics.fmean(d[0] for d in dense) if all(dense) else None
    shown = [m for m in METHODS if avgs.get(m)]
    if shown:
        fig = new_figure(figures / "smollm2_headline.png", (7.5, 4))
        ax = fig.add_subplot()
        means = [statistics.fmean(avgs[m]) for m in shown]
        errs = [statistics.stdev(avgs[m]) if len(avgs[m]) > 1 else 0.0 for m in shown]
        ax.bar(range(len(shown)), means, yerr=errs, capsize=3, color="tab:blue")
        if dense_avg is not None:
            ax.axhline(dense_avg, color="k", ls="--", lw=1, label=f"dense {dense_avg:.1f}")
            ax.legend()
        ax.set_xticks(range(len(shown)), [LABELS[m] for m in shown], rotation=40, ha="right")
        ax.set_ylabel("perplexity, mean of WikiText-2 and PTB")
        counts = sorted({len(avgs[m]) for m in shown})
        seeds = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        ax.set_title(f"SmolLM2-135M, 7 of 30 layers removed (streamline); mean ± std over {seeds} seeds")
        save_png(fig, figures / "smollm2_headline.png")
    for name, series, xs, xlabel, title in (
        ("ratio", ratio, (4, 7, 10), "layers removed (of 30), streamline", "removal ratio, seed 0"),
        ("calib_size", sweep, (4, 8, 16, 32, 64), "calibration windows (× 256 tokens)",
         "calibration size, 7 of 30, seed 0"),
    ):  # fmt: skip
        lines = {m: v for m, v in series.items() if any(x is not None for x in v)}
        if not lines:
            continue
        fig = new_figure(figures / f"smollm2_{name}.png", (6, 4))
        ax = fig.add_subplot()
        for m, values in lines.items():
            pts = [(x, v) for x, v in zip(xs, values, strict=True) if v is not None]
            k = METHODS.index(m)
            # One fixed colour and marker per method (the default cycle repeats after ten lines).
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="osD^v<>ph*X"[k], color=f"C{k % 10}",
                    ls="-" if k < 10 else "--", label=LABELS[m])  # fmt: skip
        if dense_avg is not None:
            ax.axhline(dense_avg, color="k", ls="--", lw=1, label="dense")
        if name == "calib_size":
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("perplexity, mean of WikiText-2 and PTB")
        ax.set_title(f"SmolLM2-135M: {title}")
        ax.legend(fontsize=7, ncol=2)
        save_png(fig, figures / f"smollm2_{name}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run", help="measure what the jsonl file does not hold yet")
    go.add_argument("--groups", default="a,b,c,d,e", help="comma-separated setting groups (a-e)")
    go.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    go.add_argument("--pick", default="", help="comma-separated indices into the settings list, in this "
                    "order (instead of --groups; lets two processes share the list)")  # fmt: skip
    sub.add_parser("render", help="write the tables and plots from the jsonl file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("smollm2_protocol")
    if args.command == "run":
        import torch

        torch.set_num_threads(args.threads)
        pick = [int(i) for i in args.pick.split(",")] if args.pick else None
        run([g.strip() for g in args.groups.split(",")], log, pick)
    else:
        render()
        log.info("wrote %s and %s/smollm2_*.png", DOC, FIGURES)
    return 0


if __name__ == "__main__":
    sys.exit(main())
