"""int4-aten: torch's own int4 weight-only kernels, for decoding (small M).

CPU: ``_convert_weight_to_int4pack_for_cpu(codes int32 [N, K], 1)`` then ``_weight_int4pack_mm_for_cpu(x [M, K],
packed, group_size, scales_and_zeros)``; x in fp32, bf16 or fp16, and scales_and_zeros [K/g, N, 2] in x's dtype.
CUDA (tinygemm, sm80+): ``_convert_weight_to_int4pack(uint8 [N, K/2] with even k in the high nibble, inner_k_tiles)``
then ``_weight_int4pack_mm(x bf16 [M, K], ...)``. Both dequantize ``(q - 8) * scale + zero`` with a float zero.

GPTQ's integer zero z (v1 stores z - 1; ``unpack_qzeros`` adds the 1 back) maps exactly:
``(q - z) * s = (q - 8) * s + (8 - z) * s``, so zero = (8 - z) * s, computed in fp32 and rounded once to x's dtype.
Act-order: K is sorted by g_idx once here (groups become contiguous) and x's columns are permuted at run time.
Forward only: the input gradient would need the transposed weight, which these kernels cannot read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gptqlora.quant.kernels.registry import GPTQWeight, LayerFacts
from gptqlora.quant.pack import unpack_qweight, unpack_qzeros


@dataclass(frozen=True)
class Int4State:
    """packed: the kernel's opaque layout of codes [N, K] (K in group order); scales_and_zeros [G, N, 2];
    perm int64 [K] (sorted position -> original column) or None."""

    packed: Tensor
    scales_and_zeros: Tensor
    group_size: int
    perm: Tensor | None


def inner_k_tiles(in_features: int) -> int | None:
    """tinygemm's inner K tiling: the largest of 8, 4, 2 with K a multiple of 16 tiles of it; None when none fits."""
    return next((t for t in (8, 4, 2) if in_features % (16 * t) == 0), None)


def unsupported(facts: LayerFacts, device: torch.device) -> str | None:
    k, n = facts.in_features, facts.out_features
    if k % facts.group_size:
        return f"K = {k} is not a multiple of the group size {facts.group_size} (a ragged last group)"
    if facts.act_order and not facts.sortable:
        return "g_idx does not sort into contiguous groups of group_size columns"
    if device.type == "cpu" and n % 16:
        return f"N = {n} is not a multiple of 16"
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device) < (8, 0):
            return "tinygemm needs compute capability 8.0 (sm80) or newer"
        if n % 8:
            return f"N = {n} is not a multiple of 8"
        if inner_k_tiles(k) is None:
            return f"K = {k} is not a multiple of 32"
    return None


CPU_REPACK_ROWS = 512  # output rows converted at a time on the CPU (a multiple of 16)


def _codes_nk(weight: GPTQWeight, perm: Tensor | None, lo: int, hi: int) -> Tensor:
    """Codes int32 [hi - lo, K] of output rows lo..hi, K in group order."""
    codes = unpack_qweight(weight.qweight[:, lo:hi].contiguous(), 4, weight.facts.in_features)  # [K, hi - lo]
    if perm is not None:
        codes = codes.index_select(0, perm)
    return codes.T.contiguous()


def repack(weight: GPTQWeight, dtype: torch.dtype) -> Int4State:
    f = weight.facts
    perm = None
    if f.act_order:
        perm = torch.argsort(weight.g_idx.long(), stable=True)  # [K]; group r is now columns [r*g, (r+1)*g)
    s = weight.scales.float()  # [G, N]
    z = unpack_qzeros(weight.qzeros, 4, f.out_features).float()  # [G, N]
    scales_and_zeros = torch.stack([s, (8 - z) * s], dim=-1).to(dtype).contiguous()  # [G, N, 2]
    n = f.out_features
    if weight.qweight.device.type == "cuda":
        codes_nk = _codes_nk(weight, perm, 0, n)
        pairs = (codes_nk[:, ::2] << 4 | codes_nk[:, 1::2]).to(torch.uint8)  # [N, K/2], even k high
        packed = torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles(f.in_features))
    else:
        # The CPU layout is row by row ([N, K/2] bytes), so rows are converted in slices: the int32 temporaries are
        # K x 512, not K x N twice (360 MB for 7B's down_proj).
        packed = None
        for lo in range(0, n, CPU_REPACK_ROWS):
            hi = min(lo + CPU_REPACK_ROWS, n)
            part = torch.ops.aten._convert_weight_to_int4pack_for_cpu(_codes_nk(weight, perm, lo, hi), 1)
            if packed is None:
                packed = part.new_empty((n, *part.shape[1:]))
            packed[lo:hi] = part
    return Int4State(packed, scales_and_zeros, f.group_size, perm)


def matmul(x: Tensor, state: Int4State, w: Tensor | None = None) -> Tensor:
    """x [M, K] @ W [K, N] (``w`` is never given: this backend keeps no dense weight)."""
    if state.perm is not None:
        x = x.index_select(1, state.perm)
    x = x.contiguous()
    if x.device.type == "cuda":
        return torch.ops.aten._weight_int4pack_mm(x, state.packed, state.group_size, state.scales_and_zeros)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x, state.packed, state.group_size, state.scales_and_zeros)
