"""Batched decoding on a Hugging Face causal LM: left padding, a KV cache, greedy or nucleus sampling.

Our own loop instead of ``model.generate`` so that the stop rule (a finished GSM8K ``#### <number>`` line),
the padding and the sampling are explicit and tested: batched greedy decoding gives the same tokens as
one prompt at a time, and the same tokens as ``model.generate(do_sample=False)``.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence

import torch
from transformers import DynamicCache

# A line holding "####" and a digit, ended by a newline: the GSM8K final answer is complete.
ANSWER_LINE_RE = re.compile(r"####[^\n]*\d[^\n]*\n")


def answer_line_complete(text: str) -> int | None:
    """Where to cut a generation after its completed GSM8K final-answer line.

    Args:
        text: generated text so far.
    Returns:
        The index just past the first ``#### <number>`` line (its newline excluded), so ``text[:cut]`` ends with
        the answer line; None while no such line is finished. A line ended by eos or by the token budget needs no
        cut, the generation is over anyway.
    """
    m = ANSWER_LINE_RE.search(text)
    return None if m is None else m.end() - 1


def stop_cut(text: str, stop_strings: Sequence[str] = (), stop_after_answer_line: bool = True) -> int | None:
    """The earliest cut position demanded by a stop string (cut before it) or a completed answer line, or None."""
    cuts = [i for i in (text.find(s) for s in stop_strings if s) if i >= 0]
    if stop_after_answer_line and (cut := answer_line_complete(text)) is not None:
        cuts.append(cut)
    return min(cuts) if cuts else None


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into a batch, so every sequence's next token is predicted at the last column.

    Returns:
        input_ids [B, L] and attention_mask [B, L] (0 on padding), both int64.
    """
    length = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            input_ids[i, length - len(s):] = torch.tensor(list(s), dtype=torch.long)
            attention_mask[i, length - len(s):] = 1
    return input_ids, attention_mask


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only, so a left-padded prompt is rotated as if unpadded: [B, L] -> [B, L]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row: argmax when ``temperature == 0``, else temperature + nucleus (top-p) sampling.

    Args:
        logits: [B, V] next-token logits.
        temperature: 0 for greedy; > 0 divides the logits before the softmax.
        top_p: keep the smallest set of most likely tokens whose probability mass reaches ``top_p``.
        generator: random source for sampling; the draw happens on its device, so a seeded generator is
            reproducible whatever the model's device.
    Returns:
        [B] int64 token ids, on the logits' device.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [B, V]
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # [B, V]
        # Drop a token when the mass before it already reaches top_p; the most likely token always stays.
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    device = generator.device if generator is not None else probs.device
    picked = torch.multinomial(probs.to(device), num_samples=1, generator=generator)  # [B, 1], renormalises
    return picked.squeeze(-1).to(logits.device)


def _cache_kwarg(model: torch.nn.Module) -> str:
    # transformers >= 5.x names the cache argument `cache` (`past_key_values` is deprecated); older ones do not.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def eos_token_ids(model: torch.nn.Module, tokenizer) -> set[int]:
    """The tokenizer's eos plus any eos ids in the model's generation config (as ``model.generate`` stops on)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
    return ids


@torch.inference_mode()
def generate_batch(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                   pad_id: int, eos_ids: set[int], temperature: float = 0.0, top_p: float = 1.0,
                   generator: torch.Generator | None = None,
                   should_stop: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """Decode one left-padded batch step by step with a KV cache.

    Args:
        model: a causal LM taking input_ids, attention_mask, position_ids and a cache; returns ``.logits``.
        prompt_ids: token ids per prompt (non-empty).
        max_new_tokens: token budget per sequence.
        pad_id: id fed on padding and after a sequence has finished (always masked out).
        eos_ids: ids that end a sequence; the eos itself is not returned.
        temperature, top_p, generator: see :func:`sample_next_token`.
        should_stop: called with a sequence's generated ids after each new token; True ends that sequence.
    Returns:
        The generated ids per prompt, in order, without eos.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = (t.to(device) for t in left_pad(prompt_ids, pad_id))  # [B, L]
    batch = input_ids.shape[0]
    cache = DynamicCache(config=model.config)
    cache_kw = _cache_kwarg(model)
    position_ids = position_ids_from_mask(attention_mask)  # [B, L]
    out = [[] for _ in range(batch)]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=True, logits_to_keep=1, **{cache_kw: cache}).logits[:, -1]  # [B, V]
        token = sample_next_token(logits, temperature, top_p, generator)  # [B]
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        newly_done = ~finished & torch.isin(token, eos)
        tokens = token.tolist()  # one device sync per step
        for i in (~finished & ~newly_done).nonzero().flatten().tolist():
            out[i].append(tokens[i])
            if should_stop is not None and should_stop(out[i]):
                newly_done[i] = True
        # A sequence that just finished feeds its last token once more, unmasked (its outputs are no longer read);
        # from the next step on it is fed pad under a 0 mask.
        active = ~finished
        finished |= newly_done
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        # The new token's position is the count of real tokens before it; finished rows are masked out.
        position_ids = attention_mask.sum(-1, keepdim=True)  # [B, 1]
        attention_mask = torch.cat([attention_mask, active[:, None].long()], dim=-1)  # [B, L + step + 1]
        input_ids = token[:, None]  # [B, 1]
    return out


