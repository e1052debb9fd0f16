"""Sampling with known labels for the verifier tests: a random tiny model never writes a right answer, and a verifier
needs both kinds of sample to train on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gptqlora.data.gsm8k import gold_answer, load_gsm8k


def scripted_samples(data_dir: str | Path, questions: int = 40) -> Callable:
    """A stand-in for ``generate_samples`` over the first ``questions`` GSM8K train questions: sample ``j`` of each
    prompt's question writes the gold answer when ``j`` is even, a wrong one otherwise. Other prompts (test
    questions, which an evaluation samples) are sampled by the real ``generate_samples``."""
    from gptqlora.eval.generate import generate_samples as real

    golds = {e["question"]: gold_answer(e) for e in load_gsm8k("train", str(data_dir))[:questions]}

    def generate_samples(model, tokenizer, prompts, k, **kw) -> list[list[str]]:
        if not any(q in p for p in prompts for q in golds):
            return real(model, tokenizer, prompts, k, **kw)
        out = []
        for p in prompts:
            gold = next(g for q, g in golds.items() if q in p)
            out.append([f" We add.\n#### {int(gold) + (j % 2)}" if j % 2 else f" So it is.\n#### {int(gold)}"
                        for j in range(k)])
        return out

    return generate_samples
