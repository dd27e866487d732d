"""The lm-evaluation-harness bridge, on a small local task written by the test (no hub needed)."""

from __future__ import annotations

import json
import sys

import pytest

from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.evaluate import lm_eval_tasks
from tests.pipeline._tiny import tiny_llama, tiny_model_dir, tiny_tokenizer

TASK = "ghostsolve_tiny_choice"
DOCS = [
    {"question": "Shall I compare thee to a summer's", "choices": [" day", " night"], "label": 0},
    {"question": "Rough winds do shake the darling buds of", "choices": [" May", " June"], "label": 0},
    {"question": "So long as men can breathe or eyes can", "choices": [" hear", " see"], "label": 1},
    {"question": "Thou art more lovely and more", "choices": [" temperate", " cold"], "label": 0},
]


def _write_task(folder):
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    (folder / f"{TASK}.yaml").write_text(
        f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
        encoding="utf-8",
    )
    return folder


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.mark.slow
def test_local_task_runs_on_the_in_memory_model(tmp_path, offline):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'ghostsolve[eval]')")
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), layers=2)
    results = lm_eval_tasks(model, tok, [TASK], include_path=str(_write_task(tmp_path)), batch_size=2)
    assert set(results) == {TASK}
    acc = results[TASK]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert results[TASK]["sample_len"] == len(DOCS)


@pytest.mark.slow
def test_cli_eval_with_tasks(tmp_path, offline, capsys):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'ghostsolve[eval]')")
    from ghostsolve.cli import main

    model_dir = tiny_model_dir(tmp_path / "model", layers=2)
    tasks = _write_task(tmp_path)
    report = tmp_path / "r.json"
    argv = ["eval", str(model_dir), "--tasks", TASK, "--include-path", str(tasks), "--report", str(report)]
    assert main([*argv, "--no-progress"]) == 0
    assert TASK in capsys.readouterr().out
    assert 0.0 <= json.loads(report.read_text())["tasks"][TASK]["acc,none"] <= 1.0


@pytest.mark.slow
def test_unknown_task_is_refused(tmp_path, offline):
    pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'ghostsolve[eval]')")
    tok = tiny_tokenizer()
    with pytest.raises(GhostsolveError, match=r"unknown lm-eval task\(s\) \['no_such_task_xyz'\]"):
        lm_eval_tasks(tiny_llama(len(tok), layers=1), tok, ["no_such_task_xyz"], include_path=str(tmp_path))
    with pytest.raises(GhostsolveError, match="no lm-eval task given"):
        lm_eval_tasks(tiny_llama(len(tok), layers=1), tok, [" "])


def test_missing_lm_eval_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(GhostsolveError, match=r"pip install 'ghostsolve\[eval\]'"):
        lm_eval_tasks(object(), object(), ["arc_easy"])
