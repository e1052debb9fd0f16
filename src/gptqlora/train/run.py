"""One LoRA training run around its steps: the checks and the start (fresh and seeded, or resumed from the last
checkpoint), what the run decided once (``TrainRun``), a checkpoint, and the finish (the adapter and the loss curve).
``gptqlora.train.loop`` runs the steps between them.

Rank 0 alone writes (``TrainRun.record``, ``save``, ``finish``, and the start's preparation of ``out``); every rank
takes part in what is gathered (FSDP's shards, each rank's generator states), and the others wait at barriers.

``metrics.jsonl`` holds one strict-JSON record per line: a train step (``loss``, ``lr``, ``grad_norm``...), an
evaluation (``eval_loss``), or a ``warning`` (a resume that changed ``lr``, ``max_grad_norm`` or ``fsdp``). A
non-finite value is written as null and its key listed under ``non_finite`` (``state.finite_record``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import shutil
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from gptqlora import distributed
from gptqlora.config import TrainConfig
from gptqlora.data.gsm8k import collate, pad_token_id
from gptqlora.errors import OutputExistsError, UsageError
from gptqlora.files import append_durable, write_atomic
from gptqlora.hardware import free_memory, resolve_bf16
from gptqlora.lora.adapter import save_adapter
from gptqlora.lora.layer import adapter_state_dict, get_adapter_params, is_linear, lora_modules
from gptqlora.quant.linear import dense_copy_bytes, dequantize_once
from gptqlora.seeding import seed_everything
from gptqlora.train.parallel import check_fsdp, fully_sharded
from gptqlora.train.plot import plot_loss_curve
from gptqlora.train.schedule import count_total_steps
from gptqlora.train.state import (TrainState, check_world_size, describe_setting, finite_record, load_checkpoint,
                                  ranks_rng_state, resume_checkpoint, rng_state, save_checkpoint, snapshot, step_dirs)

log = logging.getLogger(__name__)

METRICS_FILE, STATE_DIR, ADAPTER_DIR, CURVE_FILE, PROVENANCE_FILE = (
    "metrics.jsonl", "train_state", "lora_adapter", "loss_curve.png", "run_provenance.json")
# What a run writes into --out; --overwrite deletes these (and nothing else: the CLI keeps quantized_base/ there).
RUN_OUTPUTS = (METRICS_FILE, STATE_DIR, ADAPTER_DIR, CURVE_FILE, PROVENANCE_FILE)
# TrainConfig fields that shape the trajectory: a resumed run must have the checkpoint's values...
TRAJECTORY_FIELDS = ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps",
                     "min_lr_ratio", "max_grad_norm", "max_length", "train_limit", "eval_holdout")
# ...but for these, the way out of a diverged run: a lower peak lr, another clipping norm (warned, and logged).
# FSDP may be switched on or off: it shards what DDP replicates, and the steps are the same up to float rounding.
RESUME_MAY_CHANGE = {"lr": ("lower only", lambda saved, now: now <= saved),
                     "max_grad_norm": ("any value", lambda saved, now: True),
                     "fsdp": ("on or off", lambda saved, now: True)}


# --dequantize-once auto: keep a step's dense weights when they take at most this share of the free memory.
DEQUANTIZE_ONCE_SHARE = 1 / 8


def resolve_dequantize_once(setting: str, model: nn.Module, device: torch.device) -> bool:
    """Whether each step keeps its quantized layers' dense weights (``quant.linear.dequantize_once``): ``on``, ``off``,
    or ``auto``: when the model has quantized layers whose dense copies take at most :data:`DEQUANTIZE_ONCE_SHARE` of
    ``device``'s free memory (not when that cannot be read)."""
    need = dense_copy_bytes(model)
    if setting != "auto" or need == 0:
        return setting == "on" and need > 0
    free = free_memory(device)
    return free is not None and need <= DEQUANTIZE_ONCE_SHARE * free


def earlier_run(out: Path) -> list[str]:
    """What in ``out`` shows an earlier run: its metrics.jsonl and its ``train_state/step-*`` directories."""
    found = [METRICS_FILE] if (out / METRICS_FILE).exists() else []
    return found + [f"{STATE_DIR}/{d.name}" for d in step_dirs(out / STATE_DIR)]


