"""``gptqlora train-verifier``: a value head and its own LoRA over a quantized base, trained on labelled samples.

    gptqlora train-verifier --quantized Q --samples-dir DIR --out VDIR [--val-questions N] [--lm-loss-weight W]

Reads a finished ``gptqlora sample`` directory of the train split (a test-split one, or one holding a GSM8K test
question, is refused; one sampled by a model over another base than Q gets a warning naming both), trains
(``gptqlora.verifier.train``) and writes VDIR whole at the end: the LoRA in PEFT's format,
``value_head.safetensors``, ``verifier_config.json`` (its base: path and weights fingerprint) and ``metrics.jsonl``.
Use it with ``gptqlora eval --samples K --verifier VDIR``, or ``gptqlora.eval.verifier``.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

from gptqlora.commands.common import check_quantized_input, local_data_dir
from gptqlora.config import (DataConfig, LoRAConfig, ModelConfig, PromptConfig, VerifierTrainConfig, group, opt,
                             overwrite_field, quantized_field, seed_field)
from gptqlora.errors import UsageError
from gptqlora.files import OutputLock, check_output, staged_dir

METRICS_FILE = "metrics.jsonl"

log = logging.getLogger(__name__)


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


def check_no_test_questions(records: list[dict], data: str) -> None:
    """Refuse samples of a GSM8K test question: its gold label would be trained on.

    Raises:
        UsageError: naming how many records and the first one.
    """
    from gptqlora.data.gsm8k import load_gsm8k

    test = {e["question"] for e in load_gsm8k("test", data)}
    if leaked := [r["index"] for r in records if r["question"] in test]:
        raise UsageError(f"{len(leaked)} sampled questions (first: record {leaked[0]}) are GSM8K test questions: "
                         "their labels come from test gold, which must never reach training; sample the train split")


def check_sampled_over(samples_dir: str, sampled: dict, base: dict) -> None:
    """Warn when the samples were made over another base than the one the verifier trains over (naming both, as
    ``load_adapter`` warns), and note when they do not say which base made them."""
    from gptqlora.provenance import describe_base
    from gptqlora.verifier.samples import SAMPLE_CONFIG, check_samples_base, samples_base

    recorded = samples_base(sampled)
    if recorded is None:
        log.warning("note: %s does not record the base of the model that made the samples (sampled by an older "
                    "gptqlora, or without provenance): cannot check that it is the verifier's base, %s",
                    Path(samples_dir) / SAMPLE_CONFIG, describe_base(base))
    elif mismatch := check_samples_base(samples_dir, recorded, base):
        log.warning(mismatch)
        warnings.warn(mismatch, stacklevel=2)


def train_verifier_command(args: TrainVerifierArgs) -> dict:
    """Check inputs and output, train, write the verifier directory whole; returns the summary."""
    from gptqlora.commands.common import load_quantized_base
    from gptqlora.commands.finetune import check_lora_targets
    from gptqlora.data.gsm8k import resolve_style
    from gptqlora.lora.layer import inject_lora_layers
    from gptqlora.models import resolve_device
    from gptqlora.provenance import base_record
    from gptqlora.train import seed_everything
    from gptqlora.verifier.model import VerifierModel, save_verifier, verifier_config
    from gptqlora.verifier.samples import read_samples
    from gptqlora.verifier.train import class_weights, flatten, split_questions, train_verifier, validate

    vc = args.verifier
    source = check_quantized_input(args.quantized)
    check_lora_targets(source, args.lora.lora_targets)
    records, sampled = read_samples(args.samples_dir)
    check_no_test_questions(records, args.data.data)
    base = base_record(source)  # the weights are fingerprinted once: checked against the samples', then recorded
    check_sampled_over(args.samples_dir, sampled, base)
    train_records, val_records = (split_questions(records, vc.val_questions, args.seed) if vc.val_questions
                                  else (records, []))
    items, val_items = flatten(train_records), flatten(val_records)
    class_weights([y for _, _, y in items], vc.balance)  # both classes present, before any model loads
    out = check_output(args.out, inputs=[source, args.samples_dir, local_data_dir(args.data.data)],
                       overwrite=args.overwrite)
    replace = args.overwrite or out.exists()  # an empty or --overwrite'd directory: check_output allowed it
    with OutputLock(out):
        model, tokenizer = load_quantized_base(args.quantized, args.model.dtype, resolve_device(args.model.device),
                                               args.model.kernel)
        style = resolve_style(args.prompt.prompt_style, tokenizer)
        seed_everything(args.seed)  # LoRA init
        lc = args.lora
        inject_lora_layers(model, lc.lora_targets, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, use_rslora=lc.rslora)
        verifier = VerifierModel(model)
        before = validate(verifier, tokenizer, val_items, style, vc.max_length) if val_items else None
        trained = train_verifier(verifier, tokenizer, items, vc, style=style, seed=args.seed)
        after = validate(verifier, tokenizer, val_items, style, vc.max_length) if val_items else None
        history = trained.pop("history")
        summary = {**trained, "val_before": before, "val_after": after,
                   "train_loss": history[-1]["loss"] if history else None}
        training = {"samples_dir": str(Path(args.samples_dir).resolve()), "samples": sampled,
                    "train_questions": len(train_records), "val_questions": len(val_records), "seed": args.seed,
                    "lora": {"r": lc.r, "alpha": lc.alpha, "dropout": lc.dropout, "targets": lc.lora_targets,
                             "rslora": lc.rslora},
                    "options": {k: getattr(vc, k) for k in vc.__dataclass_fields__}, "summary": summary}
        config = verifier_config(base, style, vc.max_length, model.config.hidden_size, training)
        with staged_dir(out, overwrite=replace) as tmp:
            save_verifier(verifier, tmp, config)
            (tmp / METRICS_FILE).write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in history))
    return summary | {"out": str(out), "base": base}
