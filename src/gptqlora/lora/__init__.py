"""LoRA by composition over float or quantized linears, and adapters in PEFT's format."""

from gptqlora.lora.adapter import load_adapter, read_adapter_config, save_adapter
from gptqlora.lora.layer import (LoRALinear, adapter_state_dict, get_adapter_params, inject_lora_layers,
                                 lora_modules, mark_only_lora_trainable, merge_lora, set_trainable_params)

__all__ = ["LoRALinear", "adapter_state_dict", "get_adapter_params", "inject_lora_layers", "load_adapter",
           "lora_modules", "mark_only_lora_trainable", "merge_lora", "read_adapter_config", "save_adapter",
           "set_trainable_params"]
