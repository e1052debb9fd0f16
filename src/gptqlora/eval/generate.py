"""Batched decoding on a Hugging Face causal LM: left padding, a KV cache, greedy or nucleus sampling.

Our own loop instead of ``model.generate`` so that the stop rule (a finished GSM8K ``#### <number>`` line),
the padding and the sampling are explicit and tested: batched greedy decoding gives the same tokens as
one prompt at a time, and the same tokens as ``model.generate(do_sample=False)``.

The model's context (``max_position_embeddings``) bounds every sequence: a budget that cannot fit beside even a
one-token prompt is refused (:func:`check_token_budget`, which commands also call on config.json before loading),
and a prompt whose budget would run past the context generates only up to it, with a logged warning.

Per decode step the loop costs O(1) besides the forward pass: one device -> host read (the new tokens), and a stop
check that decodes only a few tokens (:class:`StopChecker`) instead of the whole text so far.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from gptqlora.data.gsm8k import pad_token_id
from gptqlora.errors import UsageError
from gptqlora.eval.decode import (CompiledDecode, EagerDecode, contiguous_head_input,  # noqa: F401 (re-exported)
                                   position_ids_from_mask)
from gptqlora.files import read_json_object

log = logging.getLogger(__name__)

# A line holding "####" and a digit, ended by a newline: the GSM8K final answer is complete.
ANSWER_LINE_RE = re.compile(r"####[^\n]*\d[^\n]*\n")
# The same line before its newline: only that newline is missing.
_ANSWER_LINE_OPEN_RE = re.compile(r"####[^\n]*\d")


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


def _line_carry(line: str) -> str:
    """The part of an unfinished line (no newline in it) that :data:`ANSWER_LINE_RE` can still use.

    A match lies within one line, so of the line written so far only this matters for what follows: whether it
    already holds ``####`` then a digit (then a newline completes the answer line), else whether it holds ``####``,
    else its last 3 characters (a ``####`` may straddle the join). The carry plus any further text matches the
    regex exactly when the whole line plus that text does, and it is at most 5 characters long.
    """
    if _ANSWER_LINE_OPEN_RE.search(line):
        return "####0"
    return "####" if "####" in line else line[-3:]


class StopChecker:
    """Incremental :func:`stop_cut` for one sequence: fed one token id at a time, O(1) work per token.

    ``push(id)`` is True exactly when ``stop_cut(tokenizer.decode(ids, skip_special_tokens=True), ...)`` finds a
    cut in the ids pushed so far, as re-decoding the whole text at every token would (O(T^2) in all); the caller
    stops at the first True.

    The text is decoded incrementally as vLLM and TGI do: a small window of the latest ids is decoded and diffed
    against the decoding of its head (whose text is already known), so byte-level merges, SentencePiece's leading
    space and multi-byte characters come out as in one decode of all ids. Text is committed only when it does not
    end in U+FFFD (a character whose bytes have not all arrived), so the window holds a few tokens. Text not yet
    committed is checked too: the whole-text check sees it, U+FFFD included. This assumes a decode that only
    appends as ids are added once a character is complete: true of byte-level BPE decoders (GPT-2, SmolLM2,
    Llama 3) and of SentencePiece ones on valid UTF-8; not with ``clean_up_tokenization_spaces`` (it deletes spaces
    already written). The tests compare it with the whole-text check on random token streams. The window grows
    only while the text ends in U+FFFD, e.g. over a run of invalid bytes.

    Only what a stop could still use is kept of the committed text: the carry of its last line for the answer
    line (:func:`_line_carry`) and its last ``len(longest stop string) - 1`` characters for the stop strings.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str] = (), stop_after_answer_line: bool = True):
        self._tokenizer = tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        self.stop_after_answer_line = stop_after_answer_line
        self._keep = max((len(s) for s in self.stop_strings), default=1) - 1
        self._window: list[int] = []  # ids since the start of the previous commit
        self._head = 0  # ids of the window already committed (as _head_text)
        self._head_text = ""
        self._line = ""  # _line_carry of the committed text's last line
        self._tail = ""  # the committed text's last self._keep characters

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token_id: int) -> bool:
        """Add one generated token id; True when the text so far calls for a stop."""
        self._window.append(token_id)
        window_text = self._decode(self._window)
        new = window_text[len(self._head_text):]  # the text after the committed text
        # No stop was found before this token, so a stop now must end in `new`: an answer line within the last
        # line (its carry) plus `new`, a stop string within the committed text's last characters plus `new`.
        answer = self.stop_after_answer_line and ANSWER_LINE_RE.search(self._line + new) is not None
        stop = answer or any(s in self._tail + new for s in self.stop_strings)
        if len(window_text) > len(self._head_text) and not window_text.endswith("\ufffd"):
            self._line = _line_carry((self._line + new).rpartition("\n")[2])
            self._tail = (self._tail + new)[-self._keep:] if self._keep else ""
            self._window = self._window[self._head:]  # the next window starts at this commit's first id
            self._head = len(self._window)
            self._head_text = self._decode(self._window)
        return stop


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


