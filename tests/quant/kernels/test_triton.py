"""The Triton kernels against the exact product: on the CPU under TRITON_INTERPRET=1 (fp32, small shapes, fixed
blocks; set by this directory's conftest where there is no CUDA), and compiled on CUDA (marked gpu). Skipped where
triton is not installed."""

import pytest
import torch

pytest.importorskip("triton")

from gptqlora.quant.kernels import triton_gptq  # noqa: E402
from gptqlora.quant.kernels.registry import unsupported_reason  # noqa: E402

from quant.kernels.layers import (assert_matches, check_on_cuda, exact_output, random_layer,  # noqa: E402
                                  run)

BLOCKS = (16, 32, 32)  # (BLOCK_M, BLOCK_N, BLOCK_K): the interpreter runs every program in Python
interpreted = pytest.mark.skipif(
    not triton_gptq.interpreting() or type(triton_gptq._matmul_kernel).__name__ != "InterpretedFunction",
    reason="the kernels were not defined under TRITON_INTERPRET=1 (CUDA present, or triton imported before "
           "tests/quant/kernels/conftest.py could set it: run tests/quant/kernels on its own)")


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [False, True])
@interpreted
def test_kernels_equal_exact_product_interpreted(bits, act_order, sym):
    layer = random_layer(n=80, k=96, bits=bits, group_size=32, act_order=act_order, sym=sym)  # N, K not block multiples
    state = triton_gptq.repack(layer.gptq_weight(), torch.float32)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 96, generator=gen)
    y = triton_gptq.matmul(x, state, blocks=BLOCKS)
    assert_matches(y, exact_output(layer, x), torch.float32)
    dy = torch.randn(5, 80, generator=gen)
    dx = triton_gptq.matmul_t(dy, state, blocks=BLOCKS)
    assert_matches(dx, dy.double() @ layer.dequantize_weight(torch.float64), torch.float32)


@interpreted
def test_reads_strided_inputs_interpreted():
    layer = random_layer(n=64, k=64, bits=4, group_size=32)
    state = triton_gptq.repack(layer.gptq_weight(), torch.float32)
    x = torch.randn(64, 3).T  # [3, 64], column-major
    assert_matches(triton_gptq.matmul(x, state, blocks=BLOCKS), exact_output(layer, x), torch.float32)


@interpreted
def test_layer_forward_and_backward_interpreted():
    layer = random_layer(n=48, k=64, bits=4, group_size=32, act_order=True, bias=True)
    x = torch.randn(3, 64, requires_grad=True)
    y = run(layer, "triton", x)
    assert_matches(y.detach(), exact_output(layer, x.detach()), torch.float32)
    y.backward(torch.ones_like(y))
    assert_matches(x.grad, torch.ones(3, 48).double() @ layer.dequantize_weight(torch.float64), torch.float32)


def test_not_on_the_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    layer = random_layer(n=48, k=64, bits=4, group_size=32)
    reason = unsupported_reason("triton", layer.facts, torch.device("cpu"), torch.float32, needs_grad=False)
    assert reason is not None and "CUDA" in reason
    layer.set_kernel("triton")
    with pytest.warns(UserWarning, match="using 'dequant'"):
        layer(torch.randn(2, 64))
    assert layer.last_kernel == "dequant"


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_forward_and_backward(bits, act_order, dtype):
    layer = random_layer(n=256, k=512, bits=bits, group_size=128, act_order=act_order, bias=True)
    for m in (1, 33, 300):
        check_on_cuda("triton", layer, dtype, m=m)
