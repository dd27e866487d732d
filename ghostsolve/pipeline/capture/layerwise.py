"""The layer-by-layer engine: every batch advanced one decoder layer at a time, with up to two streams.

**Layer by layer** (``capture="layerwise"``, ``onload=True``). Only one decoder layer sits on the execution
device at a time; the activations of every batch are carried from layer to layer on an offload device (the
CPU by default). A 70B model in bf16 (≈140 GB) is thereby calibrated on one 80 GB GPU: what the GPU holds is
one layer (≈1.7 GB), one batch of activations and the fp64 statistics.

**Two streams** (a :class:`~ghostsolve.pipeline.capture.plan.PrunedStream`). Beside the dense model's stream
a second one is carried: that of the model pruned and recovered so far (GPTQ's two streams). It skips each
removed interval and passes through the map the interval's ``on_interval`` returns, which is called as soon as
the interval's statistics are complete, so each interval is fitted on the activations of the model with the
earlier maps in place. This is the one algorithm of the sequential fitting order: the hook engine runs it
too, with ``onload=False`` (the model resident where it sits). Cost: the dense stream passes every layer up to
the last tap once, the pruned stream every kept layer after the first interval once — at most two passes,
whatever the number of intervals.

How it stays architecture-agnostic: the model's *own* forward runs once per batch with every needed decoder
layer's ``forward`` temporarily replaced by a recorder. The model computes the embeddings, the rotary position
embeddings and the causal / sliding-window masks, exactly as in a normal forward, and the recorder keeps the
arguments each layer would have received (per layer, so models whose layers differ in mask or rotary table,
e.g. OLMo-3's alternating sliding/full attention, are served right). The forward stops at the last needed
layer. Layers managed by accelerate (``dispatch_model``, ``device_map="auto"``, ``cpu_offload``) are not
moved: their hooks onload the weights themselves.

Memory on the offload device: the activations of all calibration tokens, ``n_tokens · d`` elements in the
model's dtype, for each stream and for each tap held until its event completes (the stream entering an
open interval's start, at most one at a time for a removal set).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ghostsolve.adapters import ModelAdapter
from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.capture.plan import Consumer, Plan, PrunedStream, StreamMap, Tap
from ghostsolve.pipeline.model.batches import CalibrationBatch, eval_mode
from ghostsolve.pipeline.model.devices import (
    is_dispatched,
    model_input_device,
    onloaded,
    resolve_device,
    tensor_devices,
)
from ghostsolve.pipeline.model.operators import GhostOperator, ghost_of
from ghostsolve.pipeline.model.surgery import check_intervals
from ghostsolve.pipeline.progress import progress_bar

__all__ = ["LayerwiseEngine"]

# An empty tensor stands in for the hidden states in a recorded call, so the call can be replayed with any
# stream through the adapter's replace_hidden_states without keeping the original activation alive.
_PLACEHOLDER = torch.empty(0)


class _StopForward(Exception):
    """Raised by the recorder of the last needed layer to end the model's forward early."""


@dataclass
class _LayerCall:
    """The arguments one decoder layer received for one batch, with the hidden states taken out."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class LayerwiseEngine:
    """Layer-major capture; see the module docstring.

    Parameters
    ----------
    device : torch.device or str, optional
        Execution device onto which each layer is moved in turn (default: the current CUDA device if any,
        else the CPU). Ignored with ``onload=False``.
    offload_device : torch.device or str, default "cpu"
        Where the carried activations live between layers (``onload=True``).
    onload : bool, default True
        False: the model stays where it sits (also dispatched), activations stay where its layers put them.
    """

    name = "layerwise"

    def __init__(
        self,
        *,
        device: torch.device | str | None = None,
        offload_device: torch.device | str = "cpu",
        onload: bool = True,
    ) -> None:
        self.onload = onload
        self.device = resolve_device(device) if onload else None
        self.offload = resolve_device(offload_device, what="offload_device") if onload else None

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

        The model comes back on its original devices and in its training modes, also on error.

        Raises
        ------
        GhostsolveError
            No batches; a module with weights on several devices or on the meta device (not dispatched);
            a forward that does not call its layers once each, in order; whatever a consumer raises.
        """
        if not batches:
            raise GhostsolveError("no calibration batches: the batches iterable was empty")
        plan = Plan.build(consumers, len(adapter.layers(model)), pruned)
        with torch.no_grad(), eval_mode(model):
            _Pass(self, model, adapter, list(batches), plan, pruned, progress).run()
        for consumer in consumers:
            consumer.finish()