def eos_token_ids(model: torch.nn.Module | None, tokenizer, generation_config: Any = None) -> set[int]:
    """The tokenizer's eos plus any eos ids in the model's generation config (as ``model.generate`` stops on); a
    ``generation_config`` given (a model served elsewhere) stands for the model's."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    generation_config = generation_config or getattr(model, "generation_config", None)
    gen_eos = getattr(generation_config, "eos_token_id", None)
    if gen_eos is not None:
        ids |= set(gen_eos) if isinstance(gen_eos, (list, tuple)) else {gen_eos}
    return ids


def context_length(config: Any) -> int | None:
    """The positions a model can attend over: ``max_position_embeddings`` of its config (a ``PretrainedConfig`` or
    config.json's dict); None when the config does not say (then nothing is bounded)."""
    value = config.get("max_position_embeddings") if isinstance(config, dict) else getattr(
        config, "max_position_embeddings", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def model_dir_config(model_dir: str | os.PathLike | None) -> dict | None:
    """A model directory's config.json, without loading anything; None when there is no directory (a hub id) or it
    has no config.json yet (an embedded model's cache before its conversion).

    Raises:
        UsageError: a config.json that is not a JSON object.
    """
    path = None if model_dir is None else Path(model_dir).expanduser() / "config.json"
    return read_json_object(path) if path is not None and path.is_file() else None


def model_dir_context(model_dir: str | os.PathLike | None) -> int | None:
    """:func:`context_length` read from :func:`model_dir_config`; None without a config.json.

    Raises:
        UsageError: a config.json that is not a JSON object.
    """
    config = model_dir_config(model_dir)
    return None if config is None else context_length(config)


def row_budget(prompt_length: int, max_new_tokens: int, context: int | None) -> int:
    """The tokens a prompt of ``prompt_length`` may get: the budget, cut where the context ends (0 when it is full)."""
    return max_new_tokens if context is None else max(0, min(max_new_tokens, context - prompt_length))


def encode_prompts(tokenizer, prompts: Sequence[str], add_special_tokens: bool) -> list[list[int]]:
    """Each prompt's token ids, as every engine is given them.

    Raises:
        ValueError: a prompt that encodes to no tokens.
    """
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    if empty := [i for i, ids in enumerate(encoded) if not ids]:
        raise ValueError(f"prompts {empty[:5]} encode to no tokens: give non-empty prompts or add_special_tokens=True")
    return encoded


def check_token_budget(max_new_tokens: int, context: int | None, model: str | os.PathLike = "the model") -> None:
    """Refuse a budget that the model's context cannot hold beside a prompt of even one token.

    Generating past the context runs on positions the model never saw (its text is noise) for as long as the budget
    lasts: minutes for ``--max-new-tokens 100000``.

    Raises:
        UsageError: ``max_new_tokens >= context``, naming both and ``model``.
    """
    if context is not None and max_new_tokens >= context:
        raise UsageError(f"max_new_tokens={max_new_tokens} does not fit the context of {model}: its config.json gives "
                         f"max_position_embeddings {context}, and the prompt takes at least one of those positions; "
                         f"give --max-new-tokens below {context}")


@torch.inference_mode()
def generate_batch(model: torch.nn.Module, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                   pad_id: int, eos_ids: set[int], temperature: float = 0.0, top_p: float = 1.0,
                   generator: torch.Generator | None = None,
                   stop_checks: Sequence[Callable[[int], bool]] | None = None,
                   context: int | None = None, compiled: bool = False) -> list[list[int]]:
    """Decode one left-padded batch step by step with a KV cache.

    Each step reads one small tensor from the device, the new tokens: which rows have finished is kept on the
    device for the model's inputs and mirrored on the host from those tokens, never read back.

    Args:
        model: a causal LM taking input_ids, attention_mask, position_ids and a cache; returns ``.logits``.
        prompt_ids: token ids per prompt (non-empty).
        max_new_tokens: token budget per sequence.
        pad_id: id fed on padding and after a sequence has finished (always masked out).
        eos_ids: ids that end a sequence; the eos itself is not returned.
        temperature, top_p, generator: see :func:`sample_next_token`.
        stop_checks: one per prompt, called with each new token of its sequence (eos excluded), in order, e.g.
            :meth:`StopChecker.push`; True ends that sequence (the token is kept).
        context: the model's context (:func:`context_length`); a sequence ends when its prompt and new tokens fill
            it, so a row gets ``min(max_new_tokens, context - len(prompt))`` tokens at most (none when its prompt
            fills the context), whatever the batch.
        compiled: decode over a static cache with the compiled step (``gptqlora.eval.decode.CompiledDecode``)
            instead of eagerly (``EagerDecode``).
    Returns:
        The generated ids per prompt, in order, without eos.
    Raises:
        ValueError: when ``stop_checks`` does not have one entry per prompt.
    """
    if stop_checks is not None and len(stop_checks) != len(prompt_ids):
        raise ValueError(f"{len(stop_checks)} stop checks for {len(prompt_ids)} prompts: give one per prompt")
    budgets = [row_budget(len(p), max_new_tokens, context) for p in prompt_ids]
    max_new_tokens = max(budgets)  # the loop's length: the longest any row may run
    if max_new_tokens == 0:
        return [[] for _ in prompt_ids]
    device = next(model.parameters()).device
    input_ids, attention_mask = (t.to(device) for t in left_pad(prompt_ids, pad_id))  # [B, L]
    batch = input_ids.shape[0]
    decode = (CompiledDecode(model, input_ids, attention_mask, max_new_tokens, pad_id, context) if compiled
              else EagerDecode(model, input_ids, attention_mask))
    out = [[] for _ in range(batch)]
    done = [b == 0 for b in budgets]  # the host's copy of `finished`; a prompt that fills the context gets nothing
    decode.drop([i for i in range(batch) if done[i]])
    finished = torch.tensor(done, dtype=torch.bool, device=device)  # [B]
    eos = torch.tensor(sorted(eos_ids), dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        logits = decode.logits()  # [B, V]
        token = sample_next_token(logits, temperature, top_p, generator)  # [B]
        token = torch.where(finished, torch.full_like(token, pad_id), token)
        tokens = token.tolist()  # the one device -> host sync of the step
        ended, stopped = [], []  # the rows that finished at this step; those of them ended by a stop or the budget
        for i in range(batch):
            if done[i]:
                continue
            if tokens[i] in eos_ids:
                ended.append(i)
                continue
            out[i].append(tokens[i])
            if (stop_checks is not None and stop_checks[i](tokens[i])) or len(out[i]) == budgets[i]:
                ended.append(i)
                stopped.append(i)
        for i in ended:
            done[i] = True
        # A decoder may stop computing the rows that finished (EagerDecode drops them); one that keeps them feeds
        # each its last token once more, unmasked (its outputs are no longer read), then pad under a 0 mask.
        active = ~finished
        finished = finished | torch.isin(token, eos)  # eos rows, on the device
        for i in stopped:
            finished[i] = True  # a host value written to the device: no sync
        if all(done) or step == max_new_tokens - 1:
            break
        decode.drop(ended)
        decode.advance(token, active)
    return out


def generate(model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int = 256, batch_size: int = 8,
             temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
             stop_strings: Sequence[str] = (), stop_after_answer_line: bool = True,
             add_special_tokens: bool = False, progress: bool = False, compiled: bool = False) -> list[str]:
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
        compiled: decode with the compiled step over a static cache (see :func:`generate_batch`).
    Returns:
        The generated text per prompt, decoded with ``skip_special_tokens=True``, without eos.
    Raises:
        ValueError: for a bad budget, batch size or sampling setting, an empty prompt or no pad/eos token.
        UsageError: a budget the model's context cannot hold (:func:`check_token_budget`), before anything is
            generated. A prompt that leaves less room is not an error: its generation stops at the context (a
            warning is logged), so it gets no tokens when it fills the context alone.
    """
    if max_new_tokens <= 0 or batch_size <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} and batch_size={batch_size} must be positive")
    config = getattr(model, "config", None)  # None for a stand-in model: then nothing is bounded
    context = context_length(config)
    check_token_budget(max_new_tokens, context, getattr(config, "name_or_path", None) or "the model")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1 (got {temperature}, {top_p})")
    pad_id = pad_token_id(tokenizer)
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token: set tokenizer.pad_token")
    eos_ids = eos_token_ids(model, tokenizer)
    encoded = encode_prompts(tokenizer, prompts, add_special_tokens)
    if context is not None and (clamped := [len(ids) for ids in encoded if len(ids) + max_new_tokens > context]):
        log.warning("%d of %d prompts (the longest: %d tokens) leave fewer than max_new_tokens=%d positions in the "
                    "model's context of %d tokens (max_position_embeddings): their generation stops where the context "
                    "ends, %d of them fill it and get no tokens; use fewer --shots or a smaller --max-new-tokens",
                    len(clamped), len(prompts), max(clamped), max_new_tokens, context,
                    sum(n >= context for n in clamped))

    stops = stop_after_answer_line or any(stop_strings)  # else no stop check is needed
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
            checks = ([StopChecker(tokenizer, stop_strings, stop_after_answer_line).push for _ in idx]
                      if stops else None)
            new_ids = generate_batch(model, [encoded[i] for i in idx], max_new_tokens=max_new_tokens, pad_id=pad_id,
                                     eos_ids=eos_ids, temperature=temperature, top_p=top_p, generator=generator,
                                     stop_checks=checks, context=context, compiled=compiled)
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