def generate(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 256, batch_size: int = 8,
             temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
             stop_strings: Sequence[str] = (), stop_after_answer_line: bool = True,
             add_special_tokens: bool = False, progress: bool = False) -> list[str]:
    """Generate a continuation for every prompt, batched, order preserved.

    Prompts are sorted by token length (longest first, so memory peaks on the first batch) and batched with left
    padding; the results are put back in the input order.

    Args:
        model: a Hugging Face causal LM (put in eval mode for the call, its mode restored after).
        tokenizer: its tokenizer; the pad id is ``pad_token_id``, or eos when there is none.
        prompts: the prompt texts (already formatted, e.g. through the chat template).
        max_new_tokens: token budget per prompt.
        batch_size: prompts per forward pass.
        temperature: 0 for greedy decoding, > 0 for sampling.
        top_p: nucleus threshold in (0, 1] when sampling.
        generator: random source for sampling (seed it for reproducible samples).
        stop_strings: a sequence stops when its text contains one; the text is cut before it.
        stop_after_answer_line: stop a sequence once it has written a complete ``#### <number>`` line, and cut
            the text after that line.
        add_special_tokens: let the tokenizer add its special tokens (e.g. bos) to each prompt.
        progress: show a tqdm bar over batches.
    Returns:
        The generated text per prompt, decoded with ``skip_special_tokens=True``, without eos.
    Raises:
        ValueError: for a bad budget, batch size or sampling setting, an empty prompt or no pad/eos token.
    """
    if max_new_tokens <= 0 or batch_size <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} and batch_size={batch_size} must be positive")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token: set tokenizer.pad_token")
    eos_ids = eos_token_ids(model, tokenizer)
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    if empty := [i for i, ids in enumerate(encoded) if not ids]:
        raise ValueError(f"prompts {empty[:5]} encode to no tokens: give non-empty prompts or add_special_tokens=True")

    def should_stop(ids: list[int]) -> bool:
        text = tokenizer.decode(ids, skip_special_tokens=True)
        return stop_cut(text, stop_strings, stop_after_answer_line) is not None

    check = should_stop if stop_strings or stop_after_answer_line else None
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # stable: equal lengths keep their order
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", unit="batch")
    texts: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()  # dropout (LoRA's included) off while decoding
    try:
        for start in starts:
            idx = order[start:start + batch_size]
            new_ids = generate_batch(model, [encoded[i] for i in idx], max_new_tokens=max_new_tokens, pad_id=pad_id,
                                     eos_ids=eos_ids, temperature=temperature, top_p=top_p, generator=generator,
                                     should_stop=check)
            for i, ids in zip(idx, new_ids):
                text = tokenizer.decode(ids, skip_special_tokens=True)
                cut = stop_cut(text, stop_strings, stop_after_answer_line)
                texts[i] = text if cut is None else text[:cut]
    finally:
        model.train(was_training)
    return texts


def generate_samples(model: torch.nn.Module, tokenizer, prompts: list[str], k: int, temperature: float = 0.7,
                     top_p: float = 0.95, seed: int = 0, **kw) -> list[list[str]]:
    """Draw ``k`` sampled continuations per prompt (for self-consistency voting), reproducibly from ``seed``.

    Each prompt is repeated ``k`` times in the batch stream; the samples of one prompt differ by their draws.

    Args:
        model, tokenizer, prompts: as for :func:`generate`.
        k: samples per prompt.
        temperature: sampling temperature (> 0).
        top_p: nucleus threshold in (0, 1].
        seed: seeds the generator, so the same call gives the same samples.
        **kw: passed on to :func:`generate` (max_new_tokens, batch_size, stop_strings, ...).
    Returns:
        One list of ``k`` texts per prompt, in prompt order.
    Raises:
        ValueError: for ``k < 1`` or ``temperature <= 0``.
    """
    if k < 1:
        raise ValueError(f"k={k} must be >= 1")
    if temperature <= 0:
        raise ValueError(f"sampling needs temperature > 0 (got {temperature}); use generate() for greedy decoding")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    repeated = [p for p in prompts for _ in range(k)]
    texts = generate(model, tokenizer, repeated, temperature=temperature, top_p=top_p, generator=generator, **kw)
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]
