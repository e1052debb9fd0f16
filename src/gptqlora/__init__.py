"""gptqlora: GPTQ quantization and LoRA fine-tuning of LLaMA-family models on GSM8K, on raw PyTorch.

Public names are imported lazily, so ``import gptqlora`` stays cheap and has no side effects.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "gptqlora.models",
    "QuantizedLinear": "gptqlora.quant.linear",
    "quantize_model_weights": "gptqlora.quant.driver",
    "gptq_solve": "gptqlora.quant.gptq",
    "rtn_quantize": "gptqlora.quant.grid",
    "save_quantized": "gptqlora.quant.checkpoint",
    "load_quantized": "gptqlora.quant.checkpoint",
    "load_gsm8k": "gptqlora.data.gsm8k",
    "format_gsm8k_entry": "gptqlora.data.gsm8k",
    "extract_answer": "gptqlora.data.gsm8k",
    "GSM8KCoTDataset": "gptqlora.data.gsm8k",
    "LoRALinear": "gptqlora.lora.layer",
    "inject_lora_layers": "gptqlora.lora.layer",
    "save_adapter": "gptqlora.lora.adapter",
    "load_adapter": "gptqlora.lora.adapter",
    "train_lora": "gptqlora.train.loop",
    "evaluate_gsm8k": "gptqlora.eval.gsm8k_eval",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gptqlora' has no attribute {name!r}")
