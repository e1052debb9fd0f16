"""triton: fused dequant-matmul over GPTQ v1 codes, and its transpose for the input gradient (2/4/8-bit, g_idx-aware).

Each program dequantizes a [BLOCK_K, BLOCK_N] tile of W in registers, ``(q - z[g_idx[k]]) * s[g_idx[k]]`` in fp32,
from the layer's own qweight (no repack of the codes: g_idx is read per row, so act-order needs no sorting) and
accumulates ``x @ W`` (forward) or ``dy @ W^T`` (backward) in fp32. fp32 inputs use IEEE fp32 products (no TF32), so
the result is the reference's within fp32 tolerance. Block sizes are fixed per M range (not autotuned, not yet
measured on a GPU); the tests pass small ones and run the kernels on the CPU under ``TRITON_INTERPRET=1``.

Imported only when the triton backend is considered (CUDA, or an explicit preference): it needs triton.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from gptqlora.quant.kernels.registry import GPTQWeight, LayerFacts
from gptqlora.quant.pack import unpack_qzeros


@dataclass(frozen=True)
class TritonState:
    """The layer's own qweight [K*b/32, N], scales fp16 [G, N] and g_idx [K]; zeros int32 [G, N] unpacked."""

    qweight: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    bits: int
    in_features: int
    out_features: int


def interpreting() -> bool:
    """Whether triton runs kernels in its interpreter (TRITON_INTERPRET=1), which takes CPU tensors."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4
    return bool(knobs.runtime.interpret) if knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"


def unsupported(facts: LayerFacts, device: torch.device) -> str | None:
    if device.type == "cpu" and not interpreting():
        return "Triton kernels run on CUDA (on the CPU only under TRITON_INTERPRET=1, for tests)"
    return None


def repack(weight: GPTQWeight, dtype: torch.dtype) -> TritonState:
    f = weight.facts
    zeros = unpack_qzeros(weight.qzeros, f.bits, f.out_features).contiguous()  # [G, N]
    return TritonState(weight.qweight.contiguous(), weight.scales.contiguous(), zeros,
                       weight.g_idx.to(torch.int32).contiguous(), f.bits, f.in_features, f.out_features)


@triton.jit
def _weight_tile(qw_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, k_mask, n_mask,
                 stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn, BITS: tl.constexpr):
    """W[offs_k, offs_n] in fp32: [BLOCK_K, BLOCK_N]."""
    per_word: tl.constexpr = 32 // BITS
    mask: tl.constexpr = (1 << BITS) - 1
    both = k_mask[:, None] & n_mask[None, :]
    words = tl.load(qw_ptr + (offs_k // per_word)[:, None] * stride_qk + offs_n[None, :] * stride_qn, mask=both,
                    other=0)
    q = (words >> ((offs_k % per_word) * BITS)[:, None]) & mask  # arithmetic shift; the mask drops the sign fill
    g = tl.load(g_ptr + offs_k, mask=k_mask, other=0)
    s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=both, other=0.0)
    z = tl.load(z_ptr + g[:, None] * stride_zg + offs_n[None, :] * stride_zn, mask=both, other=0)
    return (q.to(tl.float32) - z.to(tl.float32)) * s.to(tl.float32)


@triton.jit
def _matmul_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, y_ptr, M, N, K,
                   stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
                   stride_ym, stride_yn, BITS: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y [M, N] = x [M, K] @ W [K, N]; one program per [BLOCK_M, BLOCK_N] tile of y."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = offs_m < M, offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = _weight_tile(qw_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, k_mask, n_mask,
                         stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn, BITS)
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=PRECISION)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _matmul_t_kernel(dy_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, dx_ptr, M, N, K,
                     stride_dm, stride_dn, stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn,
                     stride_xm, stride_xk, BITS: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx [M, K] = dy [M, N] @ W^T; one program per [BLOCK_M, BLOCK_K] tile of dx, looping over N."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask, k_mask = offs_m < M, offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dm + offs_n[None, :] * stride_dn,
                     mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        w = _weight_tile(qw_ptr, s_ptr, z_ptr, g_ptr, offs_k, offs_n, k_mask, n_mask,
                         stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn, BITS)  # [BK, BN]
        acc = tl.dot(dy, tl.trans(w.to(dy.dtype)), acc, input_precision=PRECISION)
    tl.store(dx_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, acc.to(dx_ptr.dtype.element_ty),
             mask=m_mask[:, None] & k_mask[None, :])


def default_blocks(m: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) for M rows: thin tiles for decoding, square ones for prefill and training."""
    if m <= 16:
        return 16, 64, 64
    if m <= 64:
        return 64, 64, 32
    return 64, 128, 32


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 only matters for fp32 inputs


def matmul(x: Tensor, state: TritonState, w: Tensor | None = None, blocks: tuple[int, int, int] | None = None
           ) -> Tensor:
    """x [M, K] @ W [K, N] (``w`` is never given: nothing dense is kept)."""
    m, k = x.shape
    n = state.out_features
    bm, bn, bk = blocks or default_blocks(m)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    _matmul_kernel[grid](x, state.qweight, state.scales, state.zeros, state.g_idx, y, m, n, k,
                         x.stride(0), x.stride(1), state.qweight.stride(0), state.qweight.stride(1),
                         state.scales.stride(0), state.scales.stride(1), state.zeros.stride(0), state.zeros.stride(1),
                         y.stride(0), y.stride(1), BITS=state.bits, PRECISION=_precision(x.dtype),
                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return y


def matmul_t(dy: Tensor, state: TritonState, w: Tensor | None = None, blocks: tuple[int, int, int] | None = None
             ) -> Tensor:
    """dy [M, N] @ W^T: the input gradient [M, K], read straight from the packed codes."""
    m, n = dy.shape
    k = state.in_features
    bm, bn, bk = blocks or default_blocks(m)
    dx = torch.empty(m, k, dtype=dy.dtype, device=dy.device)
    grid = (triton.cdiv(m, bm), triton.cdiv(k, bk))
    _matmul_t_kernel[grid](dy, state.qweight, state.scales, state.zeros, state.g_idx, dx, m, n, k,
                           dy.stride(0), dy.stride(1), state.qweight.stride(0), state.qweight.stride(1),
                           state.scales.stride(0), state.scales.stride(1), state.zeros.stride(0),
                           state.zeros.stride(1), dx.stride(0), dx.stride(1), BITS=state.bits,
                           PRECISION=_precision(dy.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    return dx
