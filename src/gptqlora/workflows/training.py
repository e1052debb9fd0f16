"""Train on a base: the training corpus and its held-out split, the LoRA targets checked before any load, and LoRA
trained over a prepared base (``gptqlora.workflows.base.prepare_base``) with the run's provenance recorded.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gptqlora.config import DataConfig, LoRAConfig, TrainConfig, TrainDataConfig
from gptqlora.context import RunContext
from gptqlora.errors import UsageError
from gptqlora.seeding import permutation, seed_everything


def gsm8k_source(data: DataConfig, train_data: TrainDataConfig) -> str:
    """The GSM8K directory or hub id of a fine-tuning run: the contamination reference and the calibration text
    (see ``gptqlora.data.corpora.gsm8k_reference``).

    Raises:
        UsageError: a mixture beside a local ``--data`` that is not a GSM8K directory.
    """
    from gptqlora.data.corpora import gsm8k_reference

    return gsm8k_reference(data.data, bool(train_data.mix))


def split_train(entries: list[dict], holdout: int, limit: int | None, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded shuffle of the training entries into (training examples, held-out examples for the eval loss).

    Raises:
        UsageError: when the held-out slice leaves no training example.
    """
    if holdout >= len(entries):
        raise UsageError(f"eval_holdout={holdout} holds out all {len(entries)} training examples: use a smaller "
                         "--eval-holdout")
    shuffled = [entries[i] for i in permutation(len(entries), seed)]
    held, rest = shuffled[:holdout], shuffled[holdout:]
    return (rest[:limit] if limit else rest), held


def load_training_data(data: DataConfig, train_data: TrainDataConfig, tc: TrainConfig,
                       seed: int) -> tuple[list[dict], list[dict], dict]:
    """The training corpus (``--train-mix``, else ``--data``: GSM8K, MetaMathQA or MathInstruct), without GSM8K test
    questions, checked for scorable answers, split into (training, held-out) examples, with the report of how it was
    made (``gptqlora.data.corpora.describe_report`` prints it).

    Raises:
        UsageError: see ``gsm8k_source``, ``gptqlora.data.corpora.build_training_set`` and ``split_train``.
    """
    from gptqlora.data.corpora import build_training_set
    from gptqlora.data.gsm8k import check_answers

    entries, report = build_training_set(train_data.mix or ((data.data, 1.0),), gsm8k_source(data, train_data),
                                         train_data.program_of_thought, seed)
    check_answers([e for e in entries if not e.get("program")], f"training data ({data.data})")
    train, held = split_train(entries, tc.eval_holdout, tc.train_limit, seed)
    return train, held, report


def check_resumable_training(out: Path) -> None:
    """A ``--resume``'s output check: ``out`` holds training checkpoints to continue.

    Raises:
        UsageError: ``out`` has no ``train_state/``.
    """
    if not (out / "train_state").is_dir():
        raise UsageError(f"--resume: {out} holds no training checkpoints (train_state/) to continue: run without "
                         "--resume to start")


def check_lora_targets(source: Path | None, targets: str) -> None:
    """Check the LoRA targets against the model's module names before anything loads or is quantized.

    The model is built on the meta device from its config.json (no weights, no memory); a hub id is checked after
    loading instead.

    Raises:
        UsageError: targets that select no linear layer, or a named target that matches none.
    """
    if source is None or not (source / "config.json").is_file():
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from gptqlora.lora.layer import find_targets

    config = AutoConfig.from_pretrained(source)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    find_targets(skeleton, targets)


def run_provenance(base_dir: Path, data: str, seed: int, data_report: dict | None = None) -> dict:
    """What a training run is made from: its base (path and weights fingerprint), data source and seed, and with
    ``data_report`` (``load_training_data``) its sources, their weights and what the contamination guard dropped."""
    from gptqlora.provenance import base_record

    record = {"base": base_record(base_dir), "data": data, "seed": seed}
    return record | ({"training_data": data_report} if data_report is not None else {})


def train_on_base(run: RunContext, model, tokenizer, base_dir: Path, train: list[dict], held: list[dict],
                  lc: LoRAConfig, tc: TrainConfig, style: str, data: str, *, overwrite: bool = False,
                  data_report: dict | None = None) -> dict:
    """Seed, inject LoRA and train; writes the adapter, metrics and checkpoints under ``tc.out``.

    Under torchrun every rank calls it (after ``prepare_base``) and trains its shard of each batch; rank 0 writes.

    Args:
        style: the prompt style (``--prompt-style``).
        data: the ``--data`` source, recorded in ``run_provenance.json``.
        overwrite: replace an earlier start's metrics that no checkpoint continues (``run --resume`` only).
        data_report: where the examples came from (``load_training_data``), recorded in ``run_provenance.json``;
            rank 0 prints it when training is done (a run refused on the way prints its one error line only).
    Returns:
        ``train_lora``'s summary.
    """
    from gptqlora.data.corpora import describe_report
    from gptqlora.data.gsm8k import GSM8KCoTDataset
    from gptqlora.lora.layer import inject_lora_layers
    from gptqlora.train import train_lora

    if run.world.distributed:
        run.say(f"global batch: {tc.batch_size} per process x {run.world.size} processes x {tc.grad_accum} "
                f"accumulation = {tc.batch_size * run.world.size * tc.grad_accum} examples per step",
                file=sys.stderr, flush=True)
    train_ds = GSM8KCoTDataset(train, tokenizer, style=style, max_length=tc.max_length)
    held_ds = GSM8KCoTDataset(held, tokenizer, style=style, max_length=tc.max_length) if held else None
    seed_everything(run.seed)  # LoRA init draws from the global RNG
    inject_lora_layers(model, lc.lora_targets, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, use_rslora=lc.rslora)
    summary = train_lora(model, tokenizer, train_ds, held_ds, tc, seed=run.seed, base_model_name_or_path=str(base_dir),
                         provenance=run_provenance(base_dir, data, run.seed, data_report), overwrite=overwrite)
    if data_report is not None:
        run.say(describe_report(data_report), file=sys.stderr, flush=True)
    return summary
