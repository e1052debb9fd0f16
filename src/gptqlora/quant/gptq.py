"""GPTQ (Frantar et al., 2022): a Hessian accumulator and a pure solver.

The solver quantizes W [N, K] column by column in the order of the (optionally permuted) Hessian, spreading each
column's rounding error over the columns not yet quantized with the upper Cholesky factor of H^-1. Names follow the
paper: W, H, Hinv, Q, Err1, Losses.

Column orders (:func:`column_order`): natural; act-order (desc_act, whose dynamic groups make g_idx a permutation);
group-aware (groups by importance, columns within each group by importance: g_idx stays k // group_size).

Memory: besides the caller's W and H, the solver holds one float32 copy of W and two K x K buffers (H, damped in
place, then its inverse; the Cholesky factors), where a plain implementation holds five to seven K x K temporaries.
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

    ROWS = 1024  # rows of H per bf16 product: temporaries of ROWS x K, not K x K twice (693 MiB at K = 11008)

    def add(self, x: Tensor) -> None:
        """Add a batch of inputs [..., K] (every token counts; calibration windows carry no padding)."""
        x = x.reshape(-1, x.shape[-1]).to(self.sum.device, self.product_dtype)  # [T, K]
        with torch.autocast(x.device.type, enabled=False):
            if self.product_dtype == torch.float32:
                self.sum.addmm_(x.T, x)
            else:
                for lo in range(0, x.shape[1], self.ROWS):
                    self.sum[lo:lo + self.ROWS] += (x[:, lo:lo + self.ROWS].T @ x).float()
        self.n_tokens += x.shape[0]

    def hessian(self) -> Tensor:
        if self.n_tokens == 0:
            raise RuntimeError("no calibration inputs reached this layer: the Hessian is empty")
        return self.sum * (2.0 / self.n_tokens)


def column_order(d: Tensor, group_size: int, act_order: bool, group_aware: bool) -> Tensor:
    """The order in which the solver quantizes W's columns, as a permutation of 0..K-1.

    GPTQ's error feedback helps most when the columns that matter most (large Hessian diagonal: inputs with large
    activations) are quantized first, while the most columns remain to absorb their rounding error.

    Args:
        d: diag(H) [K].
        group_size: columns per group (K for one group per row).
        act_order: descending d over all columns (desc_act); a group is then a run of positions, so the
            checkpoint's g_idx is a permutation unless the groups are static.
        group_aware: keep each group's columns together: groups by descending max(d) over their columns, and
            within a group its columns by descending d. Groups stay the contiguous k // group_size, so g_idx needs no
            permutation and every kernel's fast path applies. Measured (issue 9) it keeps only part of act-order's
            benefit; act-order with static groups keeps more, and is QuantConfig's default.
    Returns:
        perm, int64 [K]: position p quantizes column perm[p].
    Raises:
        ValueError: both orders asked for.
    """
    n_cols = d.shape[0]
    if act_order and group_aware:
        raise ValueError("act_order and group_aware are two different column orders: choose one")
    if act_order:
        return torch.argsort(d, descending=True)
    if not group_aware:
        return torch.arange(n_cols, device=d.device)
    starts = range(0, n_cols, group_size)  # a ragged last group is a group like the others
    within = [s + torch.argsort(d[s:s + group_size], descending=True) for s in starts]
    importance = torch.stack([d[s:s + group_size].max() for s in starts])  # [G]
    return torch.cat([within[gi] for gi in torch.argsort(importance, descending=True).tolist()])


def _prepared_hessian(H: Tensor, perm: Tensor | None, dead: Tensor) -> Tensor:
    """A float32 copy of H, permuted to processing order, with dead inputs' diagonal pinned to 1.

    One K x K copy is made (the gather is the copy), so the caller's H is never written.
    """
    H = H.detach().to(torch.float32)
    H = H[perm[:, None], perm] if perm is not None else H.clone()
    diag = H.diagonal()
    diag[dead if perm is None else dead[perm]] = 1
    return H


def _inverse_cholesky_upper(make_H, damp_percent: float, max_tries: int = 6) -> Tensor:
    """Upper Cholesky factor U of (H + damp I)^-1 (U^T U = the inverse), raising the damping tenfold on failure.

    Memory: two K x K buffers in all (7B's down_proj: K = 11008, 485 MB each). ``make_H()`` gives a fresh H that this
    function owns; it is damped in place, factored into the second buffer, inverted back into the first and factored
    again into the second. The buffers are column-major, the layout LAPACK works in, so torch makes no temporary
    copies. A failed attempt asks ``make_H`` for a fresh copy (the failure is rare; the inverse overwrote H).
    """
    H = make_H()
    n = H.shape[0]
    mean_diag = torch.mean(torch.diag(H))
    out = torch.empty(n, n, dtype=H.dtype, device=H.device).mT  # column-major
    info = torch.empty((), dtype=torch.int32, device=H.device)
    damp = damp_percent
    for attempt in range(max_tries):
        if attempt:
            H = make_H()
        H.diagonal().add_(damp * mean_diag)
        torch.linalg.cholesky_ex(H, out=(out, info))  # L: H = L L^T
        if info == 0:
            Hinv = H.mT  # column-major view of H's buffer, which is no longer needed
            torch.cholesky_inverse(out, out=Hinv)
            torch.linalg.cholesky_ex(Hinv, upper=True, out=(out, info))
            if info == 0:
                return out
        damp *= 10
    raise RuntimeError(f"the Hessian is not positive definite even with damping {damp / 10:g} x mean(diag(H)): "
                       "calibrate on more or more varied samples")


def gptq_solve(W: Tensor, H: Tensor, bits: int = 4, group_size: int = 128, sym: bool = True, act_order: bool = False,
               static_groups: bool = False, group_aware: bool = False, damp_percent: float = 0.01,
               block_size: int = 128) -> QuantResult:
    """Quantize one weight matrix with GPTQ.

    Rows are independent given H, so layers sharing an input (q, k, v) can be solved at once by stacking their rows.

    Args:
        W: weight [N, K] (out, in); not modified.
        H: Hessian [K, K] of the layer inputs (see :class:`HessianAccumulator`); not modified.
        bits, group_size, sym: the grid (group_size -1 = one group per row; a ragged last group is allowed).
        act_order: quantize columns by descending diag(H); codes, g_idx and groups come back in original column order.
        static_groups: compute every group's scale and zero from the original W before any update.
        group_aware: group-aware reordering (see :func:`column_order`); not with ``act_order``.
        damp_percent: damping as a fraction of mean(diag(H)); raised and retried when Cholesky fails.
        block_size: columns per lazy batch update.
    Returns:
        :class:`QuantResult` with the codes the solver chose (never re-derived) and the summed GPTQ loss.
    """
    n_rows, n_cols = W.shape
    g = n_cols if group_size == -1 else group_size
    n_groups = num_groups(n_cols, group_size)

    # Inputs that never fire carry no information: pin their Hessian diagonal and drop the weights.
    d = torch.diag(H).to(torch.float32)  # [K]
    dead = d == 0
    d[dead] = 1
    perm = column_order(d, g, act_order, group_aware)
    permuted = act_order or group_aware
    W = W.detach().to(torch.float32)
    W = W[:, perm] if permuted else W.clone()  # [N, K] in processing order, our own copy
    W[:, dead[perm]] = 0

    # Group of each position in processing order. Groups are the contiguous k // g, except with dynamic act-order,
    # where a group is a run of g positions (and the checkpoint's g_idx becomes a permutation).
    contiguous_groups = static_groups or not act_order
    g_of_pos = (perm // g) if contiguous_groups else (torch.arange(n_cols, device=W.device) // g)
    g_of_pos_list = g_of_pos.tolist()
    # With dynamic grids (every order but static groups) each group is one run of positions, whose grid is computed
    # on entering it from the run's weights as updated so far.
    group_end = {}  # group -> one past its last position
    for pos, gi in enumerate(g_of_pos_list):
        group_end[gi] = pos + 1

    scales = torch.empty(n_groups, n_rows, dtype=torch.float32, device=W.device)
    zeros = torch.empty_like(scales)
    if static_groups:
        for gi in range(n_groups):
            cols = (g_of_pos == gi).nonzero().squeeze(1)  # positions of original columns gi*g .. gi*g+g-1
            scales[gi], zeros[gi] = compute_qparams(W[:, cols], bits, sym)

    Hinv = _inverse_cholesky_upper(lambda: _prepared_hessian(H, perm if permuted else None, dead), damp_percent)
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
                if not static_groups:
                    # Enter a new group: its grid comes from the weights as they are now, error updates
                    # included; the part of the group beyond this block has the earlier blocks' updates.
                    end = group_end[gi]
                    cur = W1[:, i:end - i1]
                    if end > i2:
                        cur = torch.cat([cur, W[:, i2:end]], dim=1)
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
    del W, Hinv

    if permuted:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
    if contiguous_groups:
        g_idx = group_index(n_cols, group_size).to(codes.device)
    else:
        g_idx = (inv // g).to(torch.int32)  # column k was quantized at position inv[k]
    return QuantResult(codes, scales, zeros, g_idx, float(Losses.sum()))
