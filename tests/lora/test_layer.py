"""LoRALinear, the shared LoRA input of q/k/v, and the injection / merge helpers, on single layers and the tiny
seeded LLaMA."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gptqlora.lora.layer import (LoRALinear, SharedInput, get_adapter_params, inject_lora_layers, lora_modules,
                                 merge_lora, set_trainable_params)
from gptqlora.train.loop import _enable_checkpointing

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
    no_dropout = LoRALinear(base, r=4, alpha=8.0, dropout=0.0)
    nn.init.normal_(no_dropout.lora_B.weight)
    assert torch.equal(no_dropout.train()(x), no_dropout.eval()(x))  # dropout 0 draws no mask


def identity_adapter(layer: LoRALinear) -> None:
    """A = I [r = in, in], B = I [out, r]: the LoRA branch returns its (dropped) input, times scale."""
    with torch.no_grad():
        layer.lora_A.weight.copy_(torch.eye(layer.r, layer.in_features))
        layer.lora_B.weight.copy_(torch.eye(layer.out_features, layer.r))


def test_dropout_zeroes_inputs_with_probability_p_and_rescales_the_rest():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 64), r=64, alpha=64.0, dropout=0.25).train()  # scale 1
    identity_adapter(layer)
    x = torch.randn(64, 64)
    seen = (layer(x) - layer.base(x)) * 0.75  # = keep * x: each element is x or 0
    kept = seen != 0
    torch.testing.assert_close(seen[kept], x[kept])
    assert 0.2 < 1 - kept.float().mean() < 0.3


def test_state_dict_keys_are_fixed_and_sharing_adds_none():
    layer = LoRALinear(nn.Linear(8, 8), r=2, alpha=4.0, dropout=0.1)
    assert set(layer.state_dict()) == {"base.weight", "base.bias", "lora_A.weight", "lora_B.weight"}
    assert [n for n, _ in layer.named_modules()] == ["", "base", "lora_A", "lora_B"]


def qkv_inputs_and_deltas(model: nn.Module, layer: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Forward hooks on q/k/v/o of one block: each one's input and its LoRA delta (output minus base output)."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    attn = model.model.layers[layer].self_attn
    hooks = []
    for name in ATTN:
        m = getattr(attn, name)
        hooks.append(m.register_forward_hook(
            lambda mod, args, out, name=name: seen.__setitem__(name, (args[0], out - mod.base(args[0])))))
    logits(model)
    for h in hooks:
        h.remove()
    return seen


def test_q_k_v_share_one_dropout_mask_of_their_input(tiny_llama):
    inject_lora_layers(tiny_llama, "attn", r=64, alpha=64.0, dropout=0.5)  # r = hidden: A = I shows the input
    for m in lora_modules(tiny_llama).values():
        identity_adapter(m)
    tiny_llama.train()
    seen = qkv_inputs_and_deltas(tiny_llama)
    x = seen["q_proj"][0]
    assert all(seen[n][0] is x for n in ("k_proj", "v_proj"))  # the block calls q, k and v on one tensor
    keep = {n: seen[n][1] != 0 for n in ATTN}  # [B, T, out]; B = I [out, 64] reads the first `out` inputs
    for n in ("q_proj", "k_proj", "v_proj"):
        out = keep[n].shape[-1]
        assert torch.equal(keep[n], keep["q_proj"][..., :out])  # one mask
        torch.testing.assert_close(seen[n][1], 2 * x[..., :out] * keep[n])  # = x / (1 - p) where kept
    assert 0.4 < 1 - keep["q_proj"].float().mean() < 0.6
    assert not torch.equal(keep["o_proj"], keep["q_proj"])  # o_proj reads another tensor: a mask of its own
    shared = {id(m.shared) for m in lora_modules(tiny_llama).values()}
    assert len(shared) == 2 * 2  # per block: one for q/k/v, one for o_proj
    assert all(m.shared._x is None and m.shared._h == () for m in lora_modules(tiny_llama).values())


def test_layers_of_one_group_fed_different_tensors_each_read_their_own():
    torch.manual_seed(0)
    q, k = (LoRALinear(nn.Linear(16, 16), r=16, alpha=16.0, dropout=0.0) for _ in range(2))
    q.shared = k.shared = SharedInput([q, k])
    for m in (q, k):
        identity_adapter(m)
    x1, x2 = torch.randn(3, 16), torch.randn(3, 16)
    torch.testing.assert_close(q(x1) - q.base(x1), x1)
    torch.testing.assert_close(k(x2) - k.base(x2), x2)  # its own tensor, not q's round on x1
    torch.testing.assert_close(q(x1) - q.base(x1), x1)  # a member called twice starts a new round
    assert q.shared._x is not None  # k has not taken its slice of this round yet...
    torch.testing.assert_close(k(x1) - k.base(x1), x1)
    assert q.shared._x is None and q.shared._h == ()  # ...now it has, and the round is forgotten


def test_sharing_changes_nothing_without_dropout(tiny_llama):
    inject_lora_layers(tiny_llama, "all", r=4, alpha=8.0, dropout=0.0)
    groups: dict[int, list[str]] = {}  # SharedInput -> its layers' short names
    for name, m in lora_modules(tiny_llama).items():
        groups.setdefault(id(m.shared), []).append(name.rsplit(".", 1)[1])
    assert sorted(groups.values()) == sorted(2 * [["q_proj", "k_proj", "v_proj"], ["o_proj"],
                                                  ["gate_proj", "up_proj"], ["down_proj"]])
    randomize_B(tiny_llama)
    shared = logits(tiny_llama.train())
    assert torch.equal(logits(tiny_llama.eval()), shared)
    for m in lora_modules(tiny_llama).values():
        m.shared = SharedInput([m])  # every layer alone: per-layer A, as PEFT computes it
    torch.testing.assert_close(logits(tiny_llama), shared, rtol=1e-6, atol=1e-6)


def loss_and_grads(model: nn.Module, bf16: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    ids = torch.randint(0, 259, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)  # the dropout masks
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in get_adapter_params(model).items()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("bf16", [False, True])
def test_gradient_checkpointing_recomputes_the_same_masks(tiny_llama, bf16):
    inject_lora_layers(tiny_llama, "all", r=4, alpha=8.0, dropout=0.3)
    randomize_B(tiny_llama)
    tiny_llama.train()
    calls = []
    tiny_llama.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    loss, grads = loss_and_grads(tiny_llama, bf16)
    undo = _enable_checkpointing(tiny_llama)  # non-reentrant, as train_lora runs it
    loss_ckpt, grads_ckpt = loss_and_grads(tiny_llama, bf16)
    undo()
    assert len(calls) == 3  # once without checkpointing; forward and recompute with it
    assert torch.equal(loss_ckpt, loss)
    assert grads.keys() == grads_ckpt.keys() and all(g.abs().sum() > 0 for g in grads.values())
    for name, g in grads.items():
        assert torch.equal(grads_ckpt[name], g), name
    assert all(m.shared._x is None and m.shared._h == () for m in lora_modules(tiny_llama).values())  # none kept


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


def test_a_target_regex_that_could_hang_is_refused_before_it_meets_a_name(tiny_llama):
    from gptqlora.errors import UsageError
    from gptqlora.lora.layer import find_targets
    from conftest import deadline

    with deadline(10):
        with pytest.raises(UsageError, match=r"^--lora-targets: the target regex '\(\.\*\.\*\)\*X' repeats a part"):
            inject_lora_layers(tiny_llama, "re:(.*.*)*X")
        with pytest.raises(UsageError, match=r"^adapter_config\.json: target_modules: the target regex .* too many"):
            find_targets(tiny_llama, "re:" + ".*" * 8 + "X", where="adapter_config.json: target_modules")
    assert not lora_modules(tiny_llama)