class _Pass:
    """One layer-major pass: the state the loop carries from boundary to boundary."""

    def __init__(
        self,
        engine: LayerwiseEngine,
        model: nn.Module,
        adapter: ModelAdapter,
        batches: list[CalibrationBatch],
        plan: Plan,
        pruned_plan: PrunedStream | None,
        progress: bool,
    ) -> None:
        self.model, self.adapter, self.batches, self.plan = model, adapter, batches, plan
        self.layers = adapter.layers(model)
        self.dispatched = is_dispatched(model)
        self.exec, self.offload = engine.device, engine.offload
        self.pruned_plan = pruned_plan
        intervals = check_intervals(pruned_plan.intervals, plan.num_layers) if pruned_plan else []
        self.starts = {s for s, _ in intervals}
        self.ends = {e: (s, e) for s, e in intervals}
        self.progress = progress
        self.values: dict[Tap, list[torch.Tensor]] = {}
        self.dense: list[torch.Tensor] = []
        self.pruned: list[torch.Tensor] | None = None  # None: equal to the dense stream (not diverged yet)
        self.held: list[torch.Tensor] | None = None  # the pruned stream entering the open interval
        self.inside = False
        self.calls: list[list[_LayerCall]] = []
        self.finished = False

    # -- the loop -----------------------------------------------------------------------------------
    def run(self) -> None:
        last_layer = self.plan.last_layer()
        self.record(max(1, last_layer + 1))
        num_layers = self.plan.num_layers
        bar = progress_bar(range(last_layer + 2), self.progress, "ghostsolve layer-by-layer capture",
                           unit="layer")  # fmt: skip
        for b in bar:
            module = self.layers[b] if b < num_layers else self.adapter.final_norm(self.model)
            # A layer's ghost operator is its child: one onload serves the boundary and the layer.
            with onloaded([module] if self.onloads else [], self._exec_or_cpu, f"decoder layer {b}"):
                self.at_boundary(b, ghost_of(module))
                if not (self.finished or b > last_layer):
                    self.run_layer(b, module)
            if self.finished or b > last_layer:
                break

    def current_pruned(self) -> list[torch.Tensor]:
        return self.pruned if self.pruned is not None else self.dense

    def at_boundary(self, b: int, ghost: GhostOperator | None) -> None:
        """The taps of boundary ``b`` and the pruned stream's skips and maps.

        Carried streams are what a module receives; where it holds a ghost operator, the stream at the
        boundary (what its taps read) is the ghost's output.
        """
        wants_pruned = Tap.boundary(b, "pruned") in self.plan.needed or b in self.starts
        self.deliver(Tap.boundary(b, "dense"), self.after_ghost(ghost, self.dense, Tap.boundary(b, "dense")))
        if b in self.ends:
            assert self.pruned_plan is not None and self.held is not None
            smap = self.pruned_plan.on_interval(self.ends[b])
            self.pruned = self.apply_map(smap, self.held)
            self.held, self.inside = None, False
        if self.inside or not wants_pruned:
            return
        at_b = self.after_ghost(ghost, self.current_pruned(), None)
        self.deliver(Tap.boundary(b, "pruned"), at_b)
        if b in self.starts:
            self.held, self.inside = at_b, True

    def run_layer(self, b: int, layer: nn.Module) -> None:
        """Layer ``b`` on the dense stream and, outside a removed interval, on the pruned one."""
        dense_mlp, pruned_mlp = Tap.mlp(b, "dense"), Tap.mlp(b, "pruned")
        wanted = self.plan.needed
        shared = self.pruned is None and not self.inside
        want_dense = dense_mlp in wanted or (shared and pruned_mlp in wanted)
        self.dense, mlp = self.run_stream(layer, b, self.dense, want_dense)
        if want_dense:
            self.deliver(dense_mlp, mlp)
            if shared:
                self.deliver(pruned_mlp, mlp)
        if self.pruned is not None and not self.inside:
            self.pruned, mlp = self.run_stream(layer, b, self.pruned, pruned_mlp in wanted)
            self.deliver(pruned_mlp, mlp)

    # -- recording the layers' arguments --------------------------------------------------------------
    def record(self, n_needed: int) -> None:
        """Run the model's own forward per batch up to layer ``n_needed - 1``; keep each layer's call."""
        prefix = [] if (self.dispatched or not self.onloads) else _prefix_modules(self.model, self.adapter)
        if self.onloads and not self.dispatched:
            device: torch.device | None = self._exec_or_cpu
        else:
            device = None if self.dispatched else model_input_device(self.model, self.adapter)
        with onloaded(prefix, self._exec_or_cpu, "a module before the first decoder layer"):
            for batch in self.batches:
                entering, calls = self._record_batch(batch.model_inputs(device), n_needed)
                self.dense.append(self.park(entering))
                self.calls.append(calls)

    def _record_batch(self, inputs: dict[str, Any], n_needed: int) -> tuple[torch.Tensor, list[_LayerCall]]:
        calls: list[_LayerCall] = []
        first: list[torch.Tensor] = []
        saved: list[tuple[nn.Module, Any]] = []

        def recorder(index: int) -> Any:
            def forward(*args: Any, **kwargs: Any) -> Any:
                hidden = self.adapter.hidden_states(args, kwargs)
                calls.append(_LayerCall(*self.adapter.replace_hidden_states(args, kwargs, _PLACEHOLDER)))
                if index == 0:
                    first.append(hidden)
                if index == n_needed - 1:
                    raise _StopForward
                # The layer is skipped: the stream passes unchanged, and only the arguments of later layers
                # (masks, rotary tables; computed before the loop) are recorded.
                return hidden

            return forward

        try:
            for index in range(n_needed):
                layer = self.layers[index]
                saved.append((layer, layer.__dict__.get("forward")))
                layer.forward = recorder(index)  # type: ignore[method-assign]
            try:
                self.model(**inputs, use_cache=False)
            except _StopForward:
                pass
            else:
                raise GhostsolveError(
                    f"the model's forward finished without calling decoder layer {n_needed - 1}; the "
                    "adapter's layers_path does not point at the layers the forward runs"
                )
        finally:
            for layer, previous in saved:
                if previous is None:
                    del layer.forward
                else:
                    layer.forward = previous  # type: ignore[method-assign]
        if len(calls) != n_needed:
            raise GhostsolveError(
                f"the model's forward called {len(calls)} decoder layers before layer {n_needed - 1}, "
                f"expected {n_needed}; layer-by-layer capture needs each layer called once per forward, in "
                "order"
            )
        return first[0], calls

    # -- moving streams -------------------------------------------------------------------------------
    @property
    def onloads(self) -> bool:
        return self.exec is not None

    @property
    def _exec_or_cpu(self) -> torch.device:
        return self.exec if self.exec is not None else torch.device("cpu")

    def park(self, h: torch.Tensor) -> torch.Tensor:
        """Where a carried activation waits between layers."""
        return h.to(self.offload) if self.offload is not None else h

    def fetch(self, h: torch.Tensor, module: nn.Module | None = None) -> torch.Tensor:
        """An activation on the device where it is used next: the execution device, or, with the model
        resident, ``module``'s device. Accelerate's hooks move the inputs of a dispatched model themselves."""
        if self.dispatched:
            return h
        if self.exec is not None:
            return h.to(self.exec)
        devices = {d for d in tensor_devices(module) if d.type != "meta"} if module is not None else set()
        return h.to(next(iter(devices))) if len(devices) == 1 else h

    def run_stream(
        self, runner: nn.Module, b: int, stream: list[torch.Tensor], want_mlp: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Layer ``b`` on every batch of ``stream``; its outputs and (on request) its MLP outputs."""
        outputs: list[torch.Tensor] = []
        mlp_out: list[torch.Tensor] = []
        handle = None
        if want_mlp:
            mlp = self.adapter.mlp(runner)
            handle = mlp.register_forward_hook(
                lambda m, a, out: mlp_out.append(self.park(out[0] if isinstance(out, tuple) else out))
            )
        try:
            for h, calls in zip(stream, self.calls, strict=True):
                args, kwargs = self.adapter.replace_hidden_states(calls[b].args, calls[b].kwargs,
                                                                  self.fetch(h, runner))  # fmt: skip
                outputs.append(self.park(_first_tensor(runner(*args, **kwargs))))
        finally:
            if handle is not None:
                handle.remove()
        return outputs, mlp_out

    def after_ghost(
        self, ghost: GhostOperator | None, stream: list[torch.Tensor], tap: Tap | None
    ) -> list[torch.Tensor]:
        """``stream`` after ``ghost`` (computed only when a tap reads it; ``tap=None``: always)."""
        if ghost is None or (tap is not None and tap not in self.plan.needed):
            return stream
        return [self.park(ghost(self.fetch(h, ghost))) for h in stream]

    def apply_map(self, smap: StreamMap | None, stream: list[torch.Tensor]) -> list[torch.Tensor]:
        """The map returned by ``on_interval`` applied to every batch of ``stream``."""
        if smap is None:
            return stream
        probe = smap.modules[0] if smap.modules else None
        with onloaded(list(smap.modules) if self.onloads else [], self._exec_or_cpu, "the interval's map"):
            out = []
            for index, h in enumerate(stream):
                mapped = smap.fn(self.fetch(h, probe), index)
                if not isinstance(mapped, torch.Tensor) or mapped.shape != h.shape:
                    got = tuple(mapped.shape) if isinstance(mapped, torch.Tensor) else type(mapped).__name__
                    raise GhostsolveError(
                        f"on_interval returned a map that turned hidden states {tuple(h.shape)} into {got}; "
                        "it must map (..., d) to (..., d), e.g. the GhostOperator to insert, or return None"
                    )
                out.append(self.park(mapped))
        return out

    # -- handing taps to consumers ---------------------------------------------------------------------
    def deliver(self, tap: Tap, values: list[torch.Tensor]) -> None:
        """Keep ``tap`` while an event needs it; hand each completed event to its consumer, batch by batch."""
        if tap not in self.plan.needed:
            return
        self.values[tap] = values
        for route in self.plan.completes.get(tap, ()):
            for index, batch in enumerate(self.batches):
                tensors = [self.fetch(self.values[t][index]) for t in route.taps]
                route.consumer.consume(route.key, tensors, batch, index)
        for released in self.plan.releases.get(tap, ()):
            self.values.pop(released, None)
        if tap == self.plan.last:
            self.finished = True


def _first_tensor(out: Any) -> torch.Tensor:
    # Decoder layers return a tensor in recent transformers and a tuple (hidden, ...) in older ones.
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise GhostsolveError(
        f"a decoder layer returned {type(out).__name__}; expected a tensor or a tuple starting with one"
    )


def _prefix_modules(model: nn.Module, adapter: ModelAdapter) -> list[nn.Module]:
    """The maximal submodules that hold neither the decoder layers nor the lm_head.

    These compute whatever enters layer 0 (embeddings, rotary tables, ...) and are moved to the execution
    device for the recording pass. Modules on the path to the layer list are descended into.
    """
    layers, head = adapter.layers(model), adapter.lm_head(model)
    found: list[nn.Module] = []

    def contains(module: nn.Module, target: nn.Module) -> bool:
        return any(m is target for m in module.modules())

    def walk(module: nn.Module) -> None:
        for child in module.children():
            if child is layers or child is head:
                continue
            if not (contains(child, layers) or contains(child, head)):
                found.append(child)
                continue
            if tensor_devices(child, recurse=False):
                raise GhostsolveError(
                    f"{type(child).__name__} holds its own parameters beside the decoder layers; "
                    "layer-by-layer capture cannot place them. Move the model to one device and use "
                    "capture='hooks' instead"
                )
            walk(child)

    if tensor_devices(model, recurse=False):
        raise GhostsolveError(
            f"{type(model).__name__} holds parameters outside its submodules; layer-by-layer capture cannot "
            "place them. Move the model to one device and use capture='hooks' instead"
        )
    walk(model)
    return found

