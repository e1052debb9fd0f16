"""The learning-rate schedule and the step count: pure functions of their arguments.

Linear warmup then cosine decay, as in nanoGPT: ``get_lr(step)`` is evaluated once per optimizer step, before
the update, with ``step`` counting the updates already taken (0 for the first one).
"""

from __future__ import annotations

import math


def get_lr(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning rate for the update with 0-based index ``step``.

    Warmup rises linearly, ``peak_lr * (step + 1) / (warmup_steps + 1)``: the first update gets a small but
    non-zero rate and update ``warmup_steps`` gets exactly ``peak_lr``. Then a half cosine falls from ``peak_lr``
    to ``peak_lr * min_lr_ratio``, reached at ``step == total_steps`` and held beyond it.

    Args:
        step: updates already taken (>= 0).
        peak_lr: the rate at the end of warmup (> 0).
        warmup_steps: updates of linear warmup (>= 0); 0 starts at the peak.
        total_steps: where the cosine reaches its floor (> 0).
        min_lr_ratio: the floor as a fraction of the peak, in [0, 1].
    Returns:
        The learning rate.
    Raises:
        ValueError: for a negative step or an argument out of range.
    """
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if peak_lr <= 0 or warmup_steps < 0 or total_steps <= 0 or not 0 <= min_lr_ratio <= 1:
        raise ValueError(f"bad schedule: peak_lr={peak_lr} (> 0), warmup_steps={warmup_steps} (>= 0), "
                         f"total_steps={total_steps} (> 0), min_lr_ratio={min_lr_ratio} (in [0, 1])")
    min_lr = peak_lr * min_lr_ratio
    if step < warmup_steps:
        return peak_lr * (step + 1) / (warmup_steps + 1)
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)  # 0 at the peak -> 1 at the floor
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak_lr - min_lr)


def count_total_steps(n_examples: int, *, batch_size: int, grad_accum: int, epochs: float,
                      max_steps: int | None) -> int:
    """Optimizer steps in a run: ``max_steps`` when given, else ``ceil(epochs * n / (batch_size * grad_accum))``.

    Raises:
        ValueError: for an empty training set without ``max_steps``, or a count of 0.
    """
    if max_steps is not None:
        return max_steps
    if n_examples <= 0:
        raise ValueError("the training set is empty: give it examples (check --train-limit and --eval-holdout)")
    steps = math.ceil(epochs * n_examples / (batch_size * grad_accum))
    if steps <= 0:
        raise ValueError(f"epochs={epochs} over {n_examples} examples gives no optimizer step")
    return steps
