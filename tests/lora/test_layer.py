"""LoRALinear and the injection / merge helpers, on single layers and the tiny seeded LLaMA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gptqlora.lora.layer import (LoRALinear, get_adapter_params, inject_lora_layers, lora_modules, merge_lora,
                                 set_trainable_params)

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


class FakeQuantLinear(nn.Module):
    """Stands in for QuantizedLinear: int codes and scales as buffers, no parameters, a dequantize_weight method."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        W = linear.weight.detach()  # [out, in]
        scales = W.abs().amax(dim=1, keepdim=True) / 7  # [out, 1]
        self.register_buffer("codes", torch.clamp(torch.round(W / scales), -8, 7).to(torch.int8))
        self.register_buffer("scales", scales)
        self.bias = None

    def dequantize_weight(self) -> torch.Tensor:
        return self.codes.float() * self.scales  # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize_weight().to(x.dtype))


def randomize_B(model: nn.Module, std: float = 0.1) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, std)


def logits(model: nn.Module, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(params=["float", "quantized"])
def base(request) -> nn.Module:
    torch.manual_seed(0)
    linear = nn.Linear(32, 48, bias=True)
    return linear if request.param == "float" else FakeQuantLinear(linear)


def test_fresh_lora_equals_base_exactly(base):
    layer = LoRALinear(base, r=4, alpha=8.0, dropout=0.0)
    x = torch.randn(3, 5, 32)
    assert torch.equal(layer(x), base(x))
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    # kaiming_uniform_(a=sqrt(5)) on [r, in] draws from U(-1/sqrt(in), 1/sqrt(in)).
    A = layer.lora_A.weight
    assert A.shape == (4, 32) and layer.lora_B.weight.shape == (48, 4)
    assert 0 < A.abs().max() <= 1 / math.sqrt(32)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_forward_is_base_plus_scaled_BA(base, use_rslora):
    layer = LoRALinear(base, r=4, alpha=8.0, use_rslora=use_rslora)
    nn.init.normal_(layer.lora_B.weight)
    scale = 8.0 / (2.0 if use_rslora else 4.0)
    assert layer.scale == scale
    x = torch.randn(3, 32)
    A, B = layer.lora_A.weight, layer.lora_B.weight
    torch.testing.assert_close(layer(x), base(x) + x @ A.T @ B.T * scale)
    # delta_weight is the same update as a dense [out, in] matrix.
    torch.testing.assert_close(layer(x) - base(x), F.linear(x, layer.delta_weight()), rtol=1e-5, atol=1e-5)
    assert layer.delta_weight().shape == (48, 32)


def test_gradients_reach_x_and_lora_but_not_base(base):
    layer = LoRALinear(base, r=4, alpha=8.0)
    x = torch.randn(3, 32, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in layer.base.parameters())
    assert layer.lora_B.weight.grad is not None and layer.lora_B.weight.grad.abs().sum() > 0
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {"lora_A.weight", "lora_B.weight"}


def test_dropout_applies_to_the_lora_branch_only():
    torch.manual_seed(0)
    base = nn.Linear(32, 16)
    layer = LoRALinear(base, r=4, alpha=8.0, dropout=0.5).train()
    x = torch.randn(8, 32)
    assert torch.equal(layer(x), base(x))  # B = 0: dropout on the LoRA input cannot reach the output
    nn.init.normal_(layer.lora_B.weight)
    assert not torch.equal(layer(x), layer(x))  # two dropout masks
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    assert isinstance(LoRALinear(base, r=4, alpha=8.0, dropout=0.0).lora_dropout, nn.Identity)


def test_bf16_activations_keep_fp32_lora_params():
    torch.manual_seed(0)
    base = nn.Linear(32, 16).to(torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=8.0)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_A.weight.grad.abs().sum() > 0


def test_rejects_non_linear_and_double_wrapping():
    with pytest.raises(TypeError, match="nn.Linear or a quantized linear"):
        LoRALinear(nn.LayerNorm(8), r=2, alpha=4.0)
    with pytest.raises(TypeError):
        LoRALinear(LoRALinear(nn.Linear(8, 8), r=2, alpha=4.0), r=2, alpha=4.0)
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(8, 8), r=0, alpha=4.0)


def test_inject_attn_wraps_qkvo_and_trains_only_lora(tiny_llama):
    reference = logits(tiny_llama)
    params = inject_lora_layers(tiny_llama, "attn", r=4, alpha=8.0, dropout=0.0)
    names = set(lora_modules(tiny_llama))
    assert names == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ATTN}
    assert len(params) == 16
    trainable = {n for n, p in tiny_llama.named_parameters() if p.requires_grad}
    assert trainable == set(get_adapter_params(tiny_llama)) and len(trainable) == 16
    assert torch.equal(logits(tiny_llama), reference)  # B = 0 on every layer


