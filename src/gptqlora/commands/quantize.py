"""``gptqlora quantize``: calibrate and quantize a float model's linears, write a GPTQ v1 directory.

A safetensors checkpoint (a local directory, the embedded model's cache, or a hub model's local snapshot) is quantized
streamed, one decoder block in memory at a time, resumable (``gptqlora.quant.checkpoint.quantize_streamed``); other
checkpoints (a hub model with only ``.bin`` weights) are loaded whole and quantized in memory, with a note. Both give
the same bytes on the same inputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from gptqlora.commands.common import (calib_inputs, check_calibration, check_group_size, local_data_dir,
                                      quantize_loaded, weight_bytes)
from gptqlora.config import CalibConfig, DataConfig, ModelConfig, QuantConfig, group, opt, overwrite_field, seed_field
from gptqlora.files import OutputLock, check_output
from gptqlora.quant.stream import DEFAULT_MAX_SHARD_SIZE, parse_size
from gptqlora.quant.weights import INDEX_FILE, SINGLE_FILE

log = logging.getLogger(__name__)

# What a hub snapshot needs for streaming: configs, tokenizer files and safetensors weights (never .bin or .gguf).
_SNAPSHOT_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


@dataclass
class QuantizeArgs:
    model: ModelConfig = group(ModelConfig)
    quant: QuantConfig = group(QuantConfig)
    data: DataConfig = group(DataConfig)
    calib: CalibConfig = group(CalibConfig)
    seed: int = seed_field()
    out: str = opt(None, "Directory to write the GPTQ-format model to (refused if it exists and is not empty, "
                         "unless --overwrite).", required=True)
    overwrite: bool = overwrite_field()
    max_shard_size: str = opt(DEFAULT_MAX_SHARD_SIZE, "Largest weights file of the output (e.g. 5GB, 500MB, 2GiB); "
                                                      "a larger model is written as Hugging Face shards with "
                                                      "model.safetensors.index.json.")
    resume: bool = opt(False, "Continue a quantization to --out that was killed, after its last finished block "
                              "(kept in .OUT.quantizing beside --out); without it such leftovers are discarded.")

    def __post_init__(self) -> None:
        parse_size(self.max_shard_size)  # a bad size is refused before any work


def streamable_source(name_or_path: str, local: Path | None, cache_dir: str | None) -> Path | None:
    """The local safetensors directory ``quantize_streamed`` can read for a model name, or None.

    Args:
        local: what ``check_model_source`` returned (None for a hub id).
    Returns:
        The embedded model's cache (converted on first use), a local directory holding model.safetensors or an
        index, or a hub model's local snapshot of its safetensors; None when the weights are not safetensors.
    Raises:
        UsageError: a hub id that can be neither found in the local cache nor downloaded.
    """
    from gptqlora.errors import UsageError
    from gptqlora.models import EMBEDDED, embedded_model_dir

    if name_or_path in EMBEDDED:
        local = embedded_model_dir(name_or_path, cache_dir)
    elif local is None:  # a hub id: its snapshot, as from_pretrained would fetch it, safetensors only
        from huggingface_hub import snapshot_download

        try:
            local = Path(snapshot_download(name_or_path, allow_patterns=_SNAPSHOT_FILES))
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot load {name_or_path!r}: not an embedded alias ({', '.join(EMBEDDED)}), not a "
                             f"local model directory, and not reachable on the Hugging Face hub ({e})") from e
    if (local / SINGLE_FILE).is_file() or (local / INDEX_FILE).is_file():
        return local
    return None


def quantize(args: QuantizeArgs) -> dict:
    from gptqlora.models import check_model_source, resolve_device

    mc = args.model
    source = check_model_source(mc.model, mc.cache_dir)
    check_calibration(args.quant.method, args.calib, args.data.data, source)
    device = resolve_device(mc.device)
    out = check_output(args.out, inputs=[source, local_data_dir(args.data.data), *calib_inputs(args.calib)],
                       overwrite=args.overwrite)
    with OutputLock(out):
        weights = streamable_source(mc.model, source, mc.cache_dir)
        if weights is None:
            log.warning("%s has no safetensors weights: quantizing it in memory (the whole float model is loaded; "
                        "--resume does not apply)", mc.model)
            report = _quantize_in_memory(args, device, out)
        else:
            report = _quantize_streamed(args, weights, device, out)
    # Each layer's GPTQ loss is kept in OUT/quantize_config.json (and logged with -v), not printed.
    return {k: v for k, v in report.items() if k != "layer_losses"} | {"out": str(out)}


def _calibration(args: QuantizeArgs, tokenizer):
    """Calibration token ids [samples, seqlen] for GPTQ (None for RTN) and their description for the report."""
    from gptqlora.data.calibration import calibration_for

    if args.quant.method != "gptq":
        return None, None
    return calibration_for(args.calib, tokenizer, args.data.data, args.seed)


def _quantize_streamed(args: QuantizeArgs, weights: Path, device: str, out: Path) -> dict:
    """Block by block from safetensors: one block's float weights in memory at a time."""
    from transformers import AutoTokenizer

    from gptqlora.models import resolve_dtype
    from gptqlora.quant.checkpoint import float_skeleton, quantize_streamed, quantized_skeleton

    mc, qc = args.model, args.quant
    dtype = resolve_dtype(mc.dtype, device)
    skeleton = float_skeleton(weights, dtype)  # meta tensors: shapes without memory
    check_group_size(skeleton, qc)
    tokenizer = AutoTokenizer.from_pretrained(weights)
    tokens, described = _calibration(args, tokenizer)
    facts = {"weight_bytes_before": weight_bytes(skeleton),
             "weight_bytes_after": weight_bytes(quantized_skeleton(skeleton.config, qc, dtype)),
             "calibration": described}
    report = quantize_streamed(weights, out, qc, tokens, tokenizer=tokenizer, dtype=dtype, device=device,
                               max_shard_size=args.max_shard_size, resume=args.resume, overwrite=args.overwrite,
                               extra=facts | {"base_model": mc.model}, name_or_path=mc.model)
    return {k: report[k] for k in ("method", "bits", "group_size", "targets", "seconds", "gptq_loss_total")} | facts \
        | {k: report[k] for k in ("blocks", "resumed_blocks", "shards", "layer_losses")}


def _quantize_in_memory(args: QuantizeArgs, device: str, out: Path) -> dict:
    """The whole float model loaded, quantized in place and saved (for weights that are not safetensors)."""
    from gptqlora.models import load_model
    from gptqlora.quant.checkpoint import save_quantized

    mc = args.model
    model, tokenizer = load_model(mc.model, mc.dtype, device, mc.cache_dir)
    report = quantize_loaded(model, tokenizer, args.quant, args.calib, args.data.data, args.seed, kernel=mc.kernel)
    save_quantized(model, tokenizer, out, args.quant, extra=report | {"base_model": mc.model},
                   overwrite=args.overwrite, max_shard_size=args.max_shard_size)
    return report
