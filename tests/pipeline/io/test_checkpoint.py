"""Checkpoints: round trips of both kinds, remote code, atomic writes and loud failures."""

from __future__ import annotations

import ast
import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import ghostsolve
from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.data import batches_from_windows, text_windows
from ghostsolve.pipeline.io.checkpoint import MODELING_FILE, atomic_directory, checkpoint_info, load, save
from ghostsolve.pipeline.model.operators import GhostedLayer, GhostedNorm
from ghostsolve.pipeline.recover import recover
from tests.pipeline._tiny import TEXT, tiny_llama, tiny_tokenizer

IDS = torch.randint(0, 200, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def batches(tok):
    return batches_from_windows(text_windows(TEXT * 4, tok, 16), 8)


def _logits(model, ids=IDS):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def ghost_recovery(tok, batches):
    # Two intervals: one in the middle (a GhostedLayer) and one reaching the end (a GhostedNorm).
    model = tiny_llama(len(tok), layers=6)
    return recover(model, [1, 2, 5], batches, method="ghost", progress=False)


def test_ghosted_round_trip_is_bit_identical(tmp_path, ghost_recovery, tok):
    out = save(ghost_recovery, tmp_path / "ckpt", tokenizer=tok, original_model="tiny-llama")
    expected = _logits(ghost_recovery.model)

    loaded = ghostsolve.load(out)
    assert type(loaded) is type(ghost_recovery.model)
    assert isinstance(loaded.model.layers[1], GhostedLayer)
    assert isinstance(loaded.model.norm, GhostedNorm)
    assert torch.equal(_logits(loaded), expected)

    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert type(remote).__name__ == "GhostsolveLlamaForCausalLM"
    assert torch.equal(_logits(remote), expected)
    assert (out / MODELING_FILE).is_file()
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer_config.json").is_file()


def test_config_records_the_run(tmp_path, ghost_recovery):
    out = save(ghost_recovery, tmp_path / "ckpt", original_model="tiny-llama")
    info = checkpoint_info(out)
    assert info is not None
    assert info["original_model"] == "tiny-llama"
    assert info["removed"] == [1, 2, 5]
    assert info["intervals"] == ["1-2", "5"]  # the layers, as --drop names them
    assert info["method"] == "ghost"
    assert info["original_num_layers"] == 6
    assert info["checkpoint_kind"] == "ghosted"
    assert [(g["insert_at"], g["dim"]) for g in info["ghosts"]] == [(1, 32), ("final_norm", 32)]
    assert len(info["fits"]) == 2 and all(f["family"] == "full" for f in info["fits"])
    assert all(0 <= f["relative_residual"] <= 1 for f in info["fits"])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "ghostsolve_llama"
    assert config["num_hidden_layers"] == 3


def test_remote_code_is_self_contained(tmp_path, ghost_recovery):
    out = save(ghost_recovery, tmp_path / "ckpt")
    tree = ast.parse((out / MODELING_FILE).read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    } | {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    # Beside the standard library: torch, transformers and the operators shipped beside it (ghostsolve itself
    # is tried first, inside a try block, and needs not be installed: the subprocess below proves it).
    assert imported - set(sys.stdlib_module_names) <= {"torch", "transformers", "ghostsolve",
        "ghostsolve_operators"}
    operators = ast.parse((out / "ghostsolve_operators.py").read_text())
    assert {
        n.module.split(".")[0] for n in ast.walk(operators) if isinstance(n, ast.ImportFrom) and n.module
    } - set(sys.stdlib_module_names) <= {"torch", "ghostsolve"}
    # Load in a fresh interpreter where `import ghostsolve` fails, as for a user without ghostsolve.
    torch.save(_logits(ghost_recovery.model), tmp_path / "expected.pt")
    torch.save(IDS, tmp_path / "ids.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["ghostsolve"] = None
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            logits = model(input_ids=torch.load({str(tmp_path / "ids.pt")!r})).logits
        assert torch.equal(logits, torch.load({str(tmp_path / "expected.pt")!r})), "logits differ"
        print("remote-ok")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert "remote-ok" in result.stdout, result.stderr[-2000:]


@pytest.mark.parametrize("method", ["identity", "prune-comp", "replaceme"])
def test_folded_methods_save_plain_checkpoints(tmp_path, tok, batches, method):
    model = tiny_llama(len(tok), layers=6)
    rec = recover(model, [2, 3], batches, method=method, progress=False)
    out = save(rec, tmp_path / method)
    assert not (out / MODELING_FILE).exists()
    config = json.loads((out / "config.json").read_text())
    assert "auto_map" not in config
    assert config["model_type"] == "llama"
    assert config["ghostsolve"]["method"] == method
    assert config["ghostsolve"]["checkpoint_kind"] == "plain"
    plain = AutoModelForCausalLM.from_pretrained(out)  # no custom code needed
    assert torch.equal(_logits(plain), _logits(rec.model))
    assert torch.equal(_logits(load(out)), _logits(rec.model))


def test_a_loaded_checkpoint_saves_again_identically(tmp_path, ghost_recovery):
    first = save(ghost_recovery, tmp_path / "a", original_model="tiny-llama")
    second = save(load(first), tmp_path / "b")
    info = checkpoint_info(second)
    assert info is not None
    assert info["original_model"] == "tiny-llama"
    assert info["removed"] == [1, 2, 5]
    assert torch.equal(_logits(load(second)), _logits(ghost_recovery.model))


# ---------------------------------------------------------------------------------------------
# overwrite and atomicity
# ---------------------------------------------------------------------------------------------
def test_existing_output_is_refused_without_overwrite(tmp_path, ghost_recovery):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(GhostsolveError, match="already exists; choose another --out or pass --overwrite"):
        save(ghost_recovery, out)
    assert (out / "keep.txt").read_text() == "old"
    save(ghost_recovery, out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(GhostsolveError, match="is not a directory"):
        save(ghost_recovery, tmp_path / "file", overwrite=True)


def test_a_failed_save_leaves_nothing_behind(tmp_path, ghost_recovery, monkeypatch):
    model = ghost_recovery.model
    original = type(model).save_pretrained

    def broken(self, path, **kw):
        original(self, path, **kw)
        raise OSError("disk full")

    monkeypatch.setattr(type(model), "save_pretrained", broken)
    with pytest.raises(GhostsolveError, match="disk full"):
        save(ghost_recovery, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    # With overwrite, the previous checkpoint survives a failed save untouched.
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text("{}")
    with pytest.raises(GhostsolveError, match="disk full"):
        save(ghost_recovery, old, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert (old / "config.json").read_text() == "{}"


def test_saved_checkpoint_follows_the_umask(tmp_path, ghost_recovery):
    old = os.umask(0o022)
    try:
        out = save(ghost_recovery, tmp_path / "ckpt")
    finally:
        os.umask(old)
    assert stat.S_IMODE(Path(out).stat().st_mode) == 0o755
    files = [p for p in Path(out).rglob("*") if p.is_file()]
    assert files and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}


def test_atomic_directory_renames_only_on_success(tmp_path):
    with atomic_directory(tmp_path / "d") as tmp:
        (tmp / "x").write_text("1")
        assert not (tmp_path / "d").exists()
    assert (tmp_path / "d" / "x").read_text() == "1"
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(tmp_path / "e") as tmp:
        (tmp / "x").write_text("1")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


# ---------------------------------------------------------------------------------------------
# loud failures at load
# ---------------------------------------------------------------------------------------------
def _rewrite_weights(out, change):
    weights = load_file(out / "model.safetensors")
    change(weights)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})


def test_missing_operator_weight_fails_loudly(tmp_path, ghost_recovery):
    out = save(ghost_recovery, tmp_path / "ckpt")
    _rewrite_weights(out, lambda w: w.pop("model.layers.1.ghost.delta"))
    with pytest.raises(GhostsolveError, match=r"missing weights \['model.layers.1.ghost.delta'\]"):
        load(out)
    with pytest.raises(ValueError, match="does not load exactly"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)


def test_mis_shaped_operator_weight_fails_loudly(tmp_path, ghost_recovery):
    out = save(ghost_recovery, tmp_path / "ckpt")
    _rewrite_weights(out, lambda w: w.__setitem__("model.norm.ghost.delta", torch.zeros(16, 16)))
    with pytest.raises(GhostsolveError, match="cannot load the ghosted checkpoint"):
        load(out)
    with pytest.raises((ValueError, RuntimeError), match=r"mismatched|ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)


def test_operator_weights_without_a_layout_fail_loudly(tmp_path, ghost_recovery):
    out = save(ghost_recovery, tmp_path / "ckpt")
    config = json.loads((out / "config.json").read_text())
    config["ghostsolve"]["ghosts"] = []  # the operators' weights stay, their places are forgotten
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(GhostsolveError, match="unexpected weights"):
        load(out)
    config["model_type"] = "llama"
    del config["auto_map"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(GhostsolveError, match="unexpected weights"):
        load(out)


def test_loading_a_ghosted_checkpoint_without_remote_code_is_refused(tmp_path, ghost_recovery):
    out = save(ghost_recovery, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)


def test_load_errors(tmp_path):
    with pytest.raises(GhostsolveError, match=r"has no config\.json"):
        load(tmp_path)
    (tmp_path / "f.bin").write_bytes(b"")
    with pytest.raises(GhostsolveError, match="is a file"):
        load(tmp_path / "f.bin")


def test_plain_transformers_directories_load_strictly(tmp_path, tok):
    model = tiny_llama(len(tok), layers=2)
    model.save_pretrained(tmp_path / "plain")
    assert checkpoint_info(tmp_path / "plain") is None
    assert torch.equal(_logits(load(tmp_path / "plain")), _logits(model))
    _rewrite_weights(tmp_path / "plain", lambda w: w.pop("model.norm.weight"))
    with pytest.raises(GhostsolveError, match=r"missing weights \['model.norm.weight'\]"):
        load(tmp_path / "plain")


def test_save_rejects_other_objects(tmp_path):
    with pytest.raises(GhostsolveError, match="needs a Recovery or a transformers model"):
        save(torch.nn.Linear(2, 2), tmp_path / "x")


# ---------------------------------------------------------------------------------------------
# every family
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama-tied", "mistral", "qwen2", "qwen3", "olmo2", "olmo3"])
def test_ghosted_round_trip_for_every_family(tmp_path, family):
    from tests.model_factories import random_batches, tiny_model

    model = tiny_model(family, num_layers=4)
    rec = recover(model, [1, 3], random_batches(n_batches=2, seq_len=16), method="ghost", progress=False)
    out = save(rec, tmp_path / family)
    expected = _logits(rec.model, IDS % 97)
    assert torch.equal(_logits(load(out), IDS % 97), expected)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert torch.equal(_logits(remote, IDS % 97), expected)
    # The rebuilt model generates with a KV cache like the in-memory one.
    prompt = (IDS % 97)[:1, :4]
    kwargs = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    generated = rec.model.generate(prompt, **kwargs)  # type: ignore[operator]  # typed as nn.Module
    assert torch.equal(remote.generate(prompt, **kwargs), generated)


def test_a_resave_loads_back_exactly_by_every_route(tmp_path, ghost_recovery):
    # The recovered model is a Ghostsolve<Base>ForCausalLM: its own save_pretrained writes a complete
    # checkpoint (remote code and layout included), and so does a loaded model's.
    expected = _logits(ghost_recovery.model)
    first = tmp_path / "first"
    ghost_recovery.model.save_pretrained(first)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(first, trust_remote_code=True)), expected)
    again = tmp_path / "again"
    load(first).save_pretrained(again)
    assert torch.equal(_logits(load(again)), expected)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(again, trust_remote_code=True)), expected)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(again)  # never silently the unrecovered base model
    keys = set(load_file(again / "model.safetensors"))
    assert "model.layers.1.self_attn.q_proj.weight" in keys and "model.layers.1.ghost.delta" in keys


def test_top_level_save_and_load(tmp_path, ghost_recovery):
    out = ghostsolve.save(ghost_recovery, tmp_path / "ckpt")
    assert torch.equal(_logits(ghostsolve.load(out)), _logits(ghost_recovery.model))


def test_checkpoints_of_the_first_format_still_load(tmp_path):
    # tests/models/v1-ghosted was written by ghostsolve before the restructure (format 1: each ghosted layer
    # inside a wrapper, weights under model.layers.{i}.layer.*), with the logits its in-memory model gave.
    folder = Path(__file__).resolve().parents[2] / "models" / "v1-ghosted"
    expected = torch.load(folder / "expected_logits.pt")
    loaded = load(folder)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=expected["input_ids"]).logits, expected["logits"])
    # Re-saved, it becomes a checkpoint of the current format that loads back exactly.
    out = tmp_path / "v2"
    loaded.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["ghostsolve"]["format_version"] == 2
    with torch.no_grad():
        assert torch.equal(load(out)(input_ids=expected["input_ids"]).logits, expected["logits"])
