"""Atomic writes keep the old output on failure and give the modes the umask asks for."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.io import atomic
from ghostsolve.pipeline.io.atomic import atomic_directory, check_destination, write_bytes, write_text


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_directory_and_files_inside_get_umask_modes(tmp_path: Path, umask_022: None) -> None:
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "w.bin").write_bytes(b"x")
        (tmp / "a.json").write_text("{}")
        os.chmod(tmp / "a.json", 0o600)
    out = tmp_path / "out"
    assert _mode(out) == 0o755
    assert _mode(out / "sub") == 0o755
    assert _mode(out / "sub" / "w.bin") == 0o644
    assert _mode(out / "a.json") == 0o644


def test_files_get_umask_modes(tmp_path: Path, umask_022: None) -> None:
    assert _mode(write_text(tmp_path / "r.json", "{}")) == 0o644
    assert _mode(write_bytes(tmp_path / "b.bin", b"\0")) == 0o644
    os.umask(0o077)
    assert _mode(write_text(tmp_path / "private.json", "{}")) == 0o600


def test_the_umask_is_left_as_it_was(tmp_path: Path, umask_022: None) -> None:
    write_text(tmp_path / "r.json", "{}")
    assert os.umask(0o022) == 0o022


def test_a_failed_final_rename_restores_the_old_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    real_rename = os.rename

    def rename(src: str | Path, dst: str | Path) -> None:
        if Path(src).name.startswith(".out.tmp-"):
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"), atomic_directory(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "keep.txt").read_text() == "old"


def test_a_failed_file_write_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "r.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"), atomic.atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_destination_errors(tmp_path: Path) -> None:
    with pytest.raises(GhostsolveError, match=r"cannot write the report to .*folder .*no' does not exist"):
        check_destination(tmp_path / "no" / "r.json", what="the report")
    with pytest.raises(GhostsolveError, match=r"cannot write the plot to .*: it is a directory"):
        check_destination(tmp_path, what="the plot")
    with pytest.raises(GhostsolveError, match=r"cannot write the file to .* does not exist"):
        write_text(tmp_path / "no" / "x.txt", "x")
