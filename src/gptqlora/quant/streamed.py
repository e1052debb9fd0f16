"""Quantizing a float safetensors checkpoint straight to a GPTQ directory, one decoder block at a time.

The result equals ``quantize_model_weights`` + ``save_quantized`` on the same inputs, bit for bit, while no more than
one decoder block's float weights are ever in memory. Three parts, each a named function:

- the plan (``plan_streamed``): every check and decision made before a weight is read: the model skeleton on the meta
  device, the output's shard layout, and the fingerprint a resumed run must match;
- the source (``load_block``): block i's tensors read (memory-mapped) from the checkpoint, checked against the config
  and moved to the device it is calibrated on;
- the sink (``write_block``): block i's quantized tensors written to their place in the work directory, with the next
  block's calibration inputs, then freed.

``quantize_streamed`` runs the driver's loop (``driver.quantize_blocks``) from the source to the sink and puts the
finished directory in place; the work directory (``stream.WorkDir``) survives a crash so that a rerun can resume.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn

from gptqlora.config import QuantConfig
from gptqlora.errors import OutputExistsError, UsageError
from gptqlora.files import read_json_object, staged_dir
from gptqlora.quant.checkpoint import (check_architecture, float_skeleton, quantized_skeleton, saved_state,
                                       tensor_units, write_configs)
from gptqlora.quant.driver import decoder_layers, position_inputs, quantize_blocks
from gptqlora.quant.stream import DEFAULT_MAX_SHARD_SIZE, SafetensorsSource, ShardLayout, TensorSpec, WorkDir, parse_size

WORK_FORMAT = 2  # the work directory's fingerprint format: a resume over another is refused


@dataclasses.dataclass
class StreamPlan:
    """What a streamed quantization reads and writes, decided before any weight is read."""

    weights: SafetensorsSource
    model: nn.Module  # the float model on the meta device; block i is filled when its turn comes and emptied after
    layers: nn.ModuleList  # its decoder blocks
    float_state: dict[str, Tensor]  # the (meta) tensors the source must hold, by name: shapes and dtypes
    units: list[list[str]]  # tensor names as written: everything outside the blocks, then each block
    layout: ShardLayout  # where each output tensor goes
    fingerprint: dict  # the inputs and settings a resumed run must share


def work_dir(out_dir: str | os.PathLike) -> Path:
    """Where ``quantize_streamed`` keeps finished blocks until the output is complete: ``.NAME.quantizing``."""
    out = Path(out_dir)
    return out.with_name(f".{out.name}.quantizing")


def plan_streamed(source: Path, out: Path, config: QuantConfig, calibration: Tensor | None, *, dtype: torch.dtype,
                  device: torch.device, max_shard_size: int | str, chunk_size: int, overwrite: bool,
                  name_or_path: str | None) -> StreamPlan:
    """Check the inputs and plan the output of ``quantize_streamed`` (see its arguments); reads no weight.

    The source's bytes are hashed into the fingerprint, not only its sizes: a model rewritten in place since an
    interrupted run must not be resumed over. sha256 ran at ~600 MB/s on one core here, ~20 s for a 7B model's 13 GB.

    Raises:
        UsageError, OutputExistsError: see ``quantize_streamed``.
    """
    from transformers import AutoConfig

    weights = SafetensorsSource(source)
    if config.method == "gptq" and (calibration is None or calibration.ndim != 2):
        raise UsageError("GPTQ needs calibration token ids of shape [n_samples, seqlen]")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out} exists and is not empty: choose a new directory, or pass overwrite "
                                "(--overwrite) to replace it (nothing was written)")
    check_architecture(read_json_object(source / "config.json"), source / "config.json")
    hf_config = AutoConfig.from_pretrained(source)
    if getattr(hf_config, "quantization_config", None) is not None:
        raise UsageError(f"{source} is already quantized (its config.json has a quantization_config): pass a float "
                         "model to quantize")
    model = float_skeleton(hf_config, dtype)
    if name_or_path is not None:
        model.config.name_or_path = name_or_path
    layers = decoder_layers(model)
    specs = {n: TensorSpec.of(n, t) for n, t in saved_state(quantized_skeleton(hf_config, config, dtype)).items()}
    units = tensor_units(list(specs))
    layout = ShardLayout([[specs[n] for n in unit] for unit in units], max_shard_size)
    fingerprint = json.loads(json.dumps({
        "format": WORK_FORMAT, "source": str(source.resolve()), "source_sha256": weights.sha256(),
        "source_config_sha256": hashlib.sha256((source / "config.json").read_bytes()).hexdigest(),
        "quant": dataclasses.asdict(config), "dtype": str(dtype), "device": device.type, "chunk_size": chunk_size,
        "max_shard_size": parse_size(max_shard_size),
        "calibration": None if config.method == "rtn" else hashlib.sha256(
            calibration.to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()}))
    return StreamPlan(weights, model, layers, saved_state(model), units, layout, fingerprint)


# ---------------------------------------------------------------------------------------------- source

def _checked(plan: StreamPlan, to: torch.device, name: str, t: Tensor) -> Tensor:
    """A source tensor checked against the config and converted to the model's dtype on ``to``."""
    want = plan.float_state[name]
    if t.shape != want.shape:
        raise UsageError(f"{plan.weights.path}: {name} has shape {tuple(t.shape)} but config.json implies "
                         f"{tuple(want.shape)}")
    return t.to(device=to, dtype=want.dtype)


