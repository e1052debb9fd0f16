"""Majority voting, the Wilson interval and the summary record."""

from __future__ import annotations

import math

import pytest

from gptqlora.eval.scoring import accuracy_with_ci, majority_vote, summarize


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
