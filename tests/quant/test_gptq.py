import itertools

import pytest
import torch

from gptqlora.quant.gptq import HessianAccumulator, gptq_solve, handover
from gptqlora.quant.grid import dequantize, rtn_quantize


def correlated_problem(n_out=64, k=128, tokens=2048, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    X = torch.randn(tokens, k, generator=g) @ mix + 0.05 * torch.randn(tokens, k, generator=g)  # correlated inputs
    X[:, :4] *= 8  # a few outlier channels, as in real activations
    W = torch.randn(n_out, k, generator=g) * 0.05
    acc = HessianAccumulator(k)
    for chunk in X.split(512):
        acc.add(chunk)
    return X, W, acc.hessian()


def output_error(X, W, Q):
    return torch.linalg.norm(X @ W.T - X @ Q.T).item()


OPTIONS = list(itertools.product([2, 3, 4, 8], [-1, 32, 64], [True, False], [False, True], [False, True]))


@pytest.mark.parametrize("bits,group_size,sym,act_order,static_groups", OPTIONS)
def test_gptq_beats_rtn_on_output_error(bits, group_size, sym, act_order, static_groups):
    X, W, H = correlated_problem()
    res = gptq_solve(W, H, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                     static_groups=static_groups, block_size=32)
    rtn = rtn_quantize(W, bits, group_size, sym)
    assert output_error(X, W, res.dequantize()) < output_error(X, W, rtn.dequantize())
    assert res.codes.shape == W.shape and int(res.codes.max()) < 2**bits


def test_hessian_accumulator_matches_definition():
    X = torch.randn(300, 16)
    acc = HessianAccumulator(16)
    acc.add(X[:100].view(10, 10, 16))  # any leading shape
    acc.add(X[100:])
    torch.testing.assert_close(acc.hessian(), 2 / 300 * X.T @ X, rtol=1e-5, atol=1e-5)
    assert acc.n_tokens == 300


def test_act_order_g_idx_consistent_with_codes():
    X, W, H = correlated_problem()
    res = gptq_solve(W, H, bits=4, group_size=32, act_order=True)
    perm = torch.argsort(torch.diag(H), descending=True)
    # Columns are grouped by their position in the permutation, 32 at a time.
    expected = torch.empty_like(res.g_idx)
    expected[perm] = (torch.arange(128) // 32).to(torch.int32)
    assert torch.equal(res.g_idx, expected)
    assert not torch.equal(res.g_idx, torch.arange(128, dtype=torch.int32) // 32)
    # Dequantizing each column with the group g_idx names reproduces the weights the solver committed to.
    deq = dequantize(res.codes, res.scales[res.g_idx.long()].T, res.zeros[res.g_idx.long()].T)
    assert output_error(X, W, deq) < output_error(X, W, rtn_quantize(W, 4, 32, True).dequantize())


def test_static_groups_keep_sequential_g_idx():
    _, W, H = correlated_problem()
    res = gptq_solve(W, H, group_size=32, act_order=True, static_groups=True)
    assert torch.equal(res.g_idx, torch.arange(128, dtype=torch.int32) // 32)


def test_dead_inputs_get_zero_weight():
    X, W, H = correlated_problem()
    H[5, :] = 0
    H[:, 5] = 0
    res = gptq_solve(W, H, group_size=32)
    assert torch.all(res.dequantize()[:, 5] == 0)


def test_singular_hessian_is_rescued_by_more_damping():
    # Rank-1 Hessian with huge dynamic range: plain damping fails on some; retries must succeed without NaN.
    v = torch.randn(64, 1)
    H = v @ v.T * 1e6
    W = torch.randn(16, 64)
    res = gptq_solve(W, H, group_size=32, damp_percent=1e-9)
    assert torch.isfinite(res.dequantize()).all()


@pytest.mark.parametrize("act_order,group_aware", [(False, False), (True, False), (False, True)])
def test_solver_does_not_modify_inputs(act_order, group_aware):
    _, W, H = correlated_problem()
    H[3, :] = 0
    H[:, 3] = 0  # a dead input: its diagonal is pinned and its weights dropped, in the solver's copies only
    W0, H0 = W.clone(), H.clone()
    gptq_solve(W, H, act_order=act_order, group_aware=group_aware)
    assert torch.equal(W, W0) and torch.equal(H, H0)


@pytest.mark.parametrize("act_order,static_groups", [(False, False), (True, True), (True, False)])
def test_handed_over_hessian_and_weight_are_worked_in_their_own_memory(act_order, static_groups):
    # The driver hands its Hessian and its W over: the solver works in those buffers (no K x K copy, no copy of W)
    # and returns what it returns for inputs it must not touch, bit for bit.
    _, W, H = correlated_problem(n_out=24, k=160, seed=3)
    H[7, :] = 0
    H[:, 7] = 0
    W_before = W.clone()
    kept = gptq_solve(W, H, group_size=32, act_order=act_order, static_groups=static_groups, block_size=48)
    assert torch.equal(W, W_before)  # not ours to write
    given, given_W = H.clone(), W.clone()
    remade = []
    owned = gptq_solve(given_W, handover(given, lambda: remade.append(1) or H.clone()), group_size=32,
                       act_order=act_order, static_groups=static_groups, block_size=48, overwrite_W=True)
    for field in ("codes", "scales", "zeros", "g_idx"):
        assert torch.equal(getattr(owned, field), getattr(kept, field))
    assert owned.loss == kept.loss and owned.damp == kept.damp == 0.01
    assert not remade  # factored at the first damping: never made again
    assert not torch.equal(given, H)  # its memory held the factors
    assert torch.equal(given.triu(1), torch.zeros_like(given).triu(1))  # U^T in row-major terms: a triangle is 0
    assert not torch.equal(given_W, W)  # its memory held the updated weights


def test_overwrite_w_copies_a_weight_of_another_dtype_and_leaves_it_alone():
    _, W, H = correlated_problem(n_out=16, k=64, seed=5)
    W16 = W.bfloat16()
    before = W16.clone()
    result = gptq_solve(W16, H, group_size=32, overwrite_W=True)
    assert torch.equal(W16, before)  # float32 work needs a copy: the bf16 weights are not written
    assert torch.equal(result.codes, gptq_solve(W16.float(), H, group_size=32).codes)


def test_a_handed_over_hessian_is_remade_to_retry_with_more_damping():
    v = torch.randn(64, 1, generator=torch.Generator().manual_seed(0))
    H = v @ v.T * 1e6  # rank 1: fails at the asked damping
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))
    kept = gptq_solve(W, H, group_size=32, damp_percent=1e-9)
    remade = []
    owned = gptq_solve(W, handover(H.clone(), lambda: remade.append(1) or H.clone()), group_size=32,
                       damp_percent=1e-9)
    assert remade and kept.damp > 1e-9 and owned.damp == kept.damp
    assert torch.equal(owned.codes, kept.codes) and torch.equal(owned.scales, kept.scales)


def test_stacked_rows_equal_separate_solves():
    # q/k/v share a Hessian; solving their rows stacked is what the driver does.
    _, W, H = correlated_problem(n_out=48)
    whole = gptq_solve(W, H, group_size=32)
    top = gptq_solve(W[:16], H, group_size=32)
    assert torch.equal(whole.codes[:16], top.codes)


def test_bf16_inputs_give_the_float32_hessian_of_their_values():
    X = (torch.randn(4096, 64) @ torch.randn(64, 64)).bfloat16()
    acc = HessianAccumulator(64)
    for chunk in X.split(1024):
        acc.add(chunk)
    torch.testing.assert_close(acc.hessian(), 2 / 4096 * X.double().T @ X.double(), rtol=1e-5, atol=1e-4,
                               check_dtype=False)


def test_the_lower_triangle_summed_in_row_blocks_is_the_whole_hessian(monkeypatch):
    monkeypatch.setattr(HessianAccumulator, "ROWS", 48)  # 128 = 48 + 48 + 32: three blocks, a ragged last one
    X = torch.randn(2048, 128, dtype=torch.float64) @ torch.randn(128, 128, dtype=torch.float64)
    acc = HessianAccumulator(128)
    for chunk in X.split(512):
        acc.add(chunk)
    H = acc.hessian()
    torch.testing.assert_close(H.double(), 2 / 2048 * X.T @ X, rtol=1e-5, atol=1e-3)
    assert torch.equal(H, H.T)  # exactly symmetric: the solver's in-place factorisation relies on it
    finished = acc.finish()
    assert torch.equal(finished, H) and acc.sum is None


@pytest.mark.parametrize("seed", [0, 2])
def test_collinear_outlier_channels_factor_at_the_asked_damping(seed):
    # Three nearly collinear outlier channels in bf16 calibration inputs: products rounded to bf16 leave H indefinite
    # beyond 1% damping (the solver then raises it tenfold); the accumulator's float32 products keep the asked one.
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(2048, 64, generator=g)
    X[:, 1] = X[:, 0] + 1e-2 * torch.randn(2048, generator=g)
    X[:, 2] = X[:, 0] - 1e-2 * torch.randn(2048, generator=g)
    X[:, :3] *= 300
    X = X.bfloat16()
    W = torch.randn(16, 64, generator=g)
    rounded = sum((c.T @ c).float() for c in X.split(512)) * (2 / 2048)  # bf16 products, as the CPU returns them
    assert gptq_solve(W, rounded, group_size=32).damp > 0.01
    acc = HessianAccumulator(64)
    for chunk in X.split(512):
        acc.add(chunk)
    assert gptq_solve(W, acc.hessian(), group_size=32).damp == 0.01


def reference_gptq(W, H, bits, group_size, sym, act_order, static_groups, damp_percent=0.01, block_size=128):
    """GPTQ written the plain way (whole-matrix copies, damping by adding a scaled identity), for bit-for-bit parity
    with the memory-frugal solver: same operations on the same values, so the same floats."""
    from gptqlora.quant.grid import compute_qparams, group_index

    W, H = W.clone().float(), H.clone().float()
    n, k = W.shape
    g = k if group_size == -1 else group_size
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    groups = [(s, min(s + g, k)) for s in range(0, k, g)]
    scales = torch.empty(len(groups), n)
    zeros = torch.empty(len(groups), n)
    if static_groups:
        for gi, (s, e) in enumerate(groups):
            scales[gi], zeros[gi] = compute_qparams(W[:, s:e], bits, sym)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    H = H + damp_percent * torch.mean(torch.diag(H)) * torch.eye(k)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.empty(n, k)
    loss = torch.zeros(n)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1, Err1 = W[:, i1:i2].clone(), torch.empty(n, i2 - i1)
        U1 = U[i1:i2, i1:i2]
        inv_d = 1.0 / torch.diag(U1)
        for i in range(i2 - i1):
            col = i1 + i
            if static_groups:
                gi = int(perm[col]) // g
            else:
                gi = col // g
                if col % g == 0:  # the group's grid from its weights as updated so far
                    cur = torch.cat([W1[:, i:i + g], W[:, i2:col + g]], dim=1)[:, :g]
                    scales[gi], zeros[gi] = compute_qparams(cur, bits, sym)
            scale, zero = scales[gi], zeros[gi]
            w = W1[:, i]
            q = torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)
            Q[:, col] = q
            err = (w - (q - zero) * scale) * inv_d[i]
            Err1[:, i] = err
            W1[:, i:] -= torch.outer(err, U1[i, i:])
        loss += Err1.square().sum(dim=1) / 2
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    inv = torch.argsort(perm)
    g_idx = group_index(k, group_size) if static_groups or not act_order else (inv // g).to(torch.int32)
    return Q[:, inv].to(torch.uint8), scales, zeros, g_idx, float(loss.sum())


@pytest.mark.parametrize("bits,group_size,sym,act_order,static_groups",
                         [(4, 32, True, False, False), (3, 64, False, False, False), (4, 32, True, True, False),
                          (2, 64, False, True, True), (4, -1, True, False, True), (8, 32, False, True, False)])
def test_solver_equals_plain_reference_bit_for_bit(bits, group_size, sym, act_order, static_groups):
    # The solver's memory savings (one Hessian copy, in-place damping, factors in reused buffers) change no result.
    _, W, H = correlated_problem(n_out=24, k=160, seed=5)  # 160 % 64: a ragged last group
    H[11, :] = 0
    H[:, 11] = 0  # a dead input
    res = gptq_solve(W, H, bits=bits, group_size=group_size, sym=sym, act_order=act_order,
                     static_groups=static_groups, block_size=48)
    codes, scales, zeros, g_idx, loss = reference_gptq(W, H, bits, group_size, sym, act_order, static_groups,
                                                       block_size=48)
    assert torch.equal(res.codes, codes) and torch.equal(res.g_idx, g_idx)
    assert torch.equal(res.scales, scales) and torch.equal(res.zeros, zeros)
    assert res.loss == loss
