"""Reranking sampled solutions with a trained verifier (``gptqlora train-verifier``), and what to compare it with.

A verifier's score of a solution is ``sigmoid(value)`` at the solution's last token (``gptqlora.verifier.model``).
Given K samples of one question, their extracted answers and their scores:

- :func:`best_of_k`: the answer of the highest-scoring sample (Cobbe et al.'s verifier selection);
- :func:`weighted_vote`: each answer gets the sum of its samples' scores (majority vote is the case of equal scores);
- :func:`pass_at_k`: whether any of K samples is right (the ceiling both can reach; unbiased estimator for k < n).

:func:`verifier_fields` adds these to one question's record and :func:`verifier_scores` turns records into the
summary's blocks, each with a 95% Wilson interval. :func:`roc_auc` measures how well scores rank correct above
incorrect samples. Everything but :func:`load_verifier`, :func:`score_solutions` and :func:`score_samples` is pure.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptqlora.data.gsm8k import answers_match
from gptqlora.errors import UsageError
from gptqlora.eval.scoring import VOTE_DECIMALS, summarize
from gptqlora.provenance import base_differences, describe_base
from gptqlora.verifier.model import VerifierModel, encode_solution, load_head, pad_batch, read_verifier_config

log = logging.getLogger(__name__)


@dataclass
class LoadedVerifier:
    """A verifier ready to score: the model (eval mode), its tokenizer, and how it encodes solutions."""
    model: VerifierModel
    tokenizer: Any
    style: str
    max_length: int
    record: dict[str, Any]  # for summaries: {"path", "base"}


# ---------------------------------------------------------------------------------------------- loading and scoring

def check_verifier_base(verifier_dir: str | os.PathLike, saved: dict[str, Any],
                        scored: dict[str, Any] | None) -> str | None:
    """Whether a verifier trained over ``saved`` reranks the samples of a model over that base: None when it does
    (or ``scored`` is unknown), else a message naming both bases and the fields that differ.

    Its scores are still computed on its own base, so nothing breaks; but it learned to judge the solutions of its
    base's generator, and another base's solutions are not what it was trained on.
    """
    if scored is None or not (fields := base_differences(saved, scored)):
        return None
    return (f"the verifier {verifier_dir} was trained over {describe_base(saved)} but reranks the samples of a model "
            f"over {describe_base(scored)} (they differ in {', '.join(fields)}); its scores may not fit these "
            "solutions: rerank with a verifier trained over the evaluated base unless this is intended")


def load_verifier(verifier_dir: str | os.PathLike, *, base_dir: str | os.PathLike | None = None,
                  dtype: str = "auto", device: str = "auto", kernel: str = "auto",
                  scored_base: dict[str, Any] | None = None) -> LoadedVerifier:
    """Load a verifier onto its base: the recorded base path, or ``base_dir`` (a copy: its weights must match).

    Args:
        scored_base: the base record of the model whose samples the verifier will rerank; when the verifier was
            trained over another base, a warning names both (``logging`` and ``warnings.warn``, as
            ``load_adapter`` warns), before any weights load. Not an error: it may be intended.
    Raises:
        InputNotFoundError, UsageError: see ``read_verifier_config``; a base that is not the one the verifier was
            trained on (the fingerprints or quantization differ: its values would mean nothing there).
    """
    from gptqlora.eval.gsm8k_eval import check_quantized
    from gptqlora.lora.adapter import load_adapter
    from gptqlora.models import load_model
    from gptqlora.provenance import base_record
    from gptqlora.quant.kernels import set_kernel

    config = read_verifier_config(verifier_dir)
    saved = config["base"]
    if mismatch := check_verifier_base(verifier_dir, saved, scored_base):
        log.warning(mismatch)
        warnings.warn(mismatch, stacklevel=2)
    base_path = Path(base_dir if base_dir is not None else saved["path"]).expanduser()
    if not base_path.is_dir():
        raise UsageError(f"the verifier's base {base_path} is not a directory: it was trained on "
                         f"{describe_base(saved)}; pass the base's new location")
    current = base_record(base_path)
    if fields := base_differences(saved, current):
        raise UsageError(f"the verifier {verifier_dir} was trained on {describe_base(saved)}, not on "
                         f"{describe_base(current)} (they differ in {', '.join(fields)}): load it onto its own base")
    lm, tokenizer = load_model(str(base_path), dtype, device, inference=True)
    if saved.get("quantized"):
        check_quantized(lm)
        set_kernel(lm, kernel)
    load_adapter(lm, verifier_dir, base=current)
    head = load_head(verifier_dir, config["hidden_size"], next(lm.parameters()).device)
    model = VerifierModel(lm, head).eval()
    return LoadedVerifier(model, tokenizer, config["style"], int(config["max_length"]),
                          {"path": str(Path(verifier_dir).resolve()), "base": saved})


@torch.no_grad()
def score_solutions(verifier: LoadedVerifier, questions: Sequence[str], solutions: Sequence[str],
                    batch_size: int = 16) -> list[float]:
    """The verifier's probability that each solution is correct: ``sigmoid(value at its last token)``.

    Args:
        questions, solutions: one question per solution (repeat a question for each of its samples).
        batch_size: solutions per forward pass (right-padded: padding never changes a row's values).
    Returns:
        One score in (0, 1) per solution, in order.
    """
    if len(questions) != len(solutions):
        raise ValueError(f"{len(questions)} questions for {len(solutions)} solutions: give one question per solution")
    tok = verifier.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(verifier.model.parameters()).device
    scores: list[float] = []
    was_training = verifier.model.training
    verifier.model.eval()
    try:
        for start in range(0, len(solutions), batch_size):
            encoded = [encode_solution(tok, q, s, verifier.style, verifier.max_length)
                       for q, s in zip(questions[start:start + batch_size], solutions[start:start + batch_size])]
            batch = pad_batch(encoded, pad_id)
            values, _ = verifier.model(batch["input_ids"].to(device), batch["attention_mask"].to(device))  # [B, T]
            last = values.gather(1, batch["last"].to(device)[:, None]).squeeze(1)  # [B]
            scores += torch.sigmoid(last).tolist()
    finally:
        verifier.model.train(was_training)
    return scores


def score_samples(verifier: LoadedVerifier, questions: Sequence[str], samples: Sequence[Sequence[str]],
                  batch_size: int = 16) -> list[list[float]]:
    """:func:`score_solutions` for K samples per question (``generate_samples``'s output): one list per question."""
    if len(questions) != len(samples):
        raise ValueError(f"{len(questions)} questions for {len(samples)} lists of samples")
    flat = score_solutions(verifier, [q for q, per_q in zip(questions, samples) for _ in per_q],
                           [s for per_q in samples for s in per_q], batch_size)
    out, at = [], 0
    for per_q in samples:
        out.append(flat[at:at + len(per_q)])
        at += len(per_q)
    return out


# ---------------------------------------------------------------------------------------------- selection rules

def _key(answer: float) -> float:
    return round(float(answer), VOTE_DECIMALS) + 0.0  # as majority_vote groups answers ("18" and "18.0" agree)


def _voting(answers: Sequence[float | None]) -> list[int]:
    """Indices of the samples that have an answer (None and NaN do not vote)."""
    return [i for i, a in enumerate(answers) if a is not None and not math.isnan(a)]


def best_of_k(answers: Sequence[float | None], scores: Sequence[float]) -> float | None:
    """The answer of the highest-scoring sample that has one; a tie goes to the earlier sample; None if none has.

    A sample without an answer is never right, so it is passed over rather than chosen.
    """
    if len(answers) != len(scores):
        raise ValueError(f"{len(answers)} answers for {len(scores)} scores")
    voting = _voting(answers)
    if not voting:
        return None
    best = max(voting, key=lambda i: (scores[i], -i))
    return answers[best]


def weighted_vote(answers: Sequence[float | None], scores: Sequence[float]) -> float | None:
    """The answer whose samples' scores sum highest (its first occurrence's value); a tie goes to the answer that
    appeared first; None when no sample has an answer. With equal scores this is ``majority_vote``."""
    if len(answers) != len(scores):
        raise ValueError(f"{len(answers)} answers for {len(scores)} scores")
    totals: dict[float, float] = {}
    first: dict[float, int] = {}
    for i in _voting(answers):
        k = _key(answers[i])
        totals[k] = totals.get(k, 0.0) + float(scores[i])
        first.setdefault(k, i)
    if not totals:
        return None
    best = max(totals, key=lambda k: (totals[k], -first[k]))
    return answers[first[best]]


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that at least one of ``k`` samples drawn from ``n`` (``c`` of them correct) is correct.

    ``1 - C(n - c, k) / C(n, k)``, the unbiased estimator of Chen et al. (2021); with ``k == n`` it is 1 when any
    sample is correct, else 0.

    Raises:
        ValueError: unless ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """The probability that a random correct sample scores above a random incorrect one (ties count half).

    Raises:
        ValueError: when either class is absent (the AUC is undefined).
    """
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        raise ValueError(f"AUC needs correct and incorrect samples (got {len(pos)} and {len(neg)})")
    # Mann-Whitney U by ranks: O(n log n), average ranks for ties.
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for m in range(i, j + 1):
            ranks[order[m]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels) if y)
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


# ---------------------------------------------------------------------------------------------- records and summary

def verifier_fields(sample_answers: Sequence[float | None], scores: Sequence[float], gold: float) -> dict[str, Any]:
    """One question's reranking, for its predictions.jsonl record (next to ``samples`` and ``sample_answers``).

    Returns:
        ``verifier_scores``, ``best_of_k_answer``/``best_of_k_correct``, ``weighted_answer``/``weighted_correct``
        and ``pass_at_k`` (any sample correct).
    """
    best, weighted = best_of_k(sample_answers, scores), weighted_vote(sample_answers, scores)
    return {"verifier_scores": [float(s) for s in scores],
            "best_of_k_answer": best, "best_of_k_correct": answers_match(best, gold),
            "weighted_answer": weighted, "weighted_correct": answers_match(weighted, gold),
            "pass_at_k": any(answers_match(a, gold) for a in sample_answers)}


def _block(flags: Sequence[bool]) -> dict[str, Any]:
    s = summarize(flags)
    return {"correct": s["correct"], "accuracy": s["accuracy"], "ci95": s["ci95"]}


def verifier_scores(records: Sequence[dict], k: int, verifier: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary's blocks over records holding :func:`verifier_fields`: ``verifier_best_of_k``,
    ``verifier_weighted_vote`` and ``pass_at_k``, each ``{"k", "correct", "accuracy", "ci95"}`` (and the
    verifier's record under ``verifier`` when given).

    Raises:
        UsageError: a record without the verifier's fields (an evaluation resumed with a verifier it did not have).
    """
    if bad := [r.get("index") for r in records if "best_of_k_correct" not in r]:
        raise UsageError(f"records {bad[:5]} hold no verifier scores: evaluate again without --resume")
    out = {name: {"k": k, **_block([r[field] for r in records])}
           for name, field in (("verifier_best_of_k", "best_of_k_correct"),
                               ("verifier_weighted_vote", "weighted_correct"), ("pass_at_k", "pass_at_k"))}
    if verifier is not None:
        out["verifier"] = verifier
    return out
