"""Labelled samples for training a verifier: K sampled solutions per GSM8K train question, each marked correct or not
against the gold answer.

The output directory holds (as ``gptqlora eval``'s does, written and resumed by the same machinery,
:mod:`gptqlora.eval.records`):

- ``sample_config.json``: the settings that determine the samples (``gptqlora.eval.gsm8k_eval.eval_settings``, the
  split included) and the provenance of the model that sampled (its base record: ``train-verifier`` warns when it
  trains over another base, :func:`check_samples_base`); written when a fresh run starts;
- ``samples.jsonl``: one record per question, ``{"index", "question", "gold", "samples", "sample_answers",
  "sample_correct"}``, appended and fsynced per generation batch; a resume keeps the complete batches and answers
  the rest, ending with the bytes an uninterrupted run writes (the batch whose first question has index ``i``
  samples with seed ``seed + i``);
- ``summary.json``: counts, the fraction of correct samples and pass@K; its presence marks the samples complete.

Under ``torchrun`` the batches one process makes are dealt out round-robin to the ranks (each question is sampled by
one rank, in the batch and with the seed one process gives it); each rank appends to its own
``samples.part-RANK.jsonl`` and rank 0 writes samples.jsonl, which ends with the bytes of a one-process run, and the
summary (``world_size`` aside, the same). A resume may use another number of processes.

Only the train split is sampled (:func:`check_train_split`): these labels are training data, and test-split gold
must never reach anything trained.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from gptqlora import distributed
from gptqlora.config import EvalConfig
from gptqlora.data.gsm8k import answers_match, extract_answer, gold_answer, prompt_gets_bos, resolve_style
from gptqlora.errors import InputNotFoundError, UsageError
from gptqlora.eval.engine import Engine, as_engine
from gptqlora.eval.gsm8k_eval import build_eval_prompts, eval_settings, json_number
from gptqlora.eval.records import RecordFiles, answer_batches, open_output, rank_batches
from gptqlora.eval.scoring import summarize
from gptqlora.files import read_json_object, write_atomic
from gptqlora.provenance import base_differences, describe_base

SAMPLE_FILES = RecordFiles(records="samples.jsonl", config="sample_config.json", what="sampling")
SAMPLES, SAMPLE_CONFIG, SUMMARY = SAMPLE_FILES.records, SAMPLE_FILES.config, SAMPLE_FILES.summary
TRAIN_SPLIT = "train"


def check_train_split(split: str | None) -> None:
    """Refuse anything but the train split for labelled samples.

    Raises:
        UsageError: for the test split (or an unnamed one): its gold answers would become training labels.
    """
    if split != TRAIN_SPLIT:
        raise UsageError(f"labelled samples are training data, so only the train split may be sampled (got split "
                         f"{split!r}): test-split gold must never reach training; sample --split train, and rerank "
                         "test samples with `gptqlora eval --samples K --verifier DIR`")


def label_samples(index: int, question: str, gold: float, samples: Sequence[str]) -> dict[str, Any]:
    """One question's record: its samples, the answer extracted from each, and whether each equals ``gold``."""
    answers = [extract_answer(t) for t in samples]
    return {"index": index, "question": question, "gold": gold, "samples": list(samples),
            "sample_answers": [json_number(a) for a in answers],
            "sample_correct": [answers_match(a, gold) for a in answers]}


def sample_summary(records: Sequence[dict], k: int) -> dict[str, Any]:
    """Counts over labelled records: samples, correct samples, questions with every / no sample correct, pass@K
    (any of the K correct) with its 95% interval."""
    flags = [c for r in records for c in r["sample_correct"]]
    pass_k = summarize([any(r["sample_correct"]) for r in records])
    return {"n": len(records), "k": k, "samples": len(flags), "correct_samples": sum(flags),
            "sample_accuracy": sum(flags) / len(flags) if flags else 0.0,
            "questions_all_correct": sum(all(r["sample_correct"]) for r in records),
            "questions_none_correct": sum(not any(r["sample_correct"]) for r in records),
            "pass_at_k": {"k": k, "correct": pass_k["correct"], "accuracy": pass_k["accuracy"],
                          "ci95": pass_k["ci95"]}}


