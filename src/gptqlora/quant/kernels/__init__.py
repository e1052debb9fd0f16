"""Kernels for QuantizedLinear: one module per backend and a registry that chooses between them.

    from gptqlora.quant.linear import set_kernel
    set_kernel(model, "auto")          # the default: per device, dtype and rows M, the fastest measured backend
    set_kernel(model, "int4-aten")     # or dequant, dequant-gemm, triton, dense

``QuantizedLinear.forward`` is the one place that dispatches (``registry.select_backend``); a layer repacks its GPTQ
v1 buffers into a backend's layout at first use. See ``registry`` for what each backend supports and auto's crossovers.
Backends know the layer's buffers (``registry.GPTQWeight``), never the layer: nothing here imports ``quant.linear``.
"""
