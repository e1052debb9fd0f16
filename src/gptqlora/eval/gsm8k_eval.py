"""The GSM8K evaluation driver: prompts from questions only, greedy (and optionally self-consistency) answers, scoring.

Each step is a small function tested alone: :func:`fewshot_exemplars` picks fixed train exemplars,
:func:`build_eval_prompts` formats questions (never their solutions), :func:`score_text` and :func:`vote_samples`
turn generated text into a judged answer, and :func:`evaluate_gsm8k` runs them batch by batch, logs one line per
question and writes into its output directory:

- ``eval_config.json``: the settings that determine the records (:func:`eval_settings`) and the caller's
  provenance (model, adapter), written when a fresh run starts; a resumed run must match it;
- ``predictions.jsonl``: one record per question, appended and fsynced after each generation batch, so a crash
  loses at most the batch in flight; ``resume=True`` continues from the last complete batch and ends with the same
  bytes an uninterrupted run writes;
- ``summary.json``: accuracy over all records, the settings and the provenance, written atomically at the end.

Under ``torchrun`` the generation batches (the same batches, in the same order, as one process makes) are dealt out
round-robin to the ranks; each rank appends its batches to its own ``predictions.part-RANK.jsonl``, and rank 0
alone writes the shared files, which end with the bytes a one-process run writes; a resume may use any number of
processes. The files, the resume and the part files are :mod:`gptqlora.eval.records`' (``gptqlora sample`` writes
its samples with the same machinery).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from gptqlora import distributed
from gptqlora.config import EvalConfig
from gptqlora.data.gsm8k import (answers_match, build_prompt, extract_answer, gold_answer, prompt_gets_bos,
                                 resolve_style)
from gptqlora.errors import UsageError
from gptqlora.eval.engine import Engine, as_engine
from gptqlora.eval.records import RecordFiles, answer_batches, open_output, rank_batches, record_line
from gptqlora.eval.rerank import Rerank, rerank_fields, rerank_scores
from gptqlora.eval.scoring import majority_vote, score_block
from gptqlora.files import write_atomic
from gptqlora.seeding import permutation


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
        UsageError: for ``k < 0`` or more exemplars than train entries.
    """
    if k < 0:
        raise UsageError(f"shots={k} must be >= 0")
    if k > len(train_entries):
        raise UsageError(f"shots={k} asks for more exemplars than the {len(train_entries)} train entries given")
    if k == 0:
        return []
    return [dict(train_entries[i]) for i in permutation(len(train_entries), seed)[:k]]


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
        ValueError: for a bad style.
        UsageError: for an exemplar that is one of the evaluated questions (its solution would be in the prompt).
    """
    style = resolve_style(style, tokenizer)
    questions = {e["question"] for e in entries}
    if leaked := [i for i, ex in enumerate(exemplars) if ex["question"] in questions]:
        raise UsageError(f"few-shot exemplars {leaked} are among the evaluated questions, so their solutions would be "
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


# ---------------------------------------------------------------------------------------------- records

EVAL_FILES = RecordFiles(records="predictions.jsonl", config="eval_config.json", what="evaluation")


def json_number(x: float | None) -> float | None:
    """An answer as JSON can hold it: a number, or null for none and for a non-finite one.

    A generated run of a few hundred digits parses to ``inf``; it is scored wrong like any other wrong answer, and
    the record keeps the text it came from in ``prediction`` (or ``samples``).
    """
    return x if x is not None and math.isfinite(x) else None


def make_record(index: int, question: str, gold: float, text: str,
                samples: Sequence[str] | None = None) -> tuple[dict[str, Any], str]:
    """Score one question's generation (and samples, when given): its predictions.jsonl record and its log line."""
    pred, correct = score_text(text, gold)
    record = {"index": index, "question": question, "gold": gold, "prediction": text,
              "predicted_answer": json_number(pred), "correct": correct}
    line = f"[{index}] predicted={format_number(pred)} gold={format_number(gold)} correct={correct}"
    if samples is not None:
        answers, voted, voted_correct = vote_samples(samples, gold)
        record |= {"samples": list(samples), "sample_answers": [json_number(a) for a in answers],
                   "voted_answer": json_number(voted), "voted_correct": voted_correct}
        line += f" voted={format_number(voted)} voted_correct={voted_correct}"
    return record, line


