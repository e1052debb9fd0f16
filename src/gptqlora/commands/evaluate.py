"""``gptqlora eval``: exact-match GSM8K accuracy, greedy and self-consistency; resumable after a crash.

Data-parallel under torchrun (``torchrun --nproc-per-node N --no-python gptqlora eval ...``): each rank loads the
model and answers its share of the generation batches; rank 0 alone checks, locks and writes the output, and only
rank 0 prints the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gptqlora.config import (BATCH_ALIASES, DataConfig, EngineConfig, EvalConfig, ModelConfig, PromptConfig, SplitConfig,
                             adapter_field, check_resume_flags, group, opt, overwrite_field, quantized_field,
                             seed_field)
from gptqlora.context import RunContext
from gptqlora.errors import UsageError
from gptqlora.workflows.base import local_data_dir
from gptqlora.workflows.scored import check_scored_model, evaluate_model, fewshot


@dataclass
class EvalArgs:
    model: ModelConfig = group(ModelConfig)
    data: DataConfig = group(DataConfig)
    prompt: PromptConfig = group(PromptConfig)
    split: SplitConfig = group(SplitConfig)
    eval: EvalConfig = group(EvalConfig, aliases=BATCH_ALIASES)
    engine: EngineConfig = group(EngineConfig)
    seed: int = seed_field()
    quantized: str | None = quantized_field()
    adapter: str | None = adapter_field()
    output_dir: str | None = opt(None, "Where predictions.jsonl, eval_config.json and summary.json go (default: "
                                       "OUT/eval next to the adapter's directory, else ./eval_out).")
    verifier: str | None = opt(None, "A verifier directory (gptqlora train-verifier) that reranks the --samples K "
                                     "solutions: best-of-K and verifier-weighted vote, next to greedy and majority vote.")
    resume: bool = opt(False, "Continue an interrupted evaluation in --output-dir: questions already answered with "
                              "the same settings are kept, the rest are generated.")
    overwrite: bool = overwrite_field()

    def __post_init__(self) -> None:
        check_resume_flags(self.resume, self.overwrite)
        if self.verifier and not self.eval.samples:
            raise UsageError("--verifier reranks sampled solutions: add --samples K")

    def default_output_dir(self) -> Path:
        if self.output_dir:
            return Path(self.output_dir)
        return Path(self.adapter).expanduser().parent / "eval" if self.adapter else Path("eval_out")


def evaluate(args: EvalArgs) -> dict | None:
    """Evaluate and return the summary (None on ranks other than 0, which print nothing)."""
    from gptqlora.data.gsm8k import load_gsm8k
    from gptqlora.verifier.model import read_verifier_config

    source = check_scored_model(args.model, args.quantized, args.adapter, args.eval.max_new_tokens,
                                args.prompt.prompt_style, args.engine)
    if args.verifier:
        read_verifier_config(args.verifier)
    entries = load_gsm8k(args.split.split, args.data.data)[: args.split.limit]
    exemplars = fewshot(args.data.data, args.eval.shots, args.seed)
    with RunContext.start(args.model.device, args.seed) as run:
        with run.output(args.default_output_dir(), inputs=[source, args.adapter, args.verifier,
                                                           local_data_dir(args.data.data)],
                        overwrite=args.overwrite, resume=args.resume, what="--output-dir") as out:
            summary = evaluate_model(run, args.model, args.quantized, args.adapter, args.verifier, entries, exemplars,
                                     args.eval, args.prompt.prompt_style, out, split=args.split.split,
                                     resume=args.resume, engine=args.engine)
    return run.main_only(summary | {"output_dir": str(out)})
