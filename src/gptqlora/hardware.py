"""What the hardware runs fast: shared by calibration (quant) and training."""

from __future__ import annotations

import torch


def resolve_bf16(requested: bool | None, device: torch.device) -> bool:
    """Whether to autocast to bf16: ``requested`` when given, else when the hardware runs bf16 natively.

    On CUDA that is ``torch.cuda.is_bf16_supported()``. On a CPU it needs AVX-512 (``get_cpu_capability()``)
    with the avx512_bf16 or AMX instructions, and a tiny bf16 matmul that runs: elsewhere bf16 is emulated and
    slower than fp32.
    """
    if requested is not None:
        if requested and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("--bf16 was asked for but this GPU does not support bf16: use --no-bf16")
        return requested
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or "AVX512" not in torch.backends.cpu.get_cpu_capability():
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private in torch 2.x: absent means no
    native = any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    try:
        x = torch.ones(4, 4, dtype=torch.bfloat16)
        ok = bool(torch.equal(x @ x, torch.full((4, 4), 4.0, dtype=torch.bfloat16)))
    except RuntimeError:
        ok = False
    return native and ok
