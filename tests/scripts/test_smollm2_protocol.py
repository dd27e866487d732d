"""scripts/smollm2_protocol.py without a model: resuming from the jsonl file, and rendering it."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.scripts import load_script


@pytest.fixture(scope="module")
def protocol() -> ModuleType:
    return load_script("smollm2_protocol")


def _record(protocol: ModuleType, setting: Any, method: str, ev: str, ppl: float) -> dict[str, Any]:
    return {**protocol._base(setting), "method": method, "eval": ev, "perplexity": ppl, "removed": [3, 4],
            "relative_residual": 0.5}  # fmt: skip


def test_resume_skips_what_is_held_and_a_torn_line(protocol: ModuleType, tmp_path: Path) -> None:
    first = protocol.settings()[0]
    path = tmp_path / "runs.jsonl"
    protocol.append(path, _record(protocol, first, "ghost", "wikitext2", 30.0))
    with path.open("a") as handle:
        handle.write('{"setting": "torn')  # a run killed mid-write
    records = protocol.read_records(path)
    assert len(records) == 1
    todo = protocol.missing(first, protocol.done_keys(records))
    expected = [(m, e) for m in first.methods for e in first.evals if (m, e) != ("ghost", "wikitext2")]
    assert todo == expected
    every = [(m, e) for m in first.methods for e in first.evals]
    full = {(first.name, m, e) for m, e in every}
    assert protocol.missing(first, full) == []


def test_setting_names_are_distinct(protocol: ModuleType) -> None:
    names = [s.name for s in protocol.settings()]
    assert len(names) == len(set(names))


def test_mean_std(protocol: ModuleType) -> None:
    values = [10.0, 12.0, 17.0]
    mean, std = statistics.fmean(values), statistics.stdev(values)
    assert protocol.mean_std(values) == f"{mean:.2f} ± {std:.2f} (3)"
    assert protocol.mean_std([250.0]) == "250.0"
    assert protocol.mean_std([]) == "—"


def test_render_from_a_synthetic_file(protocol: ModuleType, tmp_path: Path) -> None:
    a = [s for s in protocol.settings() if s.group == "a"][:2]
    path = tmp_path / "runs.jsonl"
    rows = [{"setting": "dense", "group": "dense", "method": "dense", "eval": e, "perplexity": p}
            for e, p in (("wikitext2", 20.0), ("ptb", 40.0))]  # fmt: skip
    for seed, setting in enumerate(a):
        for method, base in (("identity", 100.0), ("ghost", 30.0)):
            rows += [_record(protocol, setting, method, "wikitext2", base + seed),
                     _record(protocol, setting, method, "ptb", 2 * base + seed)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = tmp_path / "results.md"
    generated = f"{protocol.BEGIN}\nold tables\n{protocol.END}"
    doc.write_text(f"# hand-written title\n\nkept text\n\n{generated}\nfooter\n")
    protocol.render(path, doc, tmp_path / "figures")
    text = doc.read_text()
    assert text.startswith("# hand-written title\n\nkept text\n")
    assert text.rstrip().endswith("footer")
    assert "old tables" not in text
    ghost_avg = [statistics.fmean([30.0 + s, 60.0 + s]) for s in (0, 1)]
    row = next(line for line in text.splitlines() if line.startswith("| ghost (full) |"))
    assert row.split(" | ")[3] == protocol.mean_std(ghost_avg)
    assert "| dense | 20.00 | 40.00 | 30.00 | — |" in text
    assert (tmp_path / "figures" / "smollm2_headline.png").stat().st_size > 0
    # Rendering twice gives the same document (the generated part is replaced, not appended).
    protocol.render(path, doc, tmp_path / "figures")
    assert doc.read_text() == text
