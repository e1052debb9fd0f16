"""Evaluation: generation, answer scoring and voting, teacher-forced loss."""
