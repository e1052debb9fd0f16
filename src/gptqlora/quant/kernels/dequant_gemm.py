"""dequant-gemm: dequantize into a reused buffer in a few cheap passes, then one GEMM (prefill and training).

The reference unpacks the codes to int32 [K, N], casts them, gathers or broadcasts zeros and scales and subtracts and
multiplies: five passes over K*N elements, two of them 4-byte integers, and fresh allocations each time. Here:
the words' bytes are transposed once into byte rows (K*b/8 x N bytes), each code position in a byte is one uint8
shift/mask, one converting copy puts the codes in their rows of the output, and one ``addcmul`` applies
``w = q * s + o`` with ``o = -z * s`` precomputed per group at repack. Only the last two passes touch K*N elements of
the compute dtype; on this CPU that is ~10x faster than the reference at 7B shapes. Codes of 3 bits straddle bytes and
are left to ``dequant``. In fp32 the weight is the reference's bit for bit (q*s and z*s are exact there).

Act-order: the repack sorts K by g_idx once (the groups become contiguous, the codes are packed again in that order,
a copy the size of qweight) and the input's columns are permuted at run time (and the input gradient's back).
Without act-order the state holds the layer's own qweight: no copy.

A CPU without native bf16 (``hardware.cpu_has_native_bf16``) runs a bf16 GEMM several times slower than an fp32 one
(emulated: 24 ms against 1.5 ms for 16 x 576 x 1536 on an AVX2 CPU), so there a bf16 layer's state dequantizes in fp32
and the GEMM runs in fp32, its output rounded to bf16: the product of the same codes, computed more exactly.

No grad: the weight goes into one buffer per (device, dtype), shared by all layers and grown to the largest weight
seen, so a forward allocates nothing of the weight's size. ``dense_weight`` (a fresh tensor) is what the training
path keeps between a checkpoint's recompute and its backward. Not thread-safe: two threads running quantized layers
at once on one device and dtype would share the buffer.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor

from gptqlora.hardware import cpu_has_native_bf16
from gptqlora.quant.kernels.registry import GPTQWeight, LayerFacts
from gptqlora.quant.pack import pack_rows, unpack_qweight, unpack_qzeros

_WORKSPACES: dict[tuple[torch.device, torch.dtype], Tensor] = {}  # shared buffers, per device and dtype


@dataclass(frozen=True)
class DequantGemmState:
    """qweight int32 [K*b/32, N] with K in group order; scale, offset [G, 1, N] in the GEMM's dtype (w = q*s + o),
    which is the input's but fp32 for bf16 on a CPU without native bf16; perm int64 [K] (sorted position -> original
    column) or None."""

    qweight: Tensor
    scale: Tensor
    offset: Tensor
    perm: Tensor | None
    bits: int
    group_size: int
    in_features: int
    out_features: int
    dtype: torch.dtype


def unsupported(facts: LayerFacts, device: torch.device) -> str | None:
    if sys.byteorder != "little":
        return "it reads int32 words as little-endian bytes"
    per_word = 32 // facts.bits
    if facts.group_size % per_word:
        return f"group size {facts.group_size} is not a multiple of the {per_word} codes in a word"
    if facts.act_order and not facts.sortable:
        return "g_idx does not sort into contiguous groups of group_size columns"
    return None


def gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the weight is dequantized and multiplied in for inputs of ``dtype`` (see the module docstring)."""
    return torch.float32 if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_native_bf16() else dtype


def repack(weight: GPTQWeight, dtype: torch.dtype) -> DequantGemmState:
    dtype = gemm_dtype(dtype, weight.qweight.device)
    f = weight.facts
    s = weight.scales.float()  # [G, N]
    z = unpack_qzeros(weight.qzeros, f.bits, f.out_features).float()  # [G, N]
    qweight, perm = weight.qweight, None
    if f.act_order:
        perm = torch.argsort(weight.g_idx.long(), stable=True)  # [K]
        codes = unpack_qweight(weight.qweight, f.bits, f.in_features)  # [K, N]
        qweight = pack_rows(codes.index_select(0, perm), f.bits)
    # Row-major [G, 1, N]: unpack_qzeros returns a transposed view, and a column-major operand makes addcmul ~8x slower.
    scale = s.to(dtype).contiguous()[:, None, :]
    offset = (-z * s).to(dtype).contiguous()[:, None, :]
    return DequantGemmState(qweight.contiguous(), scale, offset, perm, f.bits, f.group_size, f.in_features,
                            f.out_features, dtype)