def clear_run_outputs(out: Path) -> None:
    """Delete what an earlier run wrote into ``out`` (``RUN_OUTPUTS``); anything else there is kept."""
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def jsonl(records: list[dict[str, Any]]) -> list[str]:
    """Strict-JSON lines (a NaN would make the file unreadable to strict parsers: ``finite_record`` first)."""
    return [json.dumps(r, allow_nan=False) + "\n" for r in records]


def trainable_report(model: nn.Module) -> dict[str, int | float]:
    """Trainable versus total parameters; a quantized linear counts its in x out weight, not its packed buffers."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    quantized = [m for m in model.modules() if is_linear(m) and not isinstance(m, nn.Linear)]
    total += sum(m.in_features * m.out_features for m in quantized)
    return {"trainable": trainable, "total": total, "trainable_percent": 100.0 * trainable / max(total, 1)}


def check_only_lora_trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """The LoRA parameters, after checking that they, and nothing else, require grad.

    Raises:
        ValueError: for a model without LoRA layers, a frozen LoRA parameter or another trainable parameter.
    """
    params = get_adapter_params(model)
    if not params:
        raise ValueError("the model has no LoRA layers: call inject_lora_layers(model, ...) before train_lora")
    lora_ids = {id(p) for p in params.values()}
    others = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in lora_ids]
    frozen = [n for n, p in params.items() if not p.requires_grad]
    if others or frozen:
        raise ValueError(f"only LoRA parameters may be trained, but {others[:3] or frozen[:3]} "
                         f"{'require grad' if others else 'are frozen'} ({len(others) + len(frozen)} in all): call "
                         "gptqlora.lora.mark_only_lora_trainable(model) first")
    return params


def run_fingerprint(model: nn.Module, train_dataset: Dataset, config: TrainConfig, seed: int, bf16: bool,
                    provenance: dict[str, Any] | None = None, world_size: int = 1) -> dict[str, Any]:
    """The settings a resume must match: trajectory config fields, seed, bf16, the LoRA layers, the data, and what
    the caller says the run is made from (``provenance["base"]`` as ``base``, the rest as ``provenance``); with
    several processes, their number (``world_size``; left out for one, as runs before torchrun recorded it), and
    ``fsdp`` when it is on (left out when off, as runs before it recorded it)."""
    modules = lora_modules(model)
    m = next(iter(modules.values()))
    h = hashlib.sha256()
    for i in range(len(train_dataset)):  # token ids and labels of every example, in dataset order
        item = train_dataset[i]
        h.update(item["input_ids"].numpy().tobytes() + b"|" + item["labels"].numpy().tobytes() + b"\n")
    return {**{k: getattr(config, k) for k in TRAJECTORY_FIELDS}, "seed": seed, "bf16": bf16,
            "lora_r": m.r, "lora_alpha": m.alpha, "lora_dropout": m.dropout_p, "lora_rslora": m.use_rslora,
            "lora_modules": sorted(modules), "train_examples": len(train_dataset), "train_data_sha256": h.hexdigest(),
            "base": (provenance or {}).get("base"),
            "provenance": {k: v for k, v in provenance.items() if k != "base"} if provenance else None,
            **({"world_size": world_size} if world_size > 1 else {}), **({"fsdp": True} if config.fsdp else {})}


@dataclasses.dataclass
class TrainRun:
    """What ``start_or_resume`` decided once for a run, and where the run stands (``state``)."""

    config: TrainConfig
    world: distributed.World
    device: torch.device
    pad_id: int
    bf16: bool
    dequantize_once: bool  # each step keeps its dense weights (``resolve_dequantize_once``)
    total_steps: int
    params: dict[str, nn.Parameter]  # the trained ones (FSDP's DTensors when sharded)
    optimizer: torch.optim.Optimizer
    fingerprint: dict[str, Any]
    state: TrainState
    held_out: DataLoader | None  # global batches of the held-out examples, or None
    on_metrics: Callable[[dict[str, Any]], None] | None
    resumed_from: int | None = None
    t0: float = dataclasses.field(default_factory=time.perf_counter)  # this segment's start

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    def autocast(self) -> AbstractContextManager:
        """The forward's autocast: bf16 when the run uses it."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else nullcontext()

    def step_weights(self) -> AbstractContextManager:
        """A step's context for its quantized layers: ``dequantize_once`` when the run keeps dense weights."""
        return dequantize_once() if self.dequantize_once else nullcontext()

    def elapsed(self) -> float:
        """Seconds of training so far, earlier segments of a resumed run included."""
        return self.state.elapsed + time.perf_counter() - self.t0

    def logged(self, r: dict[str, Any]) -> bool:
        """Whether a record goes to metrics.jsonl and on_metrics (every record goes to the history)."""
        return ("eval_loss" in r or "warning" in r or r["step"] % self.config.log_every == 0
                or r["step"] == self.total_steps)

    def record(self, r: dict[str, Any]) -> None:
        """Keep a record in the history (on every rank: the values are reduced, so every rank's is rank 0's);
        rank 0 appends it to metrics.jsonl and hands it to ``on_metrics`` when it is logged."""
        r = finite_record(r)
        self.state.history.append(r)
        if self.logged(r) and self.world.main:
            append_durable(self.out / METRICS_FILE, jsonl([r]))
            if self.on_metrics is not None:
                self.on_metrics(r)

    def warn(self, message: str) -> None:
        """Say it loudly, once (on rank 0): in the log and as a Python warning, which a caller's tests and filters
        can catch; raised at the line that called ``train_lora`` (through ``start_or_resume``)."""
        if self.world.main:
            log.warning(message)
            warnings.warn(message, stacklevel=4)


