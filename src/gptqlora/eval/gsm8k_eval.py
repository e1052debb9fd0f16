"""The GSM8K evaluation driver: prompts from questions only, greedy (and optionally self-consistency) answers, scoring.

Each step is a small function tested alone: :func:`fewshot_exemplars` picks fixed train exemplars,
:func:`build_eval_prompts` formats questions (never their solutions), :func:`score_text` and :func:`vote_samples`
turn generated text into a judged answer, and :func:`evaluate_gsm8k` runs them batch by batch, logs one line per
question and writes ``predictions.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptqlora.config import EvalConfig
from gptqlora.data.gsm8k import answers_match, build_prompt, extract_answer, gold_answer, resolve_style
from gptqlora.eval.generate import generate, generate_samples
from gptqlora.eval.scoring import majority_vote, summarize
from gptqlora.quant.linear import QuantizedLinear


# ---------------------------------------------------------------------------------------------- prompts

def fewshot_exemplars(train_entries: Sequence[dict], k: int, seed: int = 0) -> list[dict]:
    """Fixed few-shot exemplars: the first ``k`` entries of a seeded permutation of the train split.

    Args:
        train_entries: GSM8K train entries (``{"question", "answer"}``).
        k: how many exemplars; 0 gives none.
        seed: seeds the permutation, so the same call always picks the same exemplars.
    Returns:
        ``k`` copies of train entries, in permutation order.
    Raises:
        ValueError: for ``k < 0`` or more exemplars than train entries.
    """
    if k < 0:
        raise ValueError(f"shots={k} must be >= 0")
    if k > len(train_entries):
        raise ValueError(f"shots={k} asks for more exemplars than the {len(train_entries)} train entries given")
    if k == 0:
        return []
    order = torch.randperm(len(train_entries), generator=torch.Generator().manual_seed(seed))[:k]  # [k]
    return [dict(train_entries[i]) for i in order.tolist()]


def build_eval_prompts(entries: Sequence[dict], style: str, tokenizer, exemplars: Sequence[dict] = ()) -> list[str]:
    """One prompt per entry, built from the entry's question alone (its solution never reaches the prompt builder).

    Args:
        entries: GSM8K entries; only ``entry["question"]`` is read.
        style: ``"plain"``, ``"chat"`` or ``"auto"`` (see :func:`gptqlora.data.gsm8k.build_prompt`).
        tokenizer: needed for ``"chat"`` and ``"auto"``.
        exemplars: solved train entries shown before each question.
    Returns:
        The prompts, in entry order.
    Raises:
        ValueError: for a bad style, or an exemplar that is one of the evaluated questions (its solution would be
            in the prompt).
    """
    style = resolve_style(style, tokenizer)
    questions = {e["question"] for e in entries}
    if leaked := [i for i, ex in enumerate(exemplars) if ex["question"] in questions]:
        raise ValueError(f"few-shot exemplars {leaked} are among the evaluated questions, so their solutions would be "
                         "in the prompt: take exemplars from the train split and evaluate the test split, or use "
                         "--shots 0")
    return [build_prompt(e["question"], style, tokenizer, exemplars) for e in entries]


# ---------------------------------------------------------------------------------------------- scoring

def score_text(text: str, gold: float) -> tuple[float | None, bool]:
    """The answer extracted from a generation and whether it equals ``gold``."""
    pred = extract_answer(text)
    return pred, answers_match(pred, gold)


def vote_samples(texts: Sequence[str], gold: float) -> tuple[list[float | None], float | None, bool]:
    """Self-consistency on one question: extract every sample's answer and majority-vote them.

    Returns:
        (answer per sample, voted answer or None when no sample has one, whether the vote equals ``gold``).
        Ties go to the answer that appeared first (see :func:`gptqlora.eval.scoring.majority_vote`).
    """
    answers = [extract_answer(t) for t in texts]
    voted = majority_vote(answers)
    return answers, voted, answers_match(voted, gold)


def format_number(x: float | None) -> str:
    """An answer for logs: ``18.0`` -> ``"18"``, ``2.5`` -> ``"2.5"``, None -> ``"None"``."""
    if x is None:
        return "None"
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _score_block(correct: Sequence[bool]) -> dict[str, Any]:
    s = summarize(correct)
    return {"correct": s["correct"], "accuracy": s["accuracy"], "ci95": s["ci95"]}


# ---------------------------------------------------------------------------------------------- output files

def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and ``os.replace``, so a reader
    never sees a half-written file and a crash leaves the old one intact."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_results(out_dir: str | os.PathLike, records: Sequence[dict], summary: dict) -> None:
    """Write ``predictions.jsonl`` (one record per line) and ``summary.json`` into ``out_dir``, creating it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "predictions.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    write_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------- driver

