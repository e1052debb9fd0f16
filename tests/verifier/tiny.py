"""A tiny verifier for the verifier tests: a seeded tiny LLaMA (RTN-quantized unless asked not to), LoRA on its
attention, a zero-initialised value head."""

from __future__ import annotations

import torch
from conftest import make_tiny_llama

from gptqlora.config import QuantConfig
from gptqlora.lora.layer import inject_lora_layers
from gptqlora.quant.driver import quantize_model_weights
from gptqlora.quant.linear import QuantizedLinear
from gptqlora.verifier.model import VerifierModel


def tiny_verifier(quantized: bool = True, seed: int = 0) -> VerifierModel:
    """A fresh verifier on a tiny model: it scores every solution 0.5 until trained."""
    lm = make_tiny_llama(seed=seed)
    if quantized:
        quantize_model_weights(lm, None, QuantConfig(method="rtn", targets="all", group_size=32), progress=False)
        assert any(isinstance(m, QuantizedLinear) for m in lm.modules())
    torch.manual_seed(seed)
    inject_lora_layers(lm, "attn", r=8, alpha=16, dropout=0.0)
    return VerifierModel(lm)
