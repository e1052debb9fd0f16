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

from gptqlora import distributed
from gptqlora.commands.common import fewshot, local_data_dir
from gptqlora.commands.evaluate import BATCH_ALIASES
from gptqlora.config import (DataConfig, EvalConfig, ModelConfig, PromptConfig, adapter_field, group, opt,
                             overwrite_field, quantized_field, seed_field)
from gptqlora.errors import UsageError
from gptqlora.files import check_output


@dataclass
class SampleArgs:
    model: ModelConfig = group(ModelConfig)
    data: DataConfig = group(DataConfig)
    prompt: PromptConfig = group(PromptConfig)
    eval: EvalConfig = group(EvalConfig, aliases=BATCH_ALIASES)
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
        from gptqlora.commands.finetune import check_resume_flags
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
    """The command: :func:`sample_joined` in the process group it joins (a world of one without torchrun), which it
    leaves at the end; returns the summary (None on ranks other than 0, which print nothing)."""
    try:
        summary = sample_joined(args)
    finally:
        distributed.shutdown()
    return summary if distributed.world().main else None


def sample_joined(args: SampleArgs) -> dict:
    """Check inputs and output, load the generator, sample and label; returns the summary and ``out`` on every rank.

    Joins torchrun's process group when not yet in it, and stays in it: ``gptqlora run`` calls this between its
    other stages.
    """
    from gptqlora.commands.evaluate import check_scored_model, load_scored_model, main_writes
    from gptqlora.commands.finetune import join
    from gptqlora.data.gsm8k import load_gsm8k
    from gptqlora.models import resolve_device
    from gptqlora.verifier.samples import sample_gsm8k

    source = check_scored_model(args.model, args.quantized, args.adapter, args.eval.max_new_tokens,
                                args.prompt.prompt_style)
    exemplars = fewshot(args.data.data, args.eval.shots, args.seed)
    shown = {e["question"] for e in exemplars}  # solved in every prompt: not sampled
    entries = [e for e in load_gsm8k(args.split, args.data.data) if e["question"] not in shown][: args.limit]
    join(resolve_device(args.model.device))  # the group, and on a CPU each process's share of its cores
    out = distributed.from_main(check_output, args.out, inputs=[source, args.adapter, local_data_dir(args.data.data)],
                                overwrite=args.overwrite, resume=args.resume)
    with main_writes(out, args.overwrite):
        model, tokenizer, record = load_scored_model(args.model, args.quantized, args.adapter)
        summary = sample_gsm8k(model, tokenizer, entries, args.eval, out, style=args.prompt.prompt_style,
                               exemplars=exemplars, seed=args.seed, split=args.split, resume=args.resume,
                               provenance=record, log=lambda line: print(line, flush=True))
    return summary | {"out": str(out)}
