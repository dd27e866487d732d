"""Layer-by-layer calibration capture for models larger than the accelerator (sequential onloading).

Whole-model capture (:func:`ghostsolve.pipeline.capture.capture_stats`) needs the model on its devices.
Here only **one decoder layer sits on the execution device at a time**; the calibration activations of
every batch are carried from layer to layer on an offload device (the CPU by default), and the boundary
statistics are accumulated as soon as both sides of a removed interval are known. A 70B model in bf16
(≈140 GB) is thereby calibrated on one 80 GB GPU: what the GPU holds is one layer (≈1.7 GB), one batch of
activations and the fp64 statistics.

How it stays architecture-agnostic: the model's *own* forward runs once per batch with every needed
decoder layer's ``forward`` temporarily replaced by a recorder. The model itself computes the embeddings,
the rotary position embeddings and the causal / sliding-window masks, exactly as in a normal forward, and
the recorder keeps the arguments each layer would have received (per layer, so models whose layers differ
in mask or rotary table, e.g. OLMo-3's alternating sliding/full attention, are served right). The forward
stops at the last needed layer. Then each layer is onloaded, run on every batch with its recorded
arguments and the carried hidden states, and offloaded again.

With ``on_interval`` the same pass also gives the ``sequential`` fitting order: a second stream, that of
the model pruned and recovered so far, is carried beside the dense one (GPTQ's two streams), so each
interval's operator is fitted on the activations of the model with the earlier operators in place.

Layers already managed by accelerate (``dispatch_model``, ``device_map="auto"``, ``cpu_offload``) are not
moved: their hooks onload the weights themselves, so the same function also works on dispatched models.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ghostsolve.adapters import ModelAdapter, get_adapter
from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.capture import Interval, check_intervals
from ghostsolve.pipeline.surgery import GhostedLayer, GhostedNorm
from ghostsolve.stats import Stats

__all__ = ["OnInterval", "capture_stats_layerwise", "default_execution_device"]

logger = logging.getLogger(__name__)

#: ``on_interval((start, end), stats) -> map or None``: see :func:`capture_stats_layerwise`.
OnInterval = Callable[[Interval, Stats], Callable[[torch.Tensor], torch.Tensor] | None]

# Stats.update upcasts a chunk to fp64 ([X | Y - X] and Y: 3·d·8 bytes a row); 4096 rows cap that at
# 0.75 GiB for d = 8192 while keeping the GEMMs large enough to run at full speed.
_CHUNK_ROWS = 4096


class _StopForward(Exception):
    """Raised by the recorder of the last needed layer to end the model's forward early."""


@dataclass
class _LayerCall:
    """The arguments one decoder layer received for one batch, with the hidden states taken out."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    hidden_in_args: bool


def default_execution_device() -> torch.device:
    """``cuda`` (the current device) when CUDA is available, else ``cpu``."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _has_accelerate_hook(module: nn.Module) -> bool:
    return hasattr(module, "_hf_hook")


def _is_dispatched(model: nn.Module) -> bool:
    return getattr(model, "hf_device_map", None) is not None or any(
        _has_accelerate_hook(m) for m in model.modules()
    )


def _tensor_devices(module: nn.Module, *, recurse: bool = True) -> set[torch.device]:
    return {t.device for t in (*module.parameters(recurse=recurse), *module.buffers(recurse=recurse))}


def _prefix_modules(model: nn.Module, layers: nn.Module, head: nn.Module) -> list[nn.Module]:
    """The maximal submodules that hold neither the decoder layers nor the lm_head.

    These compute whatever enters layer 0 (embeddings, rotary tables, ...) and are moved to the execution
    device for the recording pass. Modules on the path to the layer list are descended into.
    """
    found: list[nn.Module] = []

    def contains(module: nn.Module, target: nn.Module) -> bool:
        return any(m is target for m in module.modules())

    def walk(module: nn.Module) -> None:
        for child in module.children():
            if child is layers or child is head:
                continue
            if contains(child, layers) or contains(child, head):
                if _tensor_devices(child, recurse=False):
                    raise GhostsolveError(
                        f"{type(child).__name__} holds its own parameters beside the decoder layers; "
                        "layer-by-layer capture cannot place them. Move the model to one device and use "
                        "capture_stats instead"
                    )
                walk(child)
            else:
                found.append(child)

    if _tensor_devices(model, recurse=False):
        raise GhostsolveError(
            f"{type(model).__name__} holds parameters outside its submodules; layer-by-layer capture "
            "cannot place them. Move the model to one device and use capture_stats instead"
        )
    walk(model)
    return found


