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


def test_the_default_ridge_is_cross_validated() -> None:
    model = tiny_model("llama")
    fits = {
        ridge: prune(model, calibration=WINDOWS, drop=[1], methods=["ghost"], ridge=ridge, progress=False)
        .recovery.fits[(1, 2)]
        for ridge in (None, "cv")
    }
    assert fits[None].ridge == fits["cv"].ridge > 0  # 8 windows of 16 tokens for a 32×32 operator: cv ridges
    torch.testing.assert_close(fits[None].delta, fits["cv"].delta, rtol=0, atol=0)


def test_one_calibration_window_falls_back_to_gcv() -> None:
    model = tiny_model("llama")
    one = WINDOWS[:1]
    default = prune(model, calibration=one, drop=[1], methods=["ghost"], progress=False).recovery.fits[(1, 2)]
    gcv = prune(model, calibration=one, drop=[1], methods=["ghost"], ridge="gcv", progress=False)
    assert default.ridge == gcv.recovery.fits[(1, 2)].ridge
    torch.testing.assert_close(default.delta, gcv.recovery.fits[(1, 2)].delta, rtol=0, atol=0)
