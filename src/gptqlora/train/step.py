"""One optimizer step, one path for one process and for many: the gradients of a step's micro-batches, then the
update (learning rate, clipping, the finite check, AdamW).

Each step reads ``grad_accum`` micro-batches and weighs every label token equally across all of them: the summed
NLL of a micro-batch is divided by the label tokens of the whole step, so the accumulated gradient is that of the
step's token-weighted mean loss, however the step is split into micro-batches.

Under torchrun every rank reads the same global micro-batches and trains on its contiguous shard of each
(``gptqlora.loss.rank_shard``; a world of one's shard is the whole batch). The gradients are averaged across ranks
in the step's last backward only (``parallel.gradient_sync``), and each rank's summed NLL is scaled by the process
count, so the averaged gradient is the one-process run's; the logged loss is gathered, so it is too.

``apply_update`` is the LoRA trainer's and the verifier's (``gptqlora.verifier.train``) alike: a step whose loss or
gradient norm is not finite raises ``NonFiniteLossError`` before the optimizer touches a parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from torch import nn

from gptqlora import distributed
from gptqlora.errors import NonFiniteLossError
from gptqlora.loss import has_labels, label_nll, rank_shard
from gptqlora.train.parallel import gradient_sync


def accumulate_gradients(model: nn.Module, micro: Sequence[dict[str, torch.Tensor]], n_labels: int,
                         world: distributed.World, device: torch.device,
                         autocast: Callable[[], AbstractContextManager]) -> float:
    """Backward over one step's global micro-batches, this rank's shard of each; the step's mean loss.

    Args:
        model: what the forward runs through: the model, its DDP wrapper, or an FSDP-sharded model.
        micro: the step's global micro-batches (the same on every rank), on the CPU: label_nll moves each part.
        n_labels: the label tokens of the whole step, all micro-batches and ranks together (> 0).
        world: this process's place; a world of one trains on every micro-batch whole.
        device: where the model runs.
        autocast: a factory of the forward's autocast context (``nullcontext`` for none).
    Returns:
        The step's token-weighted mean NLL, equal on every rank: one host sync per step, the micro-batch NLLs
        (float32) summed in float64 in micro-batch order, then over the ranks in rank order.
    """
    labelled = [batch for batch in micro if has_labels(batch)]  # the same on every rank
    nlls = []
    for i, batch in enumerate(labelled):
        part, counts = rank_shard(batch, world.rank, world.size)
        # Gradients are averaged across ranks in the step's last backward only.
        with gradient_sync(model, i == len(labelled) - 1):
            with autocast():
                nll = label_nll(model, part, device)  # summed over this rank's label tokens
            # x processes: DDP and FSDP average, and the step's gradient is the sum over all ranks' tokens
            # (x 1 in a world of one, which is exact); a stand-in's is weighted 0.
            (nll / n_labels * (world.size if counts else 0)).backward()
        if counts:
            nlls.append(nll.detach())
    mine = sum(torch.stack(nlls).tolist()) if nlls else 0.0
    return sum(distributed.gather_objects(mine)) / n_labels  # in rank order: equal on every rank


def apply_update(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor], *, lr: float, loss: float,
                 max_grad_norm: float, step: int, last_checkpoint: Callable[[], Path | None] | None = None,
                 fix: str | None = None) -> float:
    """Take the optimizer step whose gradients are accumulated: set ``lr``, clip, check, update, zero the grads.

    Args:
        optimizer: over ``params``; its every param group gets ``lr`` (from the schedule, ``get_lr``).
        params: the trained parameters (FSDP's ``DTensor``s are clipped by the norm of the whole gradient).
        lr: this step's learning rate.
        loss: this step's loss, already reduced: it is only checked.
        max_grad_norm: the clipping norm; 0 measures the norm without clipping.
        step: the 1-based number of this step, for the error.
        last_checkpoint: finds the last good checkpoint, for the error's advice (called only on an error).
        fix: what the error advises instead, for a trainer without checkpoints (see ``NonFiniteLossError``).
    Returns:
        The gradient norm before clipping.
    Raises:
        NonFiniteLossError: when ``loss`` or the gradient norm is NaN or infinite; nothing was updated.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    max_norm = max_grad_norm if max_grad_norm > 0 else math.inf  # inf: measure, don't clip
    # Over every rank's shards under FSDP (the norm of the whole gradient, a DTensor: made whole to read it)
    grad_norm = float(distributed.full_tensor(torch.nn.utils.clip_grad_norm_(list(params), max_norm)))
    for value, what in ((loss, "training loss"), (grad_norm, "gradient norm")):
        if not math.isfinite(value):  # before optimizer.step: the bad update is never applied nor saved
            checkpoint = last_checkpoint() if last_checkpoint is not None else None
            raise NonFiniteLossError(step, value, what, checkpoint, fix)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
