"""The subcommands. Each module holds one command: its typed config (``*Args``, composed of the groups in
``gptqlora.config`` plus its own fields) and its function, which the CLI calls with that config. A command's function
calls the jobs of ``gptqlora.workflows``; commands never import each other.

Every command follows the same order: check options (the config's ``__post_init__``), then inputs (paths, data),
then start its ``gptqlora.context.RunContext`` (device, torchrun's group) and claim its output (``run.output``:
refuse to replace, check writability, take the output's lock), and only then load models and work.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

from gptqlora.commands import evaluate, finetune, merge, perplexity, quantize, run, sample, train_verifier


class Command(NamedTuple):
    help: str
    args: type
    run: Callable[[Any], dict]


COMMANDS: dict[str, Command] = {
    "quantize": Command("Quantize a model's linear layers (GPTQ or RTN) and save a GPTQ v1 directory.",
                        quantize.QuantizeArgs, quantize.quantize),
    "perplexity": Command("Teacher-forced perplexity of GSM8K solutions (float or quantized model).",
                          perplexity.PerplexityArgs, perplexity.perplexity),
    "finetune": Command("Train LoRA adapters over a quantized base on GSM8K train; under torchrun, "
                        "data-parallel (--batch-size per process).",
                        finetune.FinetuneArgs, finetune.finetune),
    "eval": Command("Exact-match GSM8K accuracy with greedy decoding and optional self-consistency.",
                    evaluate.EvalArgs, evaluate.evaluate),
    "merge": Command("Merge a LoRA adapter into its quantized base and re-quantize with GPTQ.",
                     merge.MergeArgs, merge.merge),
    "run": Command("The whole job: quantize -> fine-tune -> evaluate, with one results table.",
                   run.RunArgs, run.run),
    "sample": Command("K sampled solutions per GSM8K train question, each labelled correct or not (verifier data).",
                      sample.SampleArgs, sample.sample),
    "train-verifier": Command("Train a verifier (value head + its own LoRA over a quantized base) on labelled "
                              "samples.", train_verifier.TrainVerifierArgs, train_verifier.train_verifier_command),
}

__all__ = ["COMMANDS", "Command"]
