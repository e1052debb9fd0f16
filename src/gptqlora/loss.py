"""The answer-token loss, one definition for training and evaluation alike.

A batch holds ``input_ids``, ``attention_mask`` and ``labels``, LongTensors [B, T], right padded, ``labels`` equal to
``IGNORE_INDEX`` on the prompt and the padding; position t predicts ``labels[:, t + 1]``. The output head runs only on
the N positions that predict a label: the decoder's final hidden states [B, T, H] are gathered there ([N, H]), and
the head and the cross-entropy run on them in chunks of ``CHUNK_ROWS`` rows (``linear_cross_entropy``), so neither a
prompt's nor the padding's [T, V] logits nor [N, V] float32 logits ever exist at once. That holds for the causal LMs
whose logits are exactly ``lm_head(last hidden state)`` (``PLAIN_HEAD_TYPES``); any other model (a logit scale, a
softcap, a head that is not a plain ``nn.Linear``) gets its logits from its own forward, from the first position that
predicts a label on, with the same sums.

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
from torch.nn.parallel import DistributedDataParallel

from gptqlora import distributed
from gptqlora.data.gsm8k import IGNORE_INDEX

# Rows of the head's [rows, V] logits made at once: 1024 x 49,152 x 4 bytes = 192 MiB of float32 at most.
CHUNK_ROWS = 1024

# Causal LMs (``config.model_type``) whose logits are exactly ``lm_head(last_hidden_state)``: no logit scale, softcap or
# divisor after the head (Gemma 2, Cohere and Granite have one), so ``label_nll`` may apply the head itself.
PLAIN_HEAD_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})

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


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the label tokens are predicted: ``(rows, cols, targets)``, each [N], in row-major order.

    Position ``(rows[i], cols[i])`` predicts ``targets[i] = labels[rows[i], cols[i] + 1]``.
    """
    keep = labels[:, 1:] != IGNORE_INDEX  # [B, T - 1]: position t predicts labels[:, t + 1]
    rows, cols = keep.nonzero(as_tuple=True)  # [N] each, row-major as a boolean mask selects
    return rows, cols, labels[:, 1:][rows, cols]


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """Summed cross-entropy of the logits ``hidden @ weight.T`` against ``targets``, made ``chunk_rows`` rows at a time.

    The logits are computed as the head computes them (in autocast's dtype under autocast, else the weight's), then
    upcast to float32 one chunk at a time. With gradients on, each chunk's gradient is made in the forward (softmax
    minus one-hot, times the weight) and the backward only scales it: no [N, V] tensor is kept for the backward.

    Args:
        hidden: [N, H] the hidden states of the positions that predict a label.
        weight: [V, H] the output head's weight (a head without bias).
        targets: [N] the token ids they predict.
        chunk_rows: logit rows made at once.
    Returns:
        A float32 scalar, differentiable in ``hidden`` and ``weight`` where they require grad.
    """
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_rows)
    return _chunked_nll(hidden, weight, targets, chunk_rows, grad_hidden=False, grad_weight=False)[0]


