"""The registry: auto's choices, the fallback to the reference, layer facts, and set_kernel over a model."""

import warnings

import pytest
import torch
from torch import nn

from gptqlora.errors import UsageError
from gptqlora.quant.kernels.registry import BACKENDS, CPU_INT4_MAX_M, KERNELS, auto_order, layer_facts, select_backend
from gptqlora.quant.linear import kernels_used, set_kernel

from quant.kernels.layers import assert_matches, exact_output, random_layer, run

CPU = torch.device("cpu")


def choose(layer, dtype=torch.bfloat16, m=1, needs_grad=False, preference="auto"):
    return select_backend(preference, layer.facts, CPU, dtype, m, needs_grad)


def test_auto_on_the_cpu_follows_the_measured_crossovers():
    layer = random_layer(n=64, k=256, bits=4, group_size=64)
    assert choose(layer, torch.bfloat16, m=1) == "int4-aten"
    assert choose(layer, torch.bfloat16, m=CPU_INT4_MAX_M) == "int4-aten"
    assert choose(layer, torch.bfloat16, m=CPU_INT4_MAX_M + 1) == "dequant-gemm"
    assert choose(layer, torch.float32, m=1) == "dequant-gemm"  # the int4 kernel is slow in fp32: never chosen
    assert choose(layer, torch.bfloat16, m=1, needs_grad=True) == "dequant-gemm"  # int4 has no backward
    assert choose(random_layer(n=64, k=192, bits=3, group_size=64), torch.bfloat16) == "dequant"
    assert choose(random_layer(n=64, k=256, bits=8, group_size=64), torch.bfloat16) == "dequant-gemm"
    assert auto_order(torch.device("meta"), torch.float32, 4, 1, False) == ("dequant",)


def test_auto_skips_what_cannot_run_silently():
    ragged = random_layer(n=64, k=576, bits=4, group_size=128)  # 576 = 4 * 128 + 64: no int4 kernel
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert choose(ragged, torch.bfloat16, m=1) == "dequant-gemm"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 4, 16, 40])
@pytest.mark.parametrize("act_order", [False, True])
def test_auto_equals_exact_product(dtype, m, act_order):
    layer = random_layer(n=64, k=256, bits=4, group_size=64, act_order=act_order, bias=True)
    x = torch.randn(m, 256).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_matches(run(layer, "auto", x), exact_output(layer, x), dtype)


def test_an_explicit_kernel_that_cannot_run_falls_back_to_the_reference_with_a_warning():
    layer = random_layer(n=64, k=192, bits=3, group_size=64)
    x = torch.randn(2, 192)
    for kernel in ("int4-aten", "dequant-gemm"):
        with pytest.warns(UserWarning, match=f"kernel '{kernel}' cannot run a 3-bit 192x64 layer"):
            assert choose(layer, torch.float32, m=2, preference=kernel) == "dequant"
    reference = run(layer, "dequant", x)
    layer.set_kernel("int4-aten")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(layer(x), reference)


def test_unknown_kernel_names_are_usage_errors():
    layer = random_layer()
    with pytest.raises(UsageError, match="unknown kernel 'fast'.*auto, dequant, dequant-gemm"):
        layer.set_kernel("fast")
    with pytest.raises(UsageError, match="unknown kernel"):
        set_kernel(nn.Sequential(layer), "marlin")
    assert KERNELS[0] == "auto"


def test_the_command_lines_kernel_names_are_the_registrys():
    """One list of kernel names, the registry's ('auto', then one per backend row); every command's --kernel offers
    exactly those, so a new backend row is a new choice and a wrong name is refused while parsing."""
    from gptqlora.cli import build_parser

    assert KERNELS == ("auto", *BACKENDS)
    commands = build_parser()._subparsers._group_actions[0].choices
    offered = {name: next(a.choices for a in sub._actions if "--kernel" in a.option_strings)
               for name, sub in commands.items() if any("--kernel" in a.option_strings for a in sub._actions)}
    assert offered and all(tuple(choices) == KERNELS for choices in offered.values()), offered


def test_set_kernel_sets_every_quantized_layer_of_a_model():
    model = nn.Sequential(random_layer(seed=0), nn.ReLU(), random_layer(n=256, k=64, seed=1), nn.Linear(256, 8))
    assert kernels_used(model) == {"none": 2}
    assert set_kernel(model, "dense") == 2
    assert [m.kernel for m in model if hasattr(m, "kernel")] == ["dense", "dense"]
    model(torch.randn(3, 256))
    assert kernels_used(model) == {"dense": 2}
    assert all(m._cache is not None for m in model if hasattr(m, "kernel"))
    set_kernel(model, "auto")
    assert all(m._cache is None for m in model if hasattr(m, "kernel"))
    assert kernels_used(model) == {"none": 2}  # counted again from the new preference on


def test_kernels_used_counts_every_backend_a_layer_ran():
    """A decode runs one backend for the prompt (many rows) and another per new token: both are reported."""
    model = nn.Sequential(random_layer(n=64, k=128, bits=4, group_size=64, seed=0))
    x = torch.randn(200, 128, dtype=torch.bfloat16)
    model(x)  # M = 200: dequant-gemm on the CPU
    model(x[:1])  # M = 1: int4-aten
    assert kernels_used(model) == {"dequant-gemm": 1, "int4-aten": 1}
    model(x)
    assert kernels_used(model) == {"dequant-gemm": 1, "int4-aten": 1}


def test_layer_facts():
    plain = random_layer(n=64, k=256, bits=4, group_size=64, sym=True)
    f = plain.facts
    assert (f.act_order, f.sym, f.sortable, f.group_size, f.in_features, f.out_features) == \
        (False, True, True, 64, 256, 64)
    shuffled = random_layer(n=64, k=256, bits=4, group_size=64, act_order=True)
    assert shuffled.facts.act_order and shuffled.facts.sortable and not shuffled.facts.sym
    g_idx = shuffled.g_idx.clone()
    g_idx[0] = 3 if g_idx[0] != 3 else 2  # one group too many, one too few
    facts = layer_facts(shuffled.qzeros, g_idx, 4, 64, 256, 64)
    assert facts.act_order and not facts.sortable
    whole = random_layer(n=64, k=256, bits=4, group_size=-1)
    assert whole.facts.group_size == 256 and not whole.facts.act_order
