"""Save and load quantized models as Hugging Face directories in the GPTQ v1 format.

A directory holds ``config.json`` (with ``quantization_config``), ``quantize_config.json`` (the same block),
``model.safetensors`` and the tokenizer files. Quantized linears store qweight/qzeros/scales/g_idx (+bias);
everything else keeps its plain tensors in the model's dtype. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from gptqlora.config import ALL_TARGETS, ATTN_TARGETS, QuantConfig
from gptqlora.errors import InputNotFoundError, UsageError
from gptqlora.files import read_json_object, staged_dir
from gptqlora.quant.driver import STAGES, _set, decoder_layers
from gptqlora.quant.linear import QuantizedLinear

QUANT_BUFFERS = ("qweight", "qzeros", "scales", "g_idx", "bias")


def gptq_config_dict(config: QuantConfig) -> dict:
    """The ``quantization_config`` block transformers/GPTQModel/vLLM read (format "gptq", v1)."""
    targets = config.target_names
    block = {
        "quant_method": "gptq",
        "bits": config.bits,
        "group_size": config.group_size,
        "desc_act": config.act_order and not config.static_groups,
        "sym": config.sym,
        "true_sequential": config.true_sequential,
        "damp_percent": config.damp_percent,
        "static_groups": config.static_groups,
        "format": "gptq",
        "checkpoint_format": "gptq",
        "lm_head": False,
    }
    if tuple(targets) != ALL_TARGETS:
        # Partly quantized: list the quantized modules stage by stage, and give GPTQModel a negative rule for the rest.
        block["modules_in_block_to_quantize"] = [[n for n in stage if n in targets] for stage in STAGES
                                                 if any(n in targets for n in stage)]
        if tuple(targets) == ATTN_TARGETS:
            block["dynamic"] = {"-:.*\\.mlp\\..*": {}}
        else:
            skipped = [n.replace(".", "\\.") for n in ALL_TARGETS if n not in targets]
            block["dynamic"] = {"-:.*\\.(" + "|".join(skipped) + ")$": {}}
    return block


def quant_config_from_dict(block: dict, where: str = "quantization_config") -> QuantConfig:
    """Rebuild our QuantConfig from a ``quantization_config`` block (ours or another tool's v1 gptq).

    Raises:
        UsageError: a block that is not GPTQ v1, lacks ``bits`` or ``group_size``, or holds unsupported values;
            the message names ``where`` the block came from.
    """
    if not isinstance(block, dict):
        raise UsageError(f"{where} must be a JSON object, not {type(block).__name__}")
    if block.get("quant_method") != "gptq":
        raise UsageError(f"{where}: quant_method {block.get('quant_method')!r} is not 'gptq': this loader reads GPTQ "
                         "checkpoints")
    fmt = block.get("checkpoint_format", block.get("format", "gptq"))
    if fmt != "gptq":
        raise UsageError(f"{where}: checkpoint_format {fmt!r} is not supported: only GPTQ v1 ('gptq') is read")
    missing = [k for k in ("bits", "group_size") if not isinstance(block.get(k), int) or isinstance(block[k], bool)]
    if missing:
        raise UsageError(f"{where}: {' and '.join(missing)} missing or not an integer; a GPTQ config needs both")
    if "modules_in_block_to_quantize" in block:
        targets = ",".join(n for stage in block["modules_in_block_to_quantize"] for n in stage)
    else:
        targets = "all"
    try:
        return QuantConfig(bits=block["bits"], group_size=block["group_size"], sym=bool(block.get("sym", True)),
                           act_order=bool(block.get("desc_act", False)),
                           static_groups=bool(block.get("static_groups", False)),
                           damp_percent=float(block.get("damp_percent", 0.01)),
                           true_sequential=bool(block.get("true_sequential", True)), targets=targets)
    except UsageError as e:
        raise UsageError(f"{where}: {e}") from None


# Fields of the quantization block that shape the weights: quantize_config.json and config.json must agree on them.
_AGREEING_FIELDS = ("quant_method", "bits", "group_size", "desc_act", "sym", "static_groups",
                    "modules_in_block_to_quantize", "checkpoint_format")


def read_quantized_config(path: str | os.PathLike) -> tuple[dict, QuantConfig]:
    """Read and check a GPTQ directory's configuration without loading any weight.

    Returns:
        (config.json as a dict, the QuantConfig its ``quantization_config`` describes).
    Raises:
        InputNotFoundError: no config.json or model.safetensors.
        UsageError: JSON that is not an object, a missing or bad quantization block, an unknown ``dtype``, or a
            quantize_config.json that disagrees with config.json (naming both files and the field).
    """
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
        raise InputNotFoundError(f"{path} is not a quantized model directory: expected config.json and "
                                 "model.safetensors (write one with `gptqlora quantize --out DIR`)")
    raw = read_json_object(path / "config.json")
    block = raw.get("quantization_config")
    qconfig = quant_config_from_dict(block, f"{path / 'config.json'} quantization_config")
    dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"{path / 'config.json'}: dtype {dtype!r} is unknown: use float32, bfloat16 or float16")
    side = path / "quantize_config.json"
    if side.is_file():
        other = read_json_object(side)
        for key in _AGREEING_FIELDS:
            if key in other and other[key] != block.get(key):
                raise UsageError(f"{side} and {path / 'config.json'} disagree on {key} ({other[key]!r} vs "
                                 f"{block.get(key)!r}): the two describe the same weights; fix the wrong one")
    return raw, qconfig


def save_quantized(model: nn.Module, tokenizer, out_dir: str | os.PathLike, config: QuantConfig,
                   extra: dict | None = None, overwrite: bool = False) -> Path:
    """Write ``model`` (with QuantizedLinear layers) and ``tokenizer`` to ``out_dir`` in the GPTQ v1 format.

    The directory is written next to its destination and renamed into place (``gptqlora.files.staged_dir``), so a
    crash leaves no partial directory and an existing one is never left half-overwritten.

    Args:
        extra: recorded under ``"gptqlora"`` in quantize_config.json (method, calibration, losses...).
        overwrite: replace an existing ``out_dir``; without it an existing one is refused.
    Returns:
        The directory.
    Raises:
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is false.
    """
    with staged_dir(out_dir, overwrite=overwrite) as tmp:
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied to embed_tokens; safetensors refuses shared storage
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        block = gptq_config_dict(config)
        cfg = model.config.to_dict()
        cfg["quantization_config"] = block
        cfg["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
        (tmp / "quantize_config.json").write_text(json.dumps(block | {"gptqlora": extra or {}}, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def is_quantized_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a config.json whose ``quantization_config`` says GPTQ (nothing else is checked)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    block = read_json_object(cfg).get("quantization_config")
    return isinstance(block, dict) and block.get("quant_method") == "gptq"


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load a GPTQ v1 directory (ours, or another tool's with the same layout) as a model with QuantizedLinear layers.

    Returns:
        (model, tokenizer, QuantConfig).
    Raises:
        InputNotFoundError: no config.json or model.safetensors.
        UsageError: a bad config (see ``read_quantized_config``), a shape or dtype that does not match what the
            config describes, a truncated file, or non-finite scales.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    weights = path / "model.safetensors"
    raw, qconfig = read_quantized_config(path)
    try:
        state = load_file(weights, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise UsageError(f"cannot read {weights}: the file is truncated or corrupt ({e}); quantize again") from None

    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = getattr(torch, raw.get("dtype") or raw.get("torch_dtype") or "float32")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for i, block in enumerate(decoder_layers(model)):
        for name in qconfig.target_names:
            lin = block.get_submodule(name)
            q = QuantizedLinear(lin.in_features, lin.out_features, qconfig.bits, qconfig.group_size,
                                bias=lin.bias is not None)
            _set(block, name, q)
    expected = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UsageError(f"{weights} does not match its config: missing {missing[:4]}{'...' if len(missing) > 4 else ''}"
                         f", unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    for key, t in state.items():
        want = expected[key]
        if t.shape != want.shape:
            raise UsageError(f"{weights}: {key} has shape {tuple(t.shape)} but the config implies {tuple(want.shape)}"
                             f" (bits={qconfig.bits}, group_size={qconfig.group_size})")
        if key.endswith(("qweight", "qzeros", "g_idx")) and t.dtype != torch.int32:
            raise UsageError(f"{weights}: {key} is {t.dtype}, the GPTQ format stores int32")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise UsageError(f"{weights}: {key} holds NaN or infinite values; the checkpoint is damaged: quantize "
                             "again")
    model.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model, tokenizer, qconfig
