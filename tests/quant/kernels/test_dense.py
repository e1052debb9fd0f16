"""dense: the kept dequantized weight equals the reference's and lives only while 'dense' is preferred."""

import pytest
import torch

from gptqlora.quant.kernels import dequant

from quant.kernels.layers import check_forward_and_input_grad, check_on_cuda, random_layer, run


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_equals_exact_product(bits, act_order):
    layer = random_layer(n=64, k=192, bits=bits, group_size=64, act_order=act_order, bias=True)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        check_forward_and_input_grad("dense", layer, dtype)


def test_keeps_one_weight_per_dtype_until_another_kernel_is_chosen():
    layer = random_layer(n=64, k=192)
    x = torch.randn(2, 192)
    run(layer, "dense", x)
    kept = layer._cache
    ref = dequant.dense_weight(dequant.repack(layer.gptq_weight(), torch.float32))  # [K, N]
    assert torch.equal(kept, ref.T)  # kept in nn.Linear's [N, K] layout
    run(layer, "dense", x)
    assert layer._cache is kept  # made once
    run(layer, "dequant", x)
    assert layer._cache is None  # the memory is given back


def test_dense_keeps_a_weight_until_auto_is_set_again():
    layer = random_layer(n=64, k=192)
    layer.set_kernel("dense")
    assert layer.kernel == "dense"
    layer(torch.randn(2, 192))
    assert layer._cache is not None
    layer.set_kernel("auto")
    assert layer.kernel == "auto" and layer._cache is None


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_on_cuda(dtype):
    layer = random_layer(n=256, k=576, bits=4, group_size=64, act_order=True, bias=True)
    for m in (1, 300):
        check_on_cuda("dense", layer, dtype, m=m)
