"""Prepare a quantized base: check and load a ``--quantized`` directory, quantize a loaded float model, and a run's
base (``--quantized``, the run's own on ``--resume``, or ``--model`` quantized now and saved in ``OUT/quantized_base``).
"""

from __future__ import annotations

import time
from pathlib import Path

from torch import nn

from gptqlora import distributed
from gptqlora.config import CalibConfig, ModelConfig, QuantConfig
from gptqlora.context import RunContext
from gptqlora.errors import UsageError
from gptqlora.files import read_json_object
from gptqlora.quant.linear import QuantizedLinear

BASE_DIR = "quantized_base"  # where a run keeps the base it quantized itself


# ---------------------------------------------------------------------------------------------- inputs

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


# ---------------------------------------------------------------------------------------------- quantizing

def weight_bytes(model: nn.Module) -> int:
    """Bytes of the decoder blocks' linear weights as stored (packed buffers for quantized layers)."""
    total = 0
    for module in model.model.layers.modules():
        if isinstance(module, QuantizedLinear):
            total += sum(b.numel() * b.element_size() for b in module.buffers())
        elif isinstance(module, nn.Linear):
            total += sum(p.numel() * p.element_size() for p in module.parameters())
    return total


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
    """Quantize an already loaded float model in place, its layers then running ``kernel``.

    Returns:
        A report: method, bits, group size, targets, seconds, total and per-layer GPTQ loss, weight bytes before
        and after, the calibration's description.
    Raises:
        UsageError: a model already quantized; see ``check_group_size`` and ``calibration_for``.
    """
    from gptqlora.data.calibration import calibration_for
    from gptqlora.quant.driver import quantize_model_weights
    from gptqlora.quant.linear import set_kernel

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


# ---------------------------------------------------------------------------------------------- loading

def load_quantized_base(path: str | Path, dtype: str, device: str, kernel: str = "auto", inference: bool = False):
    """Load a quantized directory with its tokenizer, its layers running ``kernel``; a float model given where a
    quantized one is asked is refused. ``inference``: see ``gptqlora.models.resolve_dtype`` (bf16 on a CPU that runs
    it natively, where int4-aten decodes).

    Raises:
        UsageError: see ``gptqlora.quant.linear.check_quantized``.
    """
    from gptqlora.models import load_model
    from gptqlora.quant.linear import check_quantized, set_kernel

    model, tokenizer = load_model(str(path), dtype, device, inference=inference)
    check_quantized(model)
    set_kernel(model, kernel)
    return model, tokenizer


def recorded_quantization(base_dir: Path) -> dict:
    """What a run's own base was quantized from and how (model, method and the GPTQ block), for resume checks."""
    from gptqlora.quant.checkpoint import gptq_config_dict, read_quantized_config

    _, qconfig = read_quantized_config(base_dir)
    side = read_json_object(base_dir / "quantize_config.json").get("gptqlora", {})
    return {"model": side.get("base_model"), "method": side.get("method")} | gptq_config_dict(qconfig)


def check_same_quantization(base_dir: Path, model: str, qc: QuantConfig) -> None:
    """Refuse to resume a run whose own base was quantized from another model or with other options.

    Raises:
        UsageError: naming each differing setting with the recorded and the requested value.
    """
    from gptqlora.quant.checkpoint import gptq_config_dict

    recorded = recorded_quantization(base_dir)
    asked = {"model": model, "method": qc.method} | gptq_config_dict(qc)
    diffs = [f"{k}: run {recorded.get(k)!r}, now {asked[k]!r}" for k in asked if recorded.get(k) != asked[k]]
    if diffs:
        raise UsageError(f"cannot resume: {base_dir} was quantized with other settings ({'; '.join(diffs)}); resume "
                         "with the run's settings, or start a new --out")


def quantizes(out: str | Path, quantized: str | None, resume: bool) -> bool:
    """Whether a run in ``out`` quantizes ``--model`` itself: not with ``--quantized``, nor on a ``--resume`` of a
    run whose base is saved (``prepare_base`` loads it)."""
    own_base = Path(out).expanduser() / BASE_DIR / "config.json"
    return not quantized and not (resume and own_base.is_file())


def prepare_base(run: RunContext, mc: ModelConfig, qc: QuantConfig, calib: CalibConfig, calib_data: str, out: Path,
                 *, quantized: str | None = None, resume: bool = False, model=None, tokenizer=None):
    """The run's quantized base: ``quantized``, the run's own base on ``resume``, or ``mc.model`` quantized now and
    saved in ``out/quantized_base``.

    Under torchrun rank 0 quantizes and saves while the others wait, then every rank loads the saved base (rank 0
    too: every rank trains on the same tensors, as read from disk); ``model`` is then used by rank 0 only.

    Args:
        calib_data: the GSM8K source GPTQ calibrates on (``gptqlora.workflows.training.gsm8k_source``).
        model, tokenizer: the already loaded float model (``run`` evaluates it first); loaded here when None.
    Returns:
        (model, tokenizer, base directory, quantization report or None).
    Raises:
        UsageError: a resumed run whose base was quantized otherwise (``check_same_quantization``); see
            ``quantize_loaded`` and ``load_quantized_base``.
    """
    from gptqlora.models import load_model
    from gptqlora.quant.checkpoint import save_quantized

    device = run.device
    if quantized:
        return (*load_quantized_base(quantized, mc.dtype, device, mc.kernel), Path(quantized), None)
    base_dir = out / BASE_DIR
    if resume and (base_dir / "config.json").is_file():
        check_same_quantization(base_dir, mc.model, qc)
        return (*load_quantized_base(base_dir, mc.dtype, device, mc.kernel), base_dir, None)
    report = None
    if run.world.main:
        if model is None:
            model, tokenizer = load_model(mc.model, mc.dtype, device, mc.cache_dir)
        report = quantize_loaded(model, tokenizer, qc, calib, calib_data, run.seed, kernel=mc.kernel)
        save_quantized(model, tokenizer, base_dir, qc, extra=report | {"base_model": mc.model})
    if not run.world.distributed:
        return model, tokenizer, base_dir, report
    del model  # rank 0's in-memory copy: it loads the saved one below, as the others do
    distributed.barrier()  # the others wait for the saved base (within the process group's timeout)
    report = distributed.broadcast_object(report)
    return (*load_quantized_base(base_dir, mc.dtype, device, mc.kernel), base_dir, report)
