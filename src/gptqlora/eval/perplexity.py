"""Teacher-forced answer-token loss and perplexity on GSM8K solutions."""

from __future__ import annotations

from torch import nn
from torch.utils.data import DataLoader

from gptqlora.data.gsm8k import GSM8KCoTDataset, collate, load_gsm8k
from gptqlora.eval.loss import answer_token_loss


def gsm8k_answer_loss(model: nn.Module, tokenizer, entries: list[dict] | None = None, source: str | None = None,
                      split: str = "test", limit: int | None = None, batch_size: int = 8, max_length: int = 512,
                      style: str = "auto") -> dict:
    """Mean NLL and perplexity of the gold solutions (prompt masked) under ``model``.

    Args:
        entries: GSM8K problems; loaded from ``source``/``split`` when None.
        limit: the first N problems only.
    Returns:
        ``{"loss", "perplexity", "tokens", "examples"}``.
    """
    if entries is None:
        entries = load_gsm8k(split, source)
    entries = entries[:limit] if limit else entries
    dataset = GSM8KCoTDataset(entries, tokenizer, style=style, max_length=max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=lambda b: collate(b, pad_id))
    return answer_token_loss(model, loader) | {"examples": len(dataset)}
