"""``gptqlora perplexity``: teacher-forced answer-token perplexity of GSM8K solutions."""

from __future__ import annotations

from dataclasses import dataclass

from gptqlora.config import DataConfig, ModelConfig, PromptConfig, SplitConfig, group, opt
from gptqlora.context import RunContext
from gptqlora.errors import UsageError


@dataclass
class PerplexityArgs:
    model: ModelConfig = group(ModelConfig)
    data: DataConfig = group(DataConfig)
    prompt: PromptConfig = group(PromptConfig)
    split: SplitConfig = group(SplitConfig)
    batch_size: int = opt(8, "Solutions per forward pass.")
    max_length: int = opt(512, "Tokens per example (prompt + solution), truncated beyond.")

    def __post_init__(self) -> None:
        if self.batch_size <= 0 or self.max_length < 2:
            raise UsageError(f"batch_size ({self.batch_size}) must be positive and max_length ({self.max_length}) "
                             "at least 2")


def perplexity(args: PerplexityArgs) -> dict | None:
    """Score the solutions teacher-forced (writes nothing); returns the perplexity, the dtype and the kernels used."""
    from gptqlora.data.gsm8k import load_gsm8k
    from gptqlora.eval.perplexity import gsm8k_answer_loss
    from gptqlora.models import check_model_source, load_model
    from gptqlora.quant.linear import QuantizedLinear, kernels_used, set_kernel

    mc = args.model
    check_model_source(mc.model, mc.cache_dir)
    entries = load_gsm8k(args.split.split, args.data.data)[: args.split.limit]
    with RunContext.start(mc.device, None, torchrun=False) as run:  # nothing random: no seed
        model, tokenizer = load_model(mc.model, mc.dtype, run.device, mc.cache_dir, inference=True)
        set_kernel(model, mc.kernel)
        result = gsm8k_answer_loss(model, tokenizer, entries, batch_size=args.batch_size, max_length=args.max_length,
                                   style=args.prompt.prompt_style)
    n_quant = sum(isinstance(m, QuantizedLinear) for m in model.modules())
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return run.main_only({"model": mc.model, "quantized_layers": n_quant, "split": args.split.split, "dtype": dtype,
                          "kernels": kernels_used(model) or None} | result)
