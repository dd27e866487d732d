"""Checkpoints and atomic writes under faults (issue 13): corrupt files, a full disk, a killed --overwrite."""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors

import ghostsolve
from ghostsolve import GhostsolveError
from ghostsolve.pipeline.io import atomic
from ghostsolve.pipeline.io.atomic import atomic_directory, recover_interrupted, write_text
from tests.pipeline._tiny import tiny_model_dir

REPO = Path(__file__).resolve().parents[3]


def _tree(path: Path) -> dict[Path, bytes]:
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("src") / "model", layers=4)


@pytest.fixture(scope="module")
def ghosted(tmp_path_factory, source):
    import torch

    from ghostsolve.pipeline.recover import recover

    model = ghostsolve.load(source)
    windows = torch.randint(3, 90, (4, 16), generator=torch.Generator().manual_seed(0))
    recovery = recover(model, [1], [{"input_ids": windows}], method="ghost", progress=False)
    return ghostsolve.save(recovery, tmp_path_factory.mktemp("ghosted") / "ckpt")


# item 4: corrupt weights -----------------------------------------------------------------------------------
CORRUPTIONS = {
    "truncated": lambda data: data[: len(data) // 2],
    "header only": lambda data: data[:4],
    "zeros": lambda data: bytes(len(data)),
    "garbage header": lambda data: (24).to_bytes(8, "little") + b"{this is not json at all}" + data[33:],
}


@pytest.mark.parametrize("kind", ["plain", "ghosted"])
@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_weights_raise_one_clear_error(tmp_path, source, ghosted, kind, corruption):
    import shutil

    folder = shutil.copytree(source if kind == "plain" else ghosted, tmp_path / "copy")
    weights = folder / "model.safetensors"
    weights.write_bytes(CORRUPTIONS[corruption](weights.read_bytes()))
    with pytest.raises(GhostsolveError, match=r"weights file is truncated or corrupt .*copy or download"):
        ghostsolve.load(folder)


# item 4: a full disk while saving -------------------------------------------------------------------------
def _enospc_safetensors(*args, **kwargs):
    message = "Error while serializing: I/O error: No space left on device (os error 28)"
    raise safetensors.SafetensorError(message)


def _enospc_os(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failure", [_enospc_safetensors, _enospc_os])
@pytest.mark.parametrize("existing", [False, True])
def test_a_full_disk_while_saving_is_one_error_and_leaves_the_old_checkpoint(
    tmp_path, monkeypatch, source, failure, existing
):
    import transformers.modeling_utils

    out = tmp_path / "out"
    if existing:
        (out).mkdir()
        (out / "old.txt").write_text("the previous checkpoint")
    before = _tree(tmp_path)
    model = ghostsolve.load(source)
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", failure)
    with pytest.raises(GhostsolveError, match=r"cannot write the checkpoint .*the disk is full"):
        ghostsolve.save(model, out, overwrite=True)
    assert _tree(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])


def test_a_full_disk_while_writing_a_report(tmp_path, monkeypatch):
    report = tmp_path / "r.json"
    report.write_text("old")
    monkeypatch.setattr(Path, "write_text", _enospc_os)
    with pytest.raises(GhostsolveError, match=r"cannot write the report .*the disk is full"):
        write_text(report, "new", what="the report")
    monkeypatch.undo()
    assert report.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


# item 8: the --overwrite swap, crashed between its two renames ---------------------------------------------
def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


class _Crash(BaseException):
    """The process dies: nothing after this point runs (no rollback, no clean-up)."""


def _crash_between_renames(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_rename = os.rename

    def rename(src, dst):
        calls.append((src, dst))
        if len(calls) > 1:  # the first rename (old aside) happened; the process dies before the second
            raise _Crash
        real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda *a, **k: None)
    dead = _dead_pid()
    monkeypatch.setattr(atomic.os, "getpid", lambda: dead)


def _crashed_overwrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "weights").write_text("version 1")
    _crash_between_renames(monkeypatch)
    with pytest.raises(_Crash), atomic_directory(out, overwrite=True) as tmp:
        (tmp / "weights").write_text("version 2")
    monkeypatch.undo()
    assert not out.exists()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0].startswith(".ckpt.old-") and names[1].startswith(".ckpt.tmp-")
    return out


def test_a_later_save_restores_and_cleans_up_after_a_crashed_swap(tmp_path, monkeypatch, caplog):
    out = _crashed_overwrite(tmp_path, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="ghostsolve"):
        with pytest.raises(GhostsolveError, match="already exists"):  # restored: it is there again
            with atomic_directory(out, overwrite=False):
                pass
    assert (out / "weights").read_text() == "version 1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    text = caplog.text
    assert "restored" in text and "interrupted --overwrite" in text and "removed .ckpt.tmp-" in text


def test_a_later_load_restores_the_checkpoint_after_a_crashed_swap(tmp_path, monkeypatch, source, caplog):
    import shutil

    out = tmp_path / "ckpt"
    shutil.copytree(source, out)
    before = _tree(out)
    _crash_between_renames(monkeypatch)
    with pytest.raises(_Crash), atomic_directory(out, overwrite=True) as tmp:
        (tmp / "x").write_text("new")
    monkeypatch.undo()
    assert not out.exists()
    with caplog.at_level(logging.WARNING, logger="ghostsolve"):
        ghostsolve.load(out)
    assert _tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert "restored" in caplog.text


def test_a_process_killed_between_the_renames_is_recovered(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "weights").write_text("version 1")
    script = textwrap.dedent(f"""
        import os, signal
        from ghostsolve.pipeline.io import atomic
        real, calls = os.rename, []
        def rename(src, dst):
            calls.append(src)
            if len(calls) > 1:
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst)
        atomic.os.rename = rename
        with atomic.atomic_directory({str(out)!r}, overwrite=True) as tmp:
            (tmp / "weights").write_text("version 2")
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not out.exists()
    assert recover_interrupted(out)
    assert (out / "weights").read_text() == "version 1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_write_in_progress_is_left_alone(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_directory(out) as tmp:
        assert recover_interrupted(out) == [] and tmp.exists()  # this process is alive: its directory stays
    assert out.is_dir()


def test_leftovers_of_older_versions_without_a_process_id_are_cleaned(tmp_path):
    out = tmp_path / "ckpt"
    (tmp_path / ".ckpt.old-1a2b3c4d").mkdir()
    (tmp_path / ".ckpt.tmp-x8_k2m0q").mkdir()
    (tmp_path / ".other.tmp-x8_k2m0q").mkdir()
    done = recover_interrupted(out)
    assert len(done) == 2 and out.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-x8_k2m0q", "ckpt"]
