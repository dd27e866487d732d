"""Checkpoints and atomic writes under faults (issue 13): corrupt files, a full disk, a killed --overwrite."""

from __future__ import annotations

import errno
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors
import torch

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


# item 7: config.json may not steer getattr/setattr anywhere -------------------------------------------------
def _edit(section, **changes):
    ghosts = section["ghosts"]
    if "module" in changes:
        ghosts[0]["module"] = changes.pop("module")
    for key in ("hidden_states_kwarg", "hidden_states_arg_position"):
        if key in changes:
            ghosts[0][key] = changes.pop(key)
    if "norm_entry" in changes:
        entry = {"kind": "norm", "module": changes.pop("norm_entry"), "dim": ghosts[0]["dim"],
                 "insert_at": "final_norm", "delta_dtype": "float32", "compute_dtype": None}  # fmt: skip
        ghosts.append(entry)
    section["layout"].update(changes)


CRAFTED = {
    "module dunder": {"module": "model.__class__.__init__"},
    "module private": {"module": "model._modules.layers.1"},
    "layers dunder": {"layers_path": "model.__class__", "module": "model.__class__.1"},
    "layers not the layer list": {"layers_path": "model.layers.0.mlp", "module": "model.layers.0.mlp.0"},
    "norm is the head": {"final_norm_path": "lm_head", "norm_entry": "lm_head"},
    "norm is the embedding": {"final_norm_path": "model.embed_tokens", "norm_entry": "model.embed_tokens"},
    "norm dunder": {"final_norm_path": "model.norm.__class__", "norm_entry": "model.norm.__class__"},
    "kwarg dunder": {"hidden_states_kwarg": "__class__"},
    "position not an int": {"hidden_states_arg_position": "1e9"},
    "position huge": {"hidden_states_arg_position": 10**9},
}


def _class_state():
    import torch.nn
    import transformers
    from transformers.models.llama import modeling_llama

    classes = [transformers.LlamaModel, transformers.LlamaForCausalLM, modeling_llama.LlamaDecoderLayer,
               modeling_llama.LlamaRMSNorm, torch.nn.Linear, torch.nn.Embedding, torch.nn.Module]  # fmt: skip
    return {cls: dict(vars(cls)) for cls in classes}


@pytest.mark.parametrize("loader", ["ghostsolve", "remote code"])
@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_a_crafted_config_is_refused_and_patches_nothing(tmp_path, ghosted, loader, case):
    import json
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    folder = shutil.copytree(ghosted, tmp_path / "crafted")
    config = json.loads((folder / "config.json").read_text())
    _edit(config["ghostsolve"], **dict(CRAFTED[case]))
    (folder / "config.json").write_text(json.dumps(config))
    if "norm_entry" in CRAFTED[case]:  # give the extra operator its weight, so no missing key gives it away
        weights = load_file(folder / "model.safetensors")
        dim = config["ghostsolve"]["ghosts"][0]["dim"]
        weights[CRAFTED[case]["norm_entry"] + ".ghost.delta"] = torch.zeros(dim, dim)
        save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    before = _class_state()
    with pytest.raises(ValueError) as caught:  # GhostsolveError (a ValueError) with ghostsolve installed
        if loader == "ghostsolve":
            ghostsolve.load(folder)
        else:
            AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    assert isinstance(caught.value, GhostsolveError)
    assert "ghost" in str(caught.value) or "layout" in str(caught.value) or "path" in str(caught.value)
    after = _class_state()
    assert after.keys() == before.keys()
    for cls in before:
        assert after[cls] == before[cls], f"{cls.__name__} was modified"


def test_the_untouched_checkpoint_loads_by_both_routes(ghosted):
    from transformers import AutoModelForCausalLM

    ghostsolve.load(ghosted)
    AutoModelForCausalLM.from_pretrained(ghosted, trust_remote_code=True)


# item 11: loose checks of the loader ----------------------------------------------------------------------
@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("loader", ["ghostsolve", "remote code"])
def test_an_operator_holding_nan_or_inf_is_refused(tmp_path, ghosted, loader, value):
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    folder = shutil.copytree(ghosted, tmp_path / "damaged")
    weights = load_file(folder / "model.safetensors")
    (key,) = [k for k in weights if k.endswith("ghost.delta")]
    weights[key][0, :3] = value
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(GhostsolveError, match=r"ghost operator of model\.layers\.\d+ holds 3 NaN/Inf value"):
        if loader == "ghostsolve":
            ghostsolve.load(folder)
        else:
            AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal when no GPU is visible")
def test_loading_onto_an_absent_gpu_is_a_clear_error(source):
    with pytest.raises(GhostsolveError, match=r"device='cuda' was asked but 0 CUDA device\(s\) are visible"):
        ghostsolve.load(source, device="cuda")