# ---------------------------------------------------------------------------------------------- driver

def sample_gsm8k(model: nn.Module | Engine, tokenizer, entries: Sequence[dict], config: EvalConfig, out_dir: str | os.PathLike,
                 *, style: str = "auto", exemplars: Sequence[dict] = (), seed: int = 0, split: str = TRAIN_SPLIT,
                 resume: bool = False, provenance: dict | None = None,
                 log: Callable[[str], Any] = print) -> dict[str, Any]:
    """Sample ``config.samples`` solutions per question, label them, append them to ``out_dir`` batch by batch.

    Under ``torchrun`` (after :func:`gptqlora.distributed.init`) every rank calls this with the same arguments and
    samples its share of the batches; rank 0 writes the shared files (see the module docstring).

    Args:
        model, tokenizer: the generator (any causal LM: float, quantized, with an adapter), or an engine serving
            one (``gptqlora.eval.vllm.VLLMEngine``).
        entries: GSM8K train entries (already limited by the caller).
        config: batch size, token budget, K (``samples`` >= 1), temperature and top-p.
        out_dir: the output directory (see the module docstring); the caller checks and locks it.
        style, exemplars: the generator's prompt, as ``gptqlora eval`` builds it.
        seed: batch ``i`` (first question index) samples with seed ``seed + i``.
        split: the entries' split: must be ``"train"``.
        resume: continue the sampling in ``out_dir`` (with any number of processes).
        provenance: what sampled (base, adapter, dtype); saved, and a resume must pass an equal one.
        log: called with one line per question (under torchrun, this rank's questions).
    Returns:
        :func:`sample_summary` plus ``settings``, ``provenance``, ``resumed_from`` and ``world_size`` (the
        processes that sampled), on every rank.
    Raises:
        UsageError: the test split, no entries, K < 1, an entry without a gold answer, ranks given other
            arguments, or a bad resume; all before any generation.
    """
    check_train_split(split)
    if not entries:
        raise UsageError("no GSM8K entries to sample: check --limit")
    if config.samples < 1:
        raise UsageError(f"samples={config.samples}: give --samples K (K >= 1 solutions per question)")
    golds = []
    for i, e in enumerate(entries):
        gold = gold_answer(e)
        if not math.isfinite(gold):
            raise UsageError(f"entry {i} cannot be labelled: its answer {e['answer'][-80:]!r} is out of range")
        golds.append(gold)
    style = resolve_style(style, tokenizer)
    prompts = build_eval_prompts(entries, style, tokenizer, exemplars)
    add_special = prompt_gets_bos(tokenizer, style)  # as eval and training do
    k, batch = config.samples, config.eval_batch_size
    engine = as_engine(model, tokenizer)
    settings = eval_settings(entries, config, style, exemplars, seed, split)
    run_config = {"settings": settings, "provenance": json.loads(json.dumps(provenance, allow_nan=False))}
    out = Path(out_dir)
    records, cut = open_output(out, SAMPLE_FILES, run_config, entries, batch, resume)
    resumed_from = len(records)
    world = distributed.joined()
    if resume and world.main:
        log(f"resuming: {resumed_from} of {len(entries)} questions sampled in {out / SAMPLES}"
            + (" (an incomplete batch was cut off, to be sampled again)" if cut else ""))

    def answer(start: int) -> list[tuple[dict, str]]:
        texts = engine.samples(prompts[start:start + batch], k=k, temperature=config.temperature, top_p=config.top_p,
                               seed=seed + start, max_new_tokens=config.max_new_tokens, batch_size=batch,
                               add_special_tokens=add_special)
        new = [label_samples(start + j, entries[start + j]["question"], golds[start + j], per_q)
               for j, per_q in enumerate(texts)]
        return [(r, f"[{r['index']}] correct {sum(r['sample_correct'])}/{k}") for r in new]

    engine.expect(len(rank_batches(len(entries), batch, resumed_from)) * config.max_new_tokens * k, batch)
    records += answer_batches(out, SAMPLE_FILES, len(entries), batch, resumed_from, answer, log)
    summary = None
    if world.main:
        summary = {**sample_summary(records, k), "settings": settings, "provenance": run_config["provenance"],
                   "resumed_from": resumed_from, "engine": engine.name, "world_size": world.size}
        write_atomic(out / SUMMARY, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return distributed.broadcast_object(summary)


def samples_base(run_config: dict[str, Any]) -> dict[str, Any] | None:
    """The base record of the model that made the samples (``sample_config.json``'s provenance), or None when the
    samples do not record one (sampled without provenance, or by an older gptqlora)."""
    provenance = run_config.get("provenance")
    base = provenance.get("base") if isinstance(provenance, dict) else None
    return base if isinstance(base, dict) else None


def check_samples_base(samples_dir: str | os.PathLike, sampled: dict[str, Any], base: dict[str, Any]) -> str | None:
    """Whether a verifier over ``base`` trains on samples made over that base: None when it does, else a message
    naming both bases (path, fingerprint, bits, group size) and the fields that differ.

    Not an error (nothing is harmed, and a verifier over one base may be meant to judge another's solutions), but
    usually a mistake: the verifier learns to judge the solutions of a model it will not rerank.
    """
    if not (fields := base_differences(sampled, base)):
        return None
    return (f"the samples in {samples_dir} were made by a model over {describe_base(sampled)} but the verifier "
            f"trains over {describe_base(base)} (they differ in {', '.join(fields)}); it would learn to judge another "
            "model's solutions: train it over the base that sampled unless this is intended")


def read_samples(samples_dir: str | os.PathLike) -> tuple[list[dict], dict[str, Any]]:
    """The labelled records and the run config of a finished ``gptqlora sample`` directory, for training.

    Raises:
        InputNotFoundError: not a samples directory.
        UsageError: samples not labelled as the train split (test gold must never be trained on), an unfinished
            sampling (no summary.json), or records that are not labelled samples.
    """
    d = Path(samples_dir).expanduser()
    if not (d / SAMPLE_CONFIG).is_file() or not (d / SAMPLES).is_file():
        raise InputNotFoundError(f"{d} is not a samples directory (no {SAMPLE_CONFIG} and {SAMPLES}): write one with "
                                 "`gptqlora sample --split train`")
    run_config = read_json_object(d / SAMPLE_CONFIG)
    split = (run_config.get("settings") or {}).get("split")
    if split != TRAIN_SPLIT:
        raise UsageError(f"{d} holds samples of the {split!r} split, labelled with its gold answers: a verifier "
                         "trains only on train-split samples (test gold must never reach training)")
    if not (d / SUMMARY).is_file():
        raise UsageError(f"the sampling in {d} is unfinished (no {SUMMARY}): finish it with `gptqlora sample ... "
                         "--resume`")
    records = []
    for lineno, line in enumerate((d / SAMPLES).read_text(encoding="utf-8").splitlines(), start=1):
        try:
            r = json.loads(line)
        except ValueError as e:
            raise UsageError(f"{d / SAMPLES}:{lineno}: not valid JSON ({e})") from None
        if not (isinstance(r, dict) and isinstance(r.get("question"), str) and isinstance(r.get("samples"), list)
                and isinstance(r.get("sample_correct"), list) and len(r["samples"]) == len(r["sample_correct"])):
            raise UsageError(f"{d / SAMPLES}:{lineno}: not a labelled record (question, samples, sample_correct)")
        records.append(r)
    return records, run_config
