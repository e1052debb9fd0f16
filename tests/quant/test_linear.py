import pytest
import torch
import torch.nn.functional as F

from gptqlora.quant.gptq import HessianAccumulator, gptq_solve
from gptqlora.quant.grid import rtn_quantize
from gptqlora.quant.linear import QuantizedLinear


def make_layer(bits=4, group_size=32, act_order=False, n=64, k=128, bias=False):
    torch.manual_seed(0)
    W = torch.randn(n, k) * 0.05
    if act_order:
        acc = HessianAccumulator(k)
        acc.add(torch.randn(512, k) * torch.linspace(0.1, 3, k))
        res = gptq_solve(W, acc.hessian(), bits=bits, group_size=group_size, act_order=True)
    else:
        res = rtn_quantize(W, bits, group_size, sym=False)
    b = torch.randn(n) if bias else None
    return QuantizedLinear.from_result(res, bits, group_size, bias=b), res, b


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_forward_equals_linear_with_dequantized_weight(bits, act_order):
    layer, res, _ = make_layer(bits=bits, act_order=act_order)
    x = torch.randn(3, 5, 128)
    W = res.dequantize()
    torch.testing.assert_close(layer.dequantize_weight(), W, rtol=0, atol=0)
    torch.testing.assert_close(layer(x), F.linear(x, W), rtol=1e-5, atol=1e-5)


def test_bias_and_bf16_input():
    layer, res, b = make_layer(bias=True)
    x = torch.randn(4, 128)
    torch.testing.assert_close(layer(x), F.linear(x, res.dequantize(), b.half().float()), rtol=1e-5, atol=1e-5)
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), rtol=2e-2, atol=2e-2)


def test_holds_only_packed_buffers():
    layer, _, _ = make_layer()
    assert list(layer.parameters()) == []
    names = {n for n, _ in layer.named_buffers()}
    assert names == {"qweight", "qzeros", "scales", "g_idx"}
    stored = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert stored < 64 * 128 * 4 / 5  # far below the fp32 weight


def test_gradient_flows_to_input_not_buffers():
    layer, res, _ = make_layer()
    x = torch.randn(6, 128, requires_grad=True)
    layer(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    F.linear(x_ref, res.dequantize()).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert all(not b.requires_grad for b in layer.buffers())


def test_cache_is_opt_in():
    layer, _, _ = make_layer()
    x = torch.randn(2, 128)
    layer(x)
    assert layer._cache is None
    layer.set_cache(True)
    y = layer(x)
    assert layer._cache is not None and torch.equal(y, layer(x))


def test_rejects_bad_bits():
    with pytest.raises(ValueError, match="bits=5"):
        QuantizedLinear(128, 64, bits=5, group_size=32)
