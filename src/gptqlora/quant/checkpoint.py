"""Save and load quantized models as Hugging Face directories in the GPTQ v1 format.

A directory holds ``config.json`` (with ``quantization_config``), ``quantize_config.json`` (the same block),
``model.safetensors`` and the tokenizer files. Quantized linears store qweight/qzeros/scales/g_idx (+bias);
everything else keeps its plain tensors in the model's dtype. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from gptqlora.config import ALL_TARGETS, ATTN_TARGETS, QuantConfig
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


def quant_config_from_dict(block: dict) -> QuantConfig:
    """Rebuild our QuantConfig from a ``quantization_config`` block (ours or another tool's v1 gptq)."""
    if block.get("quant_method") != "gptq":
        raise ValueError(f"quant_method {block.get('quant_method')!r} is not 'gptq': this loader reads GPTQ checkpoints")
    fmt = block.get("checkpoint_format", block.get("format", "gptq"))
    if fmt != "gptq":
        raise ValueError(f"checkpoint_format {fmt!r} is not supported: only GPTQ v1 ('gptq') is read")
    if "modules_in_block_to_quantize" in block:
        targets = ",".join(n for stage in block["modules_in_block_to_quantize"] for n in stage)
    else:
        targets = "all"
    return QuantConfig(bits=int(block["bits"]), group_size=int(block["group_size"]), sym=bool(block.get("sym", True)),
                       act_order=bool(block.get("desc_act", False)),
                       static_groups=bool(block.get("static_groups", False)),
                       damp_percent=float(block.get("damp_percent", 0.01)),
                       true_sequential=bool(block.get("true_sequential", True)), targets=targets)


def save_quantized(model: nn.Module, tokenizer, out_dir: str | os.PathLike, config: QuantConfig,
                   extra: dict | None = None) -> Path:
    """Write ``model`` (with QuantizedLinear layers) and ``tokenizer`` to ``out_dir`` in the GPTQ v1 format.

    The directory is written next to its destination and renamed into place, so an existing checkpoint is never
    left half-overwritten.

    Args:
        extra: recorded under ``"gptqlora"`` in quantize_config.json (method, calibration, losses...).
    Returns:
        The directory.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
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
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def is_quantized_dir(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    return json.loads(cfg.read_text()).get("quantization_config", {}).get("quant_method") == "gptq"


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Load a GPTQ v1 directory (ours, or another tool's with the same layout) as a model with QuantizedLinear layers.

    Returns:
        (model, tokenizer, QuantConfig).
    Raises:
        FileNotFoundError: no config.json or model.safetensors.
        ValueError: a config, shape or dtype that does not match what the config describes, or a truncated file.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    weights = path / "model.safetensors"
    if not (path / "config.json").is_file() or not weights.is_file():
        raise FileNotFoundError(f"{path} is not a quantized model directory: expected config.json and "
                                "model.safetensors (write one with `gptqlora quantize --out DIR`)")
    raw = json.loads((path / "config.json").read_text())
    qconfig = quant_config_from_dict(raw.get("quantization_config", {}))
    try:
        state = load_file(weights, device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {weights}: the file is truncated or corrupt ({e}); quantize again") from e

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
        raise ValueError(f"{weights} does not match its config: missing {missing[:4]}{'...' if len(missing) > 4 else ''}"
                         f", unexpected {unexpected[:4]}{'...' if len(unexpected) > 4 else ''}")
    for key, t in state.items():
        want = expected[key]
        if t.shape != want.shape:
            raise ValueError(f"{weights}: {key} has shape {tuple(t.shape)} but the config implies {tuple(want.shape)}"
                             f" (bits={qconfig.bits}, group_size={qconfig.group_size})")
        if key.endswith(("qweight", "qzeros", "g_idx")) and t.dtype != torch.int32:
            raise ValueError(f"{weights}: {key} is {t.dtype}, the GPTQ format stores int32")
    model.load_state_dict(state, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None
    return model, tokenizer, qconfig
