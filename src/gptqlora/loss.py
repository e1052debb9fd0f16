"""The answer-token loss, one definition for training and evaluation alike.

A batch holds ``input_ids``, ``attention_mask`` and ``labels``, LongTensors [B, T], right padded, ``labels`` equal to
``IGNORE_INDEX`` on the prompt and the padding; position t predicts ``labels[:, t + 1]``. Only the logits from the
first position that predicts a label on are computed (a prompt needs no [T, V] logits), and only the labelled rows
of those reach float32.

Two reductions of the same NLL: ``label_nll`` sums a micro-batch's label tokens into a differentiable tensor (the
training loss, scaled by the caller), and ``answer_token_loss`` is the token-weighted mean over a dataset (the
held-out metric), where every labelled token weighs the same, whatever its batch.

Over the processes of a torchrun job, a global batch is cut into contiguous row shards (``rank_shard``), one per
rank; a rank with no rows that count runs a stand-in that does not count, because DDP and FSDP need every rank to
run every forward and backward. ``answer_token_loss(..., world=)`` gathers the ranks' sums, so every rank gets the
loss of the whole batch. A world of one's shard is the whole batch, as it came.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from gptqlora import distributed
from gptqlora.data.gsm8k import IGNORE_INDEX

# Rows of [rows, vocab] logits upcast to float32 at once: 4096 x 49k x 4 bytes = 800 MB at most.
CHUNK_ROWS = 4096

Batch = dict[str, torch.Tensor]


def has_labels(batch: Batch) -> bool:
    """Whether a batch holds a label token (``labels[:, 1:]``: position 0 is never predicted)."""
    return bool((batch["labels"][:, 1:] != IGNORE_INDEX).any())


def label_count(batch: Batch) -> int:
    """The label tokens of a batch: the positions whose NLL counts."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def rank_shard(batch: Batch, rank: int, size: int) -> tuple[Batch, bool]:
    """This rank's rows of a global batch (``distributed.shard_bounds``), cut to the longest of them as ``collate``
    would pad them; and whether they count. A world of one's shard is the whole batch, as it came.

    A rank whose rows are none, or hold no label token (the short last micro-batch of an epoch), gets a stand-in
    that does not count (the first labelled row, its loss weighted 0): DDP averages the gradients in every rank's
    backward, and FSDP gathers the parameters in every forward, so every rank must run one.
    """
    if size == 1:
        return batch, has_labels(batch)
    start, stop = distributed.shard_bounds(len(batch["input_ids"]), rank, size)
    part = {k: v[start:stop] for k, v in batch.items()}  # [b, T] each
    counts = start < stop and has_labels(part)
    if not counts:
        row = int((batch["labels"][:, 1:] != IGNORE_INDEX).any(1).nonzero()[0])
        part = {k: v[row:row + 1] for k, v in batch.items()}  # [1, T]
    width = int(part["attention_mask"].any(0).nonzero().max()) + 1  # columns that some row of the part uses
    return {k: v[:, :width].contiguous() for k, v in part.items()}, counts


def _logits_from_first_label(model: nn.Module, batch: Batch, device: torch.device) -> tuple[torch.Tensor, int]:
    """The model's logits from the first position that predicts a label on, [B, T - first, V], and ``first``.

    ``first`` is found where the batch is: a CPU batch is copied to ``device`` without waiting (host -> device
    needs no sync: the source is staged at once), so the call never waits for the device.
    """
    input_ids = batch["input_ids"]  # [B, T]
    first = int((batch["labels"][:, 1:] != IGNORE_INDEX).any(0).nonzero()[0])
    logits = model(input_ids=input_ids.to(device, non_blocking=True),
                   attention_mask=batch["attention_mask"].to(device, non_blocking=True), use_cache=False,
                   logits_to_keep=input_ids.shape[1] - first).logits  # [B, T - first, V]
    return logits, first


