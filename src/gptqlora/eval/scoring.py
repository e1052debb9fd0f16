"""Scoring sampled answers: the selection rules over one question's samples, and accuracy over questions.

Selection rules, each a pure function of one question's sample answers (and, for reranking, one score per sample):

- :func:`majority_vote`: the most frequent answer (self-consistency, Wang et al. 2022);
- :func:`best_of_k`: the answer of the highest-scoring sample (verifier selection, Cobbe et al. 2021);
- :func:`weighted_vote`: each answer gets the sum of its samples' scores (majority vote is the case of equal scores);
- :func:`pass_at_k`: whether any of k samples is right (the ceiling a selection can reach; Chen et al. 2021).

:func:`roc_auc` measures how well scores rank correct above incorrect samples; :func:`accuracy_with_ci`,
:func:`summarize` and :func:`score_block` turn per-question flags into an accuracy with its Wilson interval.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Answers closer than this are one vote: "18", "18.0" and "18.000001" agree.
VOTE_DECIMALS = 4


def _vote_key(answer: float) -> float:
    return round(float(answer), VOTE_DECIMALS) + 0.0  # + 0.0 folds -0.0 into 0.0


def _voting(answers: Sequence[float | None]) -> list[int]:
    """Indices of the samples that have an answer (None and NaN do not vote)."""
    return [i for i, a in enumerate(answers) if a is not None and not math.isnan(a)]


# ---------------------------------------------------------------------------------------------- selection rules

def majority_vote(answers: Sequence[float | None]) -> float | None:
    """The most frequent numeric answer among samples (self-consistency).

    Args:
        answers: one parsed answer per sample; None (or NaN) for a sample without an answer, which does not vote.
    Returns:
        The winning answer (its first occurrence's value); a tie goes to the answer that appeared first.
        None when no sample has an answer.
    """
    counts: dict[float, int] = {}
    first: dict[float, int] = {}  # vote key -> index of its first occurrence
    for i in _voting(answers):
        key = _vote_key(answers[i])
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return None
    best = max(counts, key=lambda k: (counts[k], -first[k]))
    return answers[first[best]]


def best_of_k(answers: Sequence[float | None], scores: Sequence[float]) -> float | None:
    """The answer of the highest-scoring sample that has one; a tie goes to the earlier sample; None if none has.

    A sample without an answer is never right, so it is passed over rather than chosen.

    Raises:
        ValueError: when ``answers`` and ``scores`` differ in length.
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
    appeared first; None when no sample has an answer. With equal scores this is :func:`majority_vote`.

    Raises:
        ValueError: when ``answers`` and ``scores`` differ in length.
    """
    if len(answers) != len(scores):
        raise ValueError(f"{len(answers)} answers for {len(scores)} scores")
    totals: dict[float, float] = {}
    first: dict[float, int] = {}
    for i in _voting(answers):
        key = _vote_key(answers[i])
        totals[key] = totals.get(key, 0.0) + float(scores[i])
        first.setdefault(key, i)
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


# ---------------------------------------------------------------------------------------------- accuracy

def accuracy_with_ci(correct: Sequence[bool], z: float = 1.96) -> tuple[float, float, float]:
    """Accuracy and its Wilson score interval (well behaved near 0 and 1 and for small n, unlike the normal one).

    Args:
        correct: one bool per question.
        z: standard-normal quantile; 1.96 gives a 95% interval.
    Returns:
        (accuracy, low, high), all in [0, 1].
    Raises:
        ValueError: when ``correct`` is empty.
    """
    n = len(correct)
    if n == 0:
        raise ValueError("accuracy of zero questions is undefined: evaluate at least one question")
    p = sum(bool(c) for c in correct) / n
    z2 = z * z
    denom = 1 + z2 / n
    center = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    return p, max(0.0, center - half), min(1.0, center + half)


def summarize(records: Iterable[Mapping[str, Any] | bool]) -> dict[str, Any]:
    """Count and score evaluation records.

    Args:
        records: per-question dicts with a boolean ``"correct"`` field, or plain bools.
    Returns:
        ``{"n", "correct", "accuracy", "ci95": [low, high]}``.
    Raises:
        ValueError: when there are no records, or a dict lacks ``"correct"``.
    """
    flags = []
    for r in records:
        if isinstance(r, Mapping):
            if "correct" not in r:
                raise ValueError(f"record without a 'correct' field: {dict(r)!r}")
            r = r["correct"]
        flags.append(bool(r))
    acc, lo, hi = accuracy_with_ci(flags)
    return {"n": len(flags), "correct": sum(flags), "accuracy": acc, "ci95": [lo, hi]}


def score_block(flags: Sequence[bool]) -> dict[str, Any]:
    """A summary's block for one selection rule: ``{"correct", "accuracy", "ci95"}`` over one flag per question."""
    s = summarize(flags)
    return {"correct": s["correct"], "accuracy": s["accuracy"], "ci95": s["ci95"]}
