"""Kernels for QuantizedLinear: one module per backend and a registry that chooses between them.

    from gptqlora.quant.kernels import set_kernel
    set_kernel(model, "auto")          # the default: per device, dtype and rows M, the fastest measured backend
    set_kernel(model, "int4-aten")     # or dequant, dequant-gemm, triton, dense

``QuantizedLinear.forward`` is the one place that dispatches (``registry.select_backend``); a layer repacks its GPTQ
v1 buffers into a backend's layout at first use. See ``registry`` for what each backend supports and auto's crossovers.
"""

from __future__ import annotations

from torch import nn

from gptqlora.quant.kernels.registry import (BACKENDS, KERNELS, GPTQWeight, LayerFacts, check_kernel, layer_facts,
                                             select_backend, unsupported_reason)

__all__ = ["BACKENDS", "KERNELS", "GPTQWeight", "LayerFacts", "check_kernel", "kernels_used", "layer_facts",
           "select_backend", "set_kernel", "unsupported_reason"]


def set_kernel(model: nn.Module, name: str) -> int:
    """Set every QuantizedLinear's kernel preference in ``model``; layers drop layouts they no longer need.

    Args:
        name: one of ``KERNELS``; a layer a backend cannot run falls back to ``dequant`` (with a warning).
    Returns:
        The number of QuantizedLinear layers set.
    Raises:
        UsageError: an unknown name.
    """
    from gptqlora.quant.linear import QuantizedLinear  # linear imports this package: import at call time

    check_kernel(name)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    for layer in layers:
        layer.set_kernel(name)
    return len(layers)


def kernels_used(model: nn.Module) -> dict[str, int]:
    """How many QuantizedLinear layers of ``model`` ran each backend since their kernel was last set (for run
    summaries: a decode uses one backend for the prompt and another per new token, so a layer can count twice).

    Returns:
        Backend name -> layer count, plus ``"none"`` for layers not called since; empty when there are no such layers.
    """
    from gptqlora.quant.linear import QuantizedLinear

    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            for key in sorted(m.kernels_seen) or ["none"]:
                counts[key] = counts.get(key, 0) + 1
    return counts
