"""Data-parallel calibration on top of ``torch.distributed`` (launched with ``torchrun``).

Every rank holds the whole model (or onloads it layer by layer, see :mod:`ghostsolve.pipeline.capture`),
captures the statistics of its own shard of the calibration batches, and then the statistics are summed across
ranks with one ``all_reduce(SUM)`` per buffer. Every collective of ghostsolve lives in this module, and the
library runs one only where the caller asks for it (``recover(..., distributed=ctx)``). Statistics are raw
fp64 sums (never means), so the sum over ranks *is* the statistics of the whole calibration set, and every
rank then fits the same operators. NCCL is used on CUDA, gloo on CPU.

Typical use inside a script started with ``torchrun --nproc-per-node N script.py``::

    with distributed() as ctx:
        mine = shard_batches(batches, ctx.rank, ctx.world_size)
        stats = capture_stats(model, mine, intervals)
        all_reduce_stats(stats)              # every rank now holds the global sums
        fits = {iv: fit(s) for iv, s in stats.items()}
        run_on_main(save, model, out_dir)    # rank 0 writes, the others wait for it

Outside ``torchrun`` (no ``WORLD_SIZE`` in the environment) everything degrades to a single process:
:func:`all_reduce_stats` and :func:`barrier` do nothing and :func:`is_main_process` is true.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist

from ghostsolve.errors import GhostsolveError

__all__ = [
    "DistributedContext",
    "all_reduce_stats",
    "barrier",
    "broadcast_from_main",
    "destroy_distributed",
    "distributed",
    "init_distributed",
    "is_main_process",
    "run_on_main",
    "shard_batches",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

Interval = tuple[int, int]

# torch's default (10 min for NCCL) is shorter than one layer-by-layer capture of a 70B model on a
# slow rank; a rank waiting at the all-reduce for a straggler must not time out before it arrives.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=60)


class _SummedStats(Protocol):
    """What :func:`all_reduce_stats` needs from :class:`ghostsolve.Stats`."""

    def tensors(self) -> Mapping[str, torch.Tensor]: ...


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a (possibly single-process) data-parallel run.

    Attributes
    ----------
    rank, world_size, local_rank : int
        As set by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); ``0, 1, 0`` without it.
    backend : str or None
        ``"nccl"`` or ``"gloo"``; None when no process group is in use.
    device : torch.device
        The device this rank computes on: ``cuda:LOCAL_RANK`` with NCCL, ``cpu`` otherwise.
    owns_group : bool
        Whether :func:`init_distributed` created the process group (and so
        :func:`destroy_distributed` should tear it down).
    """

    rank: int
    world_size: int
    local_rank: int
    backend: str | None
    device: torch.device
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that prints and writes files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when this process is part of a ``torch.distributed`` process group (even of size 1)."""
        return self.backend is not None


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise GhostsolveError(
                f"environment variable {name} is not set, but WORLD_SIZE is; launch with torchrun "
                "(which sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT) or set all of them"
            )
        return default
    try:
        return int(raw)
    except ValueError as err:
        raise GhostsolveError(f"environment variable {name}={raw!r} is not an integer") from err


def init_distributed(
    backend: str | None = None,
    *,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
) -> DistributedContext:
    """Join the process group described by ``torchrun``'s environment variables.

    Parameters
    ----------
    backend : {"nccl", "gloo"}, optional
        Default: ``"nccl"`` when CUDA is available, else ``"gloo"``.
    timeout : datetime.timedelta
        How long a collective waits for the slowest rank (default 60 minutes).

    Returns
    -------
    DistributedContext
        With ``world_size == 1`` and ``backend=None`` when ``WORLD_SIZE`` is unset (not under torchrun);
        the existing group's facts when ``torch.distributed`` is already initialized (then
        ``owns_group`` is False and :func:`destroy_distributed` leaves it alone).

    Raises
    ------
    GhostsolveError
        If the environment is incomplete or inconsistent (``RANK`` outside ``[0, WORLD_SIZE)``), the
        backend is unknown, or NCCL is asked for without CUDA.
    """
    if dist.is_available() and dist.is_initialized():
        used = str(dist.get_backend())
        local = _env_int("LOCAL_RANK", 0)
        device = torch.device("cuda", local) if used == "nccl" else torch.device("cpu")
        return DistributedContext(dist.get_rank(), dist.get_world_size(), local, used, device, False)

    if "WORLD_SIZE" not in os.environ:
        cuda = torch.cuda.is_available()
        device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        return DistributedContext(0, 1, 0, None, device, False)

    world_size = _env_int("WORLD_SIZE")
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", rank)
    if world_size < 1 or not 0 <= rank < world_size:
        raise GhostsolveError(
            f"RANK={rank} and WORLD_SIZE={world_size} are inconsistent; RANK must lie in [0, WORLD_SIZE)"
        )
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in os.environ:
            raise GhostsolveError(
                f"environment variable {name} is not set, but WORLD_SIZE is; launch with torchrun "
                "or set MASTER_ADDR and MASTER_PORT"
            )
    if not dist.is_available():
        raise GhostsolveError("this torch build has no torch.distributed; install a build with it")

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise GhostsolveError(f"backend is {backend!r}; use 'nccl' (CUDA) or 'gloo' (CPU)")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise GhostsolveError("backend 'nccl' needs CUDA, but no CUDA device is visible; use 'gloo'")
        if local_rank >= torch.cuda.device_count():
            raise GhostsolveError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible; "
                "start at most that many processes per node (torchrun --nproc-per-node)"
            )
        device = torch.device("cuda", local_rank)
        # Binding the rank to its GPU before the group exists keeps NCCL from putting every rank's
        # communicator on cuda:0.
        torch.cuda.set_device(device)
        dist.init_process_group(
            backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout,
            device_id=device,
        )
    else:
        device = torch.device("cpu")
        dist.init_process_group(
            backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout
        )
    logger.info("joined process group: rank %d of %d, backend %s, device %s", rank, world_size, backend,
                device)
    return DistributedContext(rank, world_size, local_rank, backend, device, True)


def destroy_distributed(ctx: DistributedContext | None = None) -> None:
    """Tear down the process group if ``ctx`` created it (or, with no ``ctx``, if one exists)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if ctx is None or ctx.owns_group:
        dist.destroy_process_group()