def evaluate_gsm8k(model: nn.Module, tokenizer, entries: Sequence[dict], config: EvalConfig, *, style: str = "auto",
                   exemplars: Sequence[dict] = (), out_dir: str | os.PathLike | None = None,
                   log: Callable[[str], Any] = print, seed: int = 0) -> dict[str, Any]:
    """Evaluate a causal LM on GSM8K entries: greedy accuracy, and self-consistency when ``config.samples > 0``.

    Questions go in batches of ``config.eval_batch_size``; each batch is decoded greedily (stopping after a complete
    ``#### <number>`` line), then sampled ``config.samples`` times per question when asked, and one line per question
    is logged. Sampling in batch ``b`` (first question index ``i``) is seeded with ``seed + i``, so results do not
    depend on what ran before.

    Args:
        model: a Hugging Face causal LM (float, quantized, with or without LoRA).
        tokenizer: its tokenizer.
        entries: the GSM8K entries to evaluate (already limited by the caller).
        config: batch size, token budget and self-consistency settings.
        style: prompt style, ``"auto"``, ``"plain"`` or ``"chat"``.
        exemplars: few-shot exemplars from the train split (see :func:`fewshot_exemplars`).
        out_dir: where to write ``predictions.jsonl`` and ``summary.json`` (created); None writes nothing.
        log: called with each progress line (``print`` for the CLI, a list's ``append`` in tests).
        seed: base seed for self-consistency sampling.
    Returns:
        ``{"n", "style", "shots", "greedy": {"correct", "accuracy", "ci95"}, "seconds", "generated_tokens",
        "tokens_per_s"}``, plus ``"self_consistency": {"k", "temperature", "top_p", "correct", "accuracy", "ci95"}``
        when sampling.
    Raises:
        ValueError: for no entries, an entry without a ``#### <number>`` answer, a bad style or leaking exemplars;
            all before any generation.
    """
    if not entries:
        raise ValueError("no GSM8K entries to evaluate: check --split and --limit")
    style = resolve_style(style, tokenizer)
    golds = [gold_answer(e) for e in entries]
    prompts = build_eval_prompts(entries, style, tokenizer, exemplars)
    # As training saw them (encode_texts): a plain prompt gets the bos only when the tokenizer adds one by default.
    add_special = style == "plain" and bool(getattr(tokenizer, "add_bos_token", False))
    gen_kw = dict(max_new_tokens=config.max_new_tokens, batch_size=config.eval_batch_size,
                  stop_after_answer_line=True, add_special_tokens=add_special)
    k = config.samples

    records: list[dict] = []
    n_tokens = 0
    start_time = time.perf_counter()
    for start in range(0, len(entries), config.eval_batch_size):
        batch_prompts = prompts[start:start + config.eval_batch_size]
        texts = generate(model, tokenizer, batch_prompts, **gen_kw)
        samples = (generate_samples(model, tokenizer, batch_prompts, k=k, temperature=config.temperature,
                                    top_p=config.top_p, seed=seed + start, **gen_kw) if k else None)
        generated = texts + [t for per_q in samples or [] for t in per_q]
        n_tokens += sum(len(ids) for ids in tokenizer(generated, add_special_tokens=False)["input_ids"])
        for j, text in enumerate(texts):
            i = start + j
            pred, correct = score_text(text, golds[i])
            record = {"index": i, "question": entries[i]["question"], "gold": golds[i], "prediction": text,
                      "predicted_answer": pred, "correct": correct}
            line = (f"[{i}] predicted={format_number(pred)} gold={format_number(golds[i])} "
                    f"correct={correct}")
            if samples is not None:
                answers, voted, voted_correct = vote_samples(samples[j], golds[i])
                record |= {"samples": samples[j], "sample_answers": answers, "voted_answer": voted,
                           "voted_correct": voted_correct}
                line += f" voted={format_number(voted)} voted_correct={voted_correct}"
            records.append(record)
            log(line)
    seconds = time.perf_counter() - start_time

    summary: dict[str, Any] = {"n": len(records), "style": style, "shots": len(exemplars),
                               "greedy": _score_block([r["correct"] for r in records])}
    if k:
        summary["self_consistency"] = {"k": k, "temperature": config.temperature, "top_p": config.top_p,
                                       **_score_block([r["voted_correct"] for r in records])}
    summary |= {"seconds": seconds, "generated_tokens": n_tokens,
                "tokens_per_s": n_tokens / seconds if seconds > 0 else 0.0}
    if out_dir is not None:
        write_results(out_dir, records, summary)
    return summary


# ---------------------------------------------------------------------------------------------- checks

def check_quantized(model: nn.Module) -> int:
    """Count the model's ``QuantizedLinear`` layers (those wrapped by LoRA included).

    Returns:
        The count, > 0.
    Raises:
        ValueError: when the model holds none, i.e. a float model was given where a quantized one was asked for.
    """
    n = sum(isinstance(m, QuantizedLinear) for m in model.modules())
    if n == 0:
        raise ValueError(f"the model ({type(model).__name__}) holds no QuantizedLinear layers: pass a directory "
                         "written by `gptqlora quantize` (or leave out --quantized to evaluate a float model)")
    return n
