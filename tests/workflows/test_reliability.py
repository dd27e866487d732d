"""The workflows from Python on requests that must be refused or flagged (issue 13)."""

from __future__ import annotations

import pytest
import torch

import ghostsolve
from ghostsolve import GhostsolveError
from tests.pipeline._tiny import tiny_model_dir

WINDOWS = torch.randint(3, 97, (4, 16), generator=torch.Generator().manual_seed(2))


def _tree(path):
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# item 3 -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("relative", [".", "sub", ".."])
def test_prune_from_python_refuses_an_output_overlapping_the_loaded_model(tmp_path, relative):
    source = tiny_model_dir(tmp_path / "models" / "m", layers=4)
    before = _tree(tmp_path / "models")
    model = ghostsolve.load(source)
    out = (source / relative) if relative != "." else source
    with pytest.raises(GhostsolveError, match=r"the input .* outside it"):
        ghostsolve.prune(model, calibration=WINDOWS, drop=[1], methods=["ghost"], out=out, overwrite=True,
                         progress=False)  # fmt: skip
    assert _tree(tmp_path / "models") == before


def test_save_refuses_to_replace_the_directory_the_model_came_from(tmp_path):
    source = tiny_model_dir(tmp_path / "m", layers=4)
    before = _tree(source)
    model = ghostsolve.load(source)
    with pytest.raises(GhostsolveError, match="is the input"):
        ghostsolve.save(model, source, overwrite=True)
    assert _tree(source) == before
