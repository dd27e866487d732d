"""One-pass calibration capture: boundary statistics of every removed interval at once.

Hooks on the decoder layers (and on the final norm) see the residual stream where it *enters* each
boundary layer and feed :meth:`ghostsolve.Stats.update` immediately; no activation is stored beyond
the batch in flight. The forward stops (a private exception) right after the last boundary it needs,
so neither the later layers nor the lm_head run.

For an interval ``(start, end)`` (``end`` exclusive) the rows are ``X`` = the stream entering layer
``start`` and ``Y`` = the stream entering layer ``end`` (the final norm's input when ``end`` is the
number of layers), both of shape ``(n_tokens, d)``; a fit then gives ``Y ≈ X W`` with ``W = I + M``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence, Sized
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ghostsolve.adapters import ModelAdapter, get_adapter
from ghostsolve.errors import GhostsolveError
from ghostsolve.pipeline.devices import model_input_device
from ghostsolve.pipeline.surgery import unwrap
from ghostsolve.stats import Stats

__all__ = ["Interval", "capture_rows", "capture_stats", "check_intervals"]

logger = logging.getLogger(__name__)

Interval = tuple[int, int]


class _StopForward(Exception):
    """Raised by the last boundary hook to end a forward pass early; never escapes this module."""


# ---------------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------------
def check_intervals(intervals: Iterable[Interval], num_layers: int) -> list[Interval]:
    """Validate ``(start, end)`` intervals (``0 <= start < end <= num_layers``) and return them sorted.

    Raises
    ------
    GhostsolveError
        If there are none, one is malformed or out of range, or two overlap.
    """
    out: list[Interval] = []
    for item in intervals:
        try:
            start, end = (int(v) for v in item)
        except (TypeError, ValueError):
            raise GhostsolveError(
                f"an interval is a pair (start, end) of layer indices, got {item!r}"
            ) from None
        if not 0 <= start < end <= num_layers:
            raise GhostsolveError(
                f"interval {(start, end)} is invalid for a model of {num_layers} layers: need "
                f"0 <= start < end <= {num_layers} (end exclusive)"
            )
        out.append((start, end))
    if not out:
        raise GhostsolveError("no intervals given; pass at least one (start, end) pair")
    out.sort()
    for (s0, e0), (s1, e1) in itertools.pairwise(out):
        if s1 < e0:
            raise GhostsolveError(f"intervals {(s0, e0)} and {(s1, e1)} overlap")
    return out


def _row_weights(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, skip_first_token: bool
) -> torch.Tensor | None:
    """Per-token weights ``(batch, seq)``: 0 for padding and (optionally) each row's first real token."""
    if attention_mask is None and not skip_first_token:
        return None
    if attention_mask is None:
        mask = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    else:
        if attention_mask.shape != input_ids.shape:
            raise GhostsolveError(
                f"attention_mask is {tuple(attention_mask.shape)} but input_ids is {tuple(input_ids.shape)}; "
                "they must have the same (batch, seq) shape"
            )
        mask = attention_mask.to(device=input_ids.device).bool()
    if skip_first_token:
        # The first *real* token of each row (left padding moves it), typically BOS: an attention sink
        # whose hidden state is orders of magnitude larger than the rest in real LLMs.
        first = (mask.long().cumsum(dim=1) == 1) & mask
        mask = mask & ~first
    return mask.to(torch.float32)


def _as_inputs(batch: Any, device: torch.device) -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise GhostsolveError(
            "each calibration batch must be a dict with 'input_ids' (batch, seq) and optionally "
            f"'attention_mask'; got {type(batch).__name__}"
        )
    ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise GhostsolveError(f"input_ids must be a (batch, seq) integer tensor, got {shape}")
    inputs = {"input_ids": ids.to(device)}
    mask = batch.get("attention_mask")
    if mask is not None:
        inputs["attention_mask"] = torch.as_tensor(mask).to(device)
    return inputs


def _describe(boundary: int, num_layers: int) -> str:
    return "the final norm's input" if boundary == num_layers else f"the input of layer {boundary}"


