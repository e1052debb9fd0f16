"""Several processes under ``torchrun``: who this process is, the process group, and the few collectives we use.

    torchrun --nproc-per-node 2 -m gptqlora.cli finetune ...   # or the gptqlora script: torchrun --no-python

torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; a plain ``gptqlora ...`` has none of them and runs as a
world of one, with no process group and every helper here a no-op. The backend is NCCL on CUDA and gloo on CPU,
so the distributed paths run in CI on two CPU processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gptqlora.errors import UsageError


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
    """Leave the process group, if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Whether a process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(value: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``value`` on every rank (picklable values; ours, never a user file)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
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