def label_nll(model: nn.Module, batch: Batch, device: torch.device | None = None) -> torch.Tensor:
    """Summed NLL of a batch's label tokens, differentiable: the training loss before its scaling.

    The label positions are found where the batch is: give a CPU batch and the model's ``device`` and the call
    never waits for the device, as ``.item()``, a boolean mask or a blocking copy on it would.

    Args:
        model: a Hugging Face causal LM (or a DDP wrapper of one).
        batch: a batch with at least one label token (``has_labels``).
        device: where the model runs; the batch's device by default.
    Returns:
        A float32 scalar tensor on ``device``.
    """
    labels = batch["labels"]  # [B, T]
    device = device if device is not None else labels.device
    logits, first = _logits_from_first_label(model, batch, device)  # [B, T - first, V]
    keep = labels[:, first + 1:] != IGNORE_INDEX  # [B, T - first - 1]: logits row t predicts labels[first + t + 1]
    rows, cols = keep.nonzero(as_tuple=True)  # [N] each, row-major as a boolean mask selects
    targets = labels[:, first + 1:][rows, cols]  # [N]
    picked = logits[rows.to(device, non_blocking=True), cols.to(device, non_blocking=True)]  # [N, V]
    return F.cross_entropy(picked.float(), targets.to(device, non_blocking=True), reduction="sum")


def label_nll_sum(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> tuple[float, int]:
    """Summed negative log-likelihood of the labelled tokens under next-token logits, as a Python float.

    Args:
        logits: [B, T, V] logits (any float dtype); position t predicts ``labels[:, t + 1]``.
        labels: [B, T] target ids, ``IGNORE_INDEX`` where a token does not count (prompt, padding).
        chunk_rows: labelled positions upcast to float32 per cross-entropy call.
    Returns:
        (summed NLL in nats, number of labelled tokens).
    """
    targets = labels[:, 1:]  # [B, T-1]
    keep = targets != IGNORE_INDEX  # [B, T-1]
    picked = logits[:, :-1][keep]  # [N, V], only the positions that count
    tgt = targets[keep]  # [N]
    total = 0.0
    for s in range(0, tgt.numel(), chunk_rows):  # a float64 sum of the chunks' float32 sums
        total += F.cross_entropy(picked[s:s + chunk_rows].float(), tgt[s:s + chunk_rows], reduction="sum").item()
    return total, int(tgt.numel())


# no_grad, not inference_mode: an FSDP2-sharded model (training's held-out loss) gathers its parameters into buffers
# it keeps, and buffers first made in inference mode refuse the training forwards that come after.
@torch.no_grad()
def answer_token_loss(model: nn.Module, batches: Iterable[Batch], device: torch.device | str | None = None,
                      world: distributed.World | None = None) -> dict[str, float | int]:
    """Token-weighted mean NLL of the label tokens over a dataset, and its perplexity.

    Every labelled token weighs the same, whatever its batch: the NLL is summed over all tokens, then divided by
    their count (a mean of per-batch means would overweight batches with short answers).

    Args:
        model: a Hugging Face causal LM (put in eval mode for the call, its mode restored after).
        batches: dicts with ``input_ids``, ``attention_mask`` and ``labels``, LongTensors [B, T], right padded,
            labels ``IGNORE_INDEX`` on the prompt and the padding.
        device: where to run; the model's device by default.
        world: under torchrun, this process's place: every rank passes the same global batches, scores its
            ``rank_shard`` of each, and gets the loss of them all (the sums are gathered in rank order). None: the
            batches are this process's alone.
    Returns:
        ``{"loss": mean NLL in nats, "perplexity": exp(loss), "tokens": labelled token count}``.
    Raises:
        ValueError: when the batches hold no labelled token.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    try:
        for batch in batches:
            if not has_labels(batch):  # the same on every rank: no rank runs this batch
                continue
            part, counts = rank_shard(batch, world.rank, world.size) if world is not None else (batch, True)
            logits, first = _logits_from_first_label(model, part, device)  # [b, t, V]
            nll, n = label_nll_sum(logits, part["labels"][:, first:].to(device))
            if counts:
                total, tokens = total + nll, tokens + n
    finally:
        model.train(was_training)
    if world is not None:
        parts = distributed.gather_objects((total, tokens))  # a world of one: [(total, tokens)]
        total, tokens = sum(n for n, _ in parts), sum(t for _, t in parts)
    if tokens == 0:
        raise ValueError("no labelled tokens (labels != -100) in the batches: check the label masking")
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}
