import pytest
import torch

from gptqlora.quant.grid import compute_qparams, dequantize, group_index, quantize, rtn_quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [-1, 32, 64, 128])
def test_rtn_error_within_half_a_step(bits, sym, group_size):
    torch.manual_seed(0)
    w = torch.randn(48, 576) * 0.02
    res = rtn_quantize(w, bits, group_size, sym)
    step = res.scales[res.g_idx.long()].T  # [N, K]
    err = (w - res.dequantize()).abs()
    assert (err <= step / 2 * (1 + 1e-4) + 1e-7).all()
    assert int(res.codes.max()) <= 2**bits - 1
    assert res.scales.shape == (1 if group_size == -1 else -(-576 // group_size), 48)


def test_ragged_last_group():
    res = rtn_quantize(torch.randn(8, 576), 4, 128, True)
    assert res.scales.shape[0] == 5  # 4 full groups of 128 and one of 64
    assert torch.equal(res.g_idx, group_index(576, 128))
    assert res.g_idx[-1] == 4


def test_symmetric_zero_is_midpoint_and_scales_fp16_exact():
    scale, zero = compute_qparams(torch.randn(16, 64), 4, sym=True)
    assert (zero == 8).all()
    assert torch.equal(scale, scale.half().float())


def test_asymmetric_zero_never_zero():
    # All-positive rows would want zero = 0, which GPTQ v1 cannot store.
    w = torch.rand(16, 64) + 0.1
    scale, zero = compute_qparams(w, 4, sym=False)
    assert (zero >= 1).all()
    q = quantize(w, scale[:, None], zero[:, None], 4)
    err = (w - dequantize(q, scale[:, None], zero[:, None])).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-4)).all()  # the widened grid still covers the row


def test_zero_rows_stay_zero():
    w = torch.zeros(4, 32)
    res = rtn_quantize(w, 4, 32, sym=False)
    assert torch.equal(res.dequantize(), w)


def test_round_half_to_even():
    scale, zero = torch.tensor([1.0]), torch.tensor([8.0])
    assert quantize(torch.tensor([0.5, 1.5, 2.5]), scale, zero, 4).tolist() == [8.0, 10.0, 10.0]
