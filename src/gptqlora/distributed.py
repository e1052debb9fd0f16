"""Several processes under ``torchrun``: who this process is, the process group, and the few collectives we use.

    torchrun --nproc-per-node 2 -m gptqlora.cli finetune ...   # or the gptqlora script: torchrun --no-python

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; a plain ``gptqlora ...`` has none of them and runs as a
world of one, with no process group and every helper here a no-op. The backend is NCCL on CUDA and gloo on CPU,
so the distributed paths run in CI on two CPU processes.
"""

from __future__ import annotations

import datetime
import logging

import os
import sys
from dataclasses import dataclass
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from gptqlora.errors import NonFiniteLossError, UsageError


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one job."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this is rank 0: the one process that writes shared outputs and prints progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's rank, the world size and the local rank, from torchrun's environment (a world of one without).

    Raises:
        UsageError: malformed or inconsistent ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``.
    """
    try:
        rank, size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise UsageError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers ({e}): launch with torchrun") from None
    if size < 1 or not 0 <= rank < size or local < 0:
        raise UsageError(f"RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local} is not a valid place: launch with "
                         "torchrun")
    return World(rank, size, local)


def rank_device(device: str) -> str:
    """The device this rank uses: under torchrun with CUDA, ``cuda:LOCAL_RANK`` (one GPU per process)."""
    w = world()
    if w.distributed and device == "cuda":
        return f"cuda:{w.local_rank}"
    return device


def init(device: str) -> World:
    """Join the job's process group (once; NCCL for CUDA devices, gloo otherwise) and return this process's place.

    A world of one creates no group. On CUDA the rank's device is made current.
    """
    w = world()
    if w.distributed and not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(torch.device(rank_device(device)))
        dist.init_process_group("nccl" if cuda else "gloo", rank=w.rank, world_size=w.size)
    return w


def shutdown() -> None:
    """Leave the process group, if one was joined.

    With gloo, every rank first waits (at most 30 s) for the others to get here: a rank that tore its connections
    down while another was still finishing the last collective aborted that one ("terminate called without an
    active exception", SIGABRT), in about one run in five of the two-rank resume test.
    """
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1 and dist.get_backend() == "gloo":
            try:
                dist.monitored_barrier(timeout=datetime.timedelta(seconds=30))
            except RuntimeError:
                pass  # a rank died or is stuck: leave anyway
        dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """End this process now with ``code``, its output flushed, skipping the interpreter's finalization: the way out
    of a torchrun worker, after ``shutdown``.

    A gloo process group can outlive ``destroy_process_group`` (something still references it once a model has been
    loaded), and its worker thread then frees the last collective's tensors while the interpreter finalizes. Taking
    the interpreter lock there ends the thread by a forced unwind through C++ frames that do not allow it, and the
    process aborts ("terminate called without an active exception", SIGABRT) after all its work is written: about
    1 in 30 two-rank resume runs under load. Every file is written and closed (``gptqlora.files``) before this.
    """
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken pipe: nothing more can be said through it
    logging.shutdown()
    os._exit(code)


def active() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(value: Any, src: int = 0, group: dist.ProcessGroup | None = None) -> Any:
    """Rank ``src``'s ``value`` on every rank (picklable values; ours, never a user file), over ``group`` (default:
    the job's)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def gather_objects(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not active():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def agree(value: Any, what: str) -> None:
    """Refuse to go on unless every rank holds an equal ``value`` (settings, data hashes).

    Raises:
        UsageError: naming ``what`` and the ranks' values.
    """
    values = gather_objects(value)
    if any(v != values[0] for v in values[1:]):
        raise UsageError(f"the processes disagree on {what}: {values}; give every rank the same arguments")


def local_size() -> int:
    """How many processes of the job run on this machine (torchrun's ``LOCAL_WORLD_SIZE``; 1 without torchrun)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        raise UsageError("LOCAL_WORLD_SIZE must be an integer: launch with torchrun") from None


def share_threads() -> int:
    """Give this process its fair share of the CPU cores: ``cores // local processes`` threads, at least one.

    Processes on one machine that each take every core slow one another down. ``OMP_NUM_THREADS``, when set, is
    the user's (or torchrun's) choice and is kept. Returns the thread count in use.
    """
    if "OMP_NUM_THREADS" not in os.environ:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // local_size()))
    return torch.get_num_threads()


def joined() -> World:
    """This process's place, checked against the process group: under torchrun, :func:`init` must have run.

    Raises:
        RuntimeError: torchrun started several processes but this one joined no group, so each would work alone
            and write over the others' outputs (a bug in the caller).
    """
    w = world()
    if w.distributed and not active():
        raise RuntimeError(f"rank {w.rank} of {w.size} has not joined the process group: call "
                           "gptqlora.distributed.init(device) first")
    return w


def from_main(fn, *args, wait: datetime.timedelta | None = None, **kwargs) -> Any:
    """Run ``fn`` on rank 0 only and hand its result to every rank; a ``UsageError`` (or a
    ``NonFiniteLossError``) it raises is raised on all.

    For the steps one process must do alone (checking and preparing an output directory, resuming from files,
    training a verifier) while the others wait, without leaving them waiting forever when the step refuses.

    ``wait``: how long the others may wait, for a step that can outlast the job's own timeout (30 minutes with
    gloo, 10 with NCCL): they then wait on a gloo group of their own, made with this timeout (its creation is a
    collective: every rank passes the same ``wait``). None waits within the job's timeout.
    """
    if not active():
        return fn(*args, **kwargs)
    group = None if wait is None else dist.new_group(backend="gloo", timeout=wait)
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn(*args, **kwargs)
        except (UsageError, NonFiniteLossError) as e:  # both are the user's to act on, on every rank
            error = e
    result, error = broadcast_object((result, error), group=group)
    if group is not None:
        dist.destroy_process_group(group)
    if error is not None:
        raise error
    return result


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` whole: a sharded ``DTensor`` (FSDP's parameters, their gradients and optimizer states) gathered from
    every rank, which is a collective (every rank must call it, in the same order); any other tensor as it is."""
    from torch.distributed.tensor import DTensor  # here: its 0.4 s import would slow every command's start

    return t.full_tensor() if isinstance(t, DTensor) else t


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` cut as ``like`` is: when ``like`` is a ``DTensor``, this rank's part of ``full`` as a DTensor on
    ``like``'s mesh and placements (every rank holds ``full``, so nothing is sent); else ``full`` as it is."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements, src_data_rank=None)


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of ``n`` that rank ``rank`` of ``size`` takes: contiguous, in rank order, sizes
    differing by one at most, so the ranks' shards put back together are the ``n`` rows in their order."""
    return rank * n // size, (rank + 1) * n // size