# ---------------------------------------------------------------------------------------------
# the recorder: hooks that call back with the stream at chosen boundaries
# ---------------------------------------------------------------------------------------------
class _Recorder:
    """Owns the hooks of one model; calls back with hidden states as a forward pass goes by.

    ``boundaries``: indices ``b`` in ``[0, num_layers]``; the callback ``on_boundary(b, h)`` receives
    the ``(batch, seq, d)`` stream entering layer ``b`` (the final norm for ``b == num_layers``).
    ``mlp_layers``: layer indices whose MLP output is passed to ``on_mlp(i, m)``.
    The forward stops after the largest boundary.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: ModelAdapter,
        boundaries: Iterable[int],
        mlp_layers: Iterable[int],
        on_boundary: Callable[[int, torch.Tensor], None],
        on_mlp: Callable[[int, torch.Tensor], None] | None = None,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self.layers = adapter.layers(model)
        self.num_layers = len(self.layers)
        self.boundaries = sorted(set(boundaries))
        self.mlp_layers = sorted(set(mlp_layers))
        self.on_boundary = on_boundary
        self.on_mlp = on_mlp
        self.last = self.boundaries[-1]
        self.fired: set[tuple[str, int]] = set()
        self.device = model_input_device(model, adapter)

    def _boundary_hook(self, b: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            h = kwargs.get(self.adapter.hidden_states_kwarg)
            if h is None and len(args) > self.adapter.hidden_states_arg_position:
                h = args[self.adapter.hidden_states_arg_position]
            if not isinstance(h, torch.Tensor):
                raise GhostsolveError(
                    f"found no hidden-states tensor entering {_describe(b, self.num_layers)}"
                )
            self.fired.add(("boundary", b))
            self.on_boundary(b, h)
            if b == self.last:
                raise _StopForward

        return hook

    def _mlp_hook(self, i: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            self.fired.add(("mlp", i))
            assert self.on_mlp is not None
            self.on_mlp(i, out)

        return hook

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Recorder]:
        """Install the hooks and eval mode; remove them and restore training flags on any exit."""
        handles: list[torch.utils.hooks.RemovableHandle] = []
        modes = {m: m.training for m in self.model.modules()}
        try:
            for b in self.boundaries:
                target = self.adapter.final_norm(self.model) if b == self.num_layers else self.layers[b]
                handles.append(
                    unwrap(target).register_forward_pre_hook(self._boundary_hook(b), with_kwargs=True)
                )
            for i in self.mlp_layers:
                mlp = self.adapter.mlp(unwrap(self.layers[i]))
                handles.append(mlp.register_forward_hook(self._mlp_hook(i)))
            self.model.eval()
            yield self
        finally:
            for handle in handles:
                handle.remove()
            for module, mode in modes.items():
                module.training = mode

    def run(self, inputs: Mapping[str, torch.Tensor]) -> None:
        """One forward pass over ``inputs`` (stops after the last boundary); checks every hook fired."""
        self.fired.clear()
        try:
            self.model(**inputs, use_cache=False)
        except _StopForward:
            pass
        expected = {("boundary", b) for b in self.boundaries} | {("mlp", i) for i in self.mlp_layers}
        missing = expected - self.fired
        if missing:
            names = [
                _describe(j, self.num_layers) if kind == "boundary" else f"the MLP output of layer {j}"
                for kind, j in sorted(missing)
            ]
            raise GhostsolveError(
                f"the capture hooks for {', '.join(names)} never fired during the forward pass; the model's "
                f"forward does not run its decoder layers as the {self.adapter.family} adapter expects "
                f"({self.adapter.layers_path}, {self.adapter.final_norm_path})"
            )


# ---------------------------------------------------------------------------------------------
# stats bookkeeping
# ---------------------------------------------------------------------------------------------
class _StatsTable:
    """Lazily created :class:`Stats` per key, with the boundary named in every error."""

    def __init__(self, dtype: torch.dtype, product_dtype: torch.dtype | None, num_layers: int) -> None:
        self.dtype = dtype
        self.product_dtype = product_dtype
        self.num_layers = num_layers
        self.stats: dict[Interval, Stats] = {}

    def update(
        self,
        key: Interval,
        X: torch.Tensor,
        Y: torch.Tensor,
        weights: torch.Tensor | None,
        what: str = "",
    ) -> None:
        if X.device != Y.device:  # a model split over devices: the interval spans two of them
            X = X.to(Y.device)
        stats = self.stats.get(key)
        if stats is None:
            stats = Stats(X.shape[-1], dtype=self.dtype, device=Y.device, product_dtype=self.product_dtype)
            self.stats[key] = stats
        w = None if weights is None else weights.to(Y.device).reshape(-1)
        try:
            stats.update(X.reshape(-1, X.shape[-1]), Y.reshape(-1, Y.shape[-1]), w)
        except GhostsolveError as err:
            start, end = key
            raise GhostsolveError(
                f"calibration statistics of interval {key}{what} (from {_describe(start, self.num_layers)} "
                f"to {_describe(end, self.num_layers)}) failed: {err}. If the model runs in fp16/bf16, "
                "capture in fp32 (e.g. model.float()) or with fewer tokens per batch"
            ) from err

    def finish(self, keys: Sequence[Interval], what: str = "") -> dict[Interval, Stats]:
        out: dict[Interval, Stats] = {}
        for key in keys:
            stats = self.stats.get(key)
            if stats is None or stats.n_rows <= 0:
                raise GhostsolveError(
                    f"interval {key}{what} saw no calibration tokens (every position was padding or the "
                    "skipped first token); pass longer or more sequences"
                )
            out[key] = stats
        return out


def _progress(batches: Iterable[Any], progress: bool, desc: str) -> Iterable[Any]:
    total = len(batches) if isinstance(batches, Sized) else None
    return tqdm(batches, total=total, desc=desc, unit="batch", disable=not progress, leave=False)


# ---------------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------------
def capture_stats(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    intervals: Iterable[Interval],
    *,
    skip_first_token: bool = False,
    progress: bool = True,
    dtype: torch.dtype = torch.float64,
    product_dtype: torch.dtype | None = None,
    adapter: ModelAdapter | None = None,
) -> dict[Interval, Stats]:
    """Boundary statistics of every interval, from one forward pass over the calibration batches.

    Parameters
    ----------
    model : transformers PreTrainedModel
        A causal LM with an adapter, on any device and in any dtype; it is not modified (hooks are
        removed and training flags restored on every exit, including errors).
    batches : iterable of dict
        Each ``{"input_ids": (batch, seq) long tensor, "attention_mask": (batch, seq), optional}``.
        Padding (mask 0) contributes no rows. Moved to the model's embedding device.
    intervals : iterable of (start, end)
        Removed intervals, ``end`` exclusive, in the model's current layer numbering.
    skip_first_token : bool
        Exclude each row's first real token (BOS / attention sink) from the statistics.
    progress : bool
        Show a tqdm progress bar over the batches.
    dtype : torch.dtype
        Accumulation dtype of the statistics (fp64 by default); activations are cast inside
        :meth:`Stats.update`, never in the model.
    product_dtype : torch.dtype, optional
        Per-chunk product precision (see :class:`Stats`); None = ``dtype``.
    adapter : ModelAdapter, optional
        Defaults to ``get_adapter(model)``.

    Returns
    -------
    dict
        ``(start, end) -> Stats`` with rows ``X`` = stream entering ``start``, ``Y`` = stream entering
        ``end`` (or the final norm), each ``(n_tokens, d)``; the stats live on the device of ``Y``.

    Raises
    ------
    GhostsolveError
        Invalid intervals or batches; a hook that never fired; an interval with no unmasked token;
        NaN/Inf in the hidden states (the message names the interval and suggests fp32 capture).

    Examples
    --------
    >>> stats = capture_stats(model, [{"input_ids": ids}], [(1, 3)])  # doctest: +SKIP
    >>> stats[(1, 3)].n_rows  # doctest: +SKIP
    """
    adapter = adapter if adapter is not None else get_adapter(model)
    residual, _ = _capture_dense(
        model,
        batches,
        intervals,
        (),
        adapter=adapter,
        skip_first_token=skip_first_token,
        progress=progress,
        dtype=dtype,
        product_dtype=product_dtype,
    )
    return residual


def capture_rows(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    interval: Interval,
    *,
    max_rows: int,
    skip_first_token: bool = False,
    adapter: ModelAdapter | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw boundary rows ``X`` and ``Y`` of one interval, for analyses that need rows, not statistics.

    :func:`ghostsolve.compare_precisions` refits in each precision from raw rows, which accumulated
    statistics cannot do. The rows follow the same rules as :func:`capture_stats` (padding and, with
    ``skip_first_token``, each row's first *real* token are excluded), and the passes stop early: each
    forward ends at the input of layer ``end``, and no further batch runs once ``max_rows`` rows are held.

    Parameters
    ----------
    model : transformers PreTrainedModel
        A causal LM with an adapter, on any device and in any dtype; it is not modified (hooks are
        removed and training flags restored on every exit, including errors).
    batches : iterable of dict
        Each ``{"input_ids": (batch, seq) long tensor, "attention_mask": (batch, seq), optional}``.
    interval : (start, end)
        ``end`` exclusive, ``0 <= start < end <= num_layers``.
    max_rows : int
        At most this many token rows are returned (the first ones, in batch then row-major order).
    skip_first_token : bool
        Exclude each row's first real token (BOS / attention sink).
    adapter : ModelAdapter, optional
        Defaults to ``get_adapter(model)``.
    progress : bool
        Show a tqdm progress bar over the batches.

    Returns
    -------
    X, Y : (n_tokens, d) tensors on the CPU, ``n_tokens <= max_rows``
        ``X`` = the stream entering layer ``start``, ``Y`` = the stream entering layer ``end`` (the final
        norm's input when ``end`` is the number of layers); a fit gives ``Y ≈ X W`` with ``W = I + M``.
        Their dtype is the model's stream dtype, unchanged (e.g. bfloat16 for a bf16 model): no rounding
        happens here, so callers choose their own precision (``X.double()``).

    Raises
    ------
    GhostsolveError
        An invalid interval, ``max_rows`` or batch; a hook that never fired; no batches; no unmasked token.
    """
    adapter = adapter if adapter is not None else get_adapter(model)
    num_layers = len(adapter.layers(model))
    ((start, end),) = check_intervals([interval], num_layers)
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise GhostsolveError(f"max_rows must be a positive integer, got {max_rows!r}")
    held: dict[int, torch.Tensor] = {}

    def on_boundary(b: int, h: torch.Tensor) -> None:
        held[b] = h

    recorder = _Recorder(model, adapter, (start, end), (), on_boundary)
    xs: list[torch.Tensor] = []
    ys: list[torch.Tensor] = []
    total = 0
    seen_batches = 0
    with torch.no_grad(), recorder.installed():
        for batch in _progress(batches, progress, "ghostsolve row capture"):
            inputs = _as_inputs(batch, recorder.device)
            weights = _row_weights(inputs["input_ids"], inputs.get("attention_mask"), skip_first_token)
            try:
                recorder.run(inputs)
                x, y = held[start], held[end]
            finally:
                held.clear()
            seen_batches += 1
            if weights is None:
                x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
            else:
                keep = weights > 0
                x, y = x[keep.to(x.device)], y[keep.to(y.device)]
            take = min(max_rows - total, x.shape[0])
            # A copy, so that no row aliases (and keeps alive) a whole activation of the model.
            xs.append(x[:take].to("cpu", copy=True))
            ys.append(y[:take].to("cpu", copy=True))
            total += take
            if total >= max_rows:
                break
    if seen_batches == 0:
        raise GhostsolveError("no calibration batches: the batches iterable was empty")
    if total == 0:
        raise GhostsolveError(
            f"interval {(start, end)} saw no calibration tokens (every position was padding or the "
            "skipped first token); pass longer or more sequences"
        )
    return torch.cat(xs), torch.cat(ys)


