"""Teacher-forced loss on answer tokens: the held-out metric that does not need generation."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Rows of [rows, vocab] logits upcast to float32 at once: 4096 x 49k x 4 bytes = 800 MB at most.
CHUNK_ROWS = 4096


def label_nll_sum(logits: torch.Tensor, labels: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> tuple[float, int]:
    """Summed negative log-likelihood of the labelled tokens under next-token logits.

    Args:
        logits: [B, T, V] logits (any float dtype); position t predicts ``labels[:, t + 1]``.
        labels: [B, T] target ids, ``-100`` where a token does not count (prompt, padding).
        chunk_rows: labelled positions upcast to float32 per cross-entropy call.
    Returns:
        (summed NLL in nats, number of labelled tokens).
    """
    targets = labels[:, 1:]  # [B, T-1]
    keep = targets != IGNORE_INDEX  # [B, T-1]
    picked = logits[:, :-1][keep]  # [N, V], only the positions that count
    tgt = targets[keep]  # [N]
    total = 0.0
    for s in range(0, tgt.numel(), chunk_rows):
        total += F.cross_entropy(picked[s:s + chunk_rows].float(), tgt[s:s + chunk_rows], reduction="sum").item()
    return total, int(tgt.numel())


# no_grad, not inference_mode: an FSDP2-sharded model (training's held-out loss) gathers its parameters into buffers
# it keeps, and buffers first made in inference mode refuse the training forwards that come after.
@torch.no_grad()
def answer_token_loss(model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                      device: torch.device | str | None = None) -> dict[str, float | int]:
    """Token-weighted mean NLL of the label tokens over a dataset, and its perplexity.

    Every labelled token weighs the same, whatever its batch: the NLL is summed over all tokens, then divided by
    their count (a mean of per-batch means would overweight batches with short answers).

    Args:
        model: a Hugging Face causal LM (put in eval mode for the call, its mode restored after).
        batches: dicts with ``input_ids``, ``attention_mask`` and ``labels``, LongTensors [B, T], right padded,
            labels ``-100`` on the prompt and the padding.
        device: where to run; the model's device by default.
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
            input_ids = batch["input_ids"].to(device)  # [B, T]
            labels = batch["labels"].to(device)  # [B, T]
            has_label = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero()  # positions t+1 that count
            if has_label.numel() == 0:
                continue
            # Logits only from the first position that predicts a label on: prompts need no [T, V] logits.
            first = int(has_label[0])
            logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device), use_cache=False,
                           logits_to_keep=input_ids.shape[1] - first).logits  # [B, T - first, V]
            nll, n = label_nll_sum(logits, labels[:, first:])
            total, tokens = total + nll, tokens + n
    finally:
        model.train(was_training)
    if tokens == 0:
        raise ValueError("no labelled tokens (labels != -100) in the batches: check the label masking")
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}
