"""get_lr: linear warmup to the peak, cosine down to the floor at total_steps; the step count."""

from __future__ import annotations

import math

import pytest

from gptqlora.train.schedule import count_total_steps, get_lr

KW = dict(peak_lr=1e-3, warmup_steps=5, total_steps=50, min_lr_ratio=0.1)


def test_warmup_rises_linearly_from_near_zero_to_the_peak():
    lrs = [get_lr(s, **KW) for s in range(KW["warmup_steps"] + 1)]
    assert 0 < lrs[0] == pytest.approx(1e-3 / 6)
    assert all(b - a == pytest.approx(1e-3 / 6) for a, b in zip(lrs, lrs[1:]))  # equal increments
    assert lrs[-1] == pytest.approx(1e-3)


def test_cosine_decays_monotonically_to_the_floor_and_stays_there():
    lrs = [get_lr(s, **KW) for s in range(5, 51)]
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))
    assert get_lr(50, **KW) == pytest.approx(1e-4)
    assert get_lr(500, **KW) == pytest.approx(1e-4)
    midpoint = 5 + (50 - 5) / 2  # half way through the cosine: half way between peak and floor
    assert get_lr(int(midpoint), **KW) > 5.5e-4 > get_lr(math.ceil(midpoint), **KW)


def test_no_warmup_starts_at_the_peak_and_a_ratio_of_one_is_constant():
    assert get_lr(0, **(KW | {"warmup_steps": 0})) == pytest.approx(1e-3)
    assert {round(get_lr(s, **(KW | {"min_lr_ratio": 1.0})), 12) for s in range(5, 60)} == {1e-3}


@pytest.mark.parametrize("bad", [dict(step=-1), dict(peak_lr=0.0), dict(total_steps=0), dict(min_lr_ratio=1.5),
                                 dict(warmup_steps=-2)])
def test_bad_arguments_raise(bad):
    kw = KW | {"step": 0} | bad
    step = kw.pop("step")
    with pytest.raises(ValueError):
        get_lr(step, **kw)


def test_total_steps_from_epochs_or_max_steps():
    assert count_total_steps(10, batch_size=2, grad_accum=2, epochs=1.0, max_steps=None) == 3  # ceil(10 / 4)
    assert count_total_steps(10, batch_size=2, grad_accum=1, epochs=2.5, max_steps=None) == 13  # ceil(12.5)
    assert count_total_steps(10, batch_size=2, grad_accum=1, epochs=1.0, max_steps=7) == 7
    with pytest.raises(ValueError, match="empty"):
        count_total_steps(0, batch_size=2, grad_accum=1, epochs=1.0, max_steps=None)