def dequantize_into(state: DequantGemmState, out: Tensor) -> Tensor:
    """Write the dense weight [K, N] (K in the state's order) into ``out`` and return it.

    Four steps, none of them a gather: (1) the words' bytes are transposed into byte rows (a shared uint8 buffer,
    [K*b/8, N], byte row r holding rows ``r*8/b ... r*8/b + 8/b - 1``); (2) per code position c in a byte, one
    shift/mask gives those codes as [K*b/8, N] uint8; (3) one converting copy writes them to their rows of ``out``;
    (4) one ``addcmul`` over ``out`` seen as [G, g, N] applies ``w = q * s + o``.
    """
    bits, g, k, n = state.bits, state.group_size, state.in_features, state.out_features
    per_byte, mask = 8 // bits, (1 << bits) - 1
    words = state.qweight.view(torch.uint8).view(k * bits // 32, n, 4)  # little-endian bytes of each word
    byte_rows = workspace(k * bits // 8 * n, torch.uint8, out.device).view(k * bits // 32, 4, n)
    byte_rows.copy_(words.permute(0, 2, 1))
    byte_rows = byte_rows.view(k * bits // 8, n)  # [K*b/8, N]
    rows = out.view(k * bits // 8, per_byte, n)  # row k = per_byte * r + c
    for c in range(per_byte):
        shifted = byte_rows if c == 0 else byte_rows >> (bits * c)
        rows[:, c, :].copy_(shifted if c == per_byte - 1 else shifted & mask)
    full = k // g  # groups of exactly g rows; a last, shorter group (576 = 4 * 128 + 64) is done apart
    if full:
        w = out[:full * g].view(full, g, n)
        torch.addcmul(state.offset[:full], w, state.scale[:full], out=w)
    if full * g < k:
        w = out[full * g:]
        torch.addcmul(state.offset[-1], w, state.scale[-1], out=w)
    return out


def workspace(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A flat buffer of at least ``numel`` elements, shared by every layer on ``device`` in ``dtype``."""
    key = (device, dtype)
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        _WORKSPACES.pop(key, None)  # free the old one before allocating the larger
        with torch.inference_mode(False):  # a normal tensor, writable in and out of inference mode
            buf = _WORKSPACES[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def release_workspaces() -> None:
    """Free the shared dequantization buffers (they come back at the next call)."""
    _WORKSPACES.clear()


def _shared_weight(state: DequantGemmState) -> Tensor:
    k, n = state.in_features, state.out_features
    return dequantize_into(state, workspace(k * n, state.dtype, state.qweight.device).view(k, n))


def dense_weight(state: DequantGemmState) -> Tensor:
    """A fresh dense weight [K, N] (K in the state's order)."""
    out = torch.empty(state.in_features, state.out_features, dtype=state.dtype, device=state.qweight.device)
    return dequantize_into(state, out)


def matmul(x: Tensor, state: DequantGemmState, w: Tensor | None = None) -> Tensor:
    """x [M, K] @ W [K, N]."""
    if state.perm is not None:
        x = x.index_select(1, state.perm)
    return (x.to(state.dtype) @ (_shared_weight(state) if w is None else w)).to(x.dtype)


def matmul_t(dy: Tensor, state: DequantGemmState, w: Tensor | None = None) -> Tensor:
    """dy [M, N] @ W^T: the input gradient [M, K], in the input's column order."""
    dx = (dy.to(state.dtype) @ (_shared_weight(state) if w is None else w).T).to(dy.dtype)  # [M, K], state's K order
    if state.perm is None:
        return dx
    return torch.empty_like(dx).index_copy_(1, state.perm, dx)
