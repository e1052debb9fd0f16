"""Train a verifier: a value head and its own LoRA over a quantized base, on a finished ``sample`` directory.

:func:`read_verifier_data` reads and checks everything before any output is touched (a test-split question, or no
example of one class, is refused; samples made over another base get a warning naming both); :func:`make_verifier`
trains (``gptqlora.verifier.train``) and writes the directory whole at the end: the LoRA in PEFT's format,
``value_head.safetensors``, ``verifier_config.json`` (its base: path and weights fingerprint) and ``metrics.jsonl``.
``gptqlora train-verifier`` and ``gptqlora run``'s verifier stage both call them.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

from gptqlora.config import LoRAConfig, ModelConfig, VerifierTrainConfig
from gptqlora.context import RunContext
from gptqlora.errors import UsageError
from gptqlora.files import staged_dir
from gptqlora.workflows.base import check_quantized_input, load_quantized_base, local_data_dir
from gptqlora.workflows.training import check_lora_targets

METRICS_FILE = "metrics.jsonl"

log = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class VerifierData:
    """What a verifier trains on, read and checked (``read_verifier_data``) before any output is touched."""

    quantized: str  # the base, as given
    source: Path  # the base's checked directory
    base: dict  # its record (path, weights fingerprint), checked against the samples' and written beside the verifier
    samples_dir: str
    sampled: dict  # the samples' sample_config.json
    data: str  # the GSM8K source (its test split guards against leaks)
    train_records: list[dict]
    val_records: list[dict]
    items: list[tuple[str, str, bool]]  # (question, solution, correct) of train_records
    val_items: list[tuple[str, str, bool]]


def read_verifier_data(quantized: str, samples_dir: str, data: str, lora_targets: str, vc: VerifierTrainConfig,
                       seed: int) -> VerifierData:
    """Check the base and the LoRA targets, read the samples (train split, no test question), fingerprint the base
    once (checked against the samples' base, then recorded) and split off ``vc.val_questions`` held-out questions.

    Raises:
        UsageError: see ``check_quantized_input``, ``check_lora_targets``, ``read_samples``,
            ``check_no_test_questions`` and ``class_weights`` (both classes must be present).
    """
    from gptqlora.provenance import base_record
    from gptqlora.verifier.samples import read_samples
    from gptqlora.verifier.train import class_weights, flatten, split_questions

    source = check_quantized_input(quantized)
    check_lora_targets(source, lora_targets)
    records, sampled = read_samples(samples_dir)
    check_no_test_questions(records, data)
    base = base_record(source)  # the weights are fingerprinted once: checked against the samples', then recorded
    check_sampled_over(samples_dir, sampled, base)
    train_records, val_records = (split_questions(records, vc.val_questions, seed) if vc.val_questions
                                  else (records, []))
    items, val_items = flatten(train_records), flatten(val_records)
    class_weights([y for _, _, y in items], vc.balance)  # both classes present, before any model loads
    return VerifierData(quantized, source, base, samples_dir, sampled, data, train_records, val_records, items,
                        val_items)


def make_verifier(run: RunContext, out: str | Path, vd: VerifierData, mc: ModelConfig, prompt_style: str,
                  lc: LoRAConfig, vc: VerifierTrainConfig, *, overwrite: bool = False) -> dict:
    """Claim ``out``, train the verifier on ``run.device`` with ``run.seed``, and write ``out`` whole at the end
    (an ``overwrite``'d one stays until then).

    Returns:
        The training summary (validation before and after, last train loss...), ``out`` and the base record.
    Raises:
        UsageError: see ``RunContext.output``.
    """
    from gptqlora.data.gsm8k import resolve_style
    from gptqlora.lora.layer import inject_lora_layers
    from gptqlora.seeding import seed_everything
    from gptqlora.verifier.model import VerifierModel, save_verifier, verifier_config
    from gptqlora.verifier.train import train_verifier, validate

    with run.output(out, inputs=[vd.source, vd.samples_dir, local_data_dir(vd.data)], overwrite=overwrite,
                    staged=True) as out:
        replace = overwrite or out.exists()  # an empty or --overwrite'd directory: the output check allowed it
        model, tokenizer = load_quantized_base(vd.quantized, mc.dtype, run.device, mc.kernel)
        style = resolve_style(prompt_style, tokenizer)
        seed_everything(run.seed)  # LoRA init
        inject_lora_layers(model, lc.lora_targets, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, use_rslora=lc.rslora)
        verifier = VerifierModel(model)
        before = validate(verifier, tokenizer, vd.val_items, style, vc.max_length) if vd.val_items else None
        trained = train_verifier(verifier, tokenizer, vd.items, vc, style=style, seed=run.seed)
        after = validate(verifier, tokenizer, vd.val_items, style, vc.max_length) if vd.val_items else None
        history = trained.pop("history")
        summary = {**trained, "val_before": before, "val_after": after,
                   "train_loss": history[-1]["loss"] if history else None}
        training = {"samples_dir": str(Path(vd.samples_dir).resolve()), "samples": vd.sampled,
                    "train_questions": len(vd.train_records), "val_questions": len(vd.val_records), "seed": run.seed,
                    "lora": {"r": lc.r, "alpha": lc.alpha, "dropout": lc.dropout, "targets": lc.lora_targets,
                             "rslora": lc.rslora},
                    "options": {k: getattr(vc, k) for k in vc.__dataclass_fields__}, "summary": summary}
        config = verifier_config(vd.base, style, vc.max_length, model.config.hidden_size, training)
        with staged_dir(out, overwrite=replace) as tmp:
            save_verifier(verifier, tmp, config)
            (tmp / METRICS_FILE).write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in history))
    return summary | {"out": str(out), "base": vd.base}