def write_results(out_dir: str | os.PathLike, records: Sequence[dict], summary: dict) -> None:
    """Write ``predictions.jsonl`` (one record per line) and ``summary.json`` atomically into ``out_dir`` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / EVAL_FILES.records, "".join(record_line(r) for r in records))
    write_atomic(out / EVAL_FILES.summary, json.dumps(summary, indent=2, allow_nan=False) + "\n")


def generated_tokens(tokenizer, records: Sequence[dict]) -> int:
    """How many tokens were generated for ``records``: each greedy prediction and each sample, tokenized alone."""
    texts = [t for r in records for t in [r["prediction"], *r.get("samples", [])]]
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0


def score_records(records: Sequence[dict], config: EvalConfig) -> dict[str, Any]:
    """``{"greedy"}`` and, when sampling, ``"self_consistency"``: scores over all the given records."""
    scores: dict[str, Any] = {"greedy": score_block([r["correct"] for r in records])}
    if config.samples:
        scores["self_consistency"] = {"k": config.samples, "temperature": config.temperature, "top_p": config.top_p,
                                      **score_block([r["voted_correct"] for r in records])}
    return scores


# ---------------------------------------------------------------------------------------------- resuming

def _sha256(items: Sequence) -> str:
    return hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8")).hexdigest()


def eval_settings(entries: Sequence[dict], config: EvalConfig, style: str, exemplars: Sequence[dict], seed: int,
                  split: str | None = None) -> dict[str, Any]:
    """The settings that determine an evaluation's records; a run may only be resumed with equal ones.

    Args:
        entries, config, exemplars, seed, split: as for :func:`evaluate_gsm8k`.
        style: the resolved prompt style (``"plain"`` or ``"chat"``).
    Returns:
        JSON-ready: hashes of the evaluated entries (question and answer, in order) and of the exemplars, their
        counts, the split's name (None when not given), the style, budget and batch size (batches fix padding and
        sampling seeds), and the sampling settings; ``temperature``, ``top_p`` and ``seed`` are None for
        greedy-only runs, which do not use them.
    """
    sampling = config.samples > 0
    return {"questions_sha256": _sha256([[e["question"], e["answer"]] for e in entries]), "n": len(entries),
            "split": split, "style": style, "shots": len(exemplars),
            "exemplars_sha256": _sha256([[e["question"], e["answer"]] for e in exemplars]),
            "max_new_tokens": config.max_new_tokens, "eval_batch_size": config.eval_batch_size,
            "samples": config.samples, "temperature": config.temperature if sampling else None,
            "top_p": config.top_p if sampling else None, "seed": seed if sampling else None}


# ---------------------------------------------------------------------------------------------- driver

def _golds(entries: Sequence[dict]) -> list[float]:
    """Each entry's gold answer; a bad entry is the data's fault, named by its index."""
    golds = []
    for i, entry in enumerate(entries):
        try:
            gold = gold_answer(entry)
        except ValueError as e:
            raise UsageError(f"entry {i} cannot be scored: {e}") from None
        if not math.isfinite(gold):
            raise UsageError(f"entry {i} cannot be scored: its answer {entry['answer'][-80:]!r} is out of range")
        golds.append(gold)
    return golds


def evaluate_gsm8k(model: nn.Module | Engine, tokenizer, entries: Sequence[dict], config: EvalConfig, *,
                   style: str = "auto",
                   exemplars: Sequence[dict] = (), out_dir: str | os.PathLike | None = None,
                   log: Callable[[str], Any] = print, seed: int = 0, split: str | None = None,
                   resume: bool = False, provenance: dict | None = None,
                   rerank: Rerank | None = None) -> dict[str, Any]:
    """Evaluate a causal LM on GSM8K entries: greedy accuracy, and self-consistency when ``config.samples > 0``.

    With ``rerank`` (e.g. a verifier, ``gptqlora.verifier.load.VerifierRerank``) and samples, each question's
    samples are also scored by it and reranked (best-of-K and weighted vote, next to pass@K) in its record and in
    the summary (see :mod:`gptqlora.eval.rerank`).

    Questions go in batches of ``config.eval_batch_size``; each batch is decoded greedily (stopping after a complete
    ``#### <number>`` line), then sampled ``config.samples`` times per question when asked; its records are appended
    to ``predictions.jsonl`` (flushed and fsynced) and then one line per question is logged. Sampling in the batch
    whose first question has index ``i`` is seeded with ``seed + i``, so results do not depend on what ran before,
    and a resumed run writes the same records as an uninterrupted one.

    Under ``torchrun`` (after :func:`gptqlora.distributed.init`) every rank calls this with the same arguments:
    rank ``r`` of ``W`` answers the ``r``-th, ``(r + W)``-th... of the batches one process would make, logs its own
    questions' lines, and rank 0 writes the shared files, which end with the bytes of a one-process run.

    Args:
        model: a Hugging Face causal LM (float, quantized, with or without LoRA), decoded by our loop; or an
            engine that serves one (``gptqlora.eval.vllm.VLLMEngine``).
        tokenizer: its tokenizer.
        entries: the GSM8K entries to evaluate (already limited by the caller).
        config: batch size, token budget and self-consistency settings.
        style: prompt style, ``"auto"``, ``"plain"`` or ``"chat"``.
        exemplars: few-shot exemplars from the train split (see :func:`fewshot_exemplars`).
        out_dir: where to write ``eval_config.json``, ``predictions.jsonl`` and ``summary.json`` (created); None
            writes nothing. A fresh run replaces those files (refusing an existing output is the caller's call).
        log: called with each progress line (``print`` for the CLI, a list's ``append`` in tests).
        seed: base seed for self-consistency sampling.
        split: the name of the split ``entries`` come from (``"test"``), for the record; None when not given.
        resume: continue the evaluation in ``out_dir``: keep its complete batches, answer only the rest.
        provenance: what is evaluated, e.g. ``{"model": ..., "adapter": ...}`` (any JSON object); saved in
            eval_config.json and summary.json, and a resume must pass an equal one.
        rerank: scores each generation batch's samples (``rerank(questions, samples) -> scores``); None: no
            reranking.
    Returns:
        ``{"n", "style", "shots", "greedy": {"correct", "accuracy", "ci95"}}``, plus
        ``"self_consistency": {"k", "temperature", "top_p", "correct", "accuracy", "ci95"}`` when sampling, then
        ``"settings"`` (see :func:`eval_settings`), ``"provenance"``, ``"resumed_from"`` (records kept from earlier
        runs), ``"engine"`` (``"ours"`` or ``"vllm"``), ``"kernels"``, ``"world_size"`` (processes that
        generated) and ``"seconds_this_run"``,
        ``"generated_tokens_this_run"``, ``"tokens_per_s_this_run"`` (this run's generation only, all ranks).
        Scores cover every record, kept and new. Every rank returns the same summary.
    Raises:
        UsageError: for no entries, an entry without a ``#### <number>`` answer or leaking exemplars; for a
            resume without ``out_dir``, with nothing to resume or with other settings; all before any generation.
        ValueError: for a bad style.
    """
    if not entries:
        raise UsageError("no GSM8K entries to evaluate: check --split and --limit")
    style = resolve_style(style, tokenizer)
    golds = _golds(entries)
    prompts = build_eval_prompts(entries, style, tokenizer, exemplars)
    add_special = prompt_gets_bos(tokenizer, style)  # as training saw them (encode_texts)
    engine = as_engine(model, tokenizer)
    gen_kw = dict(max_new_tokens=config.max_new_tokens, batch_size=config.eval_batch_size,
                  add_special_tokens=add_special)
    k, batch = config.samples, config.eval_batch_size
    settings = eval_settings(entries, config, style, exemplars, seed, split)
    provenance = json.loads(json.dumps(provenance, allow_nan=False))  # as eval_config.json will hold it
    eval_config = {"settings": settings, "provenance": provenance}

    out = None if out_dir is None else Path(out_dir)
    records, cut = open_output(out, EVAL_FILES, eval_config, entries, batch, resume)  # every rank learns where
    resumed_from = len(records)
    world = distributed.joined()
    if resume and world.main:
        log(f"resuming: {len(records)} of {len(entries)} questions answered in {out / EVAL_FILES.records}"
            + (" (an incomplete batch was cut off, to be answered again)" if cut else ""))

    def answer(start: int) -> list[tuple[dict, str]]:
        batch_prompts = prompts[start:start + batch]
        texts = engine.greedy(batch_prompts, **gen_kw)
        samples = (engine.samples(batch_prompts, k=k, temperature=config.temperature, top_p=config.top_p,
                                  seed=seed + start, **gen_kw) if k else None)
        scored = [make_record(start + j, entries[start + j]["question"], golds[start + j], text,
                              samples[j] if samples is not None else None) for j, text in enumerate(texts)]
        if rerank is not None and samples is not None:
            scores = rerank([e["question"] for e in entries[start:start + batch]], samples)
            for j, (record, _) in enumerate(scored):
                record |= rerank_fields(record["sample_answers"], scores[j], golds[start + j])
        return scored

    # greedy, then k sampled rows per question in batches of `batch`: 1 + k decodes per batch
    engine.expect(len(rank_batches(len(entries), batch, resumed_from)) * config.max_new_tokens * (1 + k), batch)
    start_time = time.perf_counter()
    new_records = answer_batches(out, EVAL_FILES, len(entries), batch, resumed_from, answer, log)
    seconds = time.perf_counter() - start_time

    summary = None
    if world.main:
        records += new_records
        n_tokens = generated_tokens(tokenizer, new_records)
        summary = {"n": len(records), "style": style, "shots": len(exemplars), **score_records(records, config),
                   **(rerank_scores(records, k, rerank.record) if rerank is not None else {}),
                   "settings": settings, "provenance": provenance, "resumed_from": resumed_from,
                   "engine": engine.name, "kernels": engine.kernels(),  # quantized layers per backend that ran
                   "world_size": world.size, "seconds_this_run": seconds, "generated_tokens_this_run": n_tokens,
                   "tokens_per_s_this_run": n_tokens / seconds if seconds > 0 else 0.0}
        if out is not None:
            write_atomic(out / EVAL_FILES.summary, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return distributed.broadcast_object(summary)

