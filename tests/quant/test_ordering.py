"""Column orders of the GPTQ solver: group-aware reordering keeps groups contiguous (g_idx = k // g, no permutation)
while quantizing the columns that matter most first."""

import itertools

import pytest
import torch

from conftest import make_tiny_llama
from gptqlora.config import QuantConfig
from gptqlora.errors import UsageError
from gptqlora.quant.driver import quantize_model_weights
from gptqlora.quant.gptq import column_order, gptq_solve
from gptqlora.quant.grid import group_index, rtn_quantize
from gptqlora.quant.linear import QuantizedLinear
from quant.test_gptq import correlated_problem, output_error


@pytest.mark.parametrize("k,group_size", [(128, 32), (160, 64), (96, 96)])  # 160 % 64: a ragged last group
def test_group_aware_order_keeps_groups_contiguous_and_sorted(k, group_size):
    d = torch.rand(k, generator=torch.Generator().manual_seed(k)) + 0.1
    perm = column_order(d, group_size, act_order=False, group_aware=True)
    assert torch.equal(torch.sort(perm).values, torch.arange(k))  # a permutation
    g_of_pos = perm // group_size  # group of the column quantized at each position
    # Each group fills one run of positions (the ragged one too)...
    runs = torch.unique_consecutive(g_of_pos)
    assert torch.equal(torch.sort(runs).values, torch.arange(-(-k // group_size)))
    # ...the runs in descending order of their group's largest diagonal, each run by descending diagonal.
    peaks = torch.stack([d[perm[g_of_pos == gi]].max() for gi in runs])
    assert torch.all(peaks[:-1] >= peaks[1:])
    for gi in runs:
        dg = d[perm[g_of_pos == gi]]
        assert torch.all(dg[:-1] >= dg[1:])


def test_orders_other_than_group_aware():
    d = torch.tensor([1.0, 5.0, 3.0, 4.0])
    assert torch.equal(column_order(d, 2, act_order=False, group_aware=False), torch.arange(4))
    assert torch.equal(column_order(d, 2, act_order=True, group_aware=False), torch.tensor([1, 3, 2, 0]))
    with pytest.raises(ValueError, match="choose one"):
        column_order(d, 2, act_order=True, group_aware=True)
    assert torch.equal(column_order(d, 2, act_order=False, group_aware=True), torch.tensor([1, 0, 3, 2]))


@pytest.mark.parametrize("bits,group_size,sym", list(itertools.product([2, 3, 4, 8], [-1, 32, 64], [True, False])))
def test_group_aware_beats_rtn_and_needs_no_g_idx_permutation(bits, group_size, sym):
    X, W, H = correlated_problem()
    res = gptq_solve(W, H, bits=bits, group_size=group_size, sym=sym, group_aware=True, block_size=32)
    assert torch.equal(res.g_idx, group_index(W.shape[1], group_size))
    rtn = rtn_quantize(W, bits, group_size, sym)
    assert output_error(X, W, res.dequantize()) < output_error(X, W, rtn.dequantize())


def test_group_aware_layer_takes_the_fast_path():
    _, W, H = correlated_problem()
    res = gptq_solve(W, H, bits=4, group_size=32, group_aware=True)
    layer = QuantizedLinear.from_result(res, 4, 32)
    assert not layer.facts.act_order
    desc_act = QuantizedLinear.from_result(gptq_solve(W, H, bits=4, group_size=32, act_order=True), 4, 32)
    assert desc_act.facts.act_order  # the check can tell the two apart


def test_group_aware_is_plain_gptq_on_the_permuted_problem():
    # Groups are whole runs of positions, so the solver must act exactly as plain GPTQ on W and H permuted.
    _, W, H = correlated_problem(n_out=24, k=128)
    H[9, :] = 0
    H[:, 9] = 0  # a dead input
    d = torch.diag(H).clone()
    d[d == 0] = 1
    perm = column_order(d, 32, act_order=False, group_aware=True)
    assert not torch.equal(perm, torch.arange(128))
    res = gptq_solve(W, H, bits=3, group_size=32, group_aware=True, block_size=48)
    plain = gptq_solve(W[:, perm], H[perm][:, perm], bits=3, group_size=32, block_size=48)
    assert torch.equal(res.codes[:, perm], plain.codes)
    group_at = perm[::32] // 32  # group quantized at each run of positions
    assert torch.equal(res.scales[group_at], plain.scales) and torch.equal(res.zeros[group_at], plain.zeros)
    assert res.loss == plain.loss


def test_importance_first_beats_natural_order_when_outliers_come_last():
    # Outlier inputs in the last group: natural order quantizes them last, with no columns left to absorb their error.
    X, W, H = correlated_problem(seed=3)
    flip = torch.arange(127, -1, -1)
    X, W, H = X[:, flip], W[:, flip], H[flip][:, flip]
    natural = gptq_solve(W, H, bits=3, group_size=32)
    aware = gptq_solve(W, H, bits=3, group_size=32, group_aware=True)
    assert aware.loss < natural.loss
    assert output_error(X, W, aware.dequantize()) < output_error(X, W, natural.dequantize())


def test_default_config_quantizes_in_act_order_without_g_idx_permutation():
    config = QuantConfig(targets="all", group_size=32)
    assert config.act_order and config.static_groups  # the default measured best (issue 9)
    model = make_tiny_llama()
    calib = torch.randint(0, 259, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize_model_weights(model, calib, config, progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 7 * len(model.model.layers)
    for layer in layers:
        assert not layer.facts.act_order  # g_idx = k // group_size: every kernel's fast path
        assert torch.equal(layer.g_idx.cpu(), group_index(layer.in_features, 32))


def test_act_order_and_group_aware_exclude_each_other():
    with pytest.raises(UsageError, match="--no-act-order"):
        QuantConfig(group_aware=True)
    assert QuantConfig(group_aware=True, act_order=False).group_aware
