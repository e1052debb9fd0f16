"""The LoRA training loop: AdamW on the adapter only, over a frozen (often quantized) base; reads top to bottom.

``train_lora`` is four parts: ``start_or_resume`` (refuse a bad start before any work, then start fresh or restore a
checkpoint), ``train_step`` (one optimizer step: ``gptqlora.train.step``), ``save`` (a checkpoint) and ``finish``
(the adapter and the loss curve), with the held-out ``evaluate`` between steps. The start, the checkpoint and the
finish, and what a run decides once (``TrainRun``), are ``gptqlora.train.run``'s.

Over a quantized base a step dequantizes each weight once when memory allows (``run.step_weights``, the
``--dequantize-once`` decision made once per run), and ``--compile-blocks`` compiles each decoder block under the same
checkpointing (``_compile_blocks``).

The data order is a permutation per epoch, ``seeding.permutation(n, seed + epoch)``, so the run's position is just
(epoch, micro-batch index) and a resumed run reads exactly the micro-batches that come next.
A fresh run seeds every global generator from ``seed`` (LoRA dropout draws from torch's); a resumed run restores
the checkpoint's generator states instead, so both end where an uninterrupted run would.

Under torchrun (``gptqlora.distributed``) ``batch_size`` is per process: every rank reads the same global
micro-batches of ``batch_size x processes`` examples (the micro-batches of a one-process run with that batch size)
and trains on its shard of each, with the one step path of a single process (``train.step``). The adapter is
trained by DistributedDataParallel, or with ``config.fsdp`` sharded by FSDP2 (``parallel.fully_sharded``): each rank
keeps a shard of every parameter, the LoRA weights with their gradients and AdamW states as well as the frozen float
ones, and the packed base stays whole on every rank (buffers); every rank then runs every forward, the held-out
loss's too. Losses and token counts are reduced, so the log is the one-process run's up to float rounding. Rank 0
alone writes files (checkpoints and the adapter gathered whole by every rank: the files a one-process run writes; a
resume cuts them into the shards again); the others wait at barriers.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from gptqlora.config import TrainConfig
from gptqlora.data.gsm8k import collate
from gptqlora.errors import UsageError
from gptqlora.loss import answer_token_loss, label_count
from gptqlora.seeding import permutation
from gptqlora.train.parallel import data_parallel
from gptqlora.train.run import STATE_DIR, TrainRun, finish, save, start_or_resume
from gptqlora.train.schedule import get_lr
from gptqlora.train.state import latest_checkpoint
from gptqlora.train.step import accumulate_gradients, apply_update


def micro_batches(dataset: Dataset, batch_size: int, pad_id: int, seed: int, epoch: int, batch_index: int
                  ) -> Iterator[tuple[dict[str, torch.Tensor], int, int]]:
    """Micro-batches from position (epoch, batch_index) on, forever; each with the position of the one after it.

    Epoch ``e`` reads ``permutation(len(dataset), seed + e)`` in chunks of ``batch_size``. The loader gets a
    generator of its own, so iterating it draws nothing from the global RNG (LoRA dropout's).
    """
    n_batches = math.ceil(len(dataset) / batch_size)
    while True:
        order = permutation(len(dataset), seed + epoch)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=order[batch_index * batch_size:],
                            collate_fn=functools.partial(collate, pad_id=pad_id), generator=torch.Generator())
        for batch in loader:
            batch_index += 1
            if batch_index == n_batches:
                epoch, batch_index = epoch + 1, 0
            yield batch, epoch, batch_index  # the loader ends with (epoch, batch_index) at (next epoch, 0)


def _enable_checkpointing(model: nn.Module, every: int = 1) -> Callable[[], None]:
    """Switch on Hugging Face activation (gradient) checkpointing, non-reentrant, for one decoder block in ``every``
    (blocks 0, every, 2 * every, ...; the others keep their activations); returns the undo.

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
    for i, block in enumerate(_blocks(model)):  # each block reads its own flag at every call
        block.gradient_checkpointing = i % every == 0

    def undo() -> None:
        if hasattr(model, "activation_checkpointing_disable"):
            model.activation_checkpointing_disable()
        else:
            model.gradient_checkpointing_disable()
        if not had_hook and hasattr(model, "disable_input_require_grads"):
            model.disable_input_require_grads()

    return undo


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The model's decoder blocks: the modules transformers checkpoints (``GradientCheckpointingLayer``)."""
    # Imported here: transformers.modeling_layers imports triton where it is installed, which must not happen at
    # import time (triton's interpreter mode is chosen before its first import: tests/quant/kernels).
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _compile_blocks(model: nn.Module, checkpointing: bool, every: int = 1) -> Callable[[], None]:
    """Compile each decoder block's forward with ``torch.compile``, checkpointed (non-reentrant) when asked, one
    block in ``every`` as ``_enable_checkpointing`` does; returns the undo.

    Hugging Face's checkpointing wraps the block class's own forward, which would bypass a compiled one, so here
    the block's compiled forward is what is checkpointed, in place of theirs (their hooks stay outside, as theirs
    do). Quantized layers are one opaque op inside the graph (``quant.linear``), whose backward is the backend's.
    """
    blocks = _blocks(model)
    if not blocks:
        raise UsageError(f"--compile-blocks: {type(model).__name__} has no decoder blocks that transformers marks "
                         "as such (GradientCheckpointingLayer)")
    for i, block in enumerate(blocks):
        forward = torch.compile(block.forward)  # one graph per block shape: the blocks share it
        checkpointed = checkpointing and i % every == 0
        block.forward = functools.partial(checkpoint, forward, use_reentrant=False) if checkpointed else forward

    def undo() -> None:
        for block in blocks:
            del block.forward  # the class's forward again

    return undo


def train_step(run: TrainRun, model: nn.Module, batches: Iterator[tuple[dict[str, torch.Tensor], int, int]]
               ) -> dict[str, Any]:
    """One optimizer step over the next ``grad_accum`` global micro-batches, logged; returns its record.

    Raises:
        UsageError: when the step's micro-batches hold no label token.
        NonFiniteLossError: see ``apply_update``; the step is not applied.
    """
    config, state = run.config, run.state
    start = time.perf_counter()
    lr = get_lr(state.step, peak_lr=config.lr, warmup_steps=config.warmup_steps, total_steps=run.total_steps,
                min_lr_ratio=config.min_lr_ratio)
    # Read the whole step first, to weigh each label token by 1 / (label tokens in the step). The batches stay on
    # the CPU until label_nll moves them: counting labels there never waits for the device.
    micro = [next(batches) for _ in range(config.grad_accum)]
    n_labels = sum(label_count(b) for b, _, _ in micro)
    n_tokens = sum(int(b["attention_mask"].sum()) for b, _, _ in micro)
    if n_labels == 0:
        raise UsageError(f"step {state.step + 1} has no label tokens: check the dataset's label masking "
                         "(or raise --max-length: every answer may have been truncated away)")
    with run.step_weights():  # each quantized weight dequantized once in the step, when the run keeps them
        loss = accumulate_gradients(model, [b for b, _, _ in micro], n_labels, run.world, run.device, run.autocast)
    grad_norm = apply_update(run.optimizer, run.params.values(), lr=lr, loss=loss, max_grad_norm=config.max_grad_norm,
                             step=state.step + 1, last_checkpoint=lambda: latest_checkpoint(run.out / STATE_DIR))
    _, state.epoch, state.batch_index = micro[-1]
    state.step += 1
    state.tokens += n_tokens
    tokens_per_s = n_tokens / max(time.perf_counter() - start, 1e-9)
    r = {"step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": state.tokens,
         "tokens_per_s": tokens_per_s, "elapsed": run.elapsed()}
    run.record(r)
    return r


def evaluate(run: TrainRun, model: nn.Module) -> None:
    """The held-out answer-token loss, logged (nothing without held-out examples)."""
    if run.held_out is None:
        return
    with run.autocast():
        result = answer_token_loss(model, run.held_out, run.device, run.world)
    run.record({"step": run.state.step, "eval_loss": result["loss"], "eval_tokens": result["tokens"],
                "elapsed": run.elapsed()})


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
    run = start_or_resume(model, tokenizer, train_dataset, eval_dataset, config, seed=seed, provenance=provenance,
                          overwrite=overwrite, on_metrics=on_metrics)
    state = run.state
    was_training = model.training
    every = config.checkpoint_every
    undo_checkpointing = (_compile_blocks(model, config.gradient_checkpointing, every) if config.compile_blocks
                          else _enable_checkpointing(model, every) if config.gradient_checkpointing else lambda: None)
    model.train()  # LoRA dropout active; a frozen base in train mode changes nothing else for LLaMA
    # What the training forward runs through: DDP's wrapper, or the model (FSDP's hooks are on it; one process).
    trained = data_parallel(model) if run.world.distributed and not config.fsdp else model
    batches = micro_batches(train_dataset, config.batch_size * run.world.size, run.pad_id, seed, state.epoch,
                            state.batch_index)
    bar = tqdm(total=run.total_steps, initial=state.step, desc="train", unit="step",
               disable=not (progress and run.world.main))
    try:
        if state.step == 0 and not state.history:
            evaluate(run, model)  # before any update: the "before" of the log
        while state.step < run.total_steps:
            r = train_step(run, trained, batches)
            bar.update(1)
            bar.set_postfix(loss=f"{r['loss']:.4f}", lr=f"{r['lr']:.2e}", tok_s=f"{r['tokens_per_s']:.0f}")
            if state.step % config.eval_every == 0 or state.step == run.total_steps:
                evaluate(run, model)
            if state.step % config.save_every == 0 or state.step == run.total_steps:
                save(run, model)
    finally:
        bar.close()
        undo_checkpointing()
        model.train(was_training)
    del trained  # drops DDP's hooks on the LoRA parameters
    return finish(run, model, base_model_name_or_path, provenance)
