"""Reranking sampled solutions by a scorer the caller supplies: what the evaluator takes, writes and sums up.

The evaluator knows no verifier. It receives a :class:`Rerank`, a callable ``rerank(questions, samples) -> scores``
(one score per sample, higher is better) with a ``record`` saying what it is; ``gptqlora.verifier.load`` makes one
from a trained verifier. For each question, :func:`rerank_fields` applies the selection rules of
:mod:`gptqlora.eval.scoring` to its samples' answers and scores (the record's ``verifier_*`` fields, named for what
scores them in practice), and :func:`rerank_scores` turns the records into the summary's blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from gptqlora.data.gsm8k import answers_match
from gptqlora.errors import UsageError
from gptqlora.eval.scoring import best_of_k, score_block, weighted_vote


class Rerank(Protocol):
    """Scores for sampled solutions, as the evaluator calls it once per generation batch.

    ``record`` is what scores (e.g. a verifier's path and base), kept in the summary.
    """

    record: dict[str, Any]

    def __call__(self, questions: Sequence[str], samples: Sequence[Sequence[str]]) -> list[list[float]]:
        """One list of scores per question, one score per sample, in order."""
        ...


def rerank_fields(sample_answers: Sequence[float | None], scores: Sequence[float], gold: float) -> dict[str, Any]:
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


def rerank_scores(records: Sequence[dict], k: int, record: dict[str, Any] | None = None) -> dict[str, Any]:
    """The summary's blocks over records holding :func:`rerank_fields`: ``verifier_best_of_k``,
    ``verifier_weighted_vote`` and ``pass_at_k``, each ``{"k", "correct", "accuracy", "ci95"}`` (and the
    reranker's ``record`` under ``verifier`` when given).

    Raises:
        UsageError: a record without the reranking fields (an evaluation resumed with a verifier it did not have).
    """
    if bad := [r.get("index") for r in records if "best_of_k_correct" not in r]:
        raise UsageError(f"records {bad[:5]} hold no verifier scores: evaluate again without --resume")
    out = {name: {"k": k, **score_block([r[field] for r in records])}
           for name, field in (("verifier_best_of_k", "best_of_k_correct"),
                               ("verifier_weighted_vote", "weighted_correct"), ("pass_at_k", "pass_at_k"))}
    if record is not None:
        out["verifier"] = record
    return out
