"""GPTQ (Frantar et al., 2022): a Hessian accumulator and a pure solver.

The solver quantizes W [N, K] column by column in the order of the (optionally permuted) Hessian, spreading each
column's rounding error over the columns not yet quantized with the upper Cholesky factor of H^-1. Names follow the
paper: W, H, Hinv, Q, Err1, Losses.

Column orders (:func:`column_order`): natural; act-order (desc_act, whose dynamic groups make g_idx a permutation);
group-aware (groups by importance, columns within each group by importance: g_idx stays k // group_size).

Memory: besides the caller's W, the solver holds one float32 copy of W (or none: the caller's own with
``overwrite_W``) and one K x K buffer: a copy of the caller's H, or the caller's own H when it is handed over
(:func:`handover`). Permutation, damping, both Cholesky factorisations and
the inverse happen in that buffer; a plain implementation holds five to seven K x K temporaries.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from gptqlora.quant.grid import QuantResult, compute_qparams, group_index, num_groups


class HessianAccumulator:
    """H = (2/n) * sum over tokens of x x^T, summed in float32 from the inputs a layer sees.

    The products are float32 whatever the inputs' dtype, as in reference GPTQ: bf16 inputs are exact in float32, and
    a bf16 product, rounded to 8 bits of mantissa, can leave H indefinite (two nearly collinear outlier channels are
    enough), so that the Cholesky factorisation fails at the asked damping and the layer is solved with ten times more.
    H is symmetric, so only its lower triangle is summed, in blocks of ``ROWS`` rows (about half the work of x^T x);
    the upper triangle is copied from it when H is read.
    """

    ROWS = 256

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.n_tokens = 0

    def add(self, x: Tensor) -> None:
        """Add a batch of inputs [..., K] (every token counts; calibration windows carry no padding)."""
        x = x.reshape(-1, x.shape[-1]).to(self.sum.device, torch.float32)  # [T, K]
        with torch.autocast(x.device.type, enabled=False):
            for lo in range(0, x.shape[1], self.ROWS):
                hi = min(lo + self.ROWS, x.shape[1])
                self.sum[lo:hi, :hi].addmm_(x[:, lo:hi].T, x[:, :hi])  # rows lo:hi up to the diagonal
        self.n_tokens += x.shape[0]

    def _complete(self) -> None:
        """Refuse an empty sum; copy the summed lower triangle onto the upper one."""
        if self.n_tokens == 0:
            raise RuntimeError("no calibration inputs reached this layer: the Hessian is empty")
        _symmetrize_from_lower_(self.sum)

    def hessian(self) -> Tensor:
        """H, a new tensor (the accumulator can go on adding)."""
        self._complete()
        return self.sum * (2.0 / self.n_tokens)

    def finish(self) -> Tensor:
        """H in the accumulator's own memory, which it gives up: a second [K, K] matrix (462 MiB for Llama-2-7B's
        down_proj) never lives next to the sum."""
        self._complete()
        H, self.sum = self.sum.mul_(2.0 / self.n_tokens), None
        return H


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


HessianSource = Tensor | Callable[[], Tensor]


def _permute_columns_(X: Tensor, perm: Tensor, rows: int = 512) -> None:
    """X[:, perm] written into X itself, ``rows`` rows at a time (temporaries of rows x K, not a copy of X)."""
    for r in range(0, X.shape[0], rows):
        X[r:r + rows] = X[r:r + rows][:, perm]


def _symmetrize_from_lower_(H: Tensor, cols: int = 512) -> None:
    """Copy H's lower triangle onto its upper one, in place, ``cols`` columns at a time: H is then exactly symmetric,
    so its row-major storage is also the column-major matrix LAPACK factors in place."""
    n = H.shape[0]
    for c0 in range(0, n, cols):
        c1 = min(c0 + cols, n)
        H[c0:c1, c1:] = H[c1:, c0:c1].T
        block = H[c0:c1, c0:c1]
        block.copy_(block.tril() + block.tril(-1).T)


def _prepare_hessian_(H: Tensor, perm: Tensor | None, dead: Tensor) -> Tensor:
    """H, owned by the solver, put in processing order in place: permuted (pure data movement), dead inputs'
    diagonal pinned to 1, and the upper triangle made a copy of the lower (the triangle the Cholesky reads)."""
    if perm is not None:
        _permute_columns_(H, perm)  # H[:, perm]
        _permute_columns_(H.mT, perm)  # then its rows: the transposed view's columns
    diag = H.diagonal()
    diag[dead if perm is None else dead[perm]] = 1
    _symmetrize_from_lower_(H)
    return H


def _inverse_cholesky_upper(make_H: Callable[[], Tensor], damp_percent: float, max_tries: int = 6
                            ) -> tuple[Tensor, float]:
    """Upper Cholesky factor U of (H + damp I)^-1 (U^T U = the inverse), raising the damping tenfold on failure.

    Memory: one K x K buffer, H's own (7B's down_proj: K = 11008, 462 MiB). ``make_H()`` gives a prepared H (see
    ``_prepare_hessian_``) that this function owns; it is damped, then factored, inverted and factored again in
    place, LAPACK writing into the column-major view of H's storage (exactly symmetric, so that view is H). A failed
    attempt asks ``make_H`` for a fresh H: the failure is rare, and the factorisation overwrote H.
    Returns:
        (U, a column-major view of the buffer ``make_H`` gave; the damping used).
    """
    H = make_H()
    mean_diag = torch.mean(torch.diag(H))
    info = torch.empty((), dtype=torch.int32, device=H.device)
    damp = damp_percent
    for attempt in range(max_tries):
        if attempt:
            H = make_H()
        H.diagonal().add_(damp * mean_diag)
        A = H.mT  # column-major; H is exactly symmetric, so A is H
        torch.linalg.cholesky_ex(A, out=(A, info))  # L: H = L L^T
        if info == 0:
            torch.cholesky_inverse(A, out=A)
            torch.linalg.cholesky_ex(A, upper=True, out=(A, info))
            if info == 0:
                return A, damp
        damp *= 10
    raise RuntimeError(f"the Hessian is not positive definite even with damping {damp / 10:g} x mean(diag(H)): "
                       "calibrate on more or more varied samples")


def _hessian_maker(H: HessianSource, device: torch.device) -> Callable[[], Tensor]:
    """A function giving a float32 Hessian the solver owns: a copy of a Tensor (the caller's is never written), or
    what a caller's function gives (each call a fresh one the solver may overwrite)."""
    if isinstance(H, Tensor):
        return lambda: H.detach().to(device=device, dtype=torch.float32, copy=True)
    return lambda: H().detach().to(device=device, dtype=torch.float32)


def handover(first: Tensor, remake: Callable[[], Tensor]) -> Callable[[], Tensor]:
    """A Hessian given to the solver to own: ``gptq_solve(W, handover(make(), make))``.

    The solver then works in ``first``'s memory instead of a copy: pass it straight from the call that made it, so
    that the caller keeps no reference. ``remake()`` makes it again (the same values), only for the rare retry with
    more damping.
    """
    held = [first]
    return lambda: held.pop() if held else remake()


def gptq_solve(W: Tensor, H: HessianSource, bits: int = 4, group_size: int = 128, sym: bool = True, act_order: bool = False,
               static_groups: bool = False, group_aware: bool = False, damp_percent: float = 0.01,
               block_size: int = 128, overwrite_W: bool = False) -> QuantResult:
    """Quantize one weight matrix with GPTQ.

    Rows are independent given H, so layers sharing an input (q, k, v) can be solved at once by stacking their rows.

    Args:
        W: weight [N, K] (out, in); not modified, unless ``overwrite_W``.
        H: Hessian [K, K] of the layer inputs (see :class:`HessianAccumulator`), not modified: the solver works on
            one copy. Or a function giving a fresh Hessian on each call, which the solver owns and overwrites,
            holding no copy (see :func:`handover`); it is called again only to retry with more damping.
        bits, group_size, sym: the grid (group_size -1 = one group per row; a ragged last group is allowed).
        act_order: quantize columns by descending diag(H); codes, g_idx and groups come back in original column order.
        static_groups: compute every group's scale and zero from the original W before any update.
        group_aware: group-aware reordering (see :func:`column_order`); not with ``act_order``.
        damp_percent: damping as a fraction of mean(diag(H)); raised and retried when Cholesky fails.
        block_size: columns per lazy batch update.
        overwrite_W: the solver may work in W's own memory (a float32 W is then left permuted and updated: garbage
            to the caller) instead of a copy: for a caller that drops W anyway (7B's gate/up, stacked: 344 MiB).
    Returns:
        :class:`QuantResult` with the codes the solver chose (never re-derived) and the summed GPTQ loss.
    """
    n_rows, n_cols = W.shape
    g = n_cols if group_size == -1 else group_size
    n_groups = num_groups(n_cols, group_size)

    # Inputs that never fire carry no information: pin their Hessian diagonal and drop the weights.
    make_H = _hessian_maker(H, W.device)
    H = make_H()  # ours: overwritten by the factorisation
    d = torch.diag(H).clone()  # [K]
    dead = d == 0
    d[dead] = 1
    perm = column_order(d, g, act_order, group_aware)
    permuted = act_order or group_aware
    W = W.detach()
    if W.dtype != torch.float32 or not overwrite_W:
        W = W.to(torch.float32, copy=True)  # our own copy
    if permuted:
        _permute_columns_(W, perm)  # [N, K] in processing order
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

    prepared = [_prepare_hessian_(H, perm if permuted else None, dead)]
    del H  # the list holds the only reference: the factor reuses its memory
    Hinv, damp = _inverse_cholesky_upper(
        lambda: prepared.pop() if prepared else _prepare_hessian_(make_H(), perm if permuted else None, dead),
        damp_percent)
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
    return QuantResult(codes, scales, zeros, g_idx, float(Losses.sum()), damp)
