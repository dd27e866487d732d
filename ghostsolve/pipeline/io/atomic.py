"""Atomic writes of directories and files, with the modes a plain ``open``/``mkdir`` would give.

Everything is written under a temporary name beside the target and renamed into place, so a failure
never leaves a partial output. ``tempfile`` creates its directories 0700 and files 0600 and a rename
keeps those modes, so before the rename every path we wrote is given the mode the user's umask asks
for (``0o777 & ~umask`` for directories, ``0o666 & ~umask`` for files) — otherwise a checkpoint or a
report would be readable by its owner only.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ghostsolve.errors import GhostsolveError

logger = logging.getLogger(__name__)

__all__ = [
    "atomic_directory",
    "atomic_file",
    "check_destination",
    "check_writable",
    "recover_interrupted",
    "refuse_existing",
    "refuse_overlap",
    "save_png",
    "write_bytes",
    "write_error",
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


def refuse_overlap(out: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Check that the output ``out`` neither is, contains, nor lies inside any of the local ``inputs``.

    Paths are compared resolved (symbolic links followed, ``..`` removed). An input that is not a local
    path (a hub id) or is ``None`` is skipped. Without this check ``--out MODEL --overwrite`` would replace
    the input model by its own pruned checkpoint.

    Raises
    ------
    GhostsolveError
        If ``out`` overlaps an input.
    """
    target = Path(out).resolve()
    for source in inputs:
        if source is None or not str(source) or not Path(source).exists():
            continue
        here = Path(source).resolve()
        if target == here:
            relation = "is"
        elif here in target.parents:
            relation = "lies inside"
        elif target in here.parents:
            relation = "contains"
        else:
            continue
        raise GhostsolveError(
            f"output {str(out)!r} {relation} the input {str(source)!r}; writing there would damage the "
            "input: choose an output path (--out, --report, --plot) outside it"
        )


def check_writable(path: str | Path, *, what: str = "the file") -> None:
    """Check that ``path`` can be created: the nearest existing folder above it is writable (and searchable).

    Everything here is written under a temporary name in that folder and renamed into place, so the folder's
    permission is what counts, also when ``path`` exists already.

    Raises
    ------
    GhostsolveError
        If that folder is not writable, naming it.
    """
    target = Path(path).absolute()
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise GhostsolveError(
            f"cannot write {what} to {str(path)!r}: folder {str(folder)!r} is not writable (permission "
            "denied); choose another path or make the folder writable"
        )


def refuse_existing(out: Path, overwrite: bool, *, inputs: Iterable[str | Path | None] = ()) -> None:
    """Check that ``out`` may become an output directory (and overlaps none of ``inputs``).

    Raises
    ------
    GhostsolveError
        If ``out`` exists and ``overwrite`` is false, or exists and is not a directory, or it is, contains
        or lies inside one of ``inputs`` (:func:`refuse_overlap`), or its folder is not writable
        (:func:`check_writable`).
    """
    refuse_overlap(out, inputs)
    recover_interrupted(out)
    check_writable(out, what="the output")
    if out.exists() and not overwrite:
        raise GhostsolveError(
            f"output {str(out)!r} already exists; choose another --out or pass --overwrite (overwrite=True)"
        )
    if out.exists() and not out.is_dir():
        raise GhostsolveError(
            f"output {str(out)!r} exists and is not a directory; remove it or choose another"
        )