def read_source(plan: StreamPlan, names: Sequence[str], to: torch.device) -> dict[str, Tensor]:
    """Source tensors by name, checked and converted (``_checked``)."""
    return plan.weights.load(names, partial(_checked, plan, to))


def load_block(plan: StreamPlan, device: torch.device, i: int) -> nn.Module:
    """The source of ``quantize_blocks``: block i with its float weights read onto ``device``."""
    prefix = f"model.layers.{i}."
    tensors = read_source(plan, [prefix + k for k in plan.layers[i].state_dict()], device)
    plan.layers[i].load_state_dict({k.removeprefix(prefix): t for k, t in tensors.items()}, assign=True)
    return plan.layers[i]


def first_inputs(plan: StreamPlan, work: WorkDir, config: QuantConfig, calibration: Tensor | None, chunk_size: int,
                 dtype: torch.dtype) -> list[Tensor] | None:
    """The calibration inputs of the first block this run quantizes, on the CPU in chunks [b, T, D]; None for RTN.

    A fresh run reads the tensors outside the blocks (embeddings, final norm, head), writes them at once and embeds
    the calibration ids; a resumed run takes the inputs the work directory recorded with the last finished block.

    Raises:
        UsageError: a resumed GPTQ run whose recorded inputs are missing.
    """
    resumed = work.units_done
    xs = None
    if resumed == 0:
        outside = read_source(plan, plan.units[0], torch.device("cpu"))
        if config.method == "gptq":
            xs = [torch.nn.functional.embedding(c, outside["model.embed_tokens.weight"]).to(dtype)
                  for c in calibration.to("cpu", torch.int64).split(chunk_size)]
        work.commit(0, outside, {}, xs)
    elif config.method == "gptq" and resumed <= len(plan.layers):
        xs = work.activations()
        if xs is None:
            raise UsageError(f"cannot resume from {work.path}: the calibration inputs of block {resumed - 1} are "
                             "missing; rerun without resume (--resume) to start again")
    return xs


# ---------------------------------------------------------------------------------------------- sink

def write_block(plan: StreamPlan, work: WorkDir, on_block: Callable[[int, dict[str, float]], None] | None, i: int,
                block: nn.Module, block_losses: dict[str, float], next_xs: list[Tensor] | None) -> None:
    """The sink of ``quantize_blocks``: block i's tensors and the next block's inputs committed, then the block freed."""
    prefix = f"model.layers.{i}."
    tensors = {prefix + k: v.detach().to("cpu").contiguous() for k, v in block.state_dict().items()}
    last = i == len(plan.layers) - 1
    work.commit(1 + i, tensors, {prefix + k: v for k, v in block_losses.items()}, None if last else next_xs)
    block.to("meta")  # frees the block
    if on_block is not None:
        on_block(i, block_losses)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # the work directory keeps its files until the output is in place
    except OSError:
        import shutil

        shutil.copyfile(src, dst)


def publish(plan: StreamPlan, work: WorkDir, out: Path, config: QuantConfig, dtype: torch.dtype, extra: dict,
            tokenizer, overwrite: bool) -> None:
    """Stage the finished shards, configs and tokenizer beside ``out``, rename them into place, drop the work."""
    with staged_dir(out, overwrite=overwrite) as tmp:
        for file in plan.layout.output_files():
            _link_or_copy(work.path / file, tmp / file)
        write_configs(tmp, plan.model.config, config, dtype, extra)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    work.remove()


# ---------------------------------------------------------------------------------------------- the whole run

