"""dense: the dequantized weight, made once per layer and dtype and kept (the old ``set_cache(True)``).

The fastest path when memory does not matter (a plain matmul), and what the GPTQ driver uses while it calibrates a
block. It costs K*N elements of the compute dtype per layer: the 4-bit memory saving is gone while it is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from gptqlora.quant.kernels import dequant
from gptqlora.quant.kernels.registry import GPTQWeight


@dataclass(frozen=True)
class DenseState:
    weight: Tensor  # [K, N] in the compute dtype


def repack(weight: GPTQWeight, dtype: torch.dtype) -> DenseState:
    return DenseState(dequant.dense_weight(dequant.repack(weight, dtype)))


def dense_weight(state: DenseState) -> Tensor:
    """The kept weight itself (keeping it for backward costs nothing more)."""
    return state.weight


def matmul(x: Tensor, state: DenseState, w: Tensor | None = None) -> Tensor:
    return x @ state.weight


def matmul_t(dy: Tensor, state: DenseState, w: Tensor | None = None) -> Tensor:
    return dy @ state.weight.T
