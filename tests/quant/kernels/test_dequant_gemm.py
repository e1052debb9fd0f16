"""dequant-gemm against the exact product; its fp32 weight is the reference's bit for bit; its limits fall back."""

import pytest
import torch

from gptqlora.quant.kernels import dequant, dequant_gemm

from quant.kernels.layers import check_forward_and_input_grad, check_on_cuda, random_layer


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])  # 128 with K = 192: a ragged last group
def test_equals_exact_product(bits, act_order, sym, group_size):
    layer = random_layer(n=64, k=192, bits=bits, group_size=group_size, act_order=act_order, sym=sym, bias=True)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        check_forward_and_input_grad("dequant-gemm", layer, dtype)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [64, 128])
def test_fp32_weight_is_the_reference_bit_for_bit(bits, group_size):
    layer = random_layer(n=96, k=576, bits=bits, group_size=group_size)  # 576 = 4 * 128 + 64
    ref = dequant.dense_weight(dequant.repack(layer.gptq_weight(), torch.float32))
    assert torch.equal(dequant_gemm.dense_weight(dequant_gemm.repack(layer.gptq_weight(), torch.float32)), ref)


def test_act_order_sorts_once_and_permutes_inputs():
    layer = random_layer(n=64, k=256, bits=4, group_size=64, act_order=True)
    state = dequant_gemm.repack(layer.gptq_weight(), torch.float32)
    assert state.perm is not None and state.qweight is not layer.qweight
    assert torch.equal(layer.g_idx[state.perm].long(), torch.arange(256) // 64)  # groups contiguous after the sort
    plain = random_layer(n=64, k=256, bits=4, group_size=64)
    assert dequant_gemm.repack(plain.gptq_weight(), torch.float32).qweight is plain.qweight  # no copy


def test_no_grad_calls_share_one_buffer():
    dequant_gemm.release_workspaces()
    a, b = random_layer(n=64, k=256, seed=0), random_layer(n=32, k=256, seed=1)
    x = torch.randn(4, 256)
    for layer in (a, b, a):
        layer.set_kernel("dequant-gemm")
        with torch.no_grad():
            layer(x)
    buffers = {k: v for k, v in dequant_gemm._WORKSPACES.items() if v.dtype == torch.float32}
    assert len(buffers) == 1 and next(iter(buffers.values())).numel() == 64 * 256  # the largest weight, once


def test_three_bits_fall_back_to_the_reference():
    layer = random_layer(n=64, k=192, bits=3, group_size=32)
    layer.set_kernel("dequant-gemm")
    x = torch.randn(2, 192)
    with pytest.warns(UserWarning, match="dequant-gemm.*no 3-bit kernel.*using 'dequant'"):
        y = layer(x)
    assert layer.last_kernel == "dequant"
    layer.set_kernel("dequant")
    assert torch.equal(y, layer(x))


def test_group_not_a_multiple_of_a_word_falls_back():
    layer = random_layer(n=64, k=192, bits=4, group_size=4)
    layer.set_kernel("dequant-gemm")
    with pytest.warns(UserWarning, match="group size 4 is not a multiple of the 8 codes in a word"):
        layer(torch.randn(2, 192))
    assert layer.last_kernel == "dequant"


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_on_cuda(bits, act_order, dtype):
    layer = random_layer(n=256, k=576, bits=bits, group_size=64, act_order=act_order, bias=True)
    for m in (1, 300):
        check_on_cuda("dequant-gemm", layer, dtype, m=m)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_runs_its_gemm_in_fp32_where_the_cpu_emulates_bf16(monkeypatch, native):
    """Without native bf16 the product is the fp32 one rounded to bf16 (a bf16 GEMM is emulated there, several
    times slower); with it, a bf16 GEMM."""
    monkeypatch.setattr(dequant_gemm, "cpu_has_native_bf16", lambda: native)
    layer = random_layer(n=64, k=256, bits=4, group_size=64)
    state = dequant_gemm.repack(layer.gptq_weight(), torch.bfloat16)
    assert state.dtype == (torch.bfloat16 if native else torch.float32)
    x = torch.randn(5, 256).bfloat16()
    y = dequant_gemm.matmul(x, state)
    assert y.dtype == torch.bfloat16
    if not native:
        w = dequant.dense_weight(dequant.repack(layer.gptq_weight(), torch.float32))  # [K, N] in the layer's order
        torch.testing.assert_close(y, (x.float() @ w).bfloat16(), rtol=0, atol=0)
        dy = torch.randn(5, 64).bfloat16()
        assert dequant_gemm.matmul_t(dy, state).dtype == torch.bfloat16
