"""What the hardware runs fast (shared by calibration, kernels and training), and handing host memory back."""

from __future__ import annotations

import ctypes
import functools

import torch


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018  (glibc only)
    except (OSError, AttributeError):
        return None
    return libc


def release_free_heap() -> bool:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim(0)``); False where there is no glibc.

    glibc keeps freed blocks in its arenas, and many mid-sized temporaries interleaved with long-lived tensors (a
    repack per layer) fragment them: without this, repacking SmolLM2's 210 layers for int4-aten left 375 MiB of free
    heap resident. About 1 ms per call.
    """
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def free_memory(device: torch.device) -> int | None:
    """Bytes this process could still allocate on ``device``: the GPU's free memory, or the host's ``MemAvailable``
    (Linux); None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024  # "123456 kB"
    except (OSError, KeyError, ValueError):
        return None


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
    return device.type == "cpu" and cpu_has_native_bf16()


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively: AVX-512 (``get_cpu_capability()``) with the avx512_bf16 or AMX
    instructions, and a tiny bf16 matmul that runs. Elsewhere bf16 is emulated: an AVX2 CPU ran a [400, 576] x
    [576, 49152] bf16 matmul 6.5x slower than fp32."""
    if "AVX512" not in torch.backends.cpu.get_cpu_capability():
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private in torch 2.x: absent means no
    native = any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    try:
        x = torch.ones(4, 4, dtype=torch.bfloat16)
        ok = bool(torch.equal(x @ x, torch.full((4, 4), 4.0, dtype=torch.bfloat16)))
    except RuntimeError:
        ok = False
    return native and ok


def cpu_has_avx512() -> bool:
    """Whether this CPU runs AVX-512 (torch's dispatch level, as vLLM's CPU build picks its ``_C_AVX512`` library)."""
    return "AVX512" in torch.backends.cpu.get_cpu_capability()
