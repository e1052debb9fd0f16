"""``gptqlora sample``: K sampled solutions per GSM8K train question, labelled correct or not, for training a verifier.

    gptqlora sample --quantized Q [--adapter A] --split train --limit N --samples K --out DIR [--resume]
    torchrun --nproc-per-node N -m gptqlora.cli sample ...   # data-parallel: the same files

The generator's prompt, token budget, temperature and top-p are those of ``gptqlora eval`` (the same flags). Only the
train split is sampled: test-split gold must never become a training label (``--split test`` is refused). Few-shot
exemplars (``--shots``) are train questions too, so they are left out of the sampled questions.

Data-parallel under torchrun, as ``gptqlora eval`` is: each rank loads the generator and samples its share of the
generation batches (each question by one rank, with the seed one process gives it); rank 0 alone checks, locks and
writes ``--out``, whose samples.jsonl and summary.json are those of a one-process run with the same seed
(summary.json adds ``world_size``), and only rank 0 prints the result. ``--resume`` may use another number of
processes than the interrupted run.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptqlora.config import (BATCH_ALIASES, DataConfig, EngineConfig, EvalConfig, ModelConfig, PromptConfig,
                             adapter_field,
                             check_resume_flags, group, opt, overwrite_field, quantized_field, seed_field)
from gptqlora.context import RunContext
from gptqlora.errors import UsageError
from gptqlora.workflows.base import local_data_dir
from gptqlora.workflows.sample import sample_questions, sample_solutions
from gptqlora.workflows.scored import check_scored_model


@dataclass
class SampleArgs:
    model: ModelConfig = group(ModelConfig)
    data: DataConfig = group(DataConfig)
    prompt: PromptConfig = group(PromptConfig)
    eval: EvalConfig = group(EvalConfig, aliases=BATCH_ALIASES)
    engine: EngineConfig = group(EngineConfig)
    split: str = opt("train", "GSM8K split to sample: only 'train' (labels are training data; test gold must never "
                              "reach training).", choices=("train", "test"))
    limit: int | None = opt(None, "Sample the first N questions only (default: the whole split).")
    seed: int = seed_field()
    quantized: str | None = quantized_field()
    adapter: str | None = adapter_field()
    out: str | None = opt(None, "Where samples.jsonl, sample_config.json and summary.json go.", required=True)
    resume: bool = opt(False, "Continue an interrupted sampling in --out: questions already sampled with the same "
                              "settings are kept, the rest are sampled.")
    overwrite: bool = overwrite_field()

    def __post_init__(self) -> None:
        from gptqlora.verifier.samples import check_train_split

        check_resume_flags(self.resume, self.overwrite)
        check_train_split(self.split)
        if self.eval.samples < 1:
            raise UsageError("give --samples K: the number of sampled solutions per question (K >= 1)")
        if self.limit is not None and self.limit <= 0:
            raise UsageError(f"limit={self.limit} must be positive; leave it out for the whole split")
        if not self.out:
            raise UsageError("--out is empty: give the directory the samples go to")


def sample(args: SampleArgs) -> dict | None:
    """Check inputs and output, load the generator, sample and label; returns the summary (None on ranks other than
    0, which print nothing)."""
    source = check_scored_model(args.model, args.quantized, args.adapter, args.eval.max_new_tokens,
                                args.prompt.prompt_style, args.engine)
    entries, exemplars = sample_questions(args.data.data, args.split, args.limit, args.eval.shots, args.seed)
    with RunContext.start(args.model.device, args.seed) as run:
        with run.output(args.out, inputs=[source, args.adapter, local_data_dir(args.data.data)],
                        overwrite=args.overwrite, resume=args.resume) as out:
            summary = sample_solutions(run, out, args.model, args.quantized, args.adapter, entries, exemplars,
                                       args.eval, args.prompt.prompt_style, split=args.split, resume=args.resume,
                                       engine=args.engine)
    return run.main_only(summary | {"out": str(out)})
