"""Atomic writes of directories and files, with the modes a plain ``open``/``mkdir`` would give.

Everything is written under a temporary name beside the target and renamed into place, so a failure
never leaves a partial output. ``tempfile`` creates its directories 0700 and files 0600 and a rename
keeps those modes, so before the rename every path we wrote is given the mode the user's umask asks
for (``0o777 & ~umask`` for directories, ``0o666 & ~umask`` for files) — otherwise a checkpoint or a
report would be readable by its owner only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ghostsolve.errors import GhostsolveError

__all__ = [
    "atomic_directory",
    "atomic_file",
    "check_destination",
    "refuse_existing", "save_png", "write_bytes",
    "write_text",
]


def _umask() -> int:
    """The process umask. It can only be read by setting it, so set 0 and restore at once."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _apply_default_modes(root: Path) -> None:
    """Give ``root`` (a file, or a directory and everything under it) the modes ``open``/``mkdir`` would."""
    mask = _umask()
    dir_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    if not root.is_dir():
        os.chmod(root, file_mode)
        return
    for base, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(base, name), dir_mode)
        for name in files:
            os.chmod(os.path.join(base, name), file_mode)
    os.chmod(root, dir_mode)


def refuse_existing(out: Path, overwrite: bool) -> None:
    """Check that ``out`` may become an output directory.

    Raises
    ------
    GhostsolveError
        If ``out`` exists and ``overwrite`` is false, or exists and is not a directory.
    """
    if out.exists() and not overwrite:
        raise GhostsolveError(
            f"output {str(out)!r} already exists; choose another --out or pass --overwrite (overwrite=True)"
        )
    if out.exists() and not out.is_dir():
        raise GhostsolveError(
            f"output {str(out)!r} exists and is not a directory; remove it or choose another"
        )


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out_dir`` when the block succeeds.

    The temporary directory sits in the same parent (so the final ``os.rename`` is atomic on one
    filesystem). On any exception it is deleted and ``out_dir`` is left as it was. With ``overwrite``, an
    existing ``out_dir`` is moved aside, the new one renamed in, and the old one deleted; if renaming the
    new one in fails, the old one is moved back.

    Raises
    ------
    GhostsolveError
        If ``out_dir`` exists and ``overwrite`` is false, or exists and is not a directory.
    """
    out = Path(out_dir).absolute()
    refuse_existing(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _apply_default_modes(tmp)
        # Re-check: another process may have created out_dir while we were writing.
        refuse_existing(out, overwrite)
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_destination(path: str | Path, *, what: str = "the file") -> None:
    """Check, before any work, that a file can later be written at ``path`` (its folder exists).

    Raises
    ------
    GhostsolveError
        If the folder of ``path`` does not exist, or ``path`` is an existing directory.
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise GhostsolveError(
            f"cannot write {what} to {str(target)!r}: folder {str(target.parent)!r} does not exist; "
            "create it or choose another path"
        )
    if target.is_dir():
        raise GhostsolveError(
            f"cannot write {what} to {str(target)!r}: it is a directory; give a file path"
        )


@contextlib.contextmanager
def atomic_file(path: str | Path, *, what: str = "the file") -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; it replaces ``path`` when the block succeeds.

    ``what`` names the file in the error message (e.g. ``"the report"``). On any exception the
    temporary file is deleted and ``path`` is left as it was.

    Raises
    ------
    GhostsolveError
        If the folder of ``path`` does not exist or ``path`` is a directory.
    """
    target = Path(path)
    check_destination(target, what=what)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _apply_default_modes(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str, *, what: str = "the file") -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; see :func:`atomic_file` (same Raises)."""
    with atomic_file(path, what=what) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_bytes(path: str | Path, data: bytes, *, what: str = "the file") -> Path:
    """Write ``data`` to ``path`` atomically; see :func:`atomic_file` (same Raises)."""
    with atomic_file(path, what=what) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def save_png(fig: Any, path: str | Path, *, what: str = "the plot", dpi: int = 120) -> Path:
    """Save a matplotlib ``Figure`` as PNG to ``path`` atomically; see :func:`atomic_file` (same Raises)."""
    with atomic_file(path, what=what) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)