def start_or_resume(model: nn.Module, tokenizer, train_dataset: Dataset, eval_dataset: Dataset | None,
                    config: TrainConfig, *, seed: int, provenance: dict[str, Any] | None, overwrite: bool,
                    on_metrics: Callable[[dict[str, Any]], None] | None) -> TrainRun:
    """Refuse a bad start before any work, then start fresh (seeded) or restore adapter, optimizer, generators and
    position from the last checkpoint; rank 0 prepares ``out`` (the log is rewritten from the checkpoint's history,
    dropping lines of steps that ran after it and will run again). See ``train_lora`` for the errors."""
    params = check_only_lora_trainable(model)
    if len(train_dataset) == 0:
        raise UsageError("the training set is empty: give it examples (check --train-limit and --eval-holdout)")
    check_fsdp(config.fsdp, distributed.world())
    out = Path(config.out)
    if config.resume and overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite deletes it: pass only one of them")
    found = [] if config.resume else earlier_run(out)
    if found and not overwrite:
        raise OutputExistsError(f"{out} holds an earlier run ({', '.join(found[:3])}): pass --resume to continue it, "
                                "--overwrite to delete it and start again, or choose a new --out (nothing was written)")
    device = next(iter(params.values())).device
    world = distributed.init(str(device))  # a world of one without torchrun: no process group
    pad_id = pad_token_id(tokenizer)
    bf16 = resolve_bf16(config.bf16, device)
    global_batch = config.batch_size * world.size  # examples per micro-batch, all ranks together
    total_steps = count_total_steps(len(train_dataset), batch_size=global_batch, grad_accum=config.grad_accum,
                                    epochs=config.epochs, max_steps=config.max_steps)
    if config.fsdp:  # the parameters become sharded DTensors: the optimizer and the clipping take those
        params = get_adapter_params(fully_sharded(model, device, world.size))
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    fingerprint = run_fingerprint(model, train_dataset, config, seed, bf16, provenance, world.size)
    held_out = None  # read as training reads its data: global batches, each rank scoring its shard
    if eval_dataset is not None and len(eval_dataset) > 0:
        held_out = DataLoader(eval_dataset, batch_size=global_batch,
                              collate_fn=functools.partial(collate, pad_id=pad_id))
    once = resolve_dequantize_once(config.dequantize_once, model, device)
    run = TrainRun(config, world, device, pad_id, bf16, once, total_steps, params, optimizer, fingerprint,
                   TrainState(), held_out, on_metrics)

    changed: dict[str, tuple[Any, Any]] = {}
    if config.resume:
        checkpoint, skipped = resume_checkpoint(out / STATE_DIR)
        if skipped:
            run.warn(f"--resume: skipping incomplete checkpoint{'s' * (len(skipped) > 1)} "
                     f"{', '.join(str(d) for d in skipped)} (files are missing); continuing from {checkpoint}")
        check_world_size(checkpoint, world.size)
        run.state, changed = load_checkpoint(checkpoint, model, optimizer, fingerprint, RESUME_MAY_CHANGE, world.rank)
        run.resumed_from = run.state.step
    else:
        seed_everything(seed)
        torch.manual_seed(seed + world.rank)  # LoRA dropout: a stream per rank (rank 0's is the one-process run's)
    distributed.barrier()  # every rank has read what it needs from out before rank 0 changes it
    if world.main:
        if found:  # overwrite (a fresh start): the refusal above let it through
            clear_run_outputs(out)
        out.mkdir(parents=True, exist_ok=True)
        if provenance is not None and not config.resume:
            write_atomic(out / PROVENANCE_FILE, json.dumps(provenance, indent=2, allow_nan=False) + "\n")
        write_atomic(out / METRICS_FILE, "".join(jsonl([r for r in run.state.history if run.logged(r)])))
    run.t0 = time.perf_counter()  # state.elapsed holds the earlier segments' seconds

    for key, (saved, now) in changed.items():  # accepted changes of settings: said, and kept in the log
        message = (f"resumed at step {run.state.step} with {key} {describe_setting(key, now)} "
                   f"(checkpoint {describe_setting(key, saved)})")
        run.warn(message)
        run.record({"step": run.state.step, "warning": message})
    return run