def _chunked_nll(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int, *,
                 grad_hidden: bool, grad_weight: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``linear_cross_entropy``'s sum and, where asked, its gradients in ``hidden`` [N, H] and ``weight`` [V, H]."""
    device_type = hidden.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
    w = weight.to(dtype)  # [V, H], cast once: autocast would cast it again for every chunk
    nll = torch.zeros((), dtype=torch.float32, device=hidden.device)
    d_hidden = torch.empty_like(hidden) if grad_hidden else None  # [N, H]
    d_weight = torch.zeros_like(weight, dtype=torch.float32) if grad_weight else None  # [V, H]
    for s in range(0, len(targets), chunk_rows):
        h, t = hidden[s:s + chunk_rows].to(dtype), targets[s:s + chunk_rows]  # [c, H], [c]
        logp = F.linear(h, w).float().log_softmax(-1)  # [c, V]: F.cross_entropy's own two steps
        nll = nll + F.nll_loss(logp, t, reduction="sum")
        if grad_hidden or grad_weight:
            d_logits = logp.exp_()  # [c, V] softmax, in place: d nll / d logits = softmax - one-hot
            d_logits[torch.arange(len(t), device=t.device), t] -= 1
            d_logits = d_logits.to(dtype)  # back to the logits' dtype, as autograd casts the float32 gradient
            if d_hidden is not None:
                d_hidden[s:s + chunk_rows] = d_logits @ w  # [c, H]
            if d_weight is not None:
                d_weight += (d_logits.T @ h).float()  # [V, H]
    return nll, d_hidden, d_weight


class _LinearCrossEntropy(torch.autograd.Function):
    """``linear_cross_entropy`` with gradients: made in the forward, chunk by chunk, and scaled in the backward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk_rows: int) -> torch.Tensor:
        nll, d_hidden, d_weight = _chunked_nll(hidden, weight, targets, chunk_rows,
                                               grad_hidden=ctx.needs_input_grad[0],
                                               grad_weight=ctx.needs_input_grad[1])
        ctx.save_for_backward(d_hidden, d_weight)
        ctx.weight_dtype = weight.dtype  # d_weight is accumulated in float32
        return nll

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        d_hidden, d_weight = ctx.saved_tensors
        return (d_hidden * grad_nll if d_hidden is not None else None,
                (d_weight * grad_nll).to(ctx.weight_dtype) if d_weight is not None else None, None, None)


def _causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside a DDP wrapper or a PEFT model; an FSDP2-sharded model is the LM itself."""
    if isinstance(model, DistributedDataParallel):
        model = model.module
    return model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model  # PEFT's


def plain_head(model: nn.Module) -> nn.Linear | None:
    """The output head of a causal LM whose logits are exactly ``head(last hidden state)``; None for any other.

    None for an architecture outside ``PLAIN_HEAD_TYPES`` (it may scale or cap its logits after the head) and for a
    head that is not a bias-free ``nn.Linear`` (a quantized or adapted head computes otherwise).
    """
    lm = _causal_lm(model)
    if getattr(getattr(lm, "config", None), "model_type", None) not in PLAIN_HEAD_TYPES:
        return None
    head = lm.get_output_embeddings()
    return head if type(head) is nn.Linear and head.bias is None else None


def _final_hidden_states(model: nn.Module, batch: Batch, device: torch.device) -> torch.Tensor:
    """The decoder's final hidden states, [B, T, H] (after its last norm: what the head reads).

    Through the top-level forward, with the head given no position (``logits_to_keep`` empty: [B, 0, V] logits), so
    a DDP wrapper's forward and FSDP2's hooks run as they do for the logits. FSDP2 keeps the root group's parameters
    (embeddings, final norm, head) gathered from the root's forward to the end of the backward (it does not reshard
    the root after forward), so the head applied after the forward reads its whole weight.
    """
    out = model(input_ids=batch["input_ids"].to(device, non_blocking=True),
                attention_mask=batch["attention_mask"].to(device, non_blocking=True), use_cache=False,
                output_hidden_states=True, logits_to_keep=torch.empty(0, dtype=torch.long, device=device))
    return out.hidden_states[-1]  # [B, T, H]


def _logits_from_first_label(model: nn.Module, batch: Batch, device: torch.device) -> tuple[torch.Tensor, int]:
    """The model's logits from the first position that predicts a label on, [B, T - first, V], and ``first``."""
    input_ids = batch["input_ids"]  # [B, T]
    first = int((batch["labels"][:, 1:] != IGNORE_INDEX).any(0).nonzero()[0])
    logits = model(input_ids=input_ids.to(device, non_blocking=True),
                   attention_mask=batch["attention_mask"].to(device, non_blocking=True), use_cache=False,
                   logits_to_keep=input_ids.shape[1] - first).logits  # [B, T - first, V]
    return logits, first


def label_nll(model: nn.Module, batch: Batch, device: torch.device | None = None) -> torch.Tensor:
    """Summed NLL of a batch's label tokens, differentiable: the training loss before its scaling.

    For a model with a ``plain_head``, the head runs only on the hidden states of the N positions that predict a
    label, in chunks (``linear_cross_entropy``); any other model's logits come from its own forward, from the first
    position that predicts a label on, and only the labelled rows reach float32, a chunk at a time.

    The label positions are found where the batch is: give a CPU batch and the model's ``device`` and the call
    never waits for the device, as ``.item()``, a boolean mask or a blocking copy on it would (a CPU batch is copied
    to ``device`` without waiting: host -> device needs no sync, the source is staged at once).

    Args:
        model: a Hugging Face causal LM, a DDP wrapper or a PEFT model of one, or one sharded by FSDP2.
        batch: a batch with at least one label token (``has_labels``).
        device: where the model runs; the batch's device by default.
    Returns:
        A float32 scalar tensor on ``device``.
    """
    labels = batch["labels"]  # [B, T]
    device = device if device is not None else labels.device
    head = plain_head(model)
    if head is None:
        logits, first = _logits_from_first_label(model, batch, device)  # [B, T - first, V]
        rows, cols, targets = label_positions(labels[:, first:])  # [N] each: logits row t predicts labels[first + t + 1]
        picked = logits[rows.to(device, non_blocking=True), cols.to(device, non_blocking=True)]  # [N, V]
        targets = targets.to(device, non_blocking=True)
        return torch.stack([F.cross_entropy(picked[s:s + CHUNK_ROWS].float(), targets[s:s + CHUNK_ROWS],
                                            reduction="sum") for s in range(0, len(targets), CHUNK_ROWS)]).sum()
    rows, cols, targets = label_positions(labels)  # [N] each
    hidden = _final_hidden_states(model, batch, device)  # [B, T, H]
    picked = hidden[rows.to(device, non_blocking=True), cols.to(device, non_blocking=True)]  # [N, H]
    # The head's weight is read after the forward: under FSDP2 it is whole only from the root's forward on.
    return linear_cross_entropy(picked, head.weight, targets.to(device, non_blocking=True), CHUNK_ROWS)


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
            nll = label_nll(model, part, device).item()  # every rank runs the forward, a stand-in's too
            if counts:
                total, tokens = total + nll, tokens + label_count(part)
    finally:
        model.train(was_training)
    if world is not None:
        parts = distributed.gather_objects((total, tokens))  # a world of one: [(total, tokens)]
        total, tokens = sum(n for n, _ in parts), sum(t for _, t in parts)
    if tokens == 0:
        raise ValueError("no labelled tokens (labels != -100) in the batches: check the label masking")
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}