def _capture_dense(
    model: nn.Module,
    batches: Iterable[Any],
    intervals: Iterable[Interval],
    mlp_intervals: Iterable[Interval],
    *,
    adapter: ModelAdapter,
    skip_first_token: bool,
    progress: bool,
    dtype: torch.dtype,
    product_dtype: torch.dtype | None,
) -> tuple[dict[Interval, Stats], dict[Interval, Stats]]:
    """Residual-boundary statistics and (for ReplaceMe) MLP-output statistics in one pass.

    For an MLP interval ``(s, e)`` the rows are ``X = m`` (the MLP output of layer ``s - 1``) and
    ``Y = y_e − x_s + m``: with ``x_s = r + m`` (``r`` the stream after that layer's attention), this
    is the target ``y_e − r`` of a map ``T`` with ``r + m T ≈ y_e``.
    """
    num_layers = len(adapter.layers(model))
    res_keys = check_intervals(intervals, num_layers) if intervals else []
    mlp_list = list(mlp_intervals)
    mlp_keys = check_intervals(mlp_list, num_layers) if mlp_list else []
    if not res_keys and not mlp_keys:
        raise GhostsolveError("no intervals given; pass at least one (start, end) pair")
    for s, _e in mlp_keys:
        if s == 0:
            raise GhostsolveError("an MLP-output interval needs a layer before it; (0, e) has none")
    boundaries = {b for key in (*res_keys, *mlp_keys) for b in key}
    ends: dict[int, list[Interval]] = {}
    for key in res_keys:
        ends.setdefault(key[1], []).append(key)
    mlp_ends: dict[int, list[Interval]] = {}
    for key in mlp_keys:
        mlp_ends.setdefault(key[1], []).append(key)
    # The last boundary needing each stashed stream, so that it is dropped as soon as possible.
    last_use: dict[int, int] = {}
    for s, e in (*res_keys, *mlp_keys):
        last_use[s] = max(last_use.get(s, -1), e)

    table = _StatsTable(dtype, product_dtype, num_layers)
    mlp_table = _StatsTable(dtype, product_dtype, num_layers)
    stash: dict[int, torch.Tensor] = {}
    mlp_stash: dict[int, torch.Tensor] = {}
    current: dict[str, torch.Tensor | None] = {"weights": None}

    def on_boundary(b: int, h: torch.Tensor) -> None:
        w = current["weights"]
        for key in (*ends.get(b, ()), *mlp_ends.get(b, ())):
            if key[0] not in stash:
                raise GhostsolveError(
                    f"the capture hooks for {_describe(key[0], num_layers)} never fired before "
                    f"{_describe(b, num_layers)}; the model's forward does not run its decoder layers as the "
                    f"{adapter.family} adapter expects ({adapter.layers_path})"
                )
        for key in ends.get(b, ()):
            table.update(key, stash[key[0]], h, w)
        for key in mlp_ends.get(b, ()):
            s = key[0]
            if s - 1 not in mlp_stash:
                raise GhostsolveError(f"the capture hook on the MLP output of layer {s - 1} never fired")
            # The difference y − x cancels most digits in half precision: form it in the stats dtype.
            m = mlp_stash[s - 1].to(device=h.device, dtype=dtype)
            target = (h.to(dtype) - stash[s].to(device=h.device, dtype=dtype)) + m
            mlp_table.update(key, m, target, w, what=" (ReplaceMe MLP output)")
        if last_use.get(b, -1) > b:
            stash[b] = h
        for s in [s for s in stash if last_use.get(s, -1) <= b]:
            del stash[s]

    def on_mlp(i: int, m: torch.Tensor) -> None:
        mlp_stash[i] = m

    recorder = _Recorder(
        model, adapter, boundaries, [s - 1 for s, _ in mlp_keys], on_boundary, on_mlp if mlp_keys else None
    )
    seen_batches = 0
    with torch.no_grad(), recorder.installed():
        for batch in _progress(batches, progress, "ghostsolve capture"):
            inputs = _as_inputs(batch, recorder.device)
            current["weights"] = _row_weights(
                inputs["input_ids"], inputs.get("attention_mask"), skip_first_token
            )
            try:
                recorder.run(inputs)
            finally:
                stash.clear()
                mlp_stash.clear()
                current["weights"] = None
            seen_batches += 1
    if seen_batches == 0:
        raise GhostsolveError("no calibration batches: the batches iterable was empty")
    return table.finish(res_keys), mlp_table.finish(mlp_keys, " (ReplaceMe MLP output)")


