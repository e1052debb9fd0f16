import collections
import contextlib
import copy
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gptqlora.quant.gptq import HessianAccumulator, gptq_solve
from gptqlora.quant.grid import rtn_quantize
from gptqlora.quant.linear import QuantizedLinear, check_quantized


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


def test_nothing_dense_is_kept_by_default():
    layer, _, _ = make_layer()
    x = torch.randn(2, 128)
    layer(x)
    assert layer.kernel == "auto" and layer._cache is None
    layer.set_kernel("dense")
    y = layer(x)
    assert layer._cache is not None and torch.equal(y, layer(x))


def test_rejects_bad_bits():
    with pytest.raises(ValueError, match="bits=5"):
        QuantizedLinear(128, 64, bits=5, group_size=32)


# ---------------------------------------------------------------------------------------------- checkpoint form


def test_state_dict_is_the_checkpoint_form_whatever_ran():
    layer, _, _ = make_layer(bits=4, group_size=32, bias=True)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for kernel in ("dequant", "dequant-gemm", "int4-aten", "dense"):
        layer.set_kernel(kernel)
        layer(torch.randn(3, 128).bfloat16())
        state = layer.state_dict()
        assert list(state) == ["qweight", "qzeros", "scales", "g_idx", "bias"]
        assert all(torch.equal(state[k], before[k]) and state[k].dtype == before[k].dtype for k in state)


@pytest.mark.parametrize("kernel", ["auto", "int4-aten", "dequant-gemm", "dense"])
def test_loading_new_codes_drops_the_repacked_layouts(kernel):
    layer, _, _ = make_layer(bits=4, group_size=32)
    other, _, _ = make_layer(bits=4, group_size=32, n=64, k=128)
    other.qweight.copy_(other.qweight.flip(0))  # different codes
    x = torch.randn(2, 128).bfloat16()
    layer.set_kernel(kernel)
    layer(x)
    assert layer._layouts
    layer.load_state_dict(other.state_dict())
    assert not layer._layouts
    expected = F.linear(x.float(), other.dequantize_weight())
    torch.testing.assert_close(layer(x).float(), expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


@pytest.mark.parametrize("cast", ["to_bf16", "bfloat16", "half", "float", "double", "to_cpu_bf16"])
def test_dtype_casts_move_buffers_but_never_change_their_dtype(cast):
    layer, _, _ = make_layer(bits=4, group_size=32, bias=True)
    layer.scales[0, :3] = torch.tensor([1.0009765625, 0.0009765625, 3.0e-5])  # bf16 would round the first two
    model = nn.Sequential(nn.Linear(16, 128), layer)
    stored = {k: v.clone() for k, v in layer.state_dict().items()}
    model(torch.randn(2, 16))
    assert layer._layouts
    dtype = {"to_bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "half": torch.float16, "float": torch.float32,
             "double": torch.float64, "to_cpu_bf16": torch.bfloat16}[cast]
    if cast == "to_bf16":
        model.to(torch.bfloat16)
    elif cast == "to_cpu_bf16":
        model.to("cpu", torch.bfloat16)
    else:
        getattr(model, cast)()
    assert model[0].weight.dtype == dtype  # the float layers are cast
    for key, value in layer.state_dict().items():  # the quantized buffers are not, bit for bit
        assert value.dtype == stored[key].dtype and torch.equal(value, stored[key]), key
    assert not layer._layouts  # layouts are rebuilt for the new device/dtype
    x = torch.randn(5, 128).to(dtype)
    y = layer(x)
    assert y.dtype == dtype
    expected = x.double() @ layer.dequantize_weight(torch.float64).T + layer.bias.double()
    tol = {torch.bfloat16: 2e-2, torch.float16: 4e-3}.get(dtype, 1e-5)
    assert (y.double() - expected).abs().max() <= tol * expected.abs().max()


def test_copies_share_no_layout_and_compute_the_same():
    layer, _, _ = make_layer()
    x = torch.randn(2, 128)
    y = layer(x)
    clone = copy.deepcopy(layer)
    assert not clone._layouts and clone.qweight.data_ptr() != layer.qweight.data_ptr()
    assert torch.equal(clone(x), y)


@pytest.mark.parametrize("kernel", ["auto", "dequant-gemm", "dense"])
@pytest.mark.parametrize("bias", [False, True])
def test_compiled_layer_is_one_opaque_call_equal_to_eager(kernel, bias):
    torch._dynamo.reset()  # each layer is a recompile of the same forward: start under the limit
    layer, res, _ = make_layer(bias=bias)
    layer.set_kernel(kernel)
    graphs = []

    def backend(gm, example_inputs):  # records what the compiler sees, runs it as traced
        graphs.append(gm)
        return gm.forward

    x = torch.randn(3, 5, 128)
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)
    ops = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert torch.ops.gptqlora.quantized_linear in ops
    assert not any("matmul" in str(op) or "linear" == str(op) for op in ops)  # the kernel is not traced
    # training: the gradient of the input through the op's backward equals eager's
    xg = x.clone().requires_grad_()
    compiled(xg).pow(2).sum().backward()
    xe = x.clone().requires_grad_()
    layer(xe).pow(2).sum().backward()
    torch.testing.assert_close(xg.grad, xe.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel,traceable,op", [("auto", True, "_weight_int4pack_mm_for_cpu"),
                                                ("dense", True, "linear"), ("dequant-gemm", False, None)])
