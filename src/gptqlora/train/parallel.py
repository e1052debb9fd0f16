"""Data-parallel pieces of the training loop (torchrun, ``gptqlora.distributed``): DDP over the adapter alone or
FSDP2 over the whole model, and when a backward averages the gradients across ranks. (A rank's shard of a global
batch and the losses reduced over ranks are ``gptqlora.loss``'s.)"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from gptqlora import distributed
from gptqlora.errors import UsageError


def data_parallel(model: nn.Module) -> DistributedDataParallel:
    """DDP over the adapter alone: the frozen base (its weights and packed buffers) is neither broadcast nor
    averaged: every rank loaded the same one, and copying it would cost its whole size per rank."""
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return DistributedDataParallel(model)  # buffers are all ignored above; label_nll moves the inputs


@contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Within it, a backward averages the gradients across ranks (``sync``) or only adds this rank's to them:
    DDP's ``no_sync`` for a ``DistributedDataParallel`` wrapper, FSDP2's ``set_requires_gradient_sync`` for a
    ``fully_shard``-ed model; a plain model (a world of one) has nothing to average."""
    if isinstance(model, DistributedDataParallel):
        with nullcontext() if sync else model.no_sync():
            yield
    else:
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(sync)
        yield


def check_fsdp(fsdp: bool, world: distributed.World) -> None:
    """Refuse ``--fsdp`` outside a torchrun job of several processes (there would be nothing to shard across).

    Raises:
        UsageError: saying how to launch it.
    """
    if fsdp and not world.distributed:
        raise UsageError("--fsdp shards the model across the processes of a torchrun job, and this run has one: "
                         "launch it with torchrun --nproc-per-node N (N > 1), or leave --fsdp out")


def fully_sharded(model: nn.Module, device: torch.device, size: int) -> nn.Module:
    """FSDP2 over a LLaMA-family model, in place: one group per decoder block (``model.model.layers[i]``), the root
    group holding the rest (embeddings, final norm, head).

    Every parameter is sharded along dim 0, each rank keeping its ``1 / size``: the LoRA weights (and so their
    gradients and AdamW states) and the frozen float ones (embeddings, norms, head, float linears) alike; buffers,
    where a quantized base keeps its packed weights, stay whole on every rank. A group's parameters are gathered for
    its forward and backward, so every rank must run the same forwards. The parameters become ``DTensor``s: build the
    optimizer after this, over ``get_adapter_params(model)``.
    """
    mesh = init_device_mesh(device.type, (size,))
    for block in model.model.layers:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)
