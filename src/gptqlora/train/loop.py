"""The LoRA training loop: AdamW on the adapter only, over a frozen (often quantized) base; reads top to bottom.

Each optimizer step reads ``grad_accum`` micro-batches, weighs every label token equally across all of them
(the summed NLL of a micro-batch is divided by the label tokens of the whole step, so the accumulated gradient is
that of the step's token-weighted mean loss, however the step is split into micro-batches), clips, and updates.
The data order is a permutation per epoch drawn from ``torch.Generator().manual_seed(seed + epoch)``, so the run's
position is just (epoch, micro-batch index) and a resumed run reads exactly the micro-batches that come next.
A fresh run seeds every global generator from ``seed`` (LoRA dropout draws from torch's); a resumed run restores
the checkpoint's generator states instead, so both end where an uninterrupted run would.

Under torchrun (``gptqlora.distributed``) the adapter is trained by DistributedDataParallel: ``batch_size`` is per
process, every rank reads the same global micro-batches of ``batch_size x processes`` examples (the micro-batches
of a one-process run with that batch size) and trains on its contiguous shard of each; the gradients are averaged
across ranks on the last micro-batch of a step only (DDP ``no_sync`` before it). Each rank's summed NLL is scaled
by the process count, so the averaged gradient is the one-process run's; losses and token counts are reduced, so
the log is the one-process run's too, up to float rounding. Rank 0 alone writes files; the others wait at barriers.

With ``config.fsdp`` the model is sharded by FSDP2 instead (``parallel.fully_sharded``): each rank keeps a shard of
every parameter, the LoRA weights with their gradients and AdamW states as well as the frozen float ones, and the
packed base stays whole on every rank (buffers). The data, the loss scaling and the log are DDP's (FSDP's
reduce-scatter averages as DDP does; ``set_requires_gradient_sync`` stands for ``no_sync``); every rank runs every
forward, the held-out loss's too. Checkpoints and the adapter are gathered whole by every rank and written by rank 0,
in the files a one-process run writes; a resume cuts them into the shards again.

``metrics.jsonl`` holds one strict-JSON record per line: a train step (``loss``, ``lr``, ``grad_norm``...), an
evaluation (``eval_loss``), or a ``warning`` (a resume that changed ``lr``, ``max_grad_norm`` or ``fsdp``). A
non-finite value is written as null and its key listed under ``non_finite``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import math
import random
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from gptqlora import distributed
from gptqlora.config import TrainConfig
from gptqlora.data.gsm8k import IGNORE_INDEX, collate
from gptqlora.errors import OutputExistsError, UsageError
from gptqlora.eval.loss import answer_token_loss
from gptqlora.files import append_durable, write_atomic
from gptqlora.hardware import resolve_bf16
from gptqlora.lora.adapter import save_adapter
from gptqlora.lora.layer import adapter_state_dict, get_adapter_params, is_linear, lora_modules
from gptqlora.train.parallel import (check_fsdp, data_parallel, fully_sharded, gradient_sync, has_labels, rank_shard,
                                     sharded_answer_loss)
from gptqlora.train.plot import plot_loss_curve
from gptqlora.train.schedule import count_total_steps, get_lr
from gptqlora.train.state import (TrainState, check_world_size, describe_setting, finite_record, latest_checkpoint,
                                  load_checkpoint, ranks_rng_state, resume_checkpoint, rng_state, save_checkpoint,
                                  snapshot, step_dirs)

log = logging.getLogger(__name__)

# TrainConfig fields that shape the trajectory: a resumed run must have the checkpoint's values...
TRAJECTORY_FIELDS = ("epochs", "max_steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_steps",
                     "min_lr_ratio", "max_grad_norm", "max_length", "train_limit", "eval_holdout")
# ...but for these, the way out of a diverged run: a lower peak lr, another clipping norm (warned, and logged).
# FSDP may be switched on or off: it shards what DDP replicates, and the steps are the same up to float rounding.
RESUME_MAY_CHANGE = {"lr": ("lower only", lambda saved, now: now <= saved),
                     "max_grad_norm": ("any value", lambda saved, now: True),
                     "fsdp": ("on or off", lambda saved, now: True)}
METRICS_FILE, STATE_DIR, ADAPTER_DIR, CURVE_FILE, PROVENANCE_FILE = (
    "metrics.jsonl", "train_state", "lora_adapter", "loss_curve.png", "run_provenance.json")
# What a run writes into --out; --overwrite deletes these (and nothing else: the CLI keeps quantized_base/ there).
RUN_OUTPUTS = (METRICS_FILE, STATE_DIR, ADAPTER_DIR, CURVE_FILE, PROVENANCE_FILE)


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) of an optimizer step is NaN or infinite; the step was not applied.

    Its message is one line saying what to do: resume from the last checkpoint (all of whose steps were finite)
    with a lower ``--lr`` or another ``--max-grad-norm``, which a resume accepts, or start again.
    """

    def __init__(self, step: int, value: float = math.nan, what: str = "training loss", checkpoint: Path | None = None):
        self.step, self.value, self.checkpoint = step, value, checkpoint
        where = (f"the last good checkpoint, {checkpoint}, is kept: continue with --resume and a lower --lr or "
                 "another --max-grad-norm" if checkpoint else
                 "no checkpoint was written yet: rerun with --overwrite and a lower --lr or another --max-grad-norm")
        super().__init__(f"non-finite {what} ({value}) at step {step}; training stopped before applying it, and "
                         f"{where}")