@contextlib.contextmanager
def atomic_directory(
    out_dir: str | Path, *, overwrite: bool = False, what: str = "the output"
) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out_dir`` when the block succeeds.

    The temporary directory sits in the same parent (so the final ``os.rename`` is atomic on one
    filesystem). On any exception it is deleted and ``out_dir`` is left as it was. With ``overwrite``, an
    existing ``out_dir`` is moved aside, the new one renamed in, and the old one deleted; if renaming the
    new one in fails, the old one is moved back. A process killed between those two renames leaves no
    ``out_dir`` but the old one under a hidden name: the next write (or :func:`recover_interrupted`, which
    :func:`refuse_existing` and the checkpoint loader call) puts it back. The hidden names carry the writer's
    process id, so a write still in progress is never touched.

    Raises
    ------
    GhostsolveError
        If ``out_dir`` exists and ``overwrite`` is false, or exists and is not a directory; or writing fails
        (a full disk, no permission: :func:`write_error`), in which case nothing is left behind.
    """
    out = Path(out_dir).absolute()
    refuse_existing(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{_TMP}{os.getpid()}-", dir=out.parent))
    except OSError as exc:
        raise _io_error(exc, out, what) from exc
    try:
        try:
            yield tmp
        except Exception as exc:
            error = write_error(exc, out, what)
            if error is None:
                raise
            raise error from exc
        _apply_default_modes(tmp)
        # Re-check: another process may have created out_dir while we were writing.
        refuse_existing(out, overwrite)
        if out.exists():
            old = out.parent / f".{out.name}{_OLD}{os.getpid()}-{uuid.uuid4().hex[:8]}"
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


_TMP, _OLD = ".tmp-", ".old-"


def _leftovers(out: Path) -> tuple[list[Path], list[Path]]:
    """Hidden ``.NAME.tmp-*`` and ``.NAME.old-*`` directories beside ``out`` whose writer is gone.

    Names written by this module are ``.NAME.tmp-PID-RANDOM`` / ``.NAME.old-PID-RANDOM``; a name without a
    process id (an older ghostsolve) counts as abandoned. Returns ``(tmp, old)``, newest first.
    """
    pattern = re.compile(rf"^\.{re.escape(out.name)}(\.tmp-|\.old-)(?:(\d+)-)?[A-Za-z0-9_]+$")
    found: dict[str, list[Path]] = {_TMP: [], _OLD: []}
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return [], []
    for entry in entries:
        match = pattern.match(entry.name)
        if match is None or not entry.is_dir() or entry.is_symlink():
            continue
        pid = match.group(2)
        if pid is not None and _alive(int(pid)):
            continue
        found[match.group(1)].append(entry)
    for paths in found.values():
        paths.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return found[_TMP], found[_OLD]


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # someone else's process, or a pid we cannot check: leave its files alone
    return True


def recover_interrupted(out: str | Path) -> list[str]:
    """Finish what a killed :func:`atomic_directory` left beside ``out``; returns what was done (also logged).

    If ``out`` is missing and an abandoned ``.NAME.old-*`` exists (the process died between its two
    renames), the newest one is renamed back to ``out``. Every other abandoned ``.NAME.old-*`` (the swap had
    completed) and ``.NAME.tmp-*`` (an unfinished write) is deleted. Directories of a writer that is still
    running are left alone.
    """
    target = Path(out).absolute()
    tmps, olds = _leftovers(target)
    done: list[str] = []
    if olds and not os.path.lexists(target):
        try:
            os.rename(olds[0], target)
            done.append(f"restored {str(target)!r} from {olds[0].name}, left by an interrupted --overwrite")
        except OSError as exc:
            done.append(f"could not restore {str(target)!r} from {olds[0].name} ({exc}); rename it back by "
                        "hand")
        olds = olds[1:]
    for path in (*olds, *tmps):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            done.append(f"removed {path.name}, left beside {str(target)!r} by an interrupted write")
    for line in done:
        logger.warning("%s", line)
    return done


def write_error(exc: BaseException, path: str | Path, what: str) -> GhostsolveError | None:
    """The one-line error for a failed write of ``what`` at ``path`` (None when ``exc`` is no I/O failure).

    ``OSError`` and safetensors' ``SafetensorError`` (which wraps the OS error of its own writer) are I/O
    failures; a full disk gets its own remedy.
    """
    if isinstance(exc, GhostsolveError):
        return None
    if not isinstance(exc, OSError) and type(exc).__name__ != "SafetensorError":
        return None
    text = " ".join(str(exc).split()) or type(exc).__name__
    full = getattr(exc, "errno", None) == errno.ENOSPC or "os error 28" in text or "No space left" in text
    remedy = ("the disk is full: free space there or choose another path" if full else
              "check the path and its permissions")  # fmt: skip
    return GhostsolveError(
        f"cannot write {what} to {str(path)!r} ({text}); {remedy}. Nothing was written, and what was there "
        "before is unchanged"
    )


def _io_error(exc: OSError, path: Path, what: str = "the output") -> GhostsolveError:
    error = write_error(exc, path, what)
    return error if error is not None else GhostsolveError(str(exc))


def check_destination(path: str | Path, *, what: str = "the file") -> None:
    """Check, before any work, that a file can later be written at ``path`` (its folder exists).

    Raises
    ------
    GhostsolveError
        If the folder of ``path`` does not exist or is not writable, or ``path`` is an existing directory.
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
    check_writable(target, what=what)


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
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise _io_error(exc, target, what) from exc
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _apply_default_modes(tmp)
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        error = write_error(exc, target, what)
        if error is None:
            raise
        raise error from exc


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