@pytest.mark.parametrize("bias", [False, True])
def test_trace_kernels_lets_a_compiled_inference_call_a_traceable_kernel_directly(kernel, traceable, op, bias):
    from gptqlora.quant.linear import trace_kernels

    torch._dynamo.reset()
    layer, _, _ = make_layer(bias=bias)
    layer.set_kernel(kernel)
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    assert trace_kernels(layer, cpu, bf16, 2) == int(traceable)
    assert trace_kernels(layer, cpu, bf16, 2) == int(traceable)  # again: nothing changes
    if traceable:
        assert layer.kernels_seen == {"int4-aten" if kernel == "auto" else kernel}
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(layer, backend=backend, fullgraph=True, dynamic=False)

    def targets(x):
        graphs.clear()
        with torch.inference_mode():
            torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)  # the same kernel as eager
        return [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]

    ops = targets(torch.randn(2, 1, 128, dtype=bf16))  # two rows of one token: the prepared call
    assert ("gptqlora.quantized_linear" not in ops) == traceable
    assert any(op in t for t in ops) if traceable else True
    # a call of another shape, or in another dtype, is not prepared: it stays the opaque op
    for x in torch.randn(3, 128, dtype=bf16), torch.randn(2, 128):
        assert "gptqlora.quantized_linear" in targets(x)
    # a call that needs the input gradient stays the opaque op with its backward
    graphs.clear()
    xg = torch.randn(2, 128, dtype=bf16, requires_grad=True)
    compiled(xg).float().pow(2).sum().backward()
    assert "gptqlora.quantized_linear" in [str(n.target) for g in graphs for n in g.graph.nodes]
    # a move forgets the prepared calls with the layouts
    layer.to("cpu", torch.float16)
    assert not layer._traced


