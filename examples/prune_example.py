"""What ``ghostsolve prune`` does, from Python: select → evaluate → recover with several methods → evaluate →
save and report, on the bundled demo model with data-free (self-sampled) calibration.

    python examples/prune_example.py [OUT_DIR]

Swap ``ghostsolve.load(DEMO_MODEL_DIR)`` for your own ``AutoModelForCausalLM.from_pretrained(...)`` and
``"self"`` for a list of text files to run it on your model and data.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import ghostsolve
from ghostsolve.pipeline.data import calibration_windows, evaluation_windows
from ghostsolve.pipeline.io.checkpoint import load_tokenizer
from ghostsolve.workflows.demo import DEMO_MODEL_DIR


def main(out: Path) -> None:
    model = ghostsolve.load(DEMO_MODEL_DIR)
    tokenizer = load_tokenizer(DEMO_MODEL_DIR)
    # Calibration and evaluation sequences sampled from the dense model itself, on disjoint seed streams.
    calibration = calibration_windows(model, tokenizer, "self", n_windows=16, seq_len=64, progress=False)
    evaluation = evaluation_windows(model, tokenizer, "self", n_windows=8, seq_len=64, progress=False)

    result = ghostsolve.prune(
        model,
        tokenizer,
        calibration=calibration,
        evaluation=evaluation,
        select="recoverable",  # the block whose ghost fit leaves the smallest residual
        num_drop=3,
        methods=["ghost", "identity", "lowrank"],  # the first one listed is saved
        out=out / "pruned",
        progress=False,
    )
    print(result.format_table())
    print(result.format_timings())
    result.write_report(out / "report.json")

    pruned = ghostsolve.load(out / "pruned")  # loads back exactly, no remote code needed
    print(f"saved {out / 'pruned'}: {len(pruned.model.layers)} decoder layers, removed {result.removed}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
