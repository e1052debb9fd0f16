"""End-to-end tests on the embedded SmolLM2-135M model (marked slow; run in CI by `make test`)."""

import math

import pytest
import torch

from gptqlora.workflows.base import quantize_loaded
from gptqlora.config import CalibConfig, QuantConfig
from gptqlora.data.gsm8k import load_gsm8k
from gptqlora.eval.perplexity import gsm8k_answer_loss
from gptqlora.models import load_model
from gptqlora.quant.checkpoint import load_quantized, save_quantized
from gptqlora.quant.linear import QuantizedLinear

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def test_entries(gsm8k_dir_module):
    return load_gsm8k("test", str(gsm8k_dir_module))[:24]


@pytest.fixture(scope="module")
def gsm8k_dir_module():
    from conftest import GSM8K_DIR

    return GSM8K_DIR


def test_embedded_model_quantizes_within_bound_of_float(tmp_path, test_entries, gsm8k_dir_module):
    model, tokenizer = load_model("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    float_ppl = gsm8k_answer_loss(model, tokenizer, test_entries, batch_size=8)["perplexity"]

    qc = QuantConfig(targets="attn", group_size=64)
    report = quantize_loaded(model, tokenizer, qc, CalibConfig(calib_samples=16, calib_seqlen=256),
                             str(gsm8k_dir_module), seed=0, progress=False)
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 120
    assert report["weight_bytes_after"] < report["weight_bytes_before"]
    quant_ppl = gsm8k_answer_loss(model, tokenizer, test_entries, batch_size=8)["perplexity"]
    assert math.isfinite(quant_ppl)
    assert float_ppl <= quant_ppl * 1.02 and quant_ppl < float_ppl * 1.25  # 4-bit attention costs a little

    save_quantized(model, tokenizer, tmp_path / "q", qc)
    loaded, _, _ = load_quantized(tmp_path / "q")
    ids = tokenizer("Natalia sold clips to 48 of her friends.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