@contextmanager
def distributed(
    backend: str | None = None, *, timeout: datetime.timedelta = DEFAULT_TIMEOUT
) -> Iterator[DistributedContext]:
    """Context manager around :func:`init_distributed` and :func:`destroy_distributed`.

    The group is destroyed on exit, also when the body raises, but only if this call created it.
    """
    ctx = init_distributed(backend, timeout=timeout)
    try:
        yield ctx
    finally:
        destroy_distributed(ctx)


def _active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    """True on rank 0, or when no process group is initialized (a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return True
    return dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if not _active():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def shard_batches(batches: Iterable[T], rank: int, world_size: int) -> list[T]:
    """The batches one rank calibrates on: every ``world_size``-th batch, starting at ``rank``.

    Striding (rather than contiguous blocks) keeps the shards within one batch of each other in size, so no
    rank waits long for the others at the all-reduce. The shards are disjoint and together hold every batch
    exactly once, so summed statistics equal those of one process over all batches.

    Parameters
    ----------
    batches : iterable
        Calibration batches (e.g. dicts with ``input_ids`` ``(batch, seq_len)``); materialized into a list.
    rank, world_size : int
        This process's rank and the number of processes.

    Returns
    -------
    list
        ``batches[rank::world_size]``.

    Raises
    ------
    GhostsolveError
        If ``world_size < 1``, ``rank`` is outside ``[0, world_size)``, or there are fewer batches than
        ranks (a rank with no batch has no statistics to contribute and would fail at capture).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise GhostsolveError(
            f"rank={rank}, world_size={world_size}; rank must lie in [0, world_size) and world_size >= 1"
        )
    items = list(batches)
    if len(items) < world_size:
        raise GhostsolveError(
            f"{len(items)} calibration batch(es) cannot be sharded over {world_size} ranks: every rank needs "
            "at least one; use more calibration sequences, a smaller batch size, or fewer processes"
        )
    return items[rank::world_size]


def _signature(stats_by_interval: Mapping[Interval, _SummedStats]) -> list[Any]:
    """What must agree across ranks before summing: intervals, buffer names, shapes and dtypes."""
    sig: list[Any] = []
    for interval in sorted(stats_by_interval):
        stats = stats_by_interval[interval]
        tensors = stats.tensors()
        buffers = [(name, tuple(t.shape), str(t.dtype)) for name, t in sorted(tensors.items())]
        r_factor = getattr(stats, "r_factor", None)
        if r_factor is not None:
            # Its row count differs between ranks; only its width and dtype must agree.
            buffers.append(("r_factor", (-1, int(r_factor.shape[-1])), str(r_factor.dtype)))
        sig.append((tuple(interval), buffers))
    return sig


def _describe(sig: list[Any]) -> str:
    parts = []
    for interval, buffers in sig:
        shapes = ", ".join(f"{n}{list(s)} {d.removeprefix('torch.')}" for n, s, d in buffers)
        shapes = shapes.replace("[-1, ", "[k, ")
        parts.append(f"{interval}: {shapes}")
    return "; ".join(parts) if parts else "no intervals"


