"""The whole-model engine: one forward pass per batch, hooks read the taps (GPTQ's shape).

Pre-hooks on the decoder layers (and on the final norm; on their ghost operator's output where they hold one)
see the residual stream where it enters each boundary, forward hooks on the MLPs see their outputs, and each
event goes to its consumer as soon as its last tap exists; nothing is held beyond the batch in flight, and
only the taps a later event still needs. The forward stops (a private exception) right after the last tap, so
neither the later layers nor the lm_head run. The model runs where it sits — one device, several, or
dispatched by accelerate.

This engine has one stream. The sequential order needs a second one whose maps depend on every batch's
statistics, which no forward per batch can provide: given a :class:`PrunedStream`, it runs the two-stream
pass of :mod:`ghostsolve.pipeline.capture.layerwise` with the model resident where it sits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ghostsolve.adapters import ModelAdapter
from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.capture.plan import Consumer, Plan, PrunedStream, Tap
from ghostsolve.pipeline.model.batches import CalibrationBatch, eval_mode
from ghostsolve.pipeline.model.devices import model_input_device
from ghostsolve.pipeline.model.operators import ghost_of
from ghostsolve.pipeline.progress import progress_bar

__all__ = ["HookEngine"]


class _StopForward(Exception):
    """Raised by the hook of the last tap to end a forward pass early; never escapes this module."""


class _Batch:
    """The taps of the batch in flight, handed to consumers as their events complete."""

    def __init__(self, plan: Plan, adapter: ModelAdapter) -> None:
        self.plan = plan
        self.adapter = adapter
        self.held: dict[Tap, torch.Tensor] = {}
        self.fired: set[Tap] = set()
        self.batch: CalibrationBatch | None = None
        self.index = -1

    def arrive(self, tap: Tap, value: torch.Tensor) -> None:
        assert self.batch is not None
        self.held[tap] = value
        self.fired.add(tap)
        for route in self.plan.completes.get(tap, ()):
            missing = [t for t in route.taps if t not in self.held]
            if missing:
                raise GhostsolveError(
                    f"the capture hooks for {missing[0].describe(self.plan.num_layers)} never fired before "
                    f"{tap.describe(self.plan.num_layers)}; the model's forward does not run its decoder "
                    "layers "
                    f"as the {self.adapter.family} adapter expects ({self.adapter.layers_path})"
                )
            route.consumer.consume(route.key, [self.held[t] for t in route.taps], self.batch, self.index)
        for released in self.plan.releases.get(tap, ()):
            self.held.pop(released, None)
        if tap == self.plan.last:
            raise _StopForward


class HookEngine:
    """One whole-model forward per batch (``capture="hooks"``); see the module docstring."""

    name = "hooks"

    def run(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        batches: Sequence[CalibrationBatch],
        consumers: Sequence[Consumer],
        *,
        progress: bool = True,
        pruned: PrunedStream | None = None,
    ) -> None:
        """Deliver every consumer's events for every batch, then call each one's ``finish``.

        The model comes back unchanged (hooks removed, training flags restored), also on error.

        Raises
        ------
        GhostsolveError
            A tap that never fired (the forward does not run the layers as the adapter says); whatever a
            consumer raises.
        """
        if pruned is not None:
            from ghostsolve.pipeline.capture.layerwise import LayerwiseEngine

            LayerwiseEngine(onload=False).run(
                model, adapter, batches, consumers, progress=progress, pruned=pruned
            )
            return
        plan = Plan.build(consumers, len(adapter.layers(model)), None)
        state = _Batch(plan, adapter)
        device = model_input_device(model, adapter)
        with torch.no_grad(), eval_mode(model), _hooks(model, adapter, plan, state.arrive):
            for index, batch in enumerate(progress_bar(batches, progress, "ghostsolve capture")):
                state.batch, state.index = batch, index
                state.fired.clear()
                try:
                    model(**batch.model_inputs(device), use_cache=False)
                except _StopForward:
                    pass
                finally:
                    state.held.clear()
                _check_fired(plan, state.fired, adapter)
                if all(c.done for c in consumers):
                    break
        for consumer in consumers:
            consumer.finish()


def _check_fired(plan: Plan, fired: set[Tap], adapter: ModelAdapter) -> None:
    missing = [t for t in plan.taps if t not in fired]
    if missing:
        names = ", ".join(t.describe(plan.num_layers) for t in missing)
        raise GhostsolveError(
            f"the capture hooks for {names} never fired during the forward pass; the model's forward does "
            f"not run its decoder layers as the {adapter.family} adapter expects ({adapter.layers_path}, "
            f"{adapter.final_norm_path})"
        )


@contextlib.contextmanager
def _hooks(
    model: nn.Module, adapter: ModelAdapter, plan: Plan, arrive: Callable[[Tap, torch.Tensor], None]
) -> Iterator[None]:
    """Install one hook per tap; remove them all on any exit."""
    layers = adapter.layers(model)
    handles: list[torch.utils.hooks.RemovableHandle] = []

    def boundary_hook(tap: Tap) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            arrive(tap, adapter.hidden_states(args, kwargs))

        return hook

    def ghost_hook(tap: Tap) -> Callable[..., None]:
        # A module with a ghost operator applies it first: the stream it works on is the ghost's output.
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            arrive(tap, output)

        return hook

    def mlp_hook(tap: Tap) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            arrive(tap, output[0] if isinstance(output, tuple) else output)

        return hook

    try:
        for tap in plan.taps:
            if tap.kind == "boundary":
                target = adapter.final_norm(model) if tap.index == plan.num_layers else layers[tap.index]
                ghost = ghost_of(target)
                if ghost is not None:
                    handles.append(ghost.register_forward_hook(ghost_hook(tap)))
                else:
                    handles.append(target.register_forward_pre_hook(boundary_hook(tap), with_kwargs=True))
            else:
                mlp = adapter.mlp(layers[tap.index])
                handles.append(mlp.register_forward_hook(mlp_hook(tap)))
        yield
    finally:
        for handle in handles:
            handle.remove()
