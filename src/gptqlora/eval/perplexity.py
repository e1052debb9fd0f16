"""Teacher-forced answer-token loss and perplexity on GSM8K solutions."""

from __future__ import annotations

import math

from torch import nn
from torch.utils.data import DataLoader

from gptqlora import distributed
from gptqlora.data.gsm8k import IGNORE_INDEX, GSM8KCoTDataset, collate, load_gsm8k, pad_token_id
from gptqlora.loss import answer_token_loss


def gsm8k_answer_loss(model: nn.Module, tokenizer, entries: list[dict] | None = None, source: str | None = None,
                      split: str = "test", limit: int | None = None, batch_size: int = 8, max_length: int = 512,
                      style: str = "auto") -> dict:
    """Mean NLL and perplexity of the gold solutions (prompt masked) under ``model``.

    Under ``torchrun`` (after :func:`gptqlora.distributed.init`) every rank calls this alike: the batches one
    process makes are dealt out round-robin, each rank sums the NLL of its own, and the sums and token counts are
    gathered, so every rank returns the token-weighted mean over all batches (equal to one process's up to the
    rounding of the sum).

    Args:
        entries: GSM8K problems; loaded from ``source``/``split`` when None.
        limit: the first N problems only.
    Returns:
        ``{"loss", "perplexity", "tokens", "examples"}``.
    Raises:
        ValueError: when no solution keeps a labelled token.
    """
    if entries is None:
        entries = load_gsm8k(split, source)
    entries = entries[:limit] if limit else entries
    dataset = GSM8KCoTDataset(entries, tokenizer, style=style, max_length=max_length)
    pad_id = pad_token_id(tokenizer)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=lambda b: collate(b, pad_id))
    world = distributed.joined()
    if not world.distributed:
        return answer_token_loss(model, loader) | {"examples": len(dataset)}

    mine = [b for i, b in enumerate(loader) if i % world.size == world.rank]
    mine = [b for b in mine if bool((b["labels"][:, 1:] != IGNORE_INDEX).any())]  # a share may have none
    nll, tokens = 0.0, 0
    if mine:
        result = answer_token_loss(model, mine)
        nll, tokens = result["loss"] * result["tokens"], result["tokens"]
    sums = distributed.gather_objects((nll, tokens))
    tokens = sum(t for _, t in sums)
    if tokens == 0:
        raise ValueError("no labelled tokens (labels != -100) in the GSM8K solutions: check the label masking")
    loss = sum(n for n, _ in sums) / tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens, "examples": len(dataset)}
