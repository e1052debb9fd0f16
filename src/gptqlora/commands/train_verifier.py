"""``gptqlora train-verifier``: a value head and its own LoRA over a quantized base, trained on labelled samples.

    gptqlora train-verifier --quantized Q --samples-dir DIR --out VDIR [--val-questions N] [--lm-loss-weight W]

Reads a finished ``gptqlora sample`` directory of the train split (a test-split one, or one holding a GSM8K test
question, is refused; one sampled by a model over another base than Q gets a warning naming both), trains
(``gptqlora.verifier.train``) and writes VDIR whole at the end: the LoRA in PEFT's format,
``value_head.safetensors``, ``verifier_config.json`` (its base: path and weights fingerprint) and ``metrics.jsonl``.
Use it with ``gptqlora eval --samples K --verifier VDIR``, or ``gptqlora.verifier.load``.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptqlora.config import (DataConfig, LoRAConfig, ModelConfig, PromptConfig, VerifierTrainConfig, group, opt,
                             overwrite_field, quantized_field, seed_field)
from gptqlora.context import RunContext
from gptqlora.errors import UsageError
from gptqlora.workflows.verifier import make_verifier, read_verifier_data


@dataclass
class TrainVerifierArgs:
    model: ModelConfig = group(ModelConfig)
    data: DataConfig = group(DataConfig)
    prompt: PromptConfig = group(PromptConfig)
    lora: LoRAConfig = group(LoRAConfig)
    verifier: VerifierTrainConfig = group(VerifierTrainConfig)
    seed: int = seed_field()
    quantized: str | None = quantized_field(required=True)
    samples_dir: str | None = opt(None, "A finished `gptqlora sample --split train` directory.", required=True)
    out: str | None = opt(None, "The verifier directory to write.", required=True)
    overwrite: bool = overwrite_field()

    def __post_init__(self) -> None:
        if self.model.model != ModelConfig().model:
            raise UsageError("--model is not used: the verifier trains over --quantized; leave --model out")
        if not (self.quantized and self.samples_dir and self.out):
            raise UsageError("give --quantized, --samples-dir and --out")


def train_verifier_command(args: TrainVerifierArgs) -> dict | None:
    """Check inputs and output, train, write the verifier directory whole; returns the summary."""
    vd = read_verifier_data(args.quantized, args.samples_dir, args.data.data, args.lora.lora_targets, args.verifier,
                            args.seed)
    with RunContext.start(args.model.device, args.seed, torchrun=False) as run:
        summary = make_verifier(run, args.out, vd, args.model, args.prompt.prompt_style, args.lora, args.verifier,
                                overwrite=args.overwrite)
    return run.main_only(summary)
