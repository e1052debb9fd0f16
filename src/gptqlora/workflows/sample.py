"""Sample labelled solutions for a verifier: the questions to sample (few-shot exemplars left out), then K solutions
per question from the scored model, data-parallel under torchrun (``gptqlora.verifier.samples.sample_gsm8k``).
"""

from __future__ import annotations

from pathlib import Path

from gptqlora.config import EngineConfig, EvalConfig, ModelConfig
from gptqlora.context import RunContext
from gptqlora.workflows.scored import fewshot, open_scored_model, print_line


def sample_questions(data: str, split: str, limit: int | None, shots: int, seed: int) -> tuple[list[dict], list[dict]]:
    """The questions to sample and the few-shot exemplars, read before any model loads. An exemplar is solved in
    every prompt, so it is not sampled (the first ``limit`` of the others are).

    Returns:
        (entries, exemplars).
    Raises:
        UsageError: see ``fewshot`` and ``gptqlora.data.gsm8k.load_gsm8k``.
    """
    from gptqlora.data.gsm8k import load_gsm8k

    exemplars = fewshot(data, shots, seed)
    shown = {e["question"] for e in exemplars}
    entries = [e for e in load_gsm8k(split, data) if e["question"] not in shown][:limit]
    return entries, exemplars


def sample_solutions(run: RunContext, out: Path, mc: ModelConfig, quantized: str | None, adapter: str | None,
                     entries: list[dict], exemplars: list[dict], ec: EvalConfig, style: str, *, split: str,
                     resume: bool, engine: EngineConfig | None = None) -> dict:
    """Open the generator (``open_scored_model``: on ``run.device``, or served by vLLM), sample ``ec.samples``
    solutions per question with ``run.seed`` and label them into ``out`` (claimed by the caller); every rank samples
    its share and returns the summary."""
    from gptqlora.verifier.samples import sample_gsm8k

    with open_scored_model(run, mc, quantized, adapter, engine) as (model, tokenizer, record):
        return sample_gsm8k(model, tokenizer, entries, ec, out, style=style, exemplars=exemplars, seed=run.seed,
                            split=split, resume=resume, provenance=record, log=print_line)