@torch.no_grad()
def quantize_streamed(source: str | os.PathLike, out_dir: str | os.PathLike, config: QuantConfig,
                      calibration: Tensor | None = None, *, tokenizer=None, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu", max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                      resume: bool = False, overwrite: bool = False, extra: dict | None = None, chunk_size: int = 8,
                      name_or_path: str | None = None, progress: bool = True,
                      on_block: Callable[[int, dict[str, float]], None] | None = None) -> dict:
    """Quantize a float safetensors checkpoint into a GPTQ directory one decoder block at a time.

    The model is built on the meta device. The embeddings, final norm and head are read alone and written at once;
    then each block is read (memory-mapped) when its turn comes, moved to ``device``, calibrated on the previous
    block's outputs (kept on the CPU, sent to ``device`` chunk by chunk), quantized, written to its place in the
    output shards and freed. The result equals ``quantize_model_weights`` + ``save_quantized`` on the same inputs,
    bit for bit (same device and dtype).

    Finished blocks are kept in ``work_dir(out_dir)``, which survives a crash; with ``resume`` a rerun with the same
    inputs and settings continues after the last finished block, without it a rerun discards them and starts again
    (``stream.WorkDir.open``). When all blocks are done the directory is staged and renamed into place as
    ``save_quantized`` does, and the work directory is deleted: a killed run never leaves a partial ``out_dir``.

    Args:
        source: a Hugging Face model directory (config.json + model.safetensors, or shards and their index).
        calibration: token ids [n_samples, seqlen] (full windows, no padding); unused for RTN.
        tokenizer: saved with the model when given (as ``save_pretrained`` writes it).
        dtype: the model's dtype: calibration passes and unquantized tensors use it, as in a model loaded in it.
        device: where each block is calibrated and quantized.
        max_shard_size: bytes (or "5GB") per output file; blocks are never split across files.
        resume: continue an interrupted run on the same output (refused if its inputs or settings differ).
        overwrite: replace an existing output.
        extra: recorded under "gptqlora" in quantize_config.json, with this function's report.
        chunk_size: calibration sequences per forward chunk.
        name_or_path: recorded as config.json's ``_name_or_path`` (default: as the source's config says).
        on_block: called with (block index, GPTQ losses) once a block is durably written.
    Returns:
        A report: method, bits, group_size, targets, seconds (this run), gptq_loss_total, layer_losses (all blocks,
        resumed ones included), blocks, resumed_blocks, shards.
    Raises:
        OutputExistsError: ``out_dir`` is not empty and ``overwrite`` is false.
        UsageError: the work directory belongs to a run still going (another process); a source that is not a
            float checkpoint of a LLaMA-family model, or whose weight files fail ``weights.weight_files``' checks;
            missing calibration for GPTQ; a resume over work made from other settings or other source bytes (each
            difference named: "bits: run 4, now 3"); a block whose forward the driver does not reproduce.
    """
    begin = time.perf_counter()
    out, device = Path(out_dir), torch.device(device)
    plan = plan_streamed(Path(source), out, config, calibration, dtype=dtype, device=device,
                         max_shard_size=max_shard_size, chunk_size=chunk_size, overwrite=overwrite,
                         name_or_path=name_or_path)
    work = WorkDir.open(work_dir(out), plan.layout, plan.fingerprint, resume=resume)
    try:
        resumed = work.units_done
        xs = first_inputs(plan, work, config, calibration, chunk_size, dtype)
        rope, mask = (None, None) if xs is None else position_inputs(plan.model.model.rotary_emb.to(device),
                                                                     plan.model.config, xs[0].to(device))
        quantize_blocks(len(plan.layers), partial(load_block, plan, device), xs, rope, mask, config,
                        start=max(resumed - 1, 0), on_block=partial(write_block, plan, work, on_block),
                        progress=progress)
        del xs
        losses = work.losses
        report = {"method": config.method, "bits": config.bits, "group_size": config.group_size,
                  "targets": list(config.target_names), "seconds": round(time.perf_counter() - begin, 2),
                  "gptq_loss_total": round(sum(losses.values()), 4), "blocks": len(plan.layers),
                  "resumed_blocks": max(resumed - 1, 0), "shards": len(plan.layout.files),
                  "layer_losses": {k: round(v, 6) for k, v in losses.items()}}
        publish(plan, work, out, config, dtype, (extra or {}) | report, tokenizer, overwrite)
    finally:
        work.close()  # a run stopped by an error leaves its work for --resume
    return report