@pytest.mark.parametrize("targets, expected", [
    ("mlp", {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
    ("q_proj,v_proj", {"self_attn.q_proj", "self_attn.v_proj"}),
    (["self_attn.o_proj"], {"self_attn.o_proj"}),
    ("all", {f"self_attn.{p}" for p in ATTN} | {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
])
def test_inject_target_specs(tiny_llama, targets, expected):
    inject_lora_layers(tiny_llama, targets, r=2, alpha=4.0)
    assert set(lora_modules(tiny_llama)) == {f"model.layers.{i}.{e}" for i in range(2) for e in expected}
    assert isinstance(tiny_llama.lm_head, nn.Linear)


def test_inject_regex_fullmatches_full_names(tiny_llama):
    inject_lora_layers(tiny_llama, r"re:model\.layers\.0\.self_attn\.(q|v)_proj", r=2, alpha=4.0)
    assert set(lora_modules(tiny_llama)) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}
    with pytest.raises(ValueError, match="match no linear layer"):
        inject_lora_layers(tiny_llama, r"re:layers\.0\.self_attn\.k_proj", r=2, alpha=4.0)  # not a full match


def test_inject_errors_list_the_models_linears(tiny_llama):
    with pytest.raises(ValueError) as err:
        inject_lora_layers(tiny_llama, "query_key_value")
    msg = str(err.value)
    assert "query_key_value" in msg and "15 linear layers" in msg and "lm_head" in msg
    assert "model.layers.0.self_attn.q_proj" in msg and "model.layers.1." not in msg
    with pytest.raises(ValueError, match="qq_proj"):
        inject_lora_layers(tiny_llama, "q_proj,qq_proj")  # a typo is not silently dropped
    with pytest.raises(ValueError, match="invalid"):
        inject_lora_layers(tiny_llama, "re:(")
    assert not lora_modules(tiny_llama)


def test_inject_twice_is_an_error(tiny_llama):
    inject_lora_layers(tiny_llama, "q_proj", r=2, alpha=4.0)
    with pytest.raises(ValueError, match="already have LoRA"):
        inject_lora_layers(tiny_llama, "attn", r=2, alpha=4.0)
    inject_lora_layers(tiny_llama, "v_proj", r=2, alpha=4.0)  # other layers may still be adapted
    assert len(lora_modules(tiny_llama)) == 4


def test_inject_over_quantized_linears(tiny_llama):
    for layer in tiny_llama.model.layers:
        layer.self_attn.q_proj = FakeQuantLinear(layer.self_attn.q_proj)
    reference = logits(tiny_llama)
    inject_lora_layers(tiny_llama, "q_proj", r=2, alpha=4.0)
    assert all(isinstance(m.base, FakeQuantLinear) for m in lora_modules(tiny_llama).values())
    assert torch.equal(logits(tiny_llama), reference)


def test_set_trainable_params_rejects_unknown_names(tiny_llama):
    with pytest.raises(KeyError, match="not parameters"):
        set_trainable_params(tiny_llama, ["model.layers.0.self_attn.q_proj.lora_A.weight"])


def test_merge_equals_unmerged(tiny_llama):
    inject_lora_layers(tiny_llama, "all", r=4, alpha=8.0, dropout=0.1)
    tiny_llama.eval()
    randomize_B(tiny_llama)
    q = tiny_llama.model.layers[0].self_attn.q_proj
    expected_W = q.base.weight.detach().float() + q.delta_weight().detach()
    unmerged = logits(tiny_llama)
    assert merge_lora(tiny_llama) is tiny_llama
    assert not lora_modules(tiny_llama)
    merged_q = tiny_llama.model.layers[0].self_attn.q_proj
    assert type(merged_q) is nn.Linear and torch.equal(merged_q.weight, expected_W)
    torch.testing.assert_close(logits(tiny_llama), unmerged, rtol=1e-5, atol=1e-5)


def test_merge_into_quantized_base_points_to_the_cli(tiny_llama):
    tiny_llama.model.layers[1].self_attn.q_proj = FakeQuantLinear(tiny_llama.model.layers[1].self_attn.q_proj)
    inject_lora_layers(tiny_llama, "q_proj", r=2, alpha=4.0)
    with pytest.raises(ValueError, match="gptqlora merge"):
        merge_lora(tiny_llama)
    assert len(lora_modules(tiny_llama)) == 2  # nothing was merged half-way
