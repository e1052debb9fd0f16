"""The subcommands, as functions of their configs. The CLI parses flags into configs and calls these."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from gptqlora import config as C
from gptqlora.quant.linear import QuantizedLinear

Configs = dict[type, object]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the decoder blocks' linear weights as stored (packed buffers for quantized layers)."""
    total = 0
    for module in model.model.layers.modules():
        if isinstance(module, QuantizedLinear):
            total += sum(b.numel() * b.element_size() for b in module.buffers())
        elif isinstance(module, nn.Linear):
            total += sum(p.numel() * p.element_size() for p in module.parameters())
    return total


def quantize_loaded(model: nn.Module, tokenizer, qc: C.QuantConfig, dc: C.DataConfig, progress: bool = True) -> dict:
    """Quantize an already loaded float model in place; returns a report (time, losses, bytes)."""
    from gptqlora.data.calibration import calibration_tokens
    from gptqlora.quant.driver import quantize_model_weights

    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise ValueError("the model is already quantized: pass a float model to quantize")
    before = weight_bytes(model)
    calib = None
    if qc.method == "gptq":
        calib = calibration_tokens(tokenizer, dc.calib_samples, dc.calib_seqlen, source=dc.data,
                                   text_file=dc.calib_text, seed=dc.seed)
    start = time.perf_counter()
    losses = quantize_model_weights(model, calib, qc, progress=progress)
    seconds = time.perf_counter() - start
    return {"method": qc.method, "bits": qc.bits, "group_size": qc.group_size, "targets": list(qc.target_names),
            "seconds": round(seconds, 2), "gptq_loss_total": round(sum(losses.values()), 4),
            "weight_bytes_before": before, "weight_bytes_after": weight_bytes(model),
            "calibration": None if calib is None else {"source": dc.calib_text or dc.data,
                                                       "samples": dc.calib_samples, "seqlen": dc.calib_seqlen}}


def check_out_dir(out: str | Path, marker: str = "config.json") -> Path:
    """Refuse, before any work, to write into a non-empty directory that is not an earlier output of ours."""
    path = Path(out)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / marker).exists())):
        raise ValueError(f"--out {path} exists and holds other files: choose a new directory (nothing was written)")
    return path


def quantize(args: argparse.Namespace, configs: Configs) -> dict:
    from gptqlora.models import load_model
    from gptqlora.quant.checkpoint import save_quantized

    mc, qc, dc = configs[C.ModelConfig], configs[C.QuantConfig], configs[C.DataConfig]
    out = check_out_dir(args.out)
    model, tokenizer = load_model(mc.model, mc.dtype, mc.device, mc.cache_dir)
    report = quantize_loaded(model, tokenizer, qc, dc)
    save_quantized(model, tokenizer, out, qc, extra=report | {"base_model": mc.model})
    return report | {"out": str(out)}


def perplexity(args: argparse.Namespace, configs: Configs) -> dict:
    from gptqlora.eval.perplexity import gsm8k_answer_loss
    from gptqlora.models import load_model

    mc, dc, ec = configs[C.ModelConfig], configs[C.DataConfig], configs[C.EvalConfig]
    model, tokenizer = load_model(mc.model, mc.dtype, mc.device, mc.cache_dir)
    result = gsm8k_answer_loss(model, tokenizer, source=dc.data, split=ec.split, limit=ec.limit,
                               batch_size=ec.eval_batch_size, max_length=args.max_length, style=dc.prompt_style)
    n_quant = sum(isinstance(m, QuantizedLinear) for m in model.modules())
    return {"model": mc.model, "quantized_layers": n_quant, "split": ec.split} | result

