"""The selection rules (majority vote, best-of-K, weighted vote, pass@K), the AUC, the Wilson interval and the
summary record: each a pure function, tested alone."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from gptqlora.eval.scoring import (accuracy_with_ci, best_of_k, majority_vote, pass_at_k, roc_auc, score_block,
                                   summarize, weighted_vote)


def test_majority_vote_counts_numeric_equals_together():
    assert majority_vote([3.0, 18.0, 18.000001, 3.0, 18]) == 18.0
    assert majority_vote([None, 5.0, None, None]) == 5.0  # missing answers do not vote
    assert majority_vote([-0.0, 0.0, 1.0]) == 0.0


def test_majority_vote_ties_go_to_first_seen():
    assert majority_vote([7.0, 2.0, 2.0, 7.0]) == 7.0
    assert majority_vote([2.0, 7.0, 7.0, 2.0]) == 2.0
    assert majority_vote([1.5, None, 2.5]) == 1.5


def test_majority_vote_without_answers():
    assert majority_vote([]) is None
    assert majority_vote([None, None, float("nan")]) is None


def test_best_of_k_takes_the_top_scored_sample_with_an_answer():
    assert best_of_k([1.0, 2.0, 3.0], [0.1, 0.9, 0.5]) == 2.0
    assert best_of_k([None, 2.0], [0.99, 0.1]) == 2.0  # a sample without an answer is never chosen
    assert best_of_k([5.0, 6.0], [0.5, 0.5]) == 5.0  # ties: the earlier sample
    assert best_of_k([None, float("nan")], [0.3, 0.4]) is None
    with pytest.raises(ValueError, match="2 answers for 1 scores"):
        best_of_k([1.0, 2.0], [0.5])


def test_weighted_vote_sums_scores_per_answer():
    # 3 wins by sum (0.3 + 0.3 + 0.3 = 0.9 > 0.8) though 7 has the single best sample; "3" and "3.0" agree.
    assert weighted_vote([3.0, 7.0, 3.0, 3.00001], [0.3, 0.8, 0.3, 0.3]) == 3.0
    assert weighted_vote([3.0, 7.0, 7.0], [0.9, 0.2, 0.2]) == 3.0
    assert weighted_vote([None, None], [1.0, 1.0]) is None
    with pytest.raises(ValueError, match="1 answers for 2 scores"):
        weighted_vote([1.0], [0.5, 0.5])


def test_weighted_vote_with_equal_scores_is_majority_vote():
    rng = random.Random(0)
    for _ in range(300):
        answers = [rng.choice([None, 1.0, 2.0, 3.0, 4.0]) for _ in range(rng.randint(1, 8))]
        assert weighted_vote(answers, [0.5] * len(answers)) == majority_vote(answers)


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 4, 1) == 1.0
    # Against enumeration: the fraction of k-subsets of n samples (c correct) holding a correct one.
    for n, c, k in [(5, 2, 2), (6, 1, 3), (7, 3, 1), (8, 0, 5)]:
        samples = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(samples, k))
        assert math.isclose(pass_at_k(n, c, k), sum(any(s) for s in subsets) / len(subsets))
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 2)


def test_roc_auc_against_counting_pairs():
    rng = random.Random(2)
    for _ in range(50):
        scores = [rng.choice([0.1, 0.2, 0.5, 0.7, 0.9]) for _ in range(12)]
        labels = [rng.random() < 0.4 for _ in range(12)]
        if all(labels) or not any(labels):
            continue
        pairs = [(p, q) for p, y in zip(scores, labels) if y for q, z in zip(scores, labels) if not z]
        expected = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in pairs) / len(pairs)
        assert math.isclose(roc_auc(scores, labels), expected)
    assert roc_auc([0.9, 0.1], [True, False]) == 1.0 and roc_auc([0.1, 0.9], [True, False]) == 0.0
    with pytest.raises(ValueError):
        roc_auc([0.1, 0.2], [True, True])


def test_wilson_interval_known_values():
    acc, lo, hi = accuracy_with_ci([True] * 8 + [False] * 2)
    assert acc == 0.8
    # Wilson 95% interval for 8/10 (textbook value 0.490..0.943).
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    acc, lo, hi = accuracy_with_ci([True] * 5)
    assert acc == 1.0 and hi == 1.0 and 0.5 < lo < 1.0  # not the degenerate [1, 1] of the normal approximation
    acc, lo, hi = accuracy_with_ci([False] * 5)
    assert acc == 0.0 and lo == 0.0 and 0.0 < hi < 0.5


def test_wilson_interval_narrows_with_n_and_widens_with_z():
    _, lo_small, hi_small = accuracy_with_ci([True, False] * 10)
    _, lo_big, hi_big = accuracy_with_ci([True, False] * 1000)
    assert lo_small < lo_big < 0.5 < hi_big < hi_small
    _, lo99, hi99 = accuracy_with_ci([True, False] * 10, z=2.576)
    assert lo99 < lo_small and hi99 > hi_small
    # For large n it approaches the normal interval p +- z sqrt(p(1-p)/n).
    assert hi_big - 0.5 == pytest.approx(1.96 * math.sqrt(0.25 / 2000), rel=1e-3)


def test_accuracy_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="zero questions"):
        accuracy_with_ci([])


def test_summarize():
    out = summarize([{"correct": True, "pred": 1.0}, {"correct": False}, {"correct": True}, {"correct": True}])
    acc, lo, hi = accuracy_with_ci([True, False, True, True])
    assert out == {"n": 4, "correct": 3, "accuracy": 0.75, "ci95": [lo, hi]}
    assert summarize([True, False])["accuracy"] == 0.5
    with pytest.raises(ValueError, match="'correct'"):
        summarize([{"pred": 3.0}])
    with pytest.raises(ValueError):
        summarize([])


def test_score_block_is_the_summary_without_its_count():
    flags = [True, False, True]
    acc, lo, hi = accuracy_with_ci(flags)
    assert score_block(flags) == {"correct": 2, "accuracy": acc, "ci95": [lo, hi]}
