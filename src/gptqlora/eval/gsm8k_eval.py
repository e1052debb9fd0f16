"""The GSM8K evaluation driver: prompts from questions only, greedy (and optionally self-consistency) answers, scoring.

Each step is a small function tested alone: :func:`fewshot_exemplars` picks fixed train exemplars,
:func:`build_eval_prompts` formats questions (never their solutions), :func:`score_text` and :func:`vote_samples`
turn generated text into a judged answer, and :func:`evaluate_gsm8k` runs them batch by batch, logs one line per
question and writes into its output directory:

- ``eval_config.json``: the settings that determine the records (:func:`eval_settings`) and the caller's
  provenance (model, adapter), written when a fresh run starts; a resumed run must match it;
- ``predictions.jsonl``: one record per question, appended and fsynced after each generation batch, so a crash
  loses at most the batch in flight; ``resume=True`` continues from the last complete batch (:func:`complete_records`)
  and ends with the same bytes an uninterrupted run writes;
- ``summary.json``: accuracy over all records, the settings and the provenance, written atomically at the end.

Under ``torchrun`` the generation batches (the same batches, in the same order, as one process makes) are dealt out
round-robin to the ranks; each rank appends its batches to its own ``predictions.part-RANK.jsonl``, and rank 0
alone writes the shared files: at the end it appends every rank's records in question order to predictions.jsonl,
which then holds the bytes a one-process run writes. A resume, with any number of processes, first folds the whole
batches of the part files that continue predictions.jsonl into it (:func:`fold_parts`).
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

import torch
from torch import nn

from gptqlora import distributed
from gptqlora.config import EvalConfig
from gptqlora.data.gsm8k import answers_match, build_prompt, extract_answer, gold_answer, resolve_style
from gptqlora.errors import UsageError
from gptqlora.eval.generate import generate, generate_samples
from gptqlora.eval.scoring import majority_vote, summarize
from gptqlora.files import append_durable, fsync_path, write_atomic
from gptqlora.eval.verifier import score_samples, verifier_fields, verifier_scores
from gptqlora.quant.kernels import kernels_used
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
        UsageError: for ``k < 0`` or more exemplars than train entries.
    """
    if k < 0:
        raise UsageError(f"shots={k} must be >= 0")
    if k > len(train_entries):
        raise UsageError(f"shots={k} asks for more exemplars than the {len(train_entries)} train entries given")
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


def _score_block(correct: Sequence[bool]) -> dict[str, Any]:
    s = summarize(correct)
    return {"correct": s["correct"], "accuracy": s["accuracy"], "ci95": s["ci95"]}


# ---------------------------------------------------------------------------------------------- records

PREDICTIONS, SUMMARY, EVAL_CONFIG = "predictions.jsonl", "summary.json", "eval_config.json"
PARTS = "predictions.part-*.jsonl"  # one per rank of a distributed run, folded into PREDICTIONS


def part_path(out: Path, rank: int) -> Path:
    """Where rank ``rank`` of a distributed evaluation appends its batches' records."""
    return out / PARTS.replace("*", str(rank))


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


def record_line(record: dict) -> str:
    """One predictions.jsonl line: strict JSON (no NaN or Infinity), UTF-8 text kept as is, newline-terminated."""
    return json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"


def write_results(out_dir: str | os.PathLike, records: Sequence[dict], summary: dict) -> None:
    """Write ``predictions.jsonl`` (one record per line) and ``summary.json`` atomically into ``out_dir`` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / PREDICTIONS, "".join(record_line(r) for r in records))
    write_atomic(out / SUMMARY, json.dumps(summary, indent=2, allow_nan=False) + "\n")


def score_records(records: Sequence[dict], config: EvalConfig) -> dict[str, Any]:
    """``{"greedy"}`` and, when sampling, ``"self_consistency"``: scores over all the given records."""
    scores: dict[str, Any] = {"greedy": _score_block([r["correct"] for r in records])}
    if config.samples:
        scores["self_consistency"] = {"k": config.samples, "temperature": config.temperature, "top_p": config.top_p,
                                      **_score_block([r["voted_correct"] for r in records])}
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


_ABSENT = object()


def _flatten(value: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": 2}`` -> ``{"a.b": 1, "c": 2}`` (an empty dict stays a value)."""
    flat = {}
    for key, sub in value.items():
        name = f"{prefix}{key}"
        flat |= _flatten(sub, name + ".") if isinstance(sub, dict) and sub else {name: sub}
    return flat


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value, ensure_ascii=False)


