import pytest
import torch
from conftest import make_tiny_llama

from gptqlora.config import QuantConfig
from gptqlora.errors import UsageError
from gptqlora.quant import driver
from gptqlora.quant.linear import QuantizedLinear
from gptqlora.targets import ALL_TARGETS


def calib(n=8, t=32, seed=0):
    return torch.randint(0, 259, (n, t), generator=torch.Generator().manual_seed(seed))


def logits_error(model, ref, ids):
    with torch.no_grad():
        return (model(ids).logits - ref).pow(2).mean().item()


@pytest.mark.parametrize("targets", ["attn", "all", "q_proj,down_proj"])
def test_two_block_llama_quantizes_end_to_end(targets):
    model = make_tiny_llama()
    ids = calib()
    losses = driver.quantize_model_weights(model, ids, QuantConfig(targets=targets, group_size=32), chunk_size=3,
                                           progress=False)
    names = QuantConfig(targets=targets).target_names
    for block in model.model.layers:
        for name in ALL_TARGETS:
            assert isinstance(block.get_submodule(name), QuantizedLinear) == (name in names)
    assert set(losses) == {f"model.layers.{i}.{n}" for i in range(2) for n in names}
    # Dequantized weights kept during calibration are released: the memory saving is real afterwards.
    assert all(m.kernel == "auto" for m in model.modules() if isinstance(m, QuantizedLinear))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("calib_dtype", ["float32", "bfloat16"])
def test_gptq_closer_to_float_than_rtn(calib_dtype):
    ref_model = make_tiny_llama()
    ids, test_ids = calib(16, 64), calib(4, 64, seed=1)
    with torch.no_grad():
        ref = ref_model(test_ids).logits
    errors = {}
    for method in ("rtn", "gptq"):
        model = make_tiny_llama()
        config = QuantConfig(method=method, targets="all", group_size=32, bits=3, calib_dtype=calib_dtype)
        driver.quantize_model_weights(model, ids, config, progress=False)
        errors[method] = logits_error(model, ref, test_ids)
    assert errors["gptq"] < errors["rtn"]


def test_staged_block_equals_plain_block_forward(monkeypatch):
    """The true-sequential driver's stage-by-stage outputs are exactly the quantized block's own forward."""
    seen = []
    original = driver.quantize_block

    def checked(block, xs, rope, mask, targets, config):
        outs, losses = original(block, xs, rope, mask, targets, config)
        plain = driver._block_forward(block, xs, rope, mask)
        seen.append(max((a - b).abs().max().item() for a, b in zip(outs, plain)))
        return outs, losses

    monkeypatch.setattr(driver, "quantize_block", checked)
    driver.quantize_model_weights(make_tiny_llama(), calib(), QuantConfig(targets="all", group_size=32,
                                                                          calib_dtype="float32"),
                                  chunk_size=3, progress=False)
    assert len(seen) == 2 and max(seen) < 1e-5


def test_sequential_inputs_come_from_quantized_blocks(monkeypatch):
    """Block 1 is calibrated on block 0's quantized outputs, not the float model's."""
    model = make_tiny_llama()
    ids = calib()
    with torch.no_grad():
        float_hidden = model(ids, output_hidden_states=True).hidden_states[1]  # input to block 1, float
    inputs = []
    original = driver.quantize_block

    def spy(block, xs, *args):
        inputs.append(torch.cat(xs))
        return original(block, xs, *args)

    monkeypatch.setattr(driver, "quantize_block", spy)
    driver.quantize_model_weights(model, ids, QuantConfig(targets="all", group_size=32, calib_dtype="float32"),
                                  progress=False)
    assert not torch.allclose(inputs[1], float_hidden, atol=1e-6)
    with torch.no_grad():
        quant_hidden = model(ids, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(inputs[1], quant_hidden, rtol=1e-5, atol=1e-5)


def test_one_pass_mode_and_rtn_need_no_true_sequential():
    model = make_tiny_llama()
    driver.quantize_model_weights(model, calib(), QuantConfig(targets="all", group_size=32, true_sequential=False),
                                  progress=False)
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14
    rtn = make_tiny_llama()
    driver.quantize_model_weights(rtn, None, QuantConfig(method="rtn", targets="attn", group_size=32), progress=False)
    assert sum(isinstance(m, QuantizedLinear) for m in rtn.modules()) == 8


def test_invalid_options_rejected_before_work():
    with pytest.raises(ValueError, match="bits=5"):
        QuantConfig(bits=5)
    with pytest.raises(ValueError, match="group_size=-4"):
        QuantConfig(group_size=-4)
    with pytest.raises(ValueError, match="unknown quantization target 'qq_proj'"):
        QuantConfig(targets="q_proj,qq_proj")
    with pytest.raises(ValueError, match="calibration"):
        driver.quantize_model_weights(make_tiny_llama(), None, QuantConfig(), progress=False)


def test_non_llama_model_rejected():
    with pytest.raises(ValueError, match="LLaMA"):
        driver.quantize_model_weights(torch.nn.Linear(4, 4), calib(), QuantConfig(), progress=False)


@pytest.mark.parametrize("calib_dtype", ["float32", "bfloat16"])
def test_run_time_check_finds_llama_blocks_exact(monkeypatch, calib_dtype):
    """On a LLaMA block the staged computation and the block's forward run the same operations: difference 0."""
    diffs = []
    original = driver.check_staged_forward
    monkeypatch.setattr(driver, "check_staged_forward", lambda *a: diffs.append(original(*a)) or diffs[-1])
    driver.quantize_model_weights(make_tiny_llama(), calib(), QuantConfig(targets="all", group_size=32,
                                                                          calib_dtype=calib_dtype),
                                  chunk_size=3, progress=False)
    assert diffs == [0.0, 0.0]


def test_block_with_an_altered_forward_is_refused_before_any_solve(monkeypatch):
    model = make_tiny_llama()
    mlp = model.model.layers[1].mlp
    original = mlp.forward
    monkeypatch.setattr(mlp, "forward", lambda x: original(x) + 0.01)  # block 1 only
    solves = []
    solve = driver.gptq_solve
    monkeypatch.setattr(driver, "gptq_solve", lambda W, *a, **k: solves.append(W.shape) or solve(W, *a, **k))
    with pytest.raises(UsageError, match=r"decoder block 1 \(LlamaDecoderLayer\) does not compute .* "
                                         r"--no-true-sequential"):
        driver.quantize_model_weights(model, calib(), QuantConfig(targets="all", group_size=32), progress=False)
    assert len(solves) == 4  # block 0's four stages; nothing of block 1
