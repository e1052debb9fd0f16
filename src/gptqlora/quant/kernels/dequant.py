"""dequant: the reference kernel. Unpack the codes, dequantize the whole weight in the input's dtype, one matmul.

Every bit width (3 included), device, dtype and layout; forward and input gradient. Every other backend is tested
against it. Nothing is kept between calls: the state is the checkpoint buffers themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gptqlora.quant.kernels.registry import GPTQWeight
from gptqlora.quant.pack import unpack_qweight, unpack_qzeros


def dequantize_packed(qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Tensor, bits: int, in_features: int,
                      group_size: int, dtype: torch.dtype, sequential_groups: bool) -> Tensor:
    """The weight in [K, N] (in, out) layout and ``dtype``, from packed v1 buffers: ``s[g_idx[k]] * (q - z[g_idx[k]])``.

    ``sequential_groups`` (g_idx == k // group_size) lets the scales broadcast over whole groups instead of a gather.
    """
    q = unpack_qweight(qweight, bits, in_features).to(dtype)  # [K, N]
    n_out = q.shape[1]
    z = unpack_qzeros(qzeros, bits, n_out).to(dtype)  # [G, N]
    s = scales.to(dtype)  # [G, N]
    if sequential_groups and in_features % group_size == 0:
        n_groups = in_features // group_size
        w = (q.view(n_groups, group_size, n_out) - z[:, None, :]) * s[:, None, :]  # [G, g, N]
        return w.view(in_features, n_out)
    idx = g_idx.long()
    return (q - z[idx]) * s[idx]


@dataclass(frozen=True)
class DequantState:
    weight: GPTQWeight
    dtype: torch.dtype


def repack(weight: GPTQWeight, dtype: torch.dtype) -> DequantState:
    return DequantState(weight, dtype)


def dense_weight(state: DequantState) -> Tensor:
    """A fresh dense weight [K, N] in the state's dtype."""
    w, f = state.weight, state.weight.facts
    return dequantize_packed(w.qweight, w.qzeros, w.scales, w.g_idx, f.bits, f.in_features, f.group_size,
                             state.dtype, not f.act_order)


def matmul(x: Tensor, state: DequantState, w: Tensor | None = None) -> Tensor:
    """x [M, K] @ W [K, N]."""
    return x @ (dense_weight(state) if w is None else w)


def matmul_t(dy: Tensor, state: DequantState, w: Tensor | None = None) -> Tensor:
    """dy [M, N] @ W^T: the input gradient."""
    return dy @ (dense_weight(state) if w is None else w).T
