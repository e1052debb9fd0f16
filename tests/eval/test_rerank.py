"""Reranking in the evaluator: the record fields and summary blocks over scored samples, and the wiring of a
reranker the caller passes (a stand-in here: evaluation knows no verifier)."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence

import pytest
from conftest import make_tiny_tokenizer

from gptqlora.config import EvalConfig
from gptqlora.errors import UsageError
from gptqlora.eval import engine as engine_module
from gptqlora.eval import gsm8k_eval
from gptqlora.eval.gsm8k_eval import evaluate_gsm8k
from gptqlora.eval.rerank import rerank_fields, rerank_scores
from gptqlora.eval.scoring import accuracy_with_ci, pass_at_k


def test_best_of_k_with_an_oracle_scorer_equals_pass_at_k():
    rng = random.Random(1)
    for _ in range(200):
        gold = 7.0
        answers = [rng.choice([None, 7.0, 8.0, 9.0]) for _ in range(rng.randint(1, 6))]
        oracle = [1.0 if a == gold else 0.0 for a in answers]  # the scorer that knows the gold answer
        correct = sum(a == gold for a in answers)
        fields = rerank_fields(answers, oracle, gold)
        assert fields["best_of_k_correct"] == fields["pass_at_k"] == (pass_at_k(len(answers), correct,
                                                                                 len(answers)) == 1.0)


def test_rerank_scores_give_each_rule_its_wilson_interval():
    records = [{"index": i, **rerank_fields(a, s, 1.0)} for i, (a, s) in
               enumerate([([1.0, 2.0], [0.9, 0.1]), ([2.0, 1.0], [0.9, 0.1]), ([2.0, 2.0], [0.5, 0.5])])]
    blocks = rerank_scores(records, k=2, record={"path": "v"})
    expected = {"verifier_best_of_k": [True, False, False], "verifier_weighted_vote": [True, False, False],
                "pass_at_k": [True, True, False]}
    for name, flags in expected.items():
        acc, lo, hi = accuracy_with_ci(flags)
        assert blocks[name] == {"k": 2, "correct": sum(flags), "accuracy": acc, "ci95": [lo, hi]}
        p = blocks[name]["accuracy"]
        assert p == sum(flags) / 3 and lo < p < hi
        # Wilson's bounds are the two roots of n (p - x)^2 = z^2 x (1 - x), z = 1.96 for 95%.
        for x in (lo, hi):
            assert math.isclose(3 * (p - x) ** 2, 1.96**2 * x * (1 - x), rel_tol=1e-9)
    assert blocks["verifier"] == {"path": "v"}
    assert "verifier" not in rerank_scores(records, k=2)
    with pytest.raises(UsageError, match="no verifier scores"):
        rerank_scores([{"index": 0, "correct": True}], k=2)


# Three questions in batches of two; each sample's score is written beside it.
ENTRIES = [{"question": "Q0: 2+3?", "answer": "#### 5"}, {"question": "Q1: 2*2?", "answer": "#### 4"},
           {"question": "Q2: 6*2?", "answer": "#### 12"}]
SAMPLES = {"Q0: 2+3?": [("#### 7", 0.2), ("#### 5", 0.9), ("#### 7", 0.3)],  # majority 7; best and weighted 5
           "Q1: 2*2?": [("#### 4", 0.6), ("#### 3", 0.1), ("#### 3", 0.2)],  # majority 3; best and weighted 4
           "Q2: 6*2?": [("#### 12", 0.1), ("#### 11", 0.5), ("#### 11", 0.4)]}  # all pick 11; pass@K holds


class StandInRerank:
    """Scores each sample by its place in the table above and records how it was called."""

    record = {"path": "stand-in"}

    def __init__(self):
        self.calls: list[tuple[list[str], list[list[str]]]] = []

    def __call__(self, questions: Sequence[str], samples: Sequence[Sequence[str]]) -> list[list[float]]:
        self.calls.append((list(questions), [list(s) for s in samples]))
        return [[score for _, score in SAMPLES[q]][:len(per_q)] for q, per_q in zip(questions, samples)]


def test_the_evaluator_reranks_each_batch_with_the_callable_it_is_given(monkeypatch, tmp_path):
    def question(prompt: str) -> str:
        return next(q for q in SAMPLES if q in prompt)

    monkeypatch.setattr(engine_module, "generate", lambda model, tok, prompts, **kw: ["#### 0"] * len(prompts))
    monkeypatch.setattr(engine_module, "generate_samples", lambda model, tok, prompts, k, **kw: [
        [text for text, _ in SAMPLES[question(p)]][:k] for p in prompts])
    rerank = StandInRerank()
    config = EvalConfig(eval_batch_size=2, max_new_tokens=8, samples=3, temperature=0.5, top_p=0.9)
    summary = evaluate_gsm8k(None, make_tiny_tokenizer(), ENTRIES, config, style="plain", out_dir=tmp_path,
                             log=lambda line: None, rerank=rerank)

    questions = [e["question"] for e in ENTRIES]
    assert rerank.calls == [(questions[:2], [[t for t, _ in SAMPLES[q]] for q in questions[:2]]),
                            (questions[2:], [[t for t, _ in SAMPLES[questions[2]]]])]  # once per generation batch
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["verifier_scores"] for r in records] == [[s for _, s in SAMPLES[q]] for q in questions]
    assert [(r["voted_answer"], r["best_of_k_answer"], r["weighted_answer"]) for r in records] == [
        (7.0, 5.0, 5.0), (3.0, 4.0, 4.0), (11.0, 11.0, 11.0)]
    assert summary["self_consistency"]["correct"] == 0
    assert summary["verifier_best_of_k"]["correct"] == summary["verifier_weighted_vote"]["correct"] == 2
    assert summary["pass_at_k"]["correct"] == 3 and summary["verifier"] == {"path": "stand-in"}
