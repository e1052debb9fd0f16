"""int4-aten (torch's int4 kernels) against the exact product; exact zero conversion; what it cannot run falls back."""

import pytest
import torch

from gptqlora.quant.kernels import int4_aten
from gptqlora.quant.pack import unpack_qzeros

from quant.kernels.layers import assert_matches, check_forward_and_input_grad, exact_output, random_layer, run


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [False, True])
def test_equals_exact_product_on_cpu(group_size, act_order, sym):
    layer = random_layer(n=48, k=512, bits=4, group_size=group_size, act_order=act_order, sym=sym, bias=True)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for m in (1, 5, 17):
            check_forward_and_input_grad("int4-aten", layer, dtype, m=m, grad=False)


@pytest.mark.parametrize("act_order", [False, True])
def test_cpu_repack_in_row_slices_equals_one_piece(act_order, monkeypatch):
    """The CPU repack converts output rows in slices (bounded temporaries): 1040 rows = 2 x 512 + 16 give the same
    packed bytes as one conversion, and the layer still equals the exact product."""
    layer = random_layer(n=1040, k=256, bits=4, group_size=64, act_order=act_order)
    sliced = int4_aten.repack(layer.gptq_weight(), torch.bfloat16)
    monkeypatch.setattr(int4_aten, "CPU_REPACK_ROWS", 1040)
    whole = int4_aten.repack(layer.gptq_weight(), torch.bfloat16)
    assert torch.equal(sliced.packed, whole.packed)
    monkeypatch.undo()
    check_forward_and_input_grad("int4-aten", layer, torch.bfloat16, m=3, grad=False)


def test_float_zero_is_exact():
    """zero = (8 - z) * s: (q - 8) * s + zero == (q - z) * s, exactly in fp32 for every code."""
    layer = random_layer(n=32, k=128, bits=4, group_size=64)
    state = int4_aten.repack(layer.gptq_weight(), torch.float32)
    s, zero = state.scales_and_zeros.unbind(-1)  # [G, N] each
    z = unpack_qzeros(layer.qzeros, 4, 32).float()
    assert torch.equal(s, layer.scales.float())
    q = torch.arange(16.0)[:, None, None]  # every code
    assert torch.equal((q - 8) * s + zero, (q - z) * s)


def test_input_gradient_is_left_to_a_backend_that_has_one():
    layer = random_layer(n=48, k=256, bits=4, group_size=64)
    layer.set_kernel("int4-aten")
    x = torch.randn(3, 256, requires_grad=True)
    with pytest.warns(UserWarning, match="computes no input gradient.*using 'dequant'"):
        layer(x).sum().backward()
    assert layer.last_kernel == "dequant"
    torch.testing.assert_close(x.grad.double(), torch.ones(3, 48).double() @ layer.dequantize_weight(torch.float64))


@pytest.mark.parametrize("n, k, bits, group_size, reason", [
    (48, 256, 8, 64, "no 8-bit kernel"),
    (48, 256, 2, 64, "no 2-bit kernel"),
    (48, 192, 4, 128, "not a multiple of the group size"),  # ragged last group (as 576 with 128)
    (48, 256, 4, 16, r"group size 16 is not one of \[32, 64, 128, 256\]"),
    (40, 256, 4, 64, "N = 40 is not a multiple of 16"),
])
def test_unsupported_layers_fall_back_to_the_reference(n, k, bits, group_size, reason):
    layer = random_layer(n=n, k=k, bits=bits, group_size=group_size)
    x = torch.randn(2, k)
    layer.set_kernel("int4-aten")
    with pytest.warns(UserWarning, match=reason):
        y = layer(x)
    assert layer.last_kernel == "dequant"
    assert torch.equal(y, run(layer, "dequant", x))


def test_act_order_needs_full_contiguous_groups():
    layer = random_layer(n=48, k=256, bits=4, group_size=64, act_order=True)
    g_idx = layer.g_idx.clone()
    g_idx[g_idx == 1] = 0  # group 0 now has 128 columns: no sort makes the groups 64 wide
    layer.g_idx.copy_(g_idx)
    layer._forget_layouts()
    layer.set_kernel("int4-aten")
    with pytest.warns(UserWarning, match="does not sort into contiguous groups"):
        y = layer(torch.randn(2, 256))
    assert layer.last_kernel == "dequant" and torch.isfinite(y).all()


@pytest.mark.gpu
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_tinygemm_equals_exact_product_on_cuda(act_order, group_size):
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("tinygemm needs sm80+")
    layer = random_layer(n=256, k=1024, bits=4, group_size=group_size, act_order=act_order)
    xs = [torch.randn(m, 1024).bfloat16() for m in (1, 16, 64)]
    exact = [exact_output(layer, x) for x in xs]
    layer.cuda()
    for x, want in zip(xs, exact):
        y = run(layer, "int4-aten", x.cuda())
        assert_matches(y.cpu(), want, torch.bfloat16)
