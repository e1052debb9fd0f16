"""Quantize a float model into a GPTQ v1 directory.

A safetensors checkpoint (a local directory, the embedded model's cache, or a hub model's local snapshot) is quantized
streamed, one decoder block in memory at a time, resumable (``gptqlora.quant.streamed.quantize_streamed``); other
checkpoints (a hub model with only ``.bin`` weights) are loaded whole and quantized in memory, with a note. Both give
the same bytes on the same inputs.
"""

from __future__ import annotations

import logging
from pathlib import Path

from gptqlora.config import CalibConfig, ModelConfig, QuantConfig
from gptqlora.context import RunContext
from gptqlora.errors import UsageError
from gptqlora.quant.weights import INDEX_FILE, SINGLE_FILE
from gptqlora.workflows.base import check_group_size, quantize_loaded, weight_bytes

log = logging.getLogger(__name__)

# What a hub snapshot needs for streaming: configs, tokenizer files and safetensors weights (never .bin or .gguf).
_SNAPSHOT_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


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


def quantize_to_dir(run: RunContext, out: Path, mc: ModelConfig, qc: QuantConfig, calib: CalibConfig, data: str,
                    source: Path | None, *, max_shard_size: str, resume: bool, overwrite: bool) -> dict:
    """Quantize ``mc.model`` into ``out`` (checked and locked by the caller): streamed when its weights are
    safetensors, else loaded whole.

    Args:
        data: the GSM8K source calibration reads (``--data``).
        source: the model's local directory (``check_model_source``); None for a hub id.
        max_shard_size, resume, overwrite: see ``gptqlora.quant.streamed.quantize_streamed``.
    Returns:
        The report written in ``out/quantize_config.json`` (per-layer losses included).
    """
    weights = streamable_source(mc.model, source, mc.cache_dir)
    if weights is None:
        log.warning("%s has no safetensors weights: quantizing it in memory (the whole float model is loaded; "
                    "--resume does not apply)", mc.model)
        return _quantize_in_memory(run, out, mc, qc, calib, data, max_shard_size=max_shard_size, overwrite=overwrite)
    return _quantize_streamed(run, out, weights, mc, qc, calib, data, max_shard_size=max_shard_size, resume=resume,
                              overwrite=overwrite)


def _calibration(qc: QuantConfig, calib: CalibConfig, tokenizer, data: str, seed: int):
    """Calibration token ids [samples, seqlen] for GPTQ (None for RTN) and their description for the report."""
    from gptqlora.data.calibration import calibration_for

    if qc.method != "gptq":
        return None, None
    return calibration_for(calib, tokenizer, data, seed)


def _quantize_streamed(run: RunContext, out: Path, weights: Path, mc: ModelConfig, qc: QuantConfig,
                       calib: CalibConfig, data: str, *, max_shard_size: str, resume: bool, overwrite: bool) -> dict:
    """Block by block from safetensors: one block's float weights in memory at a time."""
    from transformers import AutoTokenizer

    from gptqlora.models import resolve_dtype
    from gptqlora.quant.checkpoint import float_skeleton, quantized_skeleton
    from gptqlora.quant.streamed import quantize_streamed

    dtype = resolve_dtype(mc.dtype, run.device)
    skeleton = float_skeleton(weights, dtype)  # meta tensors: shapes without memory
    check_group_size(skeleton, qc)
    tokenizer = AutoTokenizer.from_pretrained(weights)
    tokens, described = _calibration(qc, calib, tokenizer, data, run.seed)
    facts = {"weight_bytes_before": weight_bytes(skeleton),
             "weight_bytes_after": weight_bytes(quantized_skeleton(skeleton.config, qc, dtype)),
             "calibration": described}
    report = quantize_streamed(weights, out, qc, tokens, tokenizer=tokenizer, dtype=dtype, device=run.device,
                               max_shard_size=max_shard_size, resume=resume, overwrite=overwrite,
                               extra=facts | {"base_model": mc.model}, name_or_path=mc.model)
    return {k: report[k] for k in ("method", "bits", "group_size", "targets", "seconds", "gptq_loss_total")} | facts \
        | {k: report[k] for k in ("blocks", "resumed_blocks", "shards", "layer_losses")}


def _quantize_in_memory(run: RunContext, out: Path, mc: ModelConfig, qc: QuantConfig, calib: CalibConfig, data: str,
                        *, max_shard_size: str, overwrite: bool) -> dict:
    """The whole float model loaded, quantized in place and saved (for weights that are not safetensors)."""
    from gptqlora.models import load_model
    from gptqlora.quant.checkpoint import save_quantized

    model, tokenizer = load_model(mc.model, mc.dtype, run.device, mc.cache_dir)
    report = quantize_loaded(model, tokenizer, qc, calib, data, run.seed, kernel=mc.kernel)
    save_quantized(model, tokenizer, out, qc, extra=report | {"base_model": mc.model},
                   overwrite=overwrite, max_shard_size=max_shard_size)
    return report
