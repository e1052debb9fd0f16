"""Scoring: majority voting over sampled answers and accuracy with a Wilson confidence interval."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Answers closer than this are one vote: "18", "18.0" and "18.000001" agree.
VOTE_DECIMALS = 4


def majority_vote(answers: Sequence[float | None]) -> float | None:
    """The most frequent numeric answer among samples (self-consistency).

    Args:
        answers: one parsed answer per sample; None (or NaN) for a sample without an answer, which does not vote.
    Returns:
        The winning answer (its first occurrence's value); a tie goes to the answer that appeared first.
        None when no sample has an answer.
    """
    counts: dict[float, int] = {}
    first: dict[float, tuple[int, float]] = {}  # rounded key -> (index of first occurrence, its value)
    for i, a in enumerate(answers):
        if a is None or math.isnan(a):
            continue
        key = round(float(a), VOTE_DECIMALS) + 0.0  # + 0.0 folds -0.0 into 0.0
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, (i, a))
    if not counts:
        return None
    best = max(counts, key=lambda k: (counts[k], -first[k][0]))
    return first[best][1]


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
