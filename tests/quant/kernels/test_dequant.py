"""The reference backend: every bit width, group layout and dtype equals the exact product of the codes."""

import pytest
import torch
import torch.nn.functional as F

from gptqlora.quant.kernels import dequant

from quant.kernels.layers import check_forward_and_input_grad, check_on_cuda, random_layer, random_result


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [32, 128, -1])  # 128 with K = 192: a ragged last group
def test_equals_exact_product(bits, act_order, group_size):
    layer = random_layer(n=64, k=192, bits=bits, group_size=group_size, act_order=act_order, bias=True)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        check_forward_and_input_grad("dequant", layer, dtype)


@pytest.mark.parametrize("act_order", [False, True])
def test_dense_weight_is_the_solver_result(act_order):
    res = random_result(64, 192, 4, 64, act_order=act_order)
    from gptqlora.quant.linear import QuantizedLinear

    layer = QuantizedLinear.from_result(res, 4, 64)
    w = dequant.dense_weight(dequant.repack(layer.gptq_weight(), torch.float32))  # [K, N]
    assert torch.equal(w.T, res.dequantize())
    x = torch.randn(3, 192)
    assert torch.equal(dequant.matmul(x, dequant.repack(layer.gptq_weight(), torch.float32)), x @ w)
    assert torch.allclose(F.linear(x, res.dequantize()), x @ w)


def test_keeps_nothing_between_calls():
    layer = random_layer()
    state = dequant.repack(layer.gptq_weight(), torch.float32)
    assert state.weight.qweight is layer.qweight  # the checkpoint buffers themselves, no copy
    assert not any(isinstance(v, torch.Tensor) and v.numel() == 64 * 256 for v in vars(state).values())


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_on_cuda(bits, act_order, dtype):
    layer = random_layer(n=256, k=576, bits=bits, group_size=64, act_order=act_order, bias=True)
    for m in (1, 300):
        check_on_cuda("dequant", layer, dtype, m=m)
