"""The prune workflow: one capture serves selection and recovery where the rule allows; stages are timed."""

from __future__ import annotations

import pytest
import torch

from ghostsolve.pipeline.capture.hooks import HookEngine
from ghostsolve.workflows import prune
from tests.model_factories import tiny_model

WINDOWS = torch.randint(3, 97, (8, 16), generator=torch.Generator().manual_seed(2))


def _count_captures(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real = HookEngine.run

    def counting(self: HookEngine, *args: object, **kwargs: object) -> None:
        calls.append(1)
        real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(HookEngine, "run", counting)
    return calls


@pytest.mark.parametrize("strategy", ["streamline", "angular", "recoverable"])
@pytest.mark.parametrize("ridge", [None, "cv"])
def test_a_block_rule_captures_once_for_selection_and_recovery(monkeypatch, strategy, ridge) -> None:
    model = tiny_model("llama", num_layers=5)
    calls = _count_captures(monkeypatch)
    result = prune(model, calibration=WINDOWS, select=strategy, num_drop=2, methods=["ghost", "identity"],
                   ridge=ridge, progress=False)  # fmt: skip
    assert len(calls) == 1  # the selection's own pass
    monkeypatch.undo()
    # The handed-on statistics give the same operator as a recovery that captures its own.
    again = prune(model, calibration=WINDOWS, drop=result.removed, methods=["ghost"], ridge=ridge,
                  progress=False)  # fmt: skip
    start = result.removed[0]
    first = result.recovery.fits[(start, start + 2)]
    second = again.recovery.fits[(start, start + 2)]
    assert first.ridge == second.ridge
    torch.testing.assert_close(first.delta, second.delta, rtol=1e-9, atol=1e-12)


def test_a_rule_with_another_token_rule_does_not_hand_on_its_statistics(monkeypatch) -> None:
    model = tiny_model("llama", num_layers=5)
    calls = _count_captures(monkeypatch)
    prune(model, calibration=WINDOWS, select="streamline", num_drop=2,
          select_options={"skip_first_token": True}, methods=["ghost"], progress=False)  # fmt: skip
    assert len(calls) == 2  # rows differ (the first token skipped in selection only): recovery captures again


def test_every_stage_is_timed() -> None:
    result = prune(tiny_model("llama"), calibration=WINDOWS, evaluation=WINDOWS[:2], drop=[1],
                   methods=["ghost"], progress=False)  # fmt: skip
    assert set(result.timings) >= {"capture", "fit", "evaluation", "total"}
    assert all(v >= 0 for v in result.timings.values())
    assert result.timings["total"] >= result.timings["capture"] + result.timings["evaluation"]