def seed_everything(seed: int) -> None:
    """Seed every global generator a run draws from: torch's (CPU and every CUDA device), Python's, NumPy's.

    Call it before ``inject_lora_layers`` so the LoRA init is seeded too; ``train_lora`` calls it on a fresh
    start (LoRA dropout draws from torch's generator). The data order has its own generators and needs none.
    """
    random.seed(seed)
    torch.manual_seed(seed)  # seeds the CUDA devices as well
    torch.cuda.manual_seed_all(seed)  # explicit, and deferred until CUDA initialises
    try:
        import numpy as np
    except ImportError:  # NumPy is optional: nothing of ours draws from it
        return
    np.random.seed(seed % 2**32)


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


def micro_batches(dataset: Dataset, batch_size: int, pad_id: int, seed: int, epoch: int, batch_index: int
                  ) -> Iterator[tuple[dict[str, torch.Tensor], int, int]]:
    """Micro-batches from position (epoch, batch_index) on, forever; each with the position of the one after it.

    Epoch ``e`` reads ``randperm(len(dataset), generator=manual_seed(seed + e))`` in chunks of ``batch_size``.
    The loader gets that generator too, so building it draws nothing from the global RNG (LoRA dropout's).
    """
    n_batches = math.ceil(len(dataset) / batch_size)
    while True:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(len(dataset), generator=g).tolist()
        loader = DataLoader(dataset, batch_size=batch_size, sampler=order[batch_index * batch_size:],
                            collate_fn=functools.partial(collate, pad_id=pad_id), generator=g)
        for batch in loader:
            batch_index += 1
            if batch_index == n_batches:
                epoch, batch_index = epoch + 1, 0
            yield batch, epoch, batch_index  # the loader ends with (epoch, batch_index) at (next epoch, 0)


def label_nll(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device | None = None) -> torch.Tensor:
    """Summed NLL of a micro-batch's label tokens, differentiable; only labelled rows of the logits reach fp32.

    The label positions are found where the batch is: give a CPU batch and the model's ``device`` (the tensors
    are copied there without waiting) and the call never waits for the device, as ``.item()``, a boolean mask or a
    blocking copy on it would.
    """
    input_ids, labels = batch["input_ids"], batch["labels"]  # [B, T]
    device = device if device is not None else input_ids.device

    def to_device(t: torch.Tensor) -> torch.Tensor:  # host -> device needs no sync: the source is staged at once
        return t.to(device, non_blocking=True)

    keep = labels[:, 1:] != IGNORE_INDEX  # [B, T-1]: position t predicts labels[t + 1]
    first = int(keep.any(0).nonzero()[0])  # logits from the first position that predicts a label on
    rows, cols = keep[:, first:].nonzero(as_tuple=True)  # [N] each, row-major as a boolean mask selects
    targets = labels[:, first + 1:][rows, cols]  # [N]
    logits = model(input_ids=to_device(input_ids), attention_mask=to_device(batch["attention_mask"]),
                   use_cache=False, logits_to_keep=input_ids.shape[1] - first).logits  # [B, T - first, V]
    picked = logits[to_device(rows), to_device(cols)]  # [N, V]; cols < T - first - 1: the last row predicts nothing
    return F.cross_entropy(picked.float(), to_device(targets), reduction="sum")


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