def all_reduce_stats(
    stats_by_interval: Mapping[Interval, _SummedStats],
    *,
    group: Any = None,
) -> Mapping[Interval, _SummedStats]:
    """Sum every rank's statistics in place, so each rank holds the statistics of all calibration data.

    Each buffer of each :class:`ghostsolve.Stats` (``Stats.tensors()``: XᵀX, XᵀY, YᵀY, magnitude sums,
    token counts) is all-reduced with ``SUM`` in a fixed order — intervals sorted, then buffer names sorted
    — so every rank issues the same collectives in the same sequence. Before any data moves, the ranks
    exchange the intervals and the buffers' names, shapes and dtypes, and all of them raise if any rank
    differs (instead of hanging or summing unrelated matrices).

    Parameters
    ----------
    stats_by_interval : mapping of (start, end) to Stats
        As returned by ``capture_stats``; fp64 buffers are recommended (the default) since the summation
        order across ranks differs from one process's and fp64 keeps that difference at ~1e-16 relative.
    group : ProcessGroup, optional
        Default: the world group.

    Returns
    -------
    mapping
        ``stats_by_interval`` itself, its buffers now summed over ranks (a single process: unchanged).

    Raises
    ------
    GhostsolveError
        On every rank, if the ranks disagree on the intervals or on any buffer's shape or dtype; the
        message shows rank 0's and the differing rank's view.

    Notes
    -----
    NCCL reduces CUDA tensors only and gloo is used here with CPU tensors, so a buffer living elsewhere is
    copied to the backend's device, reduced, and copied back into the same storage.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return stats_by_interval
    world = dist.get_world_size(group)
    if world == 1:
        return stats_by_interval

    mine = _signature(stats_by_interval)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    for rank, theirs in enumerate(gathered):
        if theirs != gathered[0]:
            raise GhostsolveError(
                f"ranks disagree on the statistics to sum: rank 0 has {_describe(gathered[0])}, "
                f"but rank {rank} has {_describe(theirs)}; every rank must capture the same removal set "
                "(the same --drop) with the same model and Stats dtype"
            )

    backend = str(dist.get_backend(group))
    comm_device = (
        torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    )
    for interval in sorted(stats_by_interval):
        tensors = stats_by_interval[interval].tensors()
        for name in sorted(tensors):
            tensor = tensors[name]
            if tensor.device == comm_device and tensor.is_contiguous():
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
            else:
                staged = tensor.to(comm_device).contiguous()
                dist.all_reduce(staged, op=dist.ReduceOp.SUM, group=group)
                tensor.copy_(staged)
        stats = stats_by_interval[interval]
        r_factor = getattr(stats, "r_factor", None)
        if r_factor is not None:
            combined = _combine_r_factors(r_factor, comm_device, world, group)
            stats.r_factor = combined  # type: ignore[attr-defined]
    return stats_by_interval


def _combine_r_factors(
    r_factor: torch.Tensor, comm_device: torch.device, world: int, group: Any
) -> torch.Tensor:
    """The TSQR factor of all ranks' rows: ``R`` of the stacked per-rank factors, in rank order.

    A factor is not a sum, so it cannot be all-reduced. Each rank's ``(k, 2d)`` factor is zero-padded to
    ``(2d, 2d)`` (zero rows change neither ``RᵀR`` nor the span) so that a plain ``all_gather`` carries it;
    every rank then factors the same stack in the same order and gets the same ``R``.
    """
    width = int(r_factor.shape[-1])
    padded = torch.zeros(width, width, dtype=r_factor.dtype, device=comm_device)
    padded[: r_factor.shape[0]] = r_factor.to(comm_device)
    pieces = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(pieces, padded, group=group)
    stacked = torch.cat(pieces, dim=0).to(r_factor.device)
    combined = torch.linalg.qr(stacked, mode="r").R
    return combined[: min(stacked.shape)].contiguous()


def _once_on_main(fn: Callable[..., R], share: bool, *args: Any, **kwargs: Any) -> R | None:
    """``fn`` on rank 0; every rank learns whether it failed, and (with ``share``) receives its result."""
    if not _active():
        return fn(*args, **kwargs)
    result: R | None = None
    error: BaseException | None = None
    if is_main_process():
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            error = exc
    failure = None if error is None else f"{type(error).__name__}: {error}"
    payload: list[Any] = [result if share else None, failure]
    dist.broadcast_object_list(payload, src=0)
    if error is not None:
        raise error
    if payload[1] is not None:
        raise GhostsolveError(
            f"rank 0 failed in {getattr(fn, '__name__', fn)!s}: {payload[1]}; see rank 0's log for the cause"
        )
    return payload[0] if share else result


def run_on_main(fn: Callable[..., R], *args: Any, **kwargs: Any) -> R | None:
    """Call ``fn`` on rank 0 only; every rank returns once it has finished (and learns if it failed).

    Use it for anything that must happen once: writing a checkpoint, a report, a plot. The other ranks wait
    at a collective, so none starts reading a checkpoint that is still being written.

    Returns
    -------
    object or None
        ``fn``'s result on rank 0; None on the other ranks.

    Raises
    ------
    Exception
        On rank 0, whatever ``fn`` raised.
    GhostsolveError
        On the other ranks, if ``fn`` raised on rank 0 (so no rank carries on as if the file existed).
    """
    return _once_on_main(fn, False, *args, **kwargs)


def broadcast_from_main(fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
    """``fn(*args, **kwargs)`` computed on rank 0 and sent to every rank (a plain call outside torchrun).

    For what every rank must hold identically and only one should compute: self-sampled calibration windows
    (floating-point sampling need not agree bit for bit between processes), a layer selection. The result
    travels pickled (``broadcast_object_list``), so keep it small: tensors of token ids, not models.

    Raises
    ------
    Exception
        On rank 0, whatever ``fn`` raised.
    GhostsolveError
        On the other ranks, when ``fn`` failed on rank 0.
    """
    return _once_on_main(fn, True, *args, **kwargs)  # type: ignore[return-value]
