"""The quantization grid: per-group scale and zero point, quantize, dequantize, and round-to-nearest.

Conventions (those of the GPTQ v1 checkpoint format, see INTEROP.md):
- codes q are integers in [0, 2^bits - 1]; a weight is ``scale * (q - zero)``;
- a symmetric grid has ``zero = 2^(bits-1)`` (8 for 4 bits);
- v1 stores ``zero - 1``, so ``zero = 0`` cannot be stored: asymmetric zeros are kept in [1, maxq];
- scales are rounded to fp16 when they are computed, because fp16 is what the checkpoint stores: the solver then
  chooses its codes against exactly the scale that will be used at inference (INTEROP point 8).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class QuantResult:
    """One layer's quantized weights, in the original column order.

    codes: uint8 [N, K]; scales, zeros: float32 [G, N] (zeros integer-valued); g_idx: int32 [K] (group of column k);
    loss: GPTQ's sum of (w - q)^2 / Hinv_kk^2 / 2 (0 for RTN, which does not compute it).
    damp: the damping GPTQ used, as a fraction of mean(diag(H)): the one asked for, or more when the Hessian needed
    it to factor (None for RTN).
    """

    codes: Tensor
    scales: Tensor
    zeros: Tensor
    g_idx: Tensor
    loss: float = 0.0
    damp: float | None = None

    def dequantize(self) -> Tensor:
        """The weight [N, K] in float32."""
        return dequantize(self.codes, self.scales[self.g_idx.long()].T, self.zeros[self.g_idx.long()].T)


def max_code(bits: int) -> int:
    return (1 << bits) - 1


def compute_qparams(w: Tensor, bits: int, sym: bool) -> tuple[Tensor, Tensor]:
    """Scale and zero of a per-row grid covering each row of ``w``.

    Args:
        w: [N, C] weights of one group (C columns), any float dtype.
        bits: code width.
        sym: symmetric grid around zero (zero point fixed at 2^(bits-1)).
    Returns:
        scale [N] float32 (fp16-representable) and zero [N] float32 (integer-valued).
    """
    maxq = max_code(bits)
    w = w.float()
    # The grid always contains 0 so that zero weights stay exactly zero.
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, -1.0, xmin)
    xmax = torch.where(dead, 1.0, xmax)
    if sym:
        scale = _fp16_representable(2 * xmax / maxq)
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        scale = _fp16_representable((xmax - xmin) / maxq)
        zero = torch.round(-xmin / scale)
        # v1 cannot store zero = 0; with zero = 1 the grid's top is (maxq - 1) * scale, so widen the step to keep xmax.
        low = zero < 1
        scale = torch.where(low, _fp16_representable(xmax / (maxq - 1)), scale)
        zero = zero.clamp(1, maxq)
    return scale, zero


def _fp16_representable(scale: Tensor) -> Tensor:
    # Round up to an fp16 value (what the checkpoint stores): rounding down would shrink the grid below the
    # group's range and push its extremes more than half a step away.
    scale = scale.clamp(min=6.2e-5)
    half = scale.half()
    up = torch.nextafter(half, torch.tensor(float("inf"), dtype=torch.float16, device=scale.device))
    return torch.where(half.float() < scale, up, half).float()


def quantize(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Codes of ``w`` on the grid: ``clamp(round(w / scale) + zero, 0, maxq)``.

    Shapes broadcast: w [N, C] with scale, zero [N, 1] (or [N] with w [N]). torch.round is round-half-to-even,
    like the reference implementations. Returns a float tensor of integer values.
    """
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, max_code(bits))


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """``scale * (codes - zero)`` in float32 (shapes broadcast as in :func:`quantize`)."""
    return scale * (codes.float() - zero)


def group_index(in_features: int, group_size: int) -> Tensor:
    """g_idx without act-order: ``k // group_size`` (one group when group_size is -1). int32 [K]."""
    g = in_features if group_size == -1 else group_size
    return torch.arange(in_features, dtype=torch.int32) // g


def num_groups(in_features: int, group_size: int) -> int:
    g = in_features if group_size == -1 else group_size
    return -(-in_features // g)


def rtn_quantize(weight: Tensor, bits: int, group_size: int, sym: bool) -> QuantResult:
    """Round-to-nearest, group by group: the baseline GPTQ must beat.

    Args:
        weight: [N, K].
    Returns:
        A :class:`QuantResult` with loss 0.
    """
    w = weight.float()
    n, k = w.shape
    g = k if group_size == -1 else group_size
    codes = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    scales, zeros = [], []
    for start in range(0, k, g):  # the last group may be ragged (576 % 128 = 64)
        block = w[:, start:start + g]
        scale, zero = compute_qparams(block, bits, sym)
        codes[:, start:start + g] = quantize(block, scale[:, None], zero[:, None], bits).to(torch.uint8)
        scales.append(scale)
        zeros.append(zero)
    return QuantResult(codes, torch.stack(scales), torch.stack(zeros), group_index(k, group_size).to(w.device))
