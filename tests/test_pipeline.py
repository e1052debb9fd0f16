"""The whole job through the CLI on a tiny random model: run (quantize -> fine-tune -> evaluate), eval, merge."""

import json

import pytest

from conftest import make_tiny_llama, make_tiny_tokenizer
from gptqlora import cli
from gptqlora.data.gsm8k import answers_match
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
    for name, row in results["rows"].items():
        eval_dir = out / "eval" / name.replace(" ", "_")
        records = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]
        # Each record's verdict from its own extracted answer, and the accuracy counted here from them.
        assert [r["correct"] for r in records] == [answers_match(r["predicted_answer"], r["gold"]) for r in records]
        correct = sum(r["correct"] for r in records)
        assert row["n"] == len(records) == 3 and row["answer_loss"] > 0
        assert (row["greedy"]["correct"], row["greedy"]["accuracy"]) == (correct, correct / 3)
        assert json.loads((eval_dir / "summary.json").read_text())["greedy"] == row["greedy"]
    table = (out / "results.md").read_text()
    assert table.count("\n") == 5 and "gptq 4-bit + LoRA" in table
    assert json.loads((out / "run_config.json").read_text())["run.test_limit"] == 3
    assert (out / "lora_adapter" / "adapter_model.safetensors").is_file()
    assert (out / "loss_curve.png").is_file() and (out / "metrics.jsonl").is_file()
    model, _ = load_model(str(out / "quantized_base"))
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 8

    # A second run into the same directory must not clobber it without --resume or --overwrite.
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert cli.main(argv + SMALL) == 2
    assert "--overwrite" in capsys.readouterr().err
    # Resuming with other quantization options is refused, not mislabelled in results.md.
    assert cli.main(argv + SMALL + ["--resume", "--bits", "2"]) == 2
    assert "quant.bits: run 4, now 2" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # Resuming a finished run with the same settings keeps every row and rewrites the same table.
    assert cli.main(argv + SMALL + ["--resume"]) == 0
    assert (out / "results.md").read_text() == table

    evaluated = tmp_path / "eval"
    assert cli.main(["eval", "--quantized", str(out / "quantized_base"), "--adapter", str(out / "lora_adapter"),
                     "--data", str(gsm8k_dir), "--limit", "2", "--max-new-tokens", "4", "--output-dir",
                     str(evaluated)]) == 0
    assert len((evaluated / "predictions.jsonl").read_text().splitlines()) == 2
    summary = json.loads((evaluated / "summary.json").read_text())
    assert summary["n"] == 2
    assert summary["provenance"]["base"]["path"] == str((out / "quantized_base").resolve())
    assert summary["provenance"]["adapter"]["path"].endswith("lora_adapter")
    assert summary["provenance"]["kernel"] == "auto" and sum(summary["kernels"].values()) >= 8
    # --kernel chooses the quantized layers' backend; summary.json says which ran.
    assert cli.main(["eval", "--quantized", str(out / "quantized_base"), "--data", str(gsm8k_dir), "--limit", "1",
                     "--max-new-tokens", "2", "--output-dir", str(tmp_path / "eval-dequant"), "--kernel",
                     "dequant"]) == 0
    summary = json.loads((tmp_path / "eval-dequant" / "summary.json").read_text())
    assert summary["kernels"] == {"dequant": 8} and summary["provenance"]["kernel"] == "dequant"

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
    assert "is not a quantized model" in capsys.readouterr().err


def test_eval_resume_after_an_interruption_equals_an_uninterrupted_run(tmp_path, tiny_model_dir, gsm8k_dir,
                                                                        monkeypatch, capsys):
    import gptqlora.workflows.scored as common

    q = tmp_path / "q"
    assert cli.main(["quantize", "--model", str(tiny_model_dir), "--data", str(gsm8k_dir), "--method", "rtn",
                     "--group-size", "32", "--out", str(q)]) == 0
    argv = ["eval", "--quantized", str(q), "--data", str(gsm8k_dir), "--limit", "5", "--batch-size", "2",
            "--max-new-tokens", "6"]
    assert cli.main(argv + ["--output-dir", str(tmp_path / "whole")]) == 0

    seen = []

    def interrupt_after_the_first_batch(line):
        seen.append(line)
        if len(seen) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(common, "print_line", interrupt_after_the_first_batch)
    part = ["--output-dir", str(tmp_path / "part")]
    assert cli.main(argv + part) == 130
    assert "--resume" in capsys.readouterr().err
    assert len((tmp_path / "part" / "predictions.jsonl").read_text().splitlines()) == 2  # the first batch only
    monkeypatch.undo()
    assert cli.main(argv + part) == 2  # not without --resume
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(argv + part + ["--max-new-tokens", "7", "--resume"]) == 2  # other settings: refused
    assert "max_new_tokens" in capsys.readouterr().err
    assert cli.main(argv + part + ["--resume"]) == 0
    whole, resumed = tmp_path / "whole", tmp_path / "part"
    assert (resumed / "predictions.jsonl").read_bytes() == (whole / "predictions.jsonl").read_bytes()
    drop = lambda d: {k: v for k, v in json.loads((d / "summary.json").read_text()).items()  # noqa: E731
                      if not k.endswith("_this_run") and k != "resumed_from"}
    assert drop(resumed) == drop(whole)
