"""scripts/measure_crossval.py: its resume and render logic on tiny synthetic data (no model is run)."""

from __future__ import annotations

import datetime as dt
import json
import statistics
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.scripts import load_script


@pytest.fixture(scope="module")
def mc() -> ModuleType:
    return load_script("measure_crossval")


def _result(variant: str, size: int | None, seed: int | None, ppl: float, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "result",
        "model": "toy",
        "variant": variant,
        "size": size,
        "seed": seed,
        "perplexity": ppl,
        "fit_seconds": 0.01,
        "calib_tokens": [10 * (size or 0)],
        **extra,
    }


def _write(path: Path, records: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_read_records_skips_a_torn_last_line(mc: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    _write(path, [_result("ghost", 4, 0, 5.0)])
    with path.open("a") as f:
        f.write('{"kind": "result", "model": "to')  # a run killed mid-write
    assert [r["perplexity"] for r in mc.read_records(path)] == [5.0]
    assert mc.read_records(tmp_path / "absent.jsonl") == []


def test_table_cells_are_mean_and_sample_std_over_seeds(mc: ModuleType) -> None:
    values = {"ghost": [10.0, 12.0, 14.5], "ghost+cv": [9.0, 11.0, 12.0]}
    records = [_result("dense", None, None, 3.0), _result("identity", None, None, 40.0)]
    records += [
        _result(v, 4, s, p, ridge=[0.1 * (s + 1)]) for v, ps in values.items() for s, p in enumerate(ps)
    ]
    text, _ = mc.render_text(records, "cmd")
    for v, ps in values.items():
        cell = f"{statistics.fmean(ps):.2f} ± {statistics.stdev(ps):.2f}"
        assert cell in text, (v, cell)
    best = min(values, key=lambda v: statistics.fmean(values[v]))
    assert f"**{statistics.fmean(values[best]):.2f}" in text
    diffs = [a - b for a, b in zip(values["ghost+cv"], values["ghost"], strict=True)]
    assert f"{statistics.fmean(diffs):+.2f} ± {statistics.stdev(diffs):.2f}" in text
    assert "plain pruning (identity; no calibration) **40.00**" in text
    assert "0.2 (0.1…0.3)" in text  # median and range of the chosen ridge


def test_verdicts_follow_the_paired_differences(mc: ModuleType) -> None:
    rows = [_result("ghost", 4, s, p) for s, p in enumerate([10.0, 10.5, 11.0])]
    rows += [_result("ghost+cv", 4, s, p) for s, p in enumerate([8.0, 8.4, 9.1])]  # clearly better
    rows += [_result("ghost", 32, s, p) for s, p in enumerate([6.0, 6.0, 6.0])]
    rows += [_result("ghost+cv", 32, s, p) for s, p in enumerate([6.5, 6.6, 6.4])]  # clearly worse
    rows += [_result("lowrank", 32, s, p) for s, p in enumerate([5.0, 5.0, 5.0])]
    rows += [_result("ghost", 16, s, p) for s, p in enumerate([7.0, 8.0, 9.0])]  # seed std 1
    rows += [_result("ghost+cv", 16, s, p) for s, p in enumerate([7.2, 8.3, 9.1])]  # +0.2 ± 0.1: consistent
    grouped, _ = mc.group(rows)
    lines = mc.verdicts(grouped["toy"], [4, 16, 32])
    assert lines[0].startswith("- ghost+cv worse") and " 32 (" in lines[0] and " 4 (" not in lines[0]
    assert lines[1].startswith("- ghost+cv better") and " 4 (" in lines[1] and " 32 (" not in lines[1]
    assert " 16 (" not in lines[0] + lines[1] and "worse at 16 (+0.20 ± 0.10); better at none" in lines[2]
    assert "32 (best: lowrank" in lines[3] and " 4 (" not in lines[3]


def test_a_rerun_record_replaces_the_older_one(mc: ModuleType) -> None:
    grouped, _ = mc.group([_result("ghost", 8, 0, 7.0), _result("ghost", 8, 0, 6.0)])
    assert [r["perplexity"] for r in grouped["toy"][(8, "ghost")]] == [6.0]


def test_splice_keeps_the_hand_written_text(mc: ModuleType) -> None:
    old = f"# T\n\nintro\n\n{mc.BEGIN}\nold table\n{mc.END}\n\n## Discussion\nmine\n"
    new = mc.splice(old, f"{mc.BEGIN}\nnew table\n{mc.END}", "# T")
    assert "intro" in new and "## Discussion\nmine" in new and "new table" in new and "old table" not in new
    assert mc.splice(None, "gen", "# T") == "# T\n\ngen\n"


def test_run_model_measures_only_what_is_missing(
    mc: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "d.jsonl"
    done = [_result("dense", None, None, 3.0), _result("identity", None, None, 40.0)]
    done += [_result(v, 4, 0, 1.0) for v in mc.VARIANTS if v != "identity"]  # size 4 complete
    done += [_result("ghost", 8, 0, 1.0)]  # size 8 partly done
    _write(data, done)
    captures: list[int] = []
    fitted: list[tuple[str, int]] = []

    def fake_capture(setup: Any, batches: Any) -> tuple[dict[Any, Any], float]:
        captures.append(len(batches))
        return {}, 0.0

    def fake_evaluate(
        setup: Any, name: str, batches: Any, stats: Any, seconds: float, size: int, seed: int
    ) -> dict[str, Any]:
        fitted.append((name, size))
        return _result(name, size, seed, 2.0, ridge=[0.0], rank=[None])

    monkeypatch.setattr(mc, "capture", fake_capture)
    monkeypatch.setattr(mc, "evaluate", fake_evaluate)
    import torch

    setup = mc.Setup(
        "toy",
        None,
        [1],
        4,
        torch.zeros(2, 4, dtype=torch.long),
        lambda n, seed: torch.zeros(n, 4, dtype=torch.long),
        "toy",
    )
    assert mc.run_model(setup, [4, 8], [0], data, None)
    assert len(captures) == 1  # one capture for size 8, none for the complete size 4
    assert sorted(fitted) == sorted((v, 8) for v in mc.VARIANTS if v not in ("identity", "ghost"))
    assert {(r["variant"], r["size"]) for r in mc.read_records(data)} >= {
        (v, 8) for v in mc.VARIANTS if v != "identity"
    }
    # everything is there now: a rerun measures nothing; a stop time in the past stops before a capture
    fitted.clear()
    assert mc.run_model(setup, [4, 8], [0], data, None) and not fitted
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)
    assert not mc.run_model(setup, [4, 8, 16], [0], data, past) and not fitted