def save(run: TrainRun, model: nn.Module) -> None:
    """A checkpoint of the step just taken: every rank hands over its generator states and gathers FSDP's shards,
    rank 0 writes, and no rank runs ahead of a checkpoint that may yet fail to be written."""
    elapsed = run.elapsed()
    rng = ranks_rng_state(distributed.gather_objects(rng_state()))  # a world of one: this process's
    tensors = snapshot(model, run.optimizer)
    if run.world.main:
        save_checkpoint(run.out / STATE_DIR, tensors, dataclasses.replace(run.state, elapsed=elapsed), run.fingerprint,
                        rng)
    distributed.barrier()


def finish(run: TrainRun, model: nn.Module, base_model_name_or_path: str | None,
           provenance: dict[str, Any] | None) -> dict[str, Any]:
    """Write the final adapter and the loss curve (rank 0; every rank gathers FSDP's shards); the run's summary."""
    seconds = run.elapsed()
    out, state = run.out, run.state
    base = (provenance or {}).get("base")
    base_name = (base_model_name_or_path or (base or {}).get("path") or getattr(model.config, "name_or_path", "")
                 or "")
    adapter_dir, curve = out / ADAPTER_DIR, out / CURVE_FILE
    weights = adapter_state_dict(model)
    if run.world.main:
        adapter_dir = save_adapter(model, adapter_dir, base_model_name_or_path=base_name, base=base, weights=weights)
        curve = plot_loss_curve(state.history, curve)
    distributed.barrier()  # the adapter is on disk before any rank returns (``run`` evaluates it next)
    train_losses = [r["loss"] for r in state.history if "loss" in r]
    eval_losses = [r["eval_loss"] for r in state.history if "eval_loss" in r]
    return {"steps": state.step, "train_loss": train_losses[-1] if train_losses else None,
            "eval_loss_before": eval_losses[0] if eval_losses else None,
            "eval_loss_after": eval_losses[-1] if eval_losses else None,
            "seconds": seconds, "tokens": state.tokens, "tokens_per_s": state.tokens / max(seconds, 1e-9),
            "bf16": run.bf16, "dequantize_once": run.dequantize_once, "resumed_from": run.resumed_from, "trainable": trainable_report(model),
            "adapter": str(adapter_dir), "metrics": str(out / METRICS_FILE), "loss_curve": str(curve),
            "train_state": str(out / STATE_DIR),
            "provenance": str(out / PROVENANCE_FILE) if (out / PROVENANCE_FILE).is_file() else None,
            "warnings": [r["warning"] for r in state.history if "warning" in r]}