def _single_device(module: nn.Module, what: str) -> torch.device | None:
    devices = _tensor_devices(module)
    if not devices:
        return None
    if len(devices) > 1:
        raise GhostsolveError(
            f"{what} has tensors on several devices ({sorted(map(str, devices))}); layer-by-layer capture "
            "moves whole modules, so place each on one device (or dispatch the model with accelerate)"
        )
    (device,) = devices
    if device.type == "meta":
        raise GhostsolveError(
            f"{what} has its weights on the meta device (not loaded); load the model's weights, or "
            "dispatch it with accelerate so its hooks load them"
        )
    return device


@contextmanager
def _onloaded(modules: Sequence[nn.Module], device: torch.device, what: str) -> Iterator[None]:
    """Move modules to ``device`` for the body and back to where each was, also on error."""
    moved: list[tuple[nn.Module, torch.device]] = []
    try:
        for module in modules:
            # accelerate's hooks (on the module or, with cpu_offload, on its leaves) place the weights.
            if any(_has_accelerate_hook(m) for m in module.modules()):
                continue
            home = _single_device(module, what)
            if home is None or home == device:
                continue
            module.to(device)
            moved.append((module, home))
        yield
    finally:
        for module, home in reversed(moved):
            module.to(home)


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(v, device) for v in obj)
    if isinstance(obj, list):
        return [_to(v, device) for v in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _split_batch(batch: Any) -> tuple[dict[str, Any], torch.Tensor]:
    """Model inputs and the token mask ``(batch, seq_len)`` of one calibration batch."""
    if isinstance(batch, torch.Tensor):
        inputs: dict[str, Any] = {"input_ids": batch}
    elif isinstance(batch, Mapping):
        inputs = dict(batch)
    else:
        raise GhostsolveError(
            f"a calibration batch is a {type(batch).__name__}; pass dicts with 'input_ids' (batch, seq_len) "
            "and optionally 'attention_mask', or plain (batch, seq_len) token-id tensors"
        )
    ids = inputs.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise GhostsolveError(
            f"input_ids of a calibration batch is {shape}; it must be a (batch, seq_len) tensor"
        )
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    elif tuple(mask.shape) != tuple(ids.shape):
        raise GhostsolveError(
            f"attention_mask is {tuple(mask.shape)} but input_ids is {tuple(ids.shape)}; they must match"
        )
    return inputs, mask


def _token_keep(mask: torch.Tensor, skip_first_token: bool) -> torch.Tensor:
    """Which positions ``(batch, seq_len)`` enter the statistics: not padding and, on request, not the
    first real token of a row (BOS / attention sink; left padding moves it), as in ``capture_stats``."""
    keep = mask != 0
    if skip_first_token:
        keep = keep & ~(keep.long().cumsum(dim=1) == 1)
    return keep


def _first_tensor(out: Any) -> torch.Tensor:
    # Decoder layers return a tensor in recent transformers and a tuple (hidden, ...) in older ones.
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise GhostsolveError(
        f"a decoder layer returned {type(out).__name__}; expected a tensor or a tuple starting with one"
    )


def _record_layer_inputs(
    model: nn.Module,
    adapter: ModelAdapter,
    layers: nn.ModuleList,
    n_needed: int,
    inputs: dict[str, Any],
) -> tuple[torch.Tensor, list[_LayerCall]]:
    """Run the model's own forward up to layer ``n_needed - 1``; the input of layer 0 and each layer's
    other arguments."""
    calls: list[_LayerCall] = []
    first: list[torch.Tensor] = []
    position = adapter.hidden_states_arg_position
    keyword = adapter.hidden_states_kwarg
    saved: list[tuple[nn.Module, Any]] = []

    def recorder(index: int) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if len(args) > position:
                hidden = args[position]
                rest = (*args[:position], None, *args[position + 1 :])
                calls.append(_LayerCall(rest, dict(kwargs), True))
            elif keyword in kwargs:
                hidden = kwargs[keyword]
                others = {k: v for k, v in kwargs.items() if k != keyword}
                calls.append(_LayerCall(tuple(args), others, False))
            else:
                raise GhostsolveError(
                    f"decoder layer {index} was called without its hidden states (argument {position} or "
                    f"keyword {keyword!r}); the adapter's hidden_states_arg_position/kwarg do not match"
                )
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
            layer = layers[index]
            saved.append((layer, layer.__dict__.get("forward")))
            layer.forward = recorder(index)  # type: ignore[method-assign]
        try:
            model(**inputs, use_cache=False)
        except _StopForward:
            pass
        else:
            raise GhostsolveError(
                f"the model's forward finished without calling decoder layer {n_needed - 1}; "
                "the adapter's layers_path does not point at the layers the forward runs"
            )
    finally:
        for layer, previous in saved:
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous  # type: ignore[method-assign]
    if len(calls) != n_needed:
        raise GhostsolveError(
            f"the model's forward called {len(calls)} decoder layers before layer {n_needed - 1}, expected "
            f"{n_needed}; layer-by-layer capture needs each layer called once per forward, in order"
        )
    return first[0], calls


def _ghosts(module: nn.Module) -> tuple[list[nn.Module], nn.Module]:
    """The ghost operators in front of a (possibly wrapped) layer or norm, outermost first, and the
    wrapped module itself."""
    ghosts: list[nn.Module] = []
    while isinstance(module, (GhostedLayer, GhostedNorm)):
        ghosts.append(module.ghost)
        module = module.layer if isinstance(module, GhostedLayer) else module.norm
    return ghosts, module


def capture_stats_layerwise(
    model: nn.Module,
    batches: Iterable[Any],
    intervals: Iterable[Interval],
    *,
    device: torch.device | str | None = None,
    offload_device: torch.device | str = "cpu",
    stats_device: torch.device | str | None = None,
    skip_first_token: bool = False,
    progress: bool = True,
    dtype: torch.dtype = torch.float64,
    product_dtype: torch.dtype | None = None,
    adapter: ModelAdapter | None = None,
    on_interval: OnInterval | None = None,
) -> dict[Interval, Stats]:
    """Boundary statistics of removed intervals, computed one decoder layer at a time.

    For each interval ``(start, end)`` (``end`` exclusive), ``X`` is the residual stream entering layer
    ``start`` and ``Y`` the stream entering layer ``end`` (for ``end == num_layers``: the input of the final
    norm), as :func:`ghostsolve.pipeline.capture.capture_stats` defines them (after any ghost operator
    already inserted there); the statistics are those of ``Y ≈ X W`` with row vectors, ``W = I + M``. The
    result equals whole-model capture up to the rounding of the fp64 sums.

    Parameters
    ----------
    model : transformers ``*ForCausalLM``
        A model of a family with an adapter, with its weights anywhere (typically the CPU), or dispatched
        by accelerate. It comes back on its original devices and in its training mode, also on error.
    batches : iterable of dict or tensor
        Calibration batches: ``{"input_ids": (batch, seq_len) long, "attention_mask": (batch, seq_len)}``
        or plain ``(batch, seq_len)`` id tensors. Materialized into a list (the activations of all of them
        are carried between layers).
    intervals : iterable of (start, end)
        Removed intervals, ``0 <= start < end <= num_layers``, not overlapping.
    device : torch.device or str, optional
        Execution device onto which each layer is moved in turn (default: the current CUDA device if any,
        else the CPU).
    offload_device : torch.device or str, default "cpu"
        Where the carried activations live between layers.
    stats_device : torch.device or str, optional
        Where the statistics live (default: ``device``).
    skip_first_token : bool, default False
        Exclude each row's first real token (BOS / attention sink) from the statistics.
    progress : bool, default True
        Show a tqdm bar over layers.
    dtype : torch.dtype, default float64
        Accumulation dtype of the statistics.
    product_dtype : torch.dtype, optional
        Per-chunk product precision (see :class:`ghostsolve.Stats`); None = ``dtype``.
    adapter : ModelAdapter, optional
        Default: ``get_adapter(model)``.
    on_interval : callable, optional
        The ``sequential`` fitting order in the same single pass. Called as ``on_interval((start, end),
        stats)`` as soon as an interval's statistics are complete, in model order; it returns the map that
        replaces the interval in the pruned model — e.g. the :class:`~ghostsolve.pipeline.surgery.
        GhostOperator` built from ``ghostsolve.fit(stats)`` — or None for plain pruning. From then on, ``X``
        of every later interval is taken from the stream of the model pruned and recovered so far (the
        removed layers skipped, the returned maps applied), while ``Y`` stays the dense model's stream, so
        later operators correct the errors of earlier ones. That second stream costs one more pass of each
        layer after the first interval. Without it (the default) every interval sees the dense model
        (the ``independent`` order).

    Returns
    -------
    dict of (start, end) to Stats
        Sorted by interval; each ``Stats(hidden_size, dtype=dtype)`` on ``stats_device``.

    Raises
    ------
    GhostsolveError
        Bad intervals (empty, malformed, out of range, overlapping); no batches, or a batch without
        ``(batch, seq_len)`` input ids or with a mismatched mask; a module with weights on several devices
        or on the meta device (not dispatched); a boundary that saw no tokens; non-finite activations
        (named by interval; usually fp16 overflow — capture in fp32 or bf16).

    Notes
    -----
    Memory on ``offload_device``: the activations of all calibration tokens, ``n_tokens · d`` elements in
    the model's dtype, once for the current stream plus once per interval whose ``start`` has been passed
    but whose ``end`` has not (at most one, since intervals do not overlap). On ``device``: one layer, one
    batch of activations, the recorded masks and rotary tables of every batch, and the statistics.

    Examples
    --------
    >>> stats = capture_stats_layerwise(model, batches, [(5, 8)], device="cuda")  # doctest: +SKIP
    """
    adapter = adapter if adapter is not None else get_adapter(model)
    layers = adapter.layers(model)
    num_layers = len(layers)
    checked = check_intervals(intervals, num_layers)
    exec_device = torch.device(device) if device is not None else default_execution_device()
    offload = torch.device(offload_device)
    stats_at = torch.device(stats_device) if stats_device is not None else exec_device
    split = [_split_batch(batch) for batch in batches]
    if not split:
        raise GhostsolveError("no calibration batches: the batches iterable was empty")

    logger.info(
        "layer-by-layer capture of %s: %d batches, intervals %s, layers onloaded to %s, activations on %s",
        type(model).__name__, len(split), checked, exec_device, offload,
    )
    last = max(end for _, end in checked)
    dispatched = _is_dispatched(model)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            return _run(
                model, adapter, layers, split, checked, last, dispatched, exec_device, offload, stats_at,
                skip_first_token, progress, dtype, product_dtype, on_interval,
            )  # fmt: skip
    finally:
        for module, mode in modes.items():
            module.training = mode


def _apply_ghosts(
    ghosts: Sequence[nn.Module], stream: list[torch.Tensor], device: torch.device, offload: torch.device
) -> list[torch.Tensor]:
    if not ghosts:
        return stream
    out: list[torch.Tensor] = []
    for h in stream:
        h = h.to(device)
        for ghost in ghosts:
            h = ghost(h)
        out.append(h.to(offload))
    return out


def _run(
    model: nn.Module,
    adapter: ModelAdapter,
    layers: nn.ModuleList,
    split: list[tuple[dict[str, Any], torch.Tensor]],
    checked: list[Interval],
    last: int,
    dispatched: bool,
    exec_device: torch.device,
    offload: torch.device,
    stats_at: torch.device,
    skip_first_token: bool,
    progress: bool,
    dtype: torch.dtype,
    product_dtype: torch.dtype | None,
    on_interval: OnInterval | None,
) -> dict[Interval, Stats]:
    num_layers = len(layers)
    starts = {start for start, _ in checked}
    ends = {end: (start, end) for start, end in checked}
    stream: list[torch.Tensor] = []  # the dense model's stream, per batch
    calls_per_batch: list[list[_LayerCall]] = []
    keeps: list[torch.Tensor] = []
    prefix = [] if dispatched else _prefix_modules(model, layers, adapter.lm_head(model))
    with _onloaded(prefix, exec_device, "a module before the first decoder layer"):
        for inputs, mask in split:
            moved = inputs if dispatched else _to(inputs, exec_device)
            entering, calls = _record_layer_inputs(model, adapter, layers, last, moved)
            stream.append(entering.to(offload))
            calls_per_batch.append(calls)
            keeps.append(_token_keep(mask, skip_first_token))

    dim = int(stream[0].shape[-1])
    stats = {iv: Stats(dim, dtype=dtype, device=stats_at, product_dtype=product_dtype) for iv in checked}
    held: list[torch.Tensor] | None = None  # X of the open interval: the stream entering its start
    # Sequential order only: the stream of the model pruned and recovered so far, once it differs from the
    # dense one; it skips the layers of each removed interval and passes through the returned map instead.
    pruned: list[torch.Tensor] | None = None
    inside = False
    position = adapter.hidden_states_arg_position
    keyword = adapter.hidden_states_kwarg

    def run_layer(runner: nn.Module, b: int, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        carried: list[torch.Tensor] = []
        for h_off, calls in zip(hidden, calls_per_batch, strict=True):
            call = calls[b]
            h = h_off if dispatched else h_off.to(exec_device)
            if call.hidden_in_args:
                out = runner(*call.args[:position], h, *call.args[position + 1 :], **call.kwargs)
            else:
                out = runner(*call.args, **{keyword: h}, **call.kwargs)
            carried.append(_first_tensor(out).to(offload))
        return carried

    bar = tqdm(range(last + 1), desc="ghostsolve layer-by-layer capture", unit="layer", disable=not progress)
    for b in bar:
        # The stream entering boundary b is what enters the layer proper: after any ghost in front of it.
        outer = layers[b] if b < num_layers else adapter.final_norm(model)
        ghosts, inner = _ghosts(outer)
        with _onloaded(ghosts, exec_device, f"the ghost operator before boundary {b}"):
            stream = _apply_ghosts(ghosts, stream, exec_device, offload)
            if b in ends:
                if held is None:  # pragma: no cover - check_intervals guarantees start < end
                    raise AssertionError("interval end reached before its start")
                interval = ends[b]
                _accumulate(stats[interval], interval, held, stream, keeps, exec_device, num_layers)
                if on_interval is not None:
                    pruned = _apply_map(on_interval(interval, stats[interval]), held, exec_device, offload)
                    pruned = _apply_ghosts(ghosts, pruned, exec_device, offload)
                held, inside = None, False
            elif pruned is not None and not inside:
                pruned = _apply_ghosts(ghosts, pruned, exec_device, offload)
        if b in starts:
            held, inside = (pruned if pruned is not None else stream), True
        if b == last:
            break
        # A wrapped layer runs without its wrapper (its ghosts were applied above); a plain one is called
        # as the model calls it, so accelerate's hooks (if any) onload its weights.
        runner = inner if ghosts else outer
        with _onloaded([runner], exec_device, f"decoder layer {b}"):
            stream = run_layer(runner, b, stream)
            if pruned is not None and not inside:
                pruned = run_layer(runner, b, pruned)
    return stats


def _apply_map(
    op: Callable[[torch.Tensor], torch.Tensor] | None,
    stream: list[torch.Tensor],
    device: torch.device,
    offload: torch.device,
) -> list[torch.Tensor]:
    """``op`` (the map replacing a removed interval) applied to every batch of ``stream``."""
    if op is None:
        return stream
    modules = [op] if isinstance(op, nn.Module) else []
    with _onloaded(modules, device, "the map returned by on_interval"):
        out = []
        for h in stream:
            mapped = op(h.to(device))
            if not isinstance(mapped, torch.Tensor) or mapped.shape != h.shape:
                got = tuple(mapped.shape) if isinstance(mapped, torch.Tensor) else type(mapped).__name__
                raise GhostsolveError(
                    f"on_interval returned a map that turned hidden states {tuple(h.shape)} into {got}; it "
                    "must map (..., d) to (..., d), e.g. the GhostOperator to insert, or return None"
                )
            out.append(mapped.to(offload))
    return out


def _describe(boundary: int, num_layers: int) -> str:
    return "the final norm's input" if boundary == num_layers else f"the input of layer {boundary}"


def _accumulate(
    stats: Stats,
    interval: Interval,
    xs: Sequence[torch.Tensor],
    ys: Sequence[torch.Tensor],
    keeps: Sequence[torch.Tensor],
    device: torch.device,
    num_layers: int,
) -> None:
    start, end = interval
    for x, y, keep in zip(xs, ys, keeps, strict=True):
        flat = keep.reshape(-1)
        rows_x = x.reshape(-1, x.shape[-1])[flat.to(x.device)]
        rows_y = y.reshape(-1, y.shape[-1])[flat.to(y.device)]
        try:
            for first in range(0, rows_x.shape[0], _CHUNK_ROWS):
                chunk = slice(first, first + _CHUNK_ROWS)
                stats.update(rows_x[chunk].to(device), rows_y[chunk].to(device))
        except GhostsolveError as err:
            raise GhostsolveError(
                f"calibration statistics of interval {interval} (from {_describe(start, num_layers)} to "
                f"{_describe(end, num_layers)}) failed: {err}. If the model runs in fp16, capture in fp32 "
                "or bf16"
            ) from err
    if stats.n_rows <= 0:
        raise GhostsolveError(
            f"interval {interval} saw no calibration tokens (every position was padding or the skipped "
            "first token); pass longer or more sequences"
        )