def _enable_checkpointing(model: nn.Module) -> Callable[[], None]:
    """Switch on Hugging Face activation (gradient) checkpointing, non-reentrant; returns the undo.

    Non-reentrant checkpointing passes gradients to parameters inside a block even when the block's input (the
    frozen embedding's output) needs none, so no input-grad hook is needed; transformers >= 5 adds one anyway
    (``enable_input_require_grads``), and the undo removes it again unless the caller had set it before.
    """
    had_hook = bool(getattr(model, "_require_grads_hooks", None))
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 renamed the methods
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def undo() -> None:
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
        if not had_hook and hasattr(model, "disable_input_require_grads"):
            model.disable_input_require_grads()

    return undo


def _jsonl(records: list[dict[str, Any]]) -> list[str]:
    """Strict-JSON lines (a NaN would make the file unreadable to strict parsers: ``finite_record`` first)."""
    return [json.dumps(r, allow_nan=False) + "\n" for r in records]


def _warn(message: str) -> None:
    """Say it loudly: in the log and as a Python warning (which a caller's tests and filters can catch)."""
    log.warning(message)
    warnings.warn(message, stacklevel=3)


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


def train_lora(model: nn.Module, tokenizer, train_dataset: Dataset, eval_dataset: Dataset | None,
               config: TrainConfig, *, seed: int = 0, progress: bool = True,
               on_metrics: Callable[[dict[str, Any]], None] | None = None,
               base_model_name_or_path: str | None = None, provenance: dict[str, Any] | None = None,
               overwrite: bool = False) -> dict[str, Any]:
    """Train the model's LoRA adapters; write metrics, checkpoints, the final adapter and a loss curve.

    Under torchrun every rank calls it with the same arguments and the same (seeded) model; the process group is
    joined here if the caller has not (``distributed.init``). ``config.batch_size`` is per process: a step reads
    ``batch_size x processes x grad_accum`` examples. Rank 0 alone writes; a resume needs the same process count.
    With ``config.fsdp`` the model is FSDP-sharded in place and stays so: each of its forwards is then a collective
    that every rank must run (the adapter on disk is the run's result).

    Args:
        model: a causal LM with LoRA injected and only LoRA trainable; trained in place.
        tokenizer: gives the pad id (its eos when it has no pad token).
        train_dataset: items of 1-D ``input_ids``, ``attention_mask``, ``labels`` (``GSM8KCoTDataset``).
        eval_dataset: held-out items for the eval loss at step 0, every ``eval_every`` steps and at the end; or None.
        config: the training options; ``config.out`` receives ``metrics.jsonl``, ``train_state/``,
            ``lora_adapter/``, ``loss_curve.png`` and ``run_provenance.json``.
        seed: seeds the data order and, on a fresh start, every global generator (``seed_everything``); names the
            run: a resume must use the same seed.
        progress: show a tqdm bar (on rank 0).
        on_metrics: called with each metrics record (train step, eval or warning) as it is logged (on rank 0).
        base_model_name_or_path: recorded in the adapter config; by default the provenance's base path, else the
            model's ``name_or_path``.
        provenance: what the run is made from, e.g. ``{"base": base_record(dir), "data": "gsm8k", "seed": 0}``.
            Part of the run's fingerprint (a resume over another base is refused, naming both), written to
            ``run_provenance.json`` on a fresh start, and ``base`` is recorded beside the final adapter.
        overwrite: start fresh even though ``out`` holds an earlier run: its outputs (``RUN_OUTPUTS``) are deleted
            first. Without it such an ``out`` is refused.
    Returns:
        A summary: steps, train_loss (last step), eval_loss_before/after, seconds, tokens, tokens_per_s, bf16,
        resumed_from, trainable (``trainable_report``) and the paths written.
    Raises:
        UsageError: for an empty training set, ``resume`` with ``overwrite``, ``config.fsdp`` in a run of one
            process, a resume whose checkpoint has other settings (only a lower lr, another max_grad_norm or fsdp
            switched is accepted, with a warning), another process count, or is damaged, or whose ``train_state``
            holds only incomplete checkpoints.
        InputNotFoundError: for ``config.resume`` without a checkpoint in ``config.out``.
        OutputExistsError: for a fresh run, without ``overwrite``, in an ``out`` that holds an earlier run's
            metrics.jsonl or checkpoints; raised before any work.
        ValueError: for a model with other trainable parameters.
        NonFiniteLossError: when a step's loss or gradient norm is not finite; the step is not applied, and the last
            checkpoint (from a finite step) stays.
    """
    params = check_only_lora_trainable(model)
    if len(train_dataset) == 0:
        raise UsageError("the training set is empty: give it examples (check --train-limit and --eval-holdout)")
    check_fsdp(config.fsdp, distributed.world())
    out = Path(config.out)
    state_dir, metrics_path = out / STATE_DIR, out / METRICS_FILE
    if config.resume and overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite deletes it: pass only one of them")
    found = [] if config.resume else earlier_run(out)
    if found and not overwrite:
        raise OutputExistsError(f"{out} holds an earlier run ({', '.join(found[:3])}): pass --resume to continue it, "
                                "--overwrite to delete it and start again, or choose a new --out (nothing was written)")
    device = next(iter(params.values())).device
    world = distributed.init(str(device))  # a world of one without torchrun: everything below as ever
    main = world.main
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bf16 = resolve_bf16(config.bf16, device)
    global_batch = config.batch_size * world.size  # examples per micro-batch, all ranks together
    total_steps = count_total_steps(len(train_dataset), batch_size=global_batch, grad_accum=config.grad_accum,
                                    epochs=config.epochs, max_steps=config.max_steps)
    if config.fsdp:  # the parameters become sharded DTensors: the optimizer and the clipping take those
        params = get_adapter_params(fully_sharded(model, device, world.size))
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    fingerprint = run_fingerprint(model, train_dataset, config, seed, bf16, provenance, world.size)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    eval_loader = None
    if eval_dataset is not None and len(eval_dataset) > 0 and not world.distributed:
        eval_loader = DataLoader(eval_dataset, batch_size=config.batch_size,
                                 collate_fn=functools.partial(collate, pad_id=pad_id))

    def logged(r: dict[str, Any]) -> bool:
        """Whether a record goes to metrics.jsonl and on_metrics (every record goes to the history)."""
        return ("eval_loss" in r or "warning" in r or r["step"] % config.log_every == 0
                or r["step"] == total_steps)

    # Start fresh, or restore adapter, optimizer, RNG and position (the log is rewritten from the checkpoint's
    # history, dropping lines of steps that ran after it and will run again).
    changed: dict[str, tuple[Any, Any]] = {}
    if config.resume:
        checkpoint, skipped = resume_checkpoint(state_dir)
        if skipped and main:
            _warn(f"--resume: skipping incomplete checkpoint{'s' * (len(skipped) > 1)} "
                  f"{', '.join(str(d) for d in skipped)} (files are missing); continuing from {checkpoint}")
        check_world_size(checkpoint, world.size)
        state, changed = load_checkpoint(checkpoint, model, optimizer, fingerprint, RESUME_MAY_CHANGE, world.rank)
    else:
        seed_everything(seed)
        if world.distributed:  # LoRA dropout: a stream per rank (rank 0 keeps the one-process run's)
            torch.manual_seed(seed + world.rank)
        state = TrainState()
    distributed.barrier()  # every rank has read what it needs from out before rank 0 changes it
    if main:
        if found:  # overwrite (a fresh start): the refusal above let it through
            clear_run_outputs(out)
        out.mkdir(parents=True, exist_ok=True)
        if provenance is not None and not config.resume:
            write_atomic(out / PROVENANCE_FILE, json.dumps(provenance, indent=2, allow_nan=False) + "\n")
        write_atomic(metrics_path, "".join(_jsonl([r for r in state.history if logged(r)])))
    resumed_from = state.step if config.resume else None
    t0 = time.perf_counter()  # this segment's start; state.elapsed holds the earlier segments' seconds

    def record(r: dict[str, Any]) -> None:
        r = finite_record(r)
        state.history.append(r)  # on every rank: the values are reduced, so every rank's history is rank 0's
        if logged(r) and main:
            append_durable(metrics_path, _jsonl([r]))
            if on_metrics is not None:
                on_metrics(r)

    def evaluate() -> None:
        if eval_loader is not None:
            with autocast():
                result = answer_token_loss(model, eval_loader, device)
        elif world.distributed and eval_dataset is not None and len(eval_dataset) > 0:
            with autocast():
                result = sharded_answer_loss(model, eval_dataset, config.batch_size, pad_id, device, world)
        else:
            return
        record({"step": state.step, "eval_loss": result["loss"], "eval_tokens": result["tokens"],
                "elapsed": state.elapsed + time.perf_counter() - t0})

    for key, (saved, now) in changed.items():  # accepted changes of settings: said, and kept in the log
        message = (f"resumed at step {state.step} with {key} {describe_setting(key, now)} "
                   f"(checkpoint {describe_setting(key, saved)})")
        if main:
            _warn(message)
        record({"step": state.step, "warning": message})

    was_training = model.training
    undo_checkpointing = _enable_checkpointing(model) if config.gradient_checkpointing else lambda: None
    model.train()  # LoRA dropout active; a frozen base in train mode changes nothing else for LLaMA
    # What the training forward runs through: DDP's wrapper, or the model (FSDP's hooks are on it).
    trained = data_parallel(model) if world.distributed and not config.fsdp else model
    # Every rank reads the global micro-batches (those of a one-process run with batch_size x processes).
    batches = micro_batches(train_dataset, global_batch, pad_id, seed, state.epoch, state.batch_index)
    bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", disable=not (progress and main))
    try:
        if state.step == 0 and not state.history:
            evaluate()  # before any update: the "before" of the log
        while state.step < total_steps:
            step_start = time.perf_counter()
            lr = get_lr(state.step, peak_lr=config.lr, warmup_steps=config.warmup_steps, total_steps=total_steps,
                        min_lr_ratio=config.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr

            # Read the whole step first, to weigh each label token by 1 / (label tokens in the step). The batches
            # stay on the CPU until label_nll moves them: counting labels there never waits for the device.
            micro = [next(batches) for _ in range(config.grad_accum)]
            n_labels = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b, _, _ in micro)
            n_tokens = sum(int(b["attention_mask"].sum()) for b, _, _ in micro)
            if n_labels == 0:
                raise UsageError(f"step {state.step + 1} has no label tokens: check the dataset's label masking "
                                 "(or raise --max-length: every answer may have been truncated away)")
            nlls = []
            if not world.distributed:
                for batch, _, _ in micro:
                    if not has_labels(batch):
                        continue
                    with autocast():
                        nll = label_nll(model, batch, device)  # summed over the micro-batch's label tokens
                    (nll / n_labels).backward()
                    nlls.append(nll.detach())
                loss = sum(torch.stack(nlls).tolist()) / n_labels  # one host sync per step; a float64 sum, as ever
            else:
                labelled = [batch for batch, _, _ in micro if has_labels(batch)]  # the same on every rank
                for i, batch in enumerate(labelled):
                    part, counts = rank_shard(batch, world.rank, world.size)
                    # Gradients are averaged across ranks in the step's last backward only.
                    with gradient_sync(trained, i == len(labelled) - 1):
                        with autocast():
                            nll = label_nll(trained, part, device)  # summed over this rank's label tokens
                        # x processes: DDP and FSDP average, and the step's gradient is the sum over all ranks' tokens
                        (nll / n_labels * (world.size if counts else 0)).backward()
                    if counts:
                        nlls.append(nll.detach())
                mine = sum(torch.stack(nlls).tolist()) if nlls else 0.0
                loss = sum(distributed.gather_objects(mine)) / n_labels  # in rank order: equal on every rank
            max_norm = config.max_grad_norm if config.max_grad_norm > 0 else math.inf  # inf: measure, don't clip
            # Over every rank's shards under FSDP (the norm of the whole gradient, a DTensor: made whole to read it)
            grad_norm = float(distributed.full_tensor(torch.nn.utils.clip_grad_norm_(list(params.values()), max_norm)))
            for value, what in ((loss, "training loss"), (grad_norm, "gradient norm")):
                if not math.isfinite(value):  # before optimizer.step: the bad update is never applied nor saved
                    raise NonFiniteLossError(state.step + 1, value, what, latest_checkpoint(state_dir))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            _, state.epoch, state.batch_index = micro[-1]
            state.step += 1
            state.tokens += n_tokens
            now = time.perf_counter()
            tokens_per_s = n_tokens / max(now - step_start, 1e-9)
            record({"step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": state.tokens,
                    "tokens_per_s": tokens_per_s, "elapsed": state.elapsed + now - t0})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
            if state.step % config.eval_every == 0 or state.step == total_steps:
                evaluate()
            if state.step % config.save_every == 0 or state.step == total_steps:
                elapsed = state.elapsed + time.perf_counter() - t0
                rng = ranks_rng_state(distributed.gather_objects(rng_state())) if world.distributed else None
                tensors = snapshot(model, optimizer)  # on every rank: FSDP's shards are gathered
                if main:
                    save_checkpoint(state_dir, tensors, dataclasses.replace(state, elapsed=elapsed), fingerprint, rng)
                distributed.barrier()  # no rank runs ahead of a checkpoint that may yet fail to be written
    finally:
        bar.close()
        undo_checkpointing()
        model.train(was_training)
    del trained  # drops DDP's hooks on the LoRA parameters
    seconds = state.elapsed + time.perf_counter() - t0

    base = (provenance or {}).get("base")
    base_name = (base_model_name_or_path or (base or {}).get("path") or getattr(model.config, "name_or_path", "")
                 or "")
    adapter_dir, curve = out / ADAPTER_DIR, out / CURVE_FILE
    weights = adapter_state_dict(model)  # on every rank: FSDP's shards are gathered
    if main:
        adapter_dir = save_adapter(model, adapter_dir, base_model_name_or_path=base_name, base=base, weights=weights)
        curve = plot_loss_curve(state.history, curve)
    distributed.barrier()  # the adapter is on disk before any rank returns (``run`` evaluates it next)
    train_losses = [r["loss"] for r in state.history if "loss" in r]
    eval_losses = [r["eval_loss"] for r in state.history if "eval_loss" in r]
    return {"steps": state.step, "train_loss": train_losses[-1] if train_losses else None,
            "eval_loss_before": eval_losses[0] if eval_losses else None,
            "eval_loss_after": eval_losses[-1] if eval_losses else None,
            "seconds": seconds, "tokens": state.tokens, "tokens_per_s": state.tokens / max(seconds, 1e-9),
            "bf16": bf16, "resumed_from": resumed_from, "trainable": trainable_report(model),
            "adapter": str(adapter_dir), "metrics": str(metrics_path), "loss_curve": str(curve),
            "train_state": str(state_dir),
            "provenance": str(out / PROVENANCE_FILE) if (out / PROVENANCE_FILE).is_file() else None,
            "warnings": [r["warning"] for r in state.history if "warning" in r]}