def _capture_cross(
    x_model: nn.Module,
    x_adapter: ModelAdapter,
    x_boundary: int,
    y_model: nn.Module,
    y_adapter: ModelAdapter,
    y_boundary: int,
    batches: Iterable[Any],
    *,
    mlp: bool,
    skip_first_token: bool,
    progress: bool,
    dtype: torch.dtype,
    product_dtype: torch.dtype | None,
    key: Interval,
) -> tuple[Stats, Stats | None]:
    """Statistics pairing one model's stream (``X``) with another model's stream (``Y``), per batch.

    Used by the sequential order: ``x_model`` is the model already pruned and recovered up to an
    interval, ``x_boundary`` the (renumbered) index of the interval's first layer in it; ``y_model``
    is the dense model and ``y_boundary`` the interval's end. Two partial forwards per batch, each
    stopping at its boundary. Returns the residual statistics ``(x, y)`` and, with ``mlp=True``, also
    ReplaceMe's ``(m, y − x + m)`` where ``m`` is the MLP output of the layer before ``x_boundary``.
    """
    y_layers = len(y_adapter.layers(y_model))
    x_layers = len(x_adapter.layers(x_model))
    if not 0 <= x_boundary < x_layers:
        raise GhostsolveError(
            f"x_boundary {x_boundary} is not a layer of the pruned model ({x_layers} layers)"
        )
    if mlp and x_boundary == 0:
        raise GhostsolveError("an MLP-output interval needs a layer before it; boundary 0 has none")
    table = _StatsTable(dtype, product_dtype, y_layers)
    mlp_table = _StatsTable(dtype, product_dtype, y_layers)
    held: dict[str, torch.Tensor] = {}

    def keep_y(b: int, h: torch.Tensor) -> None:
        held["y"] = h

    def keep_x(b: int, h: torch.Tensor) -> None:
        held["x"] = h

    def keep_m(i: int, m: torch.Tensor) -> None:
        held["m"] = m

    y_rec = _Recorder(y_model, y_adapter, [y_boundary], [], keep_y)
    x_rec = _Recorder(
        x_model, x_adapter, [x_boundary], [x_boundary - 1] if mlp else [], keep_x, keep_m if mlp else None
    )
    what = " (ReplaceMe MLP output)"
    seen_batches = 0
    with torch.no_grad(), y_rec.installed(), x_rec.installed():
        for batch in _progress(batches, progress, f"ghostsolve sequential capture {key}"):
            try:
                y_rec.run(_as_inputs(batch, y_rec.device))
                inputs = _as_inputs(batch, x_rec.device)
                x_rec.run(inputs)
                weights = _row_weights(inputs["input_ids"], inputs.get("attention_mask"), skip_first_token)
                y = held["y"]
                x = held["x"].to(y.device)
                table.update(key, x, y, weights)
                if mlp:
                    m = held["m"].to(device=y.device, dtype=dtype)
                    target = (y.to(dtype) - x.to(dtype)) + m
                    mlp_table.update(key, m, target, weights, what=what)
            finally:
                held.clear()
            seen_batches += 1
    if seen_batches == 0:
        raise GhostsolveError(
            "no calibration batches in a sequential pass; the sequential order iterates over the batches "
            "once per interval, so pass a list or a DataLoader, not a one-shot iterator"
        )
    res = table.finish([key])[key]
    return res, (mlp_table.finish([key], what)[key] if mlp else None)
