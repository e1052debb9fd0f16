"""GPTQ (Frantar et al., 2022): a Hessian accumulator and a pure solver.

The solver quantizes W [N, K] column by column in the order of the (optionally permuted) Hessian, spreading each
column's rounding error over the columns not yet quantized with the upper Cholesky factor of H^-1. Names follow the
paper: W, H, Hinv, Q, Err1, Losses.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gptqlora.quant.grid import QuantResult, compute_qparams, group_index, num_groups


class HessianAccumulator:
    """H = (2/n) * sum over tokens of x x^T, summed in float32 from the inputs a layer sees.

    With ``product_dtype=torch.bfloat16`` each batch's x^T x is computed by a bf16 matmul (fp32 accumulation inside,
    rounded once per batch) and added to the float32 sum: ~3.5x faster on CPUs with native bf16, with a relative
    error per entry far below the 1% damping GPTQ adds anyway.
    """

    def __init__(self, in_features: int, device: torch.device | str = "cpu",
                 product_dtype: torch.dtype = torch.float32) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n_tokens = 0
        self.product_dtype = product_dtype

    def add(self, x: Tensor) -> None:
        """Add a batch of inputs [..., K] (every token counts; calibration windows carry no padding)."""
        x = x.reshape(-1, x.shape[-1]).to(self.sum.device, self.product_dtype)  # [T, K]
        with torch.autocast(x.device.type, enabled=False):
            if self.product_dtype == torch.float32:
                self.sum.addmm_(x.T, x)
            else:
                self.sum += (x.T @ x).float()
        self.n_tokens += x.shape[0]

    def hessian(self) -> Tensor:
        if self.n_tokens == 0:
            raise RuntimeError("no calibration inputs reached this layer: the Hessian is empty")
        return self.sum * (2.0 / self.n_tokens)


def _inverse_cholesky_upper(H: Tensor, damp_percent: float, max_tries: int = 6) -> Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, raising the damping tenfold each time the factorisation fails."""
    mean_diag = torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    damp = damp_percent
    for _ in range(max_tries):
        L, info = torch.linalg.cholesky_ex(H + damp * mean_diag * eye)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U
        damp *= 10
    raise RuntimeError(f"the Hessian is not positive definite even with damping {damp / 10:g} x mean(diag(H)): "
                       "calibrate on more or more varied samples")


def gptq_solve(W: Tensor, H: Tensor, bits: int = 4, group_size: int = 128, sym: bool = True, act_order: bool = False,
               static_groups: bool = False, damp_percent: float = 0.01, block_size: int = 128) -> QuantResult:
    """Quantize one weight matrix with GPTQ.

    Rows are independent given H, so layers sharing an input (q, k, v) can be solved at once by stacking their rows.

    Args:
        W: weight [N, K] (out, in); not modified.
        H: Hessian [K, K] of the layer inputs (see :class:`HessianAccumulator`); not modified.
        bits, group_size, sym: the grid (group_size -1 = one group per row; a ragged last group is allowed).
        act_order: quantize columns by descending diag(H); codes, g_idx and groups come back in original column order.
        static_groups: compute every group's scale and zero from the original W before any update.
        damp_percent: damping as a fraction of mean(diag(H)); raised and retried when Cholesky fails.
        block_size: columns per lazy batch update.
    Returns:
        :class:`QuantResult` with the codes the solver chose (never re-derived) and the summed GPTQ loss.
    """
    W = W.detach().to(torch.float32).clone()
    H = H.detach().to(torch.float32).clone()
    n_rows, n_cols = W.shape
    g = n_cols if group_size == -1 else group_size
    n_groups = num_groups(n_cols, group_size)

    # Inputs that never fire carry no information: pin their Hessian row and drop the weights.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    scales = torch.empty(n_groups, n_rows, dtype=torch.float32, device=W.device)
    zeros = torch.empty_like(scales)
    if static_groups:
        for gi in range(n_groups):
            scales[gi], zeros[gi] = compute_qparams(W[:, gi * g:(gi + 1) * g], bits, sym)

    perm = torch.arange(n_cols, device=W.device)
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    # Group of each column in processing order: by original index for static groups, by position otherwise.
    g_of_pos = (perm // g) if static_groups else (torch.arange(n_cols, device=W.device) // g)
    g_of_pos_list = g_of_pos.tolist()

    Hinv = _inverse_cholesky_upper(H, damp_percent)
    del H
    codes = torch.empty(n_rows, n_cols, dtype=torch.uint8, device=W.device)
    Losses = torch.zeros(n_rows, dtype=torch.float32, device=W.device)

    maxq = float((1 << bits) - 1)
    for i1 in range(0, n_cols, block_size):
        i2 = min(i1 + block_size, n_cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()  # [N, B]
        Q1 = torch.empty_like(W1)  # codes of this block
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        inv_d = 1.0 / torch.diag(Hinv1)  # [B]; the divisor is U's diagonal, not diag(H^-1)
        for i in range(count):
            col = i1 + i
            gi = g_of_pos_list[col]
            if col == 0 or gi != g_of_pos_list[col - 1] or static_groups:
                if not static_groups and col % g == 0:
                    # Enter a new group: its grid comes from the weights as they are now, error updates
                    # included; the part of the group beyond this block has the earlier blocks' updates.
                    cur = W1[:, i:i + g]
                    if i + g > count:
                        cur = torch.cat([cur, W[:, i2:col + g]], dim=1)
                    scales[gi], zeros[gi] = compute_qparams(cur, bits, sym)
                scale, zero = scales[gi], zeros[gi]
            w = W1[:, i]  # [N]
            q = torch.clamp_(torch.round_(w / scale).add_(zero), 0, maxq)
            Q1[:, i] = q
            err1 = (w - (q - zero).mul_(scale)).mul_(inv_d[i])  # (w - dequant(q)) / d
            Err1[:, i] = err1
            W1[:, i:].addr_(err1, Hinv1[i, i:], alpha=-1)
        codes[:, i1:i2] = Q1.to(torch.uint8)
        # Loss per the paper: (w - q)^2 / d^2 / 2 summed, which is Err1^2 / 2.
        Losses += Err1.square().sum(dim=1) / 2
        # Lazy batch update: the rest of W sees this block's errors in one matmul.
        W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)

    inv = torch.argsort(perm)
    codes = codes[:, inv]
    if static_groups or not act_order:
        g_idx = group_index(n_cols, group_size).to(W.device)
    else:
        g_idx = (inv // g).to(torch.int32)  # column k was quantized at position inv[k]
    return QuantResult(codes, scales, zeros, g_idx, float(Losses.sum()))
