"""GSM8K: loading, answer extraction, prompt building and the chain-of-thought training dataset.

An entry is ``{"question": str, "answer": str}`` as released: the answer is a worked solution with calculator
annotations (``<<48/2=24>>``) and a last line ``#### 72``. Prompts hold only the question (and few-shot
exemplars); the solution, ending in ``#### N``, is the training target.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset

from gptqlora.config import default_data_source
from gptqlora.data.chat_template import check_chat_template, render_chat_template
from gptqlora.data.jsonl import read_rows
from gptqlora.errors import InputNotFoundError, UsageError

SPLITS = ("train", "test")
STYLES = ("plain", "chat")
IGNORE_INDEX = -100  # label value the cross-entropy loss skips

SYSTEM_PROMPT = "Solve the math problem step by step. End with a line '#### <number>'."

_CALCULATOR = re.compile(r"<<[^<>]*>>")
# A number not glued to a word or a dot before it: optional sign and $, digits with optional thousands
# separators (1,234 but not 1,2) and decimals, or a bare decimal (.5). A trailing '.', '%' or unit is left out.
_NUMBER = re.compile(r"(?<![\w.])-?\$?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_ANSWER_IS = "the answer is"


# ---------------------------------------------------------------------------------------------- loading

def load_gsm8k(split: str, source: str | None = None) -> list[dict]:
    """Load one GSM8K split as a list of ``{"question", "answer"}`` dicts.

    Args:
        split: ``"train"`` or ``"test"``.
        source: a directory holding ``train.jsonl``/``test.jsonl`` (GSM8K as released), or a hub dataset id
            (loaded with its ``"main"`` config). ``None`` means ``$GSM8K_DIR`` when set, else ``openai/gsm8k``.
    Returns:
        The entries, in file order.
    Raises:
        ValueError: for an unknown split, an empty source, or a malformed line (with file path and 1-based line number);
            a byte that is not UTF-8 (with file path and byte offset). A leading byte-order mark is skipped.
        FileNotFoundError / NotADirectoryError: when ``source`` is a path but not a directory with the split's file.
        RuntimeError: when the hub dataset cannot be loaded.
    """
    if split not in SPLITS:
        raise UsageError(f"unknown GSM8K split {split!r}: use 'train' or 'test'")
    source = default_data_source() if source is None else source
    if not source:  # Path("") is ".", which would silently read the working directory
        raise UsageError("empty GSM8K source: pass --data DIR holding train.jsonl/test.jsonl, or a hub dataset id")
    path = Path(source).expanduser()
    if path.is_dir():
        entries = _read_jsonl(path / f"{split}.jsonl")
        if not entries:
            raise UsageError(f"{path / f'{split}.jsonl'} holds no problems: give a GSM8K directory whose "
                             f"{split}.jsonl has one JSON object per line")
        return entries
    if source.startswith((".", "/", "~")) or path.exists():
        if path.is_file():
            raise UsageError(f"GSM8K source {source!r} is a file: pass --data DIR, the directory holding "
                                     "train.jsonl and test.jsonl, or a hub dataset id such as openai/gsm8k")
        raise InputNotFoundError(f"GSM8K directory {source!r} does not exist: pass --data DIR holding "
                                "train.jsonl/test.jsonl, or a hub dataset id such as openai/gsm8k")
    return _load_hub(source, split)


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise InputNotFoundError(f"{path} not found: pass --data DIR holding train.jsonl/test.jsonl "
                                "(or set $GSM8K_DIR), or a hub dataset id such as openai/gsm8k")
    return [_entry(row, where) for row, where in read_rows(path)]


def _load_hub(dataset_id: str, split: str) -> list[dict]:
    import datasets  # lazy: a heavy import that only the hub path needs

    try:
        ds = datasets.load_dataset(dataset_id, "main", split=split)
    except Exception as e:  # network, auth or a wrong id: all get the same way out
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"GSM8K source {dataset_id!r} is not a local directory (none at {Path(dataset_id).absolute()}) "
                         f"and could not be loaded as a hub dataset ({first}): pass --data DIR (or set $GSM8K_DIR) "
                         "to a directory holding train.jsonl/test.jsonl") from e
    entries = [_entry(row, f"{dataset_id} [{split}] row {i}") for i, row in enumerate(ds)]
    if not entries:
        raise UsageError(f"the hub dataset {dataset_id!r} has no {split!r} problems")
    return entries


def _entry(row: object, where: str) -> dict:
    if not isinstance(row, dict):
        raise UsageError(f"{where}: expected a JSON object with 'question' and 'answer', got {type(row).__name__}")
    for key in ("question", "answer"):
        if not isinstance(row.get(key), str):
            raise UsageError(f"{where}: missing or non-string {key!r} (each line needs 'question' and 'answer')")
    return {"question": row["question"], "answer": row["answer"]}


# ---------------------------------------------------------------------------------------------- answers

def strip_calculator(text: str) -> str:
    """Remove GSM8K calculator annotations: ``"48/2 = <<48/2=24>>24"`` -> ``"48/2 = 24"``."""
    return _CALCULATOR.sub("", text)


def _first_number(text: str) -> float | None:
    m = _NUMBER.search(text)
    return None if m is None else _to_float(m.group())


def _to_float(token: str) -> float | None:
    """The number a token spells, or None when it overflows to infinity (hundreds of digits), which no gold equals."""
    value = float(token.replace(",", "").replace("$", ""))
    return value if math.isfinite(value) else None


def extract_answer(text: str) -> float | None:
    """The final numeric answer in a solution or a model's generation.

    Tried in order, each falling through to the next when it finds no number: the first number after the
    last ``####``; the first number after the last "The answer is" (any case); the last number in the text.
    Thousands separators, ``$``, ``%``, a sign and trailing punctuation are handled (``"$1,234."`` -> 1234.0).

    Args:
        text: the solution text.
    Returns:
        The answer as a float, or None when the text holds no number.
    """
    lowered = text.lower()
    for marker in ("####", _ANSWER_IS):
        at = lowered.rfind(marker)
        if at >= 0:
            value = _first_number(text[at + len(marker):])
            if value is not None:
                return value
    numbers = _NUMBER.findall(text)
    return _to_float(numbers[-1]) if numbers else None


def parse_number(text: str) -> float | None:
    """The value of a text that is one number and nothing else (``"18"``, ``"1,234"``, ``"$5"``, ``"-0.5"``).

    Other corpora's final answers are rewritten as ``#### N`` only when the scorer will read back exactly this
    number; ``"\\frac{1}{2}"`` or ``"(A)"`` give None.
    """
    m = _NUMBER.fullmatch(text.strip())
    return None if m is None else _to_float(m.group())


def answers_match(pred: float | None, gold: float) -> bool:
    """Whether a predicted answer equals the gold one, up to float noise (1e-6, relative beyond 1)."""
    return pred is not None and abs(pred - gold) <= 1e-6 * max(1.0, abs(gold))


def gold_answer(entry: dict) -> float:
    """The number after ``####`` in a GSM8K entry's answer.

    Raises:
        ValueError: when the answer has no ``#### <number>`` line.
    """
    answer = entry["answer"]
    value = extract_answer(answer) if "####" in answer else None
    if value is None:
        raise UsageError(f"GSM8K answer has no '#### <number>' line: {answer[-80:]!r}")
    return value


def check_answers(entries: Sequence[dict], where: str) -> None:
    """Refuse a set of entries for fine-tuning when an answer lacks the ``#### <number>`` line.

    A model trained on such solutions would never write the line the scorer reads.

    Raises:
        UsageError: naming the first bad entry and how many there are.
    """
    bad = [i for i, e in enumerate(entries) if "####" not in e["answer"] or extract_answer(e["answer"]) is None]
    if bad:
        raise UsageError(f"{where}: {len(bad)} of {len(entries)} answers have no '#### <number>' line (first: entry "
                         f"{bad[0]}, {entries[bad[0]]['answer'][-60:]!r}); GSM8K solutions end with '#### <answer>', "
                         "which the scorer reads")


# ---------------------------------------------------------------------------------------------- prompts

def resolve_style(style: str, tokenizer=None) -> str:
    """``"auto"`` -> ``"chat"`` when the tokenizer has a chat template, else ``"plain"``; others pass checked.

    A chat style is checked by rendering a small conversation (``check_chat_template``), once, where the style is
    decided: before prompts are built.

    Raises:
        ValueError: for an unknown style, or ``"chat"`` with a tokenizer that has no chat template.
        UsageError: a chat template that hangs, errs, escapes its sandbox or drops the question.
    """
    resolved = _checked_style(style, tokenizer)
    if resolved == "chat":
        check_chat_template(tokenizer, SYSTEM_PROMPT)
    return resolved


def _checked_style(style: str, tokenizer=None) -> str:
    """``resolve_style`` without the template probe (for the per-prompt calls after it)."""
    has_template = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if style == "auto":
        return "chat" if has_template else "plain"
    if style not in STYLES:
        raise UsageError(f"unknown prompt style {style!r}: use 'auto', 'plain' or 'chat'")
    if style == "chat" and not has_template:
        raise UsageError("prompt style 'chat' needs a tokenizer with a chat template: use --prompt-style plain")
    return style


def build_prompt(question: str, style: str, tokenizer=None, exemplars: Sequence[dict] = ()) -> str:
    """The prompt for one question: few-shot exemplars (if any), then the question, never its solution.

    Args:
        question: the problem text.
        style: ``"plain"`` (``"Question: ...\\nAnswer:"`` blocks), ``"chat"`` (the tokenizer's chat template,
            system prompt first, exemplars as earlier user/assistant turns) or ``"auto"``.
        tokenizer: needed for ``"chat"`` and ``"auto"``.
        exemplars: GSM8K entries shown solved before the question (calculator annotations stripped).
    Returns:
        The prompt text; a plain prompt ends with ``"Answer:"``, a chat prompt with the assistant header.
    Raises:
        ValueError: for an unknown style or a chat style without a chat template.
        UsageError: a chat template that fails within its bounds (``render_chat_template``).
    """
    style = _checked_style(style, tokenizer)  # callers resolve (and probe) the style once, not per prompt
    shots = [(e["question"], strip_calculator(e["answer"]).strip()) for e in exemplars]
    if style == "plain":
        blocks = [f"Question: {q}\nAnswer: {a}\n\n" for q, a in shots]
        return "".join(blocks) + f"Question: {question}\nAnswer:"
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for q, a in shots:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": question})
    return render_chat_template(tokenizer, messages)


def format_gsm8k_entry(entry: dict, style: str = "plain", tokenizer=None, strip_calc: bool = True,
                       exemplars: Sequence[dict] = ()) -> tuple[str, str]:
    """Split an entry into (prompt, target) for supervised fine-tuning.

    Args:
        entry: a GSM8K entry.
        style: prompt style, as in ``build_prompt``.
        tokenizer: needed for ``"chat"`` and ``"auto"``.
        strip_calc: remove calculator annotations from the target.
        exemplars: few-shot exemplars for the prompt.
    Returns:
        ``(prompt, target)``: the target is the worked solution ending in ``#### N``, with a leading space in
        plain style (so ``"Answer: ..."`` tokenizes as running text) and no end-of-sequence text.
    """
    style = _checked_style(style, tokenizer)
    solution = entry["answer"].strip()
    if strip_calc:
        solution = strip_calculator(solution)
    target = " " + solution if style == "plain" else solution
    return build_prompt(entry["question"], style, tokenizer, exemplars), target


def prompt_gets_bos(tokenizer, style: str) -> bool:
    """Whether a prompt starts with the bos token, for training, generation, sampling and the verifier alike.

    A chat template writes its own special tokens, so nothing is added for ``"chat"``; a plain prompt gets the bos
    token only when the tokenizer adds one by default (``add_bos_token``, as LLaMA's does) and has one.
    """
    return style == "plain" and bool(getattr(tokenizer, "add_bos_token", False)) and tokenizer.bos_token_id is not None


def encode_texts(tokenizer, texts: Sequence[str], style: str) -> list[list[int]]:
    """Token ids of prompts (or prompt + target) as training and generation both see them (``prompt_gets_bos``)."""
    ids = tokenizer(list(texts), add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if prompt_gets_bos(tokenizer, style):
        ids = [[tokenizer.bos_token_id] + x for x in ids]
    return ids


# ---------------------------------------------------------------------------------------------- dataset

# The most characters one token spans, an assumption: the longest tokens of common vocabularies are runs of spaces or
# punctuation a few dozen characters long, so this is generous. N tokens then never need more than N x this many
# characters, and a text is cut to that before it is tokenized: a 50 MB row costs what a normal one does.
MAX_TOKEN_CHARS = 256


class GSM8KCoTDataset(Dataset):
    """Prompt + solution + eos, with the loss on the solution and the eos only.

    Items are dicts of 1-D LongTensors ``input_ids``, ``attention_mask``, ``labels`` (-100 on prompt tokens).
    Sequences longer than ``max_length`` lose their end (solution tail, then eos). A prompt that alone fills
    ``max_length`` keeps only its last ``max_length // 2`` tokens, so every item still has labels (an item
    with none would make the mean loss NaN); ``n_truncated`` counts items cut either way.
    """

    def __init__(self, entries: Sequence[dict], tokenizer, style: str = "plain", max_length: int = 256,
                 strip_calc: bool = True):
        if max_length < 2:
            raise ValueError(f"max_length={max_length} must be at least 2 (a prompt token and a label)")
        eos = tokenizer.eos_token_id
        if eos is None:
            raise UsageError("the tokenizer has no eos token; training needs one to teach the model to stop")
        self.style = resolve_style(style, tokenizer)
        pairs = [format_gsm8k_entry(e, self.style, tokenizer, strip_calc) for e in entries]
        # Texts longer than max_length tokens can span are cut before tokenizing (see MAX_TOKEN_CHARS), each to the
        # part the truncation below keeps: the prompt to its tail, the target to its head. The cut part still holds
        # at least max_length tokens, so the ids kept are those of the whole texts.
        bound = max_length * MAX_TOKEN_CHARS
        pairs = [(p[-bound:], t[:bound]) for p, t in pairs]
        prompt_ids = encode_texts(tokenizer, [p for p, _ in pairs], self.style)
        # Prompt + target are tokenized as one text, so the boundary tokenizes as in running text; the first
        # len(prompt ids) positions are masked (the plain target opens with a space, a word start for BPE).
        full_ids = encode_texts(tokenizer, [p + t for p, t in pairs], self.style)
        self.examples: list[tuple[list[int], int]] = []  # (ids, number of prompt tokens)
        self.n_truncated = 0
        for p, full in zip(prompt_ids, full_ids):
            ids, n_prompt = full + [eos], min(len(p), len(full))
            self.n_truncated += len(ids) > max_length
            if n_prompt >= max_length:
                keep = max_length // 2
                ids, n_prompt = ids[n_prompt - keep:], keep
            self.examples.append((ids[:max_length], n_prompt))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids, n_prompt = self.examples[i]
        input_ids = torch.tensor(ids, dtype=torch.long)  # [T]
        labels = input_ids.clone()
        labels[:n_prompt] = IGNORE_INDEX
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def pad_token_id(tokenizer) -> int:
    """The id batches are padded with, everywhere (training, generation, perplexity, the verifier): the tokenizer's
    pad token, else its eos (LLaMA-family tokenizers often have no pad token; padding is masked out anyway)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(batch: Sequence[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad items to the longest: ``input_ids`` with ``pad_id``, ``attention_mask`` 0, ``labels`` -100.

    Padding is marked by position, never by token id: with pad == eos the real eos stays a label.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels``, each a LongTensor [B, T].
    """
    T = max(len(item["input_ids"]) for item in batch)
    input_ids = torch.full((len(batch), T), pad_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(batch), T), dtype=torch.long)  # [B, T]
    labels = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[row, :n] = item["input_ids"]
        attention_mask[row, :n] = item["attention_mask"]
        labels[row, :n] = item["labels"]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
