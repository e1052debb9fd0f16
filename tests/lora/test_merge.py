import pytest
import torch
from conftest import make_tiny_llama

from gptqlora.config import QuantConfig
from gptqlora.lora.layer import LoRALinear, inject_lora_layers
from gptqlora.lora.merge import merge_into_quantized, unmerge_to_float
from gptqlora.quant.driver import quantize_model_weights
from gptqlora.quant.linear import QuantizedLinear


def calib(seed=0):
    return torch.randint(0, 259, (8, 32), generator=torch.Generator().manual_seed(seed))


def adapted_quantized_model(config):
    model = make_tiny_llama()
    quantize_model_weights(model, calib(), config, progress=False)
    inject_lora_layers(model, "q_proj,v_proj", r=4, alpha=8, dropout=0.0)
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight, std=0.2)
    return model.eval()


def test_unmerge_to_float_is_exact():
    model = adapted_quantized_model(QuantConfig(targets="attn", group_size=32, calib_dtype="float32"))
    ids = calib(2)
    with torch.no_grad():
        before = model(ids).logits
        names = unmerge_to_float(model)
        after = model(ids).logits
    assert names == ["self_attn.q_proj", "self_attn.v_proj"]
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_merge_requantizes_only_adapted_layers_and_keeps_the_adapter_effect():
    config = QuantConfig(targets="attn", group_size=32, calib_dtype="float32")
    model = adapted_quantized_model(config)
    untouched = model.model.layers[0].self_attn.k_proj.qweight.clone()
    ids = calib(2)
    with torch.no_grad():
        with_adapter = model(ids).logits
        base_only = make_tiny_llama()
        quantize_model_weights(base_only, calib(), config, progress=False)
        without_adapter = base_only(ids).logits
    losses = merge_into_quantized(model, calib(), config, progress=False)
    assert set(losses) == {f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "v_proj")}
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 8
    assert torch.equal(model.model.layers[0].self_attn.k_proj.qweight, untouched)
    with torch.no_grad():
        merged = model(ids).logits
    # Re-quantization costs a little, far less than dropping the adapter would.
    assert (merged - with_adapter).pow(2).mean() < 0.25 * (without_adapter - with_adapter).pow(2).mean()


def test_merge_without_adapter_is_an_error():
    model = make_tiny_llama()
    quantize_model_weights(model, calib(), QuantConfig(targets="attn", group_size=32), progress=False)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        merge_into_quantized(model, calib(), QuantConfig(targets="attn", group_size=32), progress=False)
