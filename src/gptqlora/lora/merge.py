"""Merging a LoRA adapter into a quantized base: dequantize, add B @ A * s, quantize again with GPTQ.

Only the layers that carry an adapter are re-quantized; the other quantized layers keep their codes. The
re-quantization is sequential like the first one, so each merged layer is calibrated on the inputs it sees in the
merged model.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from gptqlora.config import QuantConfig
from gptqlora.lora.layer import LoRALinear, lora_modules
from gptqlora.quant.driver import decoder_layers, quantize_model_weights
from gptqlora.quant.linear import QuantizedLinear


@torch.no_grad()
def unmerge_to_float(model: nn.Module) -> list[str]:
    """Replace each LoRALinear over a QuantizedLinear by a float nn.Linear holding dequant(W) + B @ A * s.

    Returns:
        Block-relative names of the merged layers (e.g. ``self_attn.q_proj``), in block order, deduplicated.
    """
    names: list[str] = []
    for full_name, module in lora_modules(model).items():
        base = module.base
        if not isinstance(base, QuantizedLinear):
            raise ValueError(f"{full_name} wraps a {type(base).__name__}, not a QuantizedLinear: merge a float base "
                             "with gptqlora.lora.layer.merge_lora instead")
        weight = base.dequantize_weight(torch.float32) + module.delta_weight().float()  # [N, K]
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        linear.weight.copy_(weight)
        if base.bias is not None:
            linear.bias.copy_(base.bias.float())
        model.set_submodule(full_name, linear.to(weight.device))
        rel = full_name.split(".layers.", 1)[1].split(".", 1)[1]
        if rel not in names:
            names.append(rel)
    if not names:
        raise ValueError("the model carries no LoRA adapter to merge: load one with gptqlora.lora.adapter.load_adapter")
    return names


def merge_into_quantized(model: nn.Module, calibration: Tensor, config: QuantConfig, progress: bool = True
                         ) -> dict[str, float]:
    """Merge the model's adapters into its quantized layers and re-quantize those layers with GPTQ, in place.

    Args:
        model: a quantized model with LoRA injected (and loaded) over some QuantizedLinear layers.
        calibration: token ids [n, seqlen] for the re-quantization.
        config: the base's quantization config (bits, group size, ...); its method is forced to GPTQ.
    Returns:
        GPTQ loss per re-quantized layer.
    """
    decoder_layers(model)
    merged = unmerge_to_float(model)
    requant = dataclasses.replace(config, method="gptq", targets=",".join(merged))
    return quantize_model_weights(model, calibration, requant, progress=progress)


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())