def test_a_copied_layer_is_a_compiled_call_of_its_own():
    torch._dynamo.reset()
    layer, _, _ = make_layer()
    clone = copy.deepcopy(layer)
    with torch.no_grad():
        clone.scales.mul_(2)
    x = torch.randn(2, 128)
    assert clone._op_key != layer._op_key
    out = torch.compile(lambda a: (layer(a), clone(a)), backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(out[1], 2 * out[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", ["auto", "dequant-gemm", "dense"])
def test_layouts_made_under_inference_mode_serve_training_later(kernel):
    from gptqlora.quant.kernels import dequant_gemm

    dequant_gemm.release_workspaces()
    layer, res, _ = make_layer()
    layer.set_kernel(kernel)
    with torch.inference_mode():  # as generation runs
        layer(torch.randn(2, 128))
    x = torch.randn(3, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):  # not checkpointing: nothing kept
        layer(x).sum().backward()
    y = checkpoint(layer, x, use_reentrant=False)  # keeps the recompute's weight for backward
    y.sum().backward()
    expected = torch.ones(3, 64) @ res.dequantize()
    torch.testing.assert_close(x.grad, 2 * expected, rtol=1e-5, atol=1e-5)


def test_autocast_computes_in_the_autocast_dtype():
    layer, res, _ = make_layer()
    x = torch.randn(4, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), F.linear(x, res.dequantize()), rtol=3e-2, atol=3e-2)


# ---------------------------------------------------------------------------------------------- training


def _tiny_quantized_lora_model():
    from gptqlora.config import QuantConfig
    from gptqlora.lora import inject_lora_layers
    from gptqlora.quant.driver import quantize_model_weights

    from conftest import make_tiny_llama

    model = make_tiny_llama()
    quantize_model_weights(model, None, QuantConfig(method="rtn", bits=4, group_size=32, targets="all"),
                           progress=False)
    torch.manual_seed(1)
    inject_lora_layers(model, "all", r=4, alpha=8.0, dropout=0.0)
    return model


def _train_step(model, checkpointing: bool) -> dict[str, torch.Tensor]:
    """One forward + backward on a fixed batch; the LoRA gradients."""
    kwargs = {"use_reentrant": False}
    if checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    ids = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _count_dequantizations(monkeypatch) -> list[int]:
    """The qweight storage of each dequantization from now on (dequant-gemm's and the reference's)."""
    from gptqlora.quant.kernels import dequant, dequant_gemm

    calls: list[int] = []

    def counting(fn, qweight_of):
        def wrapper(*args, **kwargs):
            calls.append(qweight_of(*args).data_ptr())
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(dequant_gemm, "dequantize_into", counting(dequant_gemm.dequantize_into, lambda s, o: s.qweight))
    monkeypatch.setattr(dequant, "dequantize_packed", counting(dequant.dequantize_packed, lambda q, *a: q))
    return calls


@pytest.mark.parametrize("kernel", ["auto", "dequant"])
@pytest.mark.parametrize("checkpointing", [True, False])
def test_a_train_step_dequantizes_each_weight_at_most_twice(monkeypatch, kernel, checkpointing):
    from gptqlora.quant.kernels import dequant, dequant_gemm
    from gptqlora.quant.linear import set_kernel

    calls = _count_dequantizations(monkeypatch)
    alive: list[weakref.ref] = []
    most_alive = [0]

    def tracking(fn):
        def wrapper(state):
            w = fn(state)
            alive.append(weakref.ref(w))
            most_alive[0] = max(most_alive[0], sum(r() is not None for r in alive))
            return w
        return wrapper

    monkeypatch.setattr(dequant_gemm, "dense_weight", tracking(dequant_gemm.dense_weight))
    monkeypatch.setattr(dequant, "dense_weight", tracking(dequant.dense_weight))
    model = _tiny_quantized_lora_model()
    set_kernel(model, kernel)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    calls.clear()
    grads = _train_step(model, checkpointing)

    per_layer = collections.Counter(calls)
    assert len(per_layer) == len(layers) == 14  # 7 linears x 2 blocks
    # Forward + (recompute or backward): three times before. Without checkpointing, the first block's q/k/v see the
    # frozen embedding's output, which needs no gradient: no backward, one dequantization.
    assert max(per_layer.values()) == 2 and set(per_layer.values()) <= ({2} if checkpointing else {1, 2}), per_layer
    # A dense weight is kept only from a block's recompute to its backward: never more than one block's (7) at once.
    assert most_alive[0] <= (7 if checkpointing else 1)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())


@pytest.mark.parametrize("kernel", ["auto", "dequant"])
@pytest.mark.parametrize("micro_batches", [1, 2])
def test_dequantize_once_dequantizes_each_weight_once_per_step_with_the_same_gradients(monkeypatch, kernel,
                                                                                      micro_batches):
    from gptqlora.quant import linear
    from gptqlora.quant.linear import dequantize_once, set_kernel

    def step(once: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = _tiny_quantized_lora_model()
        set_kernel(model, kernel)
        calls.clear()
        with dequantize_once() if once else contextlib.nullcontext():
            for _ in range(micro_batches):  # gradient accumulation: one step, several forwards and backwards
                grads = _train_step(model, checkpointing=True)
        return grads, collections.Counter(calls)

    calls = _count_dequantizations(monkeypatch)
    plain, plain_calls = step(once=False)
    kept, kept_calls = step(once=True)
    assert set(plain_calls.values()) == {2 * micro_batches}  # forward and recompute, per micro-batch
    assert len(kept_calls) == 14 and set(kept_calls.values()) == {1}  # 7 linears x 2 blocks, once each
    assert linear._STEP_WEIGHTS is None  # dropped at the step's end
    assert plain.keys() == kept.keys()
    for name in plain:  # the same dense values: the same gradients, bit for bit
        assert torch.equal(kept[name], plain[name]), name


def test_dequantize_once_serves_the_compiled_op_and_is_not_reentrant(monkeypatch):
    from gptqlora.quant.linear import dequantize_once

    torch._dynamo.reset()
    calls = _count_dequantizations(monkeypatch)
    layer, _, _ = make_layer(bits=4, group_size=32)
    x = torch.randn(6, 128, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    eager_y = layer(x)
    (eager_grad,) = torch.autograd.grad(eager_y.sum(), x)
    calls.clear()
    with dequantize_once():
        y = compiled(x)
        (grad,) = torch.autograd.grad(y.sum(), x)
        with pytest.raises(RuntimeError, match="already active"):
            with dequantize_once():
                pass
    assert len(calls) == 1  # the op's forward made it, its backward reused it
    torch.testing.assert_close(y, eager_y)
    torch.testing.assert_close(grad, eager_grad)
    torch._dynamo.reset()


def test_checkpointing_changes_no_gradient():
    torch.manual_seed(0)
    plain = _train_step(_tiny_quantized_lora_model(), checkpointing=False)
    checkpointed = _train_step(_tiny_quantized_lora_model(), checkpointing=True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- quantized check

def test_check_quantized():
    from conftest import make_tiny_llama

    from gptqlora.config import QuantConfig
    from gptqlora.errors import UsageError
    from gptqlora.lora.layer import LoRALinear, inject_lora_layers
    from gptqlora.quant.driver import quantize_model_weights

    model = make_tiny_llama()
    with pytest.raises(UsageError, match="holds no QuantizedLinear layers: pass a directory written by `gptqlora"):
        check_quantized(model)
    torch.manual_seed(0)
    quantize_model_weights(model, torch.randint(0, 259, (4, 32)), QuantConfig(targets="attn", group_size=32),
                           progress=False)
    assert check_quantized(model) == 8  # 2 blocks x q/k/v/o
    inject_lora_layers(model, "attn", r=2)
    assert sum(isinstance(m, LoRALinear) for m in model.modules()) == 8
    assert check_quantized(model) == 8  # found as the wrappers' .base
