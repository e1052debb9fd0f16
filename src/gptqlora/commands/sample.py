"""``gptqlora sample``: K sampled solutions per GSM8K train question, labelled correct or not, for training a verifier.

    gptqlora sample --quantized Q [--adapter A] --split train --limit N --samples K --out DIR [--resume]

The generator's prompt, token budget, temperature and top-p are those of ``gptqlora eval`` (the same flags). Only the
train split is sampled: test-split gold must never become a training label (``--split test`` is refused). Few-shot
exemplars (``--shots``) are train questions too, so they are left out of the sampled questions.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptqlora.commands.common import check_quantized_input, fewshot, local_data_dir
from gptqlora.commands.evaluate import BATCH_ALIASES
from gptqlora.config import (DataConfig, EvalConfig, ModelConfig, PromptConfig, adapter_field, group, opt,
                             overwrite_field, quantized_field, seed_field)
from gptqlora.errors import UsageError
from gptqlora.files import OutputLock, check_output, clear_output


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


def sample(args: SampleArgs) -> dict:
    """Check inputs and output, load the generator, sample and label; returns the summary."""
    from gptqlora.commands.evaluate import load_scored_model
    from gptqlora.data.gsm8k import load_gsm8k
    from gptqlora.lora.adapter import read_adapter_config
    from gptqlora.models import check_model_source
    from gptqlora.verifier.samples import sample_gsm8k

    source = check_quantized_input(args.quantized) if args.quantized else check_model_source(args.model.model,
                                                                                              args.model.cache_dir)
    if args.adapter:
        read_adapter_config(args.adapter)
    exemplars = fewshot(args.data.data, args.eval.shots, args.seed)
    shown = {e["question"] for e in exemplars}  # solved in every prompt: not sampled
    entries = [e for e in load_gsm8k(args.split, args.data.data) if e["question"] not in shown][: args.limit]
    out = check_output(args.out, inputs=[source, args.adapter, local_data_dir(args.data.data)],
                       overwrite=args.overwrite, resume=args.resume)
    with OutputLock(out):
        if args.overwrite:
            clear_output(out)
        model, tokenizer, record = load_scored_model(args.model, args.quantized, args.adapter)
        summary = sample_gsm8k(model, tokenizer, entries, args.eval, out, style=args.prompt.prompt_style,
                               exemplars=exemplars, seed=args.seed, split=args.split, resume=args.resume,
                               provenance=record, log=lambda line: print(line, flush=True))
    return summary | {"out": str(out)}
