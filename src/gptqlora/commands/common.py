"""Pieces several commands share: input checks, loading a quantized base, quantizing a loaded model, evaluating one."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptqlora.config import CalibConfig, EvalConfig, QuantConfig
from gptqlora.errors import UsageError
from gptqlora.quant.linear import QuantizedLinear


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the decoder blocks' linear weights as stored (packed buffers for quantized layers)."""
    total = 0
    for module in model.model.layers.modules():
        if isinstance(module, QuantizedLinear):
            total += sum(b.numel() * b.element_size() for b in module.buffers())
        elif isinstance(module, nn.Linear):
            total += sum(p.numel() * p.element_size() for p in module.parameters())
    return total


def local_data_dir(source: str) -> Path | None:
    """The local directory a GSM8K source reads, or None for a hub id."""
    path = Path(source).expanduser()
    return path if path.exists() else None


def calib_inputs(calib: CalibConfig) -> list[Path | str | None]:
    """The calibration options' local inputs (a command never writes over them)."""
    return [calib.calib_text, calib.calib_data and local_data_dir(calib.calib_data)]


def check_calibration(method: str, calib: CalibConfig, data: str, model_dir: Path | None) -> None:
    """Read GPTQ's calibration source before any work (RTN reads none), so that a bad one is one line before any
    model loads; with the model's local directory, its tokenizer (no weights) checks that it fills one window.

    Args:
        method: the quantization method (``QuantConfig.method``; merge always re-quantizes with ``"gptq"``).
        data: the GSM8K directory or hub id the command calibrates with (see ``calibration_for``).
        model_dir: the model's local directory (``check_model_source``); None for a hub id.
    Raises:
        UsageError: see ``gptqlora.data.calibration.read_calibration`` and ``check_calibration_length``.
    """
    if method != "gptq":
        return
    from gptqlora.data.calibration import check_calibration_length, read_calibration

    source = read_calibration(calib, data)
    if model_dir is not None and (model_dir / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        check_calibration_length(AutoTokenizer.from_pretrained(model_dir), source, calib.calib_seqlen)


def check_group_size(model: nn.Module, qc: QuantConfig) -> None:
    """Refuse a group size that does not divide the input size of every linear it would quantize.

    Raises:
        UsageError: naming the first layer that does not fit.
    """
    if qc.group_size == -1:
        return
    from gptqlora.quant.driver import decoder_layers

    for name in qc.target_names:
        k = decoder_layers(model)[0].get_submodule(name).in_features
        if k % qc.group_size:
            raise UsageError(f"group_size={qc.group_size} does not divide {name}'s {k} input features: choose a "
                             "group size that divides every quantized layer's input size, or -1")


def quantize_loaded(model: nn.Module, tokenizer, qc: QuantConfig, calib: CalibConfig, data: str, seed: int,
                    progress: bool = True, kernel: str = "auto") -> dict:
    """Quantize an already loaded float model in place, its layers then running ``kernel``; returns a report
    (time, losses, bytes)."""
    from gptqlora.data.calibration import calibration_for
    from gptqlora.quant.driver import quantize_model_weights
    from gptqlora.quant.kernels import set_kernel

    if any(isinstance(m, QuantizedLinear) for m in model.modules()):
        raise UsageError("the model is already quantized: pass a float model to quantize")
    check_group_size(model, qc)
    before = weight_bytes(model)
    tokens = described = None
    if qc.method == "gptq":
        tokens, described = calibration_for(calib, tokenizer, data, seed)
    start = time.perf_counter()
    losses = quantize_model_weights(model, tokens, qc, progress=progress)
    seconds = time.perf_counter() - start
    set_kernel(model, kernel)
    return {"method": qc.method, "bits": qc.bits, "group_size": qc.group_size, "targets": list(qc.target_names),
            "seconds": round(seconds, 2), "gptq_loss_total": round(sum(losses.values()), 4),
            "weight_bytes_before": before, "weight_bytes_after": weight_bytes(model),
            "calibration": described,
            "layer_losses": {k: round(v, 6) for k, v in losses.items()}}


def check_quantized_input(path: str) -> Path:
    """Check a ``--quantized`` directory (config, agreement of its two configs, weights, tokenizer) before loading.

    Raises:
        UsageError: see ``gptqlora.quant.checkpoint.read_quantized_config``; also a directory without tokenizer files.
    """
    from gptqlora.quant.checkpoint import is_quantized_dir, read_quantized_config

    p = Path(path).expanduser()
    if not p.is_dir():
        raise UsageError(f"--quantized {p} is not a directory: give a directory written by `gptqlora quantize`")
    if (p / "config.json").is_file() and not is_quantized_dir(p):
        raise UsageError(f"--quantized {p} is not a quantized model (its config.json has no GPTQ quantization_config):"
                         " quantize it first, or pass it as --model to use the float model")
    read_quantized_config(p)
    if not (p / "tokenizer_config.json").is_file():
        raise UsageError(f"{p} has no tokenizer files (tokenizer_config.json): copy them from the model it was "
                         "quantized from (tokenizer.save_pretrained(DIR)), or quantize again with gptqlora")
    return p


def load_quantized_base(path: str | Path, dtype: str, device: str, kernel: str = "auto", inference: bool = False):
    """Load a quantized directory with its tokenizer, its layers running ``kernel``; a float model given where a
    quantized one is asked is refused. ``inference``: see ``gptqlora.models.resolve_dtype`` (bf16 on a CPU that runs
    it natively, where int4-aten decodes)."""
    from gptqlora.eval.gsm8k_eval import check_quantized
    from gptqlora.models import load_model
    from gptqlora.quant.kernels import set_kernel

    model, tokenizer = load_model(str(path), dtype, device, inference=inference)
    check_quantized(model)
    set_kernel(model, kernel)
    return model, tokenizer


def split_train(entries: list[dict], holdout: int, limit: int | None, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded shuffle of GSM8K train into (training examples, held-out examples for the eval loss).

    Raises:
        UsageError: when the held-out slice leaves no training example.
    """
    if holdout >= len(entries):
        raise UsageError(f"eval_holdout={holdout} holds out all {len(entries)} training examples: use a smaller "
                         "--eval-holdout")
    order = torch.randperm(len(entries), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [entries[i] for i in order]
    held, rest = shuffled[:holdout], shuffled[holdout:]
    return (rest[:limit] if limit else rest), held


def print_line(line: str) -> None:
    print(line, flush=True)  # one line per question: show progress even when stdout is a file


def evaluate_loaded(model, tokenizer, entries: list[dict], exemplars: list[dict], ec: EvalConfig, style: str,
                    seed: int, out_dir: str | Path | None, split: str = "test", resume: bool = False,
                    provenance: dict | None = None, log: Callable[[str], Any] | None = None, verifier=None) -> dict:
    """Exact-match accuracy (and answer-token loss) of a loaded model on the given GSM8K entries.

    Under torchrun every rank calls this with its own copy of the model: both the generation batches and the loss
    batches are split across the ranks, rank 0 writes ``out_dir``, and every rank returns the same result."""
    from gptqlora.eval.gsm8k_eval import evaluate_gsm8k
    from gptqlora.eval.perplexity import gsm8k_answer_loss

    summary = evaluate_gsm8k(model, tokenizer, entries, ec, style=style, exemplars=exemplars, out_dir=out_dir,
                             log=log or print_line, seed=seed, split=split, resume=resume, provenance=provenance,
                             verifier=verifier)
    loss = gsm8k_answer_loss(model, tokenizer, entries, style=style, batch_size=ec.eval_batch_size)
    return summary | {"answer_loss": loss["loss"], "answer_perplexity": loss["perplexity"]}


def fewshot(data: str, shots: int, seed: int) -> list[dict]:
    """The few-shot exemplars from the train split (none for ``shots == 0``), checked before any model loads."""
    from gptqlora.data.gsm8k import load_gsm8k
    from gptqlora.eval.gsm8k_eval import fewshot_exemplars

    if not shots:
        return []
    train = load_gsm8k("train", data)
    if shots > len(train):
        raise UsageError(f"shots={shots} asks for more exemplars than the {len(train)} train problems: use fewer")
    return fewshot_exemplars(train, shots, seed=seed)
