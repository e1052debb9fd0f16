"""The whole job through the CLI on a tiny random model: run (quantize -> fine-tune -> evaluate), eval, merge."""

import json

import pytest

from conftest import make_tiny_llama, make_tiny_tokenizer
from gptqlora import cli
from gptqlora.models import load_model
from gptqlora.quant.linear import QuantizedLinear

SMALL = ["--group-size", "32", "--calib-samples", "4", "--calib-seqlen", "32", "--max-new-tokens", "4",
         "--eval-batch-size", "2", "--no-bf16", "--max-length", "64"]


@pytest.fixture
def tiny_model_dir(tmp_path):
    make_tiny_llama().save_pretrained(tmp_path / "tiny")
    make_tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_run_eval_merge_end_to_end(tmp_path, tiny_model_dir, gsm8k_dir, capsys):
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_model_dir), "--data", str(gsm8k_dir), "--out", str(out), "--test-limit", "3",
            "--train-steps", "2", "--train-limit", "6", "--eval-holdout", "2", "--eval-every", "1", "--save-every", "1"]
    assert cli.main(argv + SMALL) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["rows"]) == ["float base", "gptq 4-bit base", "gptq 4-bit + LoRA"]
    for row in results["rows"].values():
        assert row["n"] == 3 and 0 <= row["greedy"]["accuracy"] <= 1 and row["answer_loss"] > 0
    table = (out / "results.md").read_text()
    assert table.count("\n") == 5 and "gptq 4-bit + LoRA" in table
    assert json.loads((out / "run_config.json").read_text())["EvalConfig"]["limit"] == 3
    assert (out / "lora_adapter" / "adapter_model.safetensors").is_file()
    assert (out / "loss_curve.png").is_file() and (out / "metrics.jsonl").is_file()
    model, _ = load_model(str(out / "quantized_base"))
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 8

    # A second run into the same directory must not clobber it without --resume.
    assert cli.main(argv + SMALL) == 2
    assert "--resume" in capsys.readouterr().err

    evaluated = tmp_path / "eval"
    assert cli.main(["eval", "--quantized", str(out / "quantized_base"), "--adapter", str(out / "lora_adapter"),
                     "--data", str(gsm8k_dir), "--limit", "2", "--max-new-tokens", "4", "--output-dir",
                     str(evaluated)]) == 0
    assert len((evaluated / "predictions.jsonl").read_text().splitlines()) == 2
    assert json.loads((evaluated / "summary.json").read_text())["n"] == 2

    merged = tmp_path / "merged"
    assert cli.main(["merge", "--quantized", str(out / "quantized_base"), "--adapter", str(out / "lora_adapter"),
                     "--data", str(gsm8k_dir), "--out", str(merged), "--calib-samples", "4", "--calib-seqlen", "32",
                     "--ppl-limit", "4"]) == 0
    printed = capsys.readouterr().out
    assert '"perplexity_unmerged"' in printed and '"perplexity_merged"' in printed
    model, _ = load_model(str(merged))
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 8


def test_eval_rejects_a_float_model_given_as_quantized(tiny_model_dir, gsm8k_dir, capsys):
    assert cli.main(["eval", "--quantized", str(tiny_model_dir), "--data", str(gsm8k_dir), "--limit", "1"]) == 2
    assert "holds no QuantizedLinear layers" in capsys.readouterr().err