def settings_diff(saved: dict, current: dict) -> list[str]:
    """``"name: saved X, now Y"`` for each setting that differs; nested dicts are named by dotted paths, sorted."""
    a, b = _flatten(saved), _flatten(current)
    return [f"{k}: saved {_show(a.get(k, _ABSENT))}, now {_show(b.get(k, _ABSENT))}"
            for k in sorted(a.keys() | b.keys()) if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def complete_records(data: bytes, entries: Sequence[dict], batch_size: int, name: str = PREDICTIONS,
                     writer: str = "this evaluation") -> tuple[list[dict], int]:
    """The records of a per-question JSONL (``name``: predictions.jsonl, or ``gptqlora sample``'s samples.jsonl) that
    a resumed run keeps, and the file length that holds exactly them.

    A kill mid-append leaves a prefix of the file: an unterminated last line is dropped, and so is a batch whose
    records are not all there, since a batch is regenerated whole (its sampling seed is ``seed + first index``).

    Args:
        data: the file's bytes.
        entries: the evaluated entries (record ``i`` must be entry ``i``'s).
        batch_size: questions per generation batch.
    Returns:
        (the kept records, in order; the byte length of their lines).
    Raises:
        UsageError: a complete line that is not JSON, or not the record of the question at its position: the file
            was not written by this evaluation alone.
    """
    lines = data.split(b"\n")[:-1]  # the part after the last newline is a torn line, or b""
    records = []
    for i, raw in enumerate(lines):
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        if not (isinstance(record, dict) and i < len(entries) and record.get("index") == i
                and record.get("question") == entries[i]["question"]):
            raise UsageError(f"line {i + 1} of {name} is not the record of question {i}: the file was changed by "
                             f"something other than {writer}, so it cannot be resumed; run without --resume to "
                             "start afresh")
        records.append(record)
    keep = len(records) if len(records) == len(entries) else len(records) - len(records) % batch_size
    return records[:keep], sum(len(line) + 1 for line in lines[:keep])


def part_batches(data: bytes, entries: Sequence[dict], batch_size: int) -> dict[int, str]:
    """The whole batches in a rank's part file: first question index -> the batch's lines, as written.

    A rank appends each of its batches whole, so a kill leaves at most one torn line and one partial batch at the
    end; both are dropped, like any batch whose records are not exactly its questions in order.

    Raises:
        UsageError: a complete line that is not the record of the question it names (the file was not written by
            this evaluation).
    """
    lines: dict[int, list[str]] = {}
    for raw in data.split(b"\n")[:-1]:  # the part after the last newline is a torn line, or b""
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        index = record.get("index") if isinstance(record, dict) else None
        if not (isinstance(index, int) and 0 <= index < len(entries)
                and record.get("question") == entries[index]["question"]):
            raise UsageError(f"a line of a {PARTS} file is not a record of this evaluation's questions: the file was "
                             "changed by something other than this evaluation, so it cannot be resumed; run "
                             "without --resume to start afresh")
        lines.setdefault(index - index % batch_size, []).append(raw.decode("utf-8") + "\n")
    return {start: "".join(batch) for start, batch in lines.items()
            if len(batch) == min(batch_size, len(entries) - start)
            and [json.loads(ln)["index"] for ln in batch] == list(range(start, start + len(batch)))}


def fold_parts(answered: int, parts: Sequence[bytes], entries: Sequence[dict], batch_size: int) -> list[str]:
    """The batches of the part files that continue the ``answered`` questions of predictions.jsonl, in order.

    Only the run of whole batches that follows on directly is kept: a batch after a gap (one a killed rank never
    finished) is answered again, so predictions.jsonl stays one record per question, in question order.

    Returns:
        The batches' lines, to append to predictions.jsonl.
    """
    found: dict[int, str] = {}
    for data in parts:
        found |= part_batches(data, entries, batch_size)
    folded = []
    while answered in found:
        folded.append(found[answered])
        answered += min(batch_size, len(entries) - answered)
    return folded


def start_fresh(out: Path, eval_config: dict) -> None:
    """Begin an evaluation in ``out``: no summary and no part files, an empty predictions.jsonl, then
    ``eval_config.json``.

    An earlier run's eval_config.json (and its part files) are deleted first, so a crash in between leaves nothing
    to resume rather than this run's records under another run's settings.
    """
    out.mkdir(parents=True, exist_ok=True)
    for path in [out / EVAL_CONFIG, out / SUMMARY, *sorted(out.glob(PARTS))]:
        path.unlink(missing_ok=True)
    write_atomic(out / PREDICTIONS, "")
    write_atomic(out / EVAL_CONFIG, json.dumps(eval_config, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def resume_from(out: Path, eval_config: dict, entries: Sequence[dict], batch_size: int) -> tuple[list[dict], bool]:
    """Continue an evaluation in ``out``: check its settings, cut predictions.jsonl back to its complete batches
    and append the part files' batches that continue them (:func:`fold_parts`); the part files are then deleted.

    Returns:
        (the kept records, whether a torn line or an incomplete batch, or a batch after a gap, was cut off).
    Raises:
        UsageError: nothing to resume (no eval_config.json or predictions.jsonl), different settings (each one
            named with both values), or a predictions.jsonl this evaluation did not write. Nothing is changed then.
    """
    config_path, predictions = out / EVAL_CONFIG, out / PREDICTIONS
    if not (config_path.is_file() and predictions.is_file()):
        raise UsageError(f"nothing to resume in {out}: it holds no {EVAL_CONFIG} and {PREDICTIONS} from an "
                         "earlier evaluation; run without --resume")
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as e:
        saved = f"not valid JSON ({e})"
    if not isinstance(saved, dict):
        raise UsageError(f"{config_path} is {saved}, not an evaluation's settings: run without --resume to start "
                         "afresh")
    current = {**eval_config["settings"], "provenance": eval_config["provenance"]}
    if diff := settings_diff({**saved.get("settings", {}), "provenance": saved.get("provenance")}, current):
        raise UsageError(f"cannot resume the evaluation in {out}: it was run with other settings ("
                         + "; ".join(diff) + "). Resume with the saved settings, or run without --resume")
    data = predictions.read_bytes()
    records, keep = complete_records(data, entries, batch_size)
    parts = sorted(out.glob(PARTS))
    part_data = [p.read_bytes() for p in parts]
    folded = fold_parts(len(records), part_data, entries, batch_size)
    (out / SUMMARY).unlink(missing_ok=True)  # written again once every question is answered
    if keep < len(data):
        os.truncate(predictions, keep)
        fsync_path(predictions)
    if folded:  # appended before the parts go: a kill in between leaves them to fold again
        append_durable(predictions, folded)
        records += [json.loads(line) for batch in folded for line in batch.splitlines()]
    for path in parts:
        path.unlink()
    dropped = sum(1 for d in part_data for line in d.split(b"\n")[:-1] if json.loads(line)["index"] >= len(records))
    return records, keep < len(data) or dropped > 0 or any(d and not d.endswith(b"\n") for d in part_data)


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


def evaluate_gsm8k(model: nn.Module, tokenizer, entries: Sequence[dict], config: EvalConfig, *, style: str = "auto",
                   exemplars: Sequence[dict] = (), out_dir: str | os.PathLike | None = None,
                   log: Callable[[str], Any] = print, seed: int = 0, split: str | None = None,
                   resume: bool = False, provenance: dict | None = None, verifier=None) -> dict[str, Any]:
    """Evaluate a causal LM on GSM8K entries: greedy accuracy, and self-consistency when ``config.samples > 0``.

    With ``verifier`` (a ``gptqlora.eval.verifier.LoadedVerifier``) and samples, each question's samples are also
    scored by the verifier and reranked (best-of-K and verifier-weighted vote, next to pass@K) in its record and in
    the summary.

    Questions go in batches of ``config.eval_batch_size``; each batch is decoded greedily (stopping after a complete
    ``#### <number>`` line), then sampled ``config.samples`` times per question when asked; its records are appended
    to ``predictions.jsonl`` (flushed and fsynced) and then one line per question is logged. Sampling in the batch
    whose first question has index ``i`` is seeded with ``seed + i``, so results do not depend on what ran before,
    and a resumed run writes the same records as an uninterrupted one.

    Under ``torchrun`` (after :func:`gptqlora.distributed.init`) every rank calls this with the same arguments:
    rank ``r`` of ``W`` answers the ``r``-th, ``(r + W)``-th... of the batches one process would make, logs its own
    questions' lines, and rank 0 writes the shared files, which end with the bytes of a one-process run.

    Args:
        model: a Hugging Face causal LM (float, quantized, with or without LoRA).
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
    Returns:
        ``{"n", "style", "shots", "greedy": {"correct", "accuracy", "ci95"}}``, plus
        ``"self_consistency": {"k", "temperature", "top_p", "correct", "accuracy", "ci95"}`` when sampling, then
        ``"settings"`` (see :func:`eval_settings`), ``"provenance"``, ``"resumed_from"`` (records kept from earlier
        runs), ``"kernels"``, ``"world_size"`` (processes that generated) and ``"seconds_this_run"``,
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
    # As training saw them (encode_texts): a plain prompt gets the bos only when the tokenizer adds one by default.
    add_special = style == "plain" and bool(getattr(tokenizer, "add_bos_token", False))
    gen_kw = dict(max_new_tokens=config.max_new_tokens, batch_size=config.eval_batch_size,
                  stop_after_answer_line=True, add_special_tokens=add_special)
    k, batch = config.samples, config.eval_batch_size
    settings = eval_settings(entries, config, style, exemplars, seed, split)
    provenance = json.loads(json.dumps(provenance, allow_nan=False))  # as eval_config.json will hold it
    eval_config = {"settings": settings, "provenance": provenance}

    world = distributed.joined()
    if world.distributed:
        distributed.agree(eval_config, "the evaluation's settings and provenance")
    out = None if out_dir is None else Path(out_dir)
    if resume and out is None:
        raise UsageError("resume needs the output directory of the evaluation to continue (out_dir)")

    def prepare() -> tuple[list[dict], bool]:  # rank 0 alone, while the others wait
        if resume:
            return resume_from(out, eval_config, entries, batch)
        if out is not None:
            start_fresh(out, eval_config)
        return [], False

    records, cut = distributed.from_main(prepare)  # every rank learns where to go on from
    resumed_from = len(records)
    if resume and world.main:
        log(f"resuming: {len(records)} of {len(entries)} questions answered in {out / PREDICTIONS}"
            + (" (an incomplete batch was cut off, to be answered again)" if cut else ""))
    # One process appends to predictions.jsonl; under torchrun each rank to its own part file, emptied now.
    mine = None if out is None else out / PREDICTIONS if not world.distributed else part_path(out, world.rank)
    if mine is not None and world.distributed:
        write_atomic(mine, "")

    new_records: list[dict] = []
    n_tokens = 0
    start_time = time.perf_counter()
    # The batches one process makes, in its order, dealt out round-robin: so each is padded and seeded alike.
    for start in list(range(resumed_from, len(entries), batch))[world.rank::world.size]:
        batch_prompts = prompts[start:start + batch]
        texts = generate(model, tokenizer, batch_prompts, **gen_kw)
        samples = (generate_samples(model, tokenizer, batch_prompts, k=k, temperature=config.temperature,
                                    top_p=config.top_p, seed=seed + start, **gen_kw) if k else None)
        generated = texts + [t for per_q in samples or [] for t in per_q]
        n_tokens += sum(len(ids) for ids in tokenizer(generated, add_special_tokens=False)["input_ids"])
        scored = [make_record(start + j, entries[start + j]["question"], golds[start + j], text,
                              samples[j] if samples is not None else None) for j, text in enumerate(texts)]
        if verifier is not None and samples is not None:
            scores = score_samples(verifier, [e["question"] for e in entries[start:start + batch]], samples, batch)
            for j, (record, _) in enumerate(scored):
                record |= verifier_fields(record["sample_answers"], scores[j], golds[start + j])
        if mine is not None:  # the batch is on disk before anything else can fail
            append_durable(mine, [record_line(r) for r, _ in scored])
        for record, line in scored:
            new_records.append(record)
            log(line)

    gathered = distributed.gather_objects((new_records, n_tokens))
    if world.distributed:
        new_records = sorted((r for rank_records, _ in gathered for r in rank_records), key=lambda r: r["index"])
        n_tokens = sum(t for _, t in gathered)
        if out is not None and world.main:  # then the parts may go: a kill in between leaves them to fold again
            append_durable(out / PREDICTIONS, [record_line(r) for r in new_records])
        distributed.barrier()
        if mine is not None:
            mine.unlink(missing_ok=True)
        distributed.barrier()
    seconds = time.perf_counter() - start_time

    summary = None
    if world.main:
        records += new_records
        summary = {"n": len(records), "style": style, "shots": len(exemplars), **score_records(records, config),
                   **(verifier_scores(records, k, verifier.record) if verifier is not None else {}),
                   "settings": settings, "provenance": provenance, "resumed_from": resumed_from,
                   # quantized layers per backend that ran (tests may pass a stand-in for the model)
                   "kernels": (kernels_used(model) or None) if isinstance(model, nn.Module) else None,
                   "world_size": world.size, "seconds_this_run": seconds, "generated_tokens_this_run": n_tokens,
                   "tokens_per_s_this_run": n_tokens / seconds if seconds > 0 else 0.0}
        if out is not None:
            write_atomic(out / SUMMARY, json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return distributed.broadcast_object(summary)


# ---------------------------------------------------------------------------------------------- checks

def check_quantized(model: nn.Module) -> int:
    """Count the model's ``QuantizedLinear`` layers (those wrapped by LoRA included).

    Returns:
        The count, > 0.
    Raises:
        UsageError: when the model holds none, i.e. a float model was given where a quantized one was asked for.
    """
    n = sum(isinstance(m, QuantizedLinear) for m in model.modules())
    if n == 0:
        raise UsageError(f"the model ({type(model).__name__}) holds no QuantizedLinear layers: pass a directory "
                         "written by `gptqlora quantize` (or leave out --quantized to evaluate a float model)")
    return n
