"""Data-parallel pieces of the training loop (torchrun, ``gptqlora.distributed``): a rank's shard of a global
micro-batch, DDP over the adapter alone or FSDP2 over the whole model, and the held-out loss scored in shards and
reduced."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from gptqlora import distributed
from gptqlora.data.gsm8k import IGNORE_INDEX, collate
from gptqlora.errors import UsageError
from gptqlora.eval.loss import answer_token_loss


def has_labels(batch: dict[str, torch.Tensor]) -> bool:
    """Whether a micro-batch holds a label token (``labels[:, 1:]``: position 0 is never predicted)."""
    return bool((batch["labels"][:, 1:] != IGNORE_INDEX).any())


def rank_shard(batch: dict[str, torch.Tensor], rank: int, size: int) -> tuple[dict[str, torch.Tensor], bool]:
    """This rank's rows of a global micro-batch (``distributed.shard_bounds``), cut to the longest of them as
    ``collate`` would pad them; and whether they count.

    A rank whose rows are none, or hold no label token (the short last micro-batch of an epoch), gets a stand-in
    that does not count (the first labelled row, its loss weighted 0): DDP averages the gradients in every rank's
    backward, and FSDP gathers the parameters in every forward, so every rank must run one.
    """
    start, stop = distributed.shard_bounds(len(batch["input_ids"]), rank, size)
    part = {k: v[start:stop] for k, v in batch.items()}  # [b, T] each
    counts = start < stop and has_labels(part)
    if not counts:
        row = int((batch["labels"][:, 1:] != IGNORE_INDEX).any(1).nonzero()[0])
        part = {k: v[row:row + 1] for k, v in batch.items()}  # [1, T]
    width = int(part["attention_mask"].any(0).nonzero().max()) + 1  # columns that some row of the part uses
    return {k: v[:, :width].contiguous() for k, v in part.items()}, counts


def data_parallel(model: nn.Module) -> DistributedDataParallel:
    """DDP over the adapter alone: the frozen base (its weights and packed buffers) is neither broadcast nor
    averaged: every rank loaded the same one, and copying it would cost its whole size per rank."""
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return DistributedDataParallel(model)  # buffers are all ignored above; label_nll moves the inputs


@contextmanager
def gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Within it, a backward averages the gradients across ranks (``sync``) or only adds this rank's to them:
    DDP's ``no_sync`` for a ``DistributedDataParallel`` wrapper, FSDP2's ``set_requires_gradient_sync`` otherwise."""
    if isinstance(model, DistributedDataParallel):
        with nullcontext() if sync else model.no_sync():
            yield
    else:
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


def sharded_answer_loss(model: nn.Module, dataset: Dataset, batch_size: int, pad_id: int, device: torch.device,
                        world: distributed.World) -> dict[str, float | int]:
    """``answer_token_loss`` over the whole ``dataset``, read as training reads its data: in global batches of
    ``batch_size x processes``, each rank scoring its rows (``rank_shard``); the summed NLL and token counts are
    gathered, so every rank gets the same token-weighted mean.

    Every rank runs one forward per global batch that holds a label token, a rank without rows (or labels) in it a
    stand-in that does not count: an FSDP-sharded model gathers its parameters in every forward, from every rank.

    Raises:
        ValueError: when no example holds a labelled token.
    """
    loader = DataLoader(dataset, batch_size=batch_size * world.size,
                        collate_fn=functools.partial(collate, pad_id=pad_id))
    nll, tokens = 0.0, 0
    for batch in loader:
        if not has_labels(batch):  # the same on every rank: no rank runs this batch
            continue
        part, counts = rank_shard(batch, world.rank, world.size)
        result = answer_token_loss(model, [part], device)
        if counts:
            nll, tokens = nll + result["loss"] * result["tokens"], tokens + result["tokens"]
    parts = distributed.gather_objects((nll, tokens))
    tokens = sum(t for _, t in parts)
    if tokens == 0:
        raise ValueError("no labelled tokens (labels != -100) in the held-out examples: check the label masking")
    return {"loss": sum(n for n, _ in parts) / tokens, "tokens": tokens}
