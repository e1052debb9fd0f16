"""Random GPTQ layers and the reference they are compared with, shared by the backend tests."""

from __future__ import annotations

import torch

from gptqlora.quant.grid import QuantResult
from gptqlora.quant.linear import QuantizedLinear

# Max |backend - exact| allowed, relative to max |exact|, per compute dtype: a matmul in that dtype (fp32 accumulation)
# over K <= 1024 stays well inside these.
TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def random_result(n: int, k: int, bits: int, group_size: int, act_order: bool = False, sym: bool = False,
                  seed: int = 0) -> QuantResult:
    """Random codes [N, K], fp16-representable scales (some just above 1, which bf16 would round), zeros, g_idx."""
    gen = torch.Generator().manual_seed(seed)
    g = k if group_size == -1 else group_size
    n_groups = -(-k // g)
    maxq = (1 << bits) - 1
    codes = torch.randint(0, maxq + 1, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n_groups, n, generator=gen) * 0.02 + 0.001).half().float()
    scales[0, :4] = torch.tensor([1.0009765625, 0.0009765625, 1.5, 0.125])  # fp16-exact, not all bf16-exact
    if sym:
        zeros = torch.full((n_groups, n), float(1 << (bits - 1)))
    else:
        zeros = torch.randint(1, maxq + 2, (n_groups, n), generator=gen).float()  # v1 stores z - 1 in [0, maxq]
    if act_order:
        perm = torch.randperm(k, generator=gen)  # column perm[i] is the i-th quantized
        g_idx = torch.empty(k, dtype=torch.int32)
        g_idx[perm] = (torch.arange(k) // g).to(torch.int32)
    else:
        g_idx = (torch.arange(k) // g).to(torch.int32)
    return QuantResult(codes, scales, zeros, g_idx)


def random_layer(n: int = 64, k: int = 256, bits: int = 4, group_size: int = 64, act_order: bool = False,
                 sym: bool = False, bias: bool = False, seed: int = 0) -> QuantizedLinear:
    res = random_result(n, k, bits, group_size, act_order, sym, seed)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1)) if bias else None
    return QuantizedLinear.from_result(res, bits, group_size, bias=b)


def exact_output(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T (+ bias) in float64 from the layer's own codes: the truth every backend is measured against."""
    w = layer.dequantize_weight(torch.float64)  # [N, K], exact: codes, zeros and fp16 scales are exact in fp64
    y = x.double() @ w.T
    return y if layer.bias is None else y + layer.bias.double()


def assert_matches(y: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> None:
    assert y.dtype == dtype
    err = (y.double() - exact).abs().max().item()
    bound = TOL[dtype] * exact.abs().max().item()
    assert err <= bound, f"max |y - exact| = {err:.3g} > {bound:.3g} ({dtype})"


def run(layer: QuantizedLinear, kernel: str, x: torch.Tensor) -> torch.Tensor:
    """layer(x) with preference ``kernel``, checking that this backend (not a fallback) ran (any one for auto)."""
    layer.set_kernel(kernel)
    y = layer(x)
    assert kernel == "auto" or layer.last_kernel == kernel, f"{kernel} fell back to {layer.last_kernel}"
    return y


def check_forward_and_input_grad(kernel: str, layer: QuantizedLinear, dtype: torch.dtype, m: int = 7,
                                 grad: bool = True) -> None:
    """Forward (and the input gradient) of ``kernel`` equal the exact product within ``dtype``'s tolerance."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, layer.in_features, generator=gen).to(dtype)
    assert_matches(run(layer, kernel, x), exact_output(layer, x), dtype)
    if not grad:
        return
    x = x.clone().requires_grad_(True)
    dy = torch.randn(m, layer.out_features, generator=gen).to(dtype)
    run(layer, kernel, x).backward(dy)
    assert_matches(x.grad, dy.double() @ layer.dequantize_weight(torch.float64), dtype)


def check_on_cuda(kernel: str, layer: QuantizedLinear, dtype: torch.dtype, m: int = 17, grad: bool = True) -> None:
    """As :func:`check_forward_and_input_grad`, with the layer and inputs on CUDA (the exact product on the CPU)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(m, layer.in_features, generator=gen).to(dtype)
    dy = torch.randn(m, layer.out_features, generator=gen).to(dtype)
    exact_y = exact_output(layer, x)
    exact_dx = dy.double() @ layer.dequantize_weight(torch.float64)
    layer.cuda()
    try:
        xc = x.cuda().requires_grad_(grad)
        y = run(layer, kernel, xc)
        assert_matches(y.cpu(), exact_y, dtype)
        if grad:
            y.backward(dy.cuda())
            assert_matches(xc.grad.cpu(), exact_dx, dtype)
    finally:
        layer.cpu()
