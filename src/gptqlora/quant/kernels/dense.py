"""dense: the dequantized weight, made once per layer and dtype and kept while 'dense' is the preference.

The fastest path when memory does not matter (a float model's own matmul), and what the GPTQ driver uses while it
calibrates a block. It costs K*N elements of the compute dtype per layer: the 4-bit memory saving is gone while it is
chosen. Kept in nn.Linear's [N, K] layout: CPU BLAS runs ``F.linear`` on it ~2x faster at M = 1 in bf16 than
``x @ W`` on [K, N].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gptqlora.quant.kernels import dequant
from gptqlora.quant.kernels.registry import GPTQWeight


@dataclass(frozen=True)
class DenseState:
    weight: Tensor  # [N, K] in the compute dtype


def repack(weight: GPTQWeight, dtype: torch.dtype) -> DenseState:
    return DenseState(dequant.dense_weight(dequant.repack(weight, dtype)).T.contiguous())


def dense_weight(state: DenseState) -> Tensor:
    """The kept weight itself (keeping it for backward costs nothing more)."""
    return state.weight


def matmul(x: Tensor, state: DenseState, w: Tensor | None = None) -> Tensor:
    return F.linear(x, state.weight)


def matmul_t(dy: Tensor, state: DenseState, w: Tensor | None = None) -> Tensor:
    return dy @ state.weight
