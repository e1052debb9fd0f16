"""``gptqlora sample`` and ``gptqlora train-verifier`` end to end on a tiny quantized model: sample -> train -> score;
resuming a sampling equals an uninterrupted one; test-split gold never reaches either command."""

import json
import logging
import re
import warnings

import pytest

from conftest import make_tiny_llama, make_tiny_tokenizer
from gptqlora import cli
from gptqlora.config import EvalConfig, QuantConfig
from gptqlora.data.gsm8k import answers_match, load_gsm8k
from gptqlora.models import load_model
from gptqlora.provenance import base_record
from gptqlora.quant.checkpoint import save_quantized
from gptqlora.quant.driver import quantize_model_weights
from gptqlora.eval import engine as engine_module
from gptqlora.verifier import samples as samples_module
from gptqlora.verifier.load import load_verifier, score_samples, score_solutions
from gptqlora.verifier.samples import SAMPLE_CONFIG, SAMPLES, SUMMARY, sample_gsm8k

from verifier.scripted import scripted_samples as scripted

SMALL = ["--max-new-tokens", "4", "--batch-size", "2", "--samples", "2", "--dtype", "float32"]


@pytest.fixture
def quantized_dir(tmp_path):
    config = QuantConfig(method="rtn", targets="attn", group_size=32)
    model = make_tiny_llama()
    quantize_model_weights(model, None, config, progress=False)
    return save_quantized(model, make_tiny_tokenizer(), tmp_path / "q", config)


@pytest.fixture
def scripted_samples(monkeypatch, gsm8k_dir):
    """Sampling that writes the gold answer in a sample's text when its index is even, a wrong one otherwise."""
    monkeypatch.setattr(engine_module, "generate_samples", scripted(gsm8k_dir))


def test_sample_train_verifier_score_end_to_end(tmp_path, quantized_dir, gsm8k_dir, scripted_samples, capsys):
    s_dir, v_dir = tmp_path / "samples", tmp_path / "verifier"
    assert cli.main(["sample", "--quantized", str(quantized_dir), "--data", str(gsm8k_dir), "--split", "train",
                     "--limit", "6", "--out", str(s_dir), *SMALL]) == 0
    records = [json.loads(line) for line in (s_dir / SAMPLES).read_text().splitlines()]
    assert [r["sample_correct"] for r in records] == [[True, False]] * 6
    summary = json.loads((s_dir / SUMMARY).read_text())
    assert summary["settings"]["split"] == "train" and summary["pass_at_k"]["accuracy"] == 1.0
    assert summary["provenance"]["base"]["fingerprint"] == base_record(quantized_dir)["fingerprint"]
    capsys.readouterr()

    argv = ["train-verifier", "--quantized", str(quantized_dir), "--samples-dir", str(s_dir), "--out", str(v_dir),
            "--data", str(gsm8k_dir), "--max-steps", "3", "--batch-size", "4", "--max-length", "96", "--no-bf16",
            "--val-questions", "2", "--r", "4"]
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["steps"] == 3 and printed["val_after"]["samples"] == 4
    for name in ("adapter_config.json", "adapter_model.safetensors", "gptqlora_base.json", "value_head.safetensors",
                 "verifier_config.json", "metrics.jsonl"):
        assert (v_dir / name).is_file(), name
    config = json.loads((v_dir / "verifier_config.json").read_text())
    assert config["base"] == base_record(quantized_dir) and config["training"]["train_questions"] == 4
    assert len((v_dir / "metrics.jsonl").read_text().splitlines()) == 3
    # A second run into the same directory is refused without --overwrite.
    assert cli.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err

    verifier = load_verifier(v_dir, dtype="float32", device="cpu")
    scores = score_solutions(verifier, [records[0]["question"]] * 2, records[0]["samples"])
    assert len(scores) == 2 and all(0 < s < 1 for s in scores)
    per_question = score_samples(verifier, [r["question"] for r in records[:3]], [r["samples"] for r in records[:3]],
                                 batch_size=4)
    assert per_question[0] == pytest.approx(scores, abs=1e-6) and [len(s) for s in per_question] == [2, 2, 2]
    # eval --samples K --verifier reranks: every record holds the verifier's scores, the summary its blocks.
    e_dir = tmp_path / "eval"
    assert cli.main(["eval", "--quantized", str(quantized_dir), "--data", str(gsm8k_dir), "--limit", "3",
                     "--samples", "2", "--max-new-tokens", "4", "--batch-size", "2", "--verifier", str(v_dir),
                     "--output-dir", str(e_dir), "--dtype", "float32"]) == 0
    evaluated = [json.loads(line) for line in (e_dir / "predictions.jsonl").read_text().splitlines()]
    assert [len(r["verifier_scores"]) for r in evaluated] == [2, 2, 2]
    summary = json.loads((e_dir / "summary.json").read_text())
    for block in ("verifier_best_of_k", "verifier_weighted_vote", "pass_at_k"):
        assert summary[block]["k"] == 2 and len(summary[block]["ci95"]) == 2, block
    assert summary["provenance"]["verifier"] == verifier.record
    with pytest.raises(SystemExit) as refused:  # options are checked as they are parsed
        cli.main(["eval", "--quantized", str(quantized_dir), "--verifier", str(v_dir)])  # needs --samples
    assert refused.value.code == 2
    assert "add --samples K" in capsys.readouterr().err
    # Loaded onto another base, the verifier is refused.
    other = tmp_path / "other"
    other.mkdir()
    for f in quantized_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "model.safetensors").write_bytes((quantized_dir / "model.safetensors").read_bytes()[:-4] + b"    ")
    with pytest.raises(Exception, match="differ in fingerprint"):
        load_verifier(v_dir, base_dir=other, device="cpu")


def other_quantized_dir(tmp_path):
    """A quantized tiny model like ``quantized_dir`` but from other weights: another base."""
    config = QuantConfig(method="rtn", targets="attn", group_size=32)
    model = make_tiny_llama(seed=1)
    quantize_model_weights(model, None, config, progress=False)
    return save_quantized(model, make_tiny_tokenizer(), tmp_path / "other_q", config)


def assert_names_both(message: str, *bases) -> None:
    for base in bases:
        record = base_record(base)
        assert record["path"] in message and record["fingerprint"][:12] in message, (record, message)


def train_verifier_argv(quantized, s_dir, v_dir, gsm8k_dir) -> list[str]:
    return ["train-verifier", "--quantized", str(quantized), "--samples-dir", str(s_dir), "--out", str(v_dir),
            "--data", str(gsm8k_dir), "--max-steps", "1", "--batch-size", "4", "--max-length", "64", "--no-bf16",
            "--r", "4"]


def test_eval_with_a_verifier_trained_over_another_base_warns_naming_both(tmp_path, quantized_dir, gsm8k_dir,
                                                                          scripted_samples, caplog):
    s_dir, v_dir = tmp_path / "samples", tmp_path / "verifier"
    assert cli.main(["sample", "--quantized", str(quantized_dir), "--data", str(gsm8k_dir), "--limit", "4",
                     "--out", str(s_dir), *SMALL]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the samples' base is the verifier's: no warning
        assert cli.main(train_verifier_argv(quantized_dir, s_dir, v_dir, gsm8k_dir)) == 0
    other = other_quantized_dir(tmp_path)
    e_dir = tmp_path / "eval"
    with caplog.at_level(logging.WARNING), pytest.warns(UserWarning, match="the verifier .* was trained over") as w:
        assert cli.main(["eval", "--quantized", str(other), "--data", str(gsm8k_dir), "--limit", "2",
                         "--verifier", str(v_dir), "--output-dir", str(e_dir), *SMALL]) == 0
    (message,) = [str(x.message) for x in w if "the verifier" in str(x.message)]
    assert_names_both(message, quantized_dir, other)
    assert "differ in fingerprint" in message and message in caplog.text
    # A warning, not an error: the evaluation ran, reranked, and records which verifier (over which base) it used.
    summary = json.loads((e_dir / "summary.json").read_text())
    assert summary["verifier_best_of_k"]["k"] == 2
    assert summary["provenance"]["verifier"]["base"] == base_record(quantized_dir)
    assert summary["provenance"]["base"] == base_record(other)


def test_train_verifier_on_another_bases_samples_warns_naming_both(tmp_path, quantized_dir, gsm8k_dir,
                                                                   scripted_samples, caplog):
    s_dir = tmp_path / "samples"
    assert cli.main(["sample", "--quantized", str(quantized_dir), "--data", str(gsm8k_dir), "--limit", "4",
                     "--out", str(s_dir), *SMALL]) == 0
    other = other_quantized_dir(tmp_path)
    with caplog.at_level(logging.WARNING), pytest.warns(UserWarning, match="the samples in .* were made") as w:
        assert cli.main(train_verifier_argv(other, s_dir, tmp_path / "v", gsm8k_dir)) == 0
    (message,) = [str(x.message) for x in w if "the samples in" in str(x.message)]
    assert_names_both(message, quantized_dir, other)
    assert "differ in fingerprint" in message and message in caplog.text
    config = json.loads((tmp_path / "v" / "verifier_config.json").read_text())
    assert config["base"] == base_record(other)
    assert config["training"]["samples"]["provenance"]["base"] == base_record(quantized_dir)

    # Samples that do not say which base made them (an older gptqlora): a note, not an error, and no warning.
    sample_config = json.loads((s_dir / SAMPLE_CONFIG).read_text())
    sample_config["provenance"] = None
    (s_dir / SAMPLE_CONFIG).write_text(json.dumps(sample_config))
    caplog.clear()
    with caplog.at_level(logging.WARNING), warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cli.main(train_verifier_argv(other, s_dir, tmp_path / "v2", gsm8k_dir)) == 0
    assert "does not record the base of the model that made the samples" in caplog.text
    assert str(other.resolve()) in caplog.text


def test_sample_refuses_the_test_split_and_never_reads_test_gold(tmp_path, quantized_dir, gsm8k_dir, monkeypatch,
                                                                 capsys):
    with pytest.raises(SystemExit) as exit_info:  # refused while the options are read, before anything loads
        cli.main(["sample", "--quantized", str(quantized_dir), "--data", str(gsm8k_dir), "--split", "test",
                  "--out", str(tmp_path / "s"), *SMALL])
    assert exit_info.value.code == 2
    assert "test-split gold must never reach training" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()

    import gptqlora.data.gsm8k as gsm8k

    splits = []
    real = gsm8k.load_gsm8k
    monkeypatch.setattr(gsm8k, "load_gsm8k", lambda split, *a, **kw: splits.append(split) or real(split, *a, **kw))
    seed = 6415  # whose one exemplar is train question 1: shown solved, so not sampled
    assert cli.main(["sample", "--quantized", str(quantized_dir), "--data", str(gsm8k_dir), "--limit", "2",
                     "--shots", "1", "--seed", str(seed), "--out", str(tmp_path / "s"), *SMALL]) == 0
    assert splits and set(splits) == {"train"}
    # The exemplar shown solved in every prompt is not among the sampled questions.
    from gptqlora.workflows.scored import fewshot

    (exemplar,) = fewshot(str(gsm8k_dir), 1, seed)
    train = load_gsm8k("train", str(gsm8k_dir))
    assert exemplar["question"] == train[1]["question"]
    sampled = [json.loads(line)["question"] for line in (tmp_path / "s" / SAMPLES).read_text().splitlines()]
    assert sampled == [train[0]["question"], train[2]["question"]]
    with pytest.raises(Exception, match="only the train split"):
        sample_gsm8k(None, make_tiny_tokenizer(), [{"question": "q", "answer": "#### 1"}], EvalConfig(samples=1),
                     tmp_path / "t", split="test")


def test_train_verifier_refuses_test_labelled_samples(tmp_path, quantized_dir, gsm8k_dir, scripted_samples, capsys):
    s_dir = tmp_path / "samples"
    assert cli.main(["sample", "--quantized", str(quantized_dir), "--data", str(gsm8k_dir), "--limit", "4",
                     "--out", str(s_dir), *SMALL]) == 0
    argv = ["train-verifier", "--quantized", str(quantized_dir), "--samples-dir", str(s_dir), "--out",
            str(tmp_path / "v"), "--data", str(gsm8k_dir), "--max-steps", "1"]
    config = json.loads((s_dir / SAMPLE_CONFIG).read_text())
    config["settings"]["split"] = "test"
    (s_dir / SAMPLE_CONFIG).write_text(json.dumps(config))
    assert cli.main(argv) == 2
    assert "test gold must never reach training" in capsys.readouterr().err

    config["settings"]["split"] = "train"
    (s_dir / SAMPLE_CONFIG).write_text(json.dumps(config))
    lines = (s_dir / SAMPLES).read_text().splitlines()
    record = json.loads(lines[1])
    record["question"] = load_gsm8k("test", str(gsm8k_dir))[0]["question"]  # a test question slipped in
    (s_dir / SAMPLES).write_text("\n".join([lines[0], json.dumps(record), *lines[2:]]) + "\n")
    assert cli.main(argv) == 2
    assert "are GSM8K test questions" in capsys.readouterr().err
    assert not (tmp_path / "v").exists()


def test_resumed_sampling_equals_an_uninterrupted_one(tmp_path, quantized_dir, gsm8k_dir):
    model, tok = load_model(str(quantized_dir), "float32", "cpu")
    entries = load_gsm8k("train", str(gsm8k_dir))[:5]
    config = EvalConfig(eval_batch_size=2, max_new_tokens=4, samples=2)
    whole = tmp_path / "whole"
    sample_gsm8k(model, tok, entries, config, whole, style="plain", seed=3, log=lambda line: None)

    class Killed(Exception):
        pass

    def kill_after_first_batch(line):
        if line.startswith("[1]"):
            raise Killed

    part = tmp_path / "part"
    with pytest.raises(Killed):
        sample_gsm8k(model, tok, entries, config, part, style="plain", seed=3, log=kill_after_first_batch)
    with (part / SAMPLES).open("a") as f:
        f.write('{"index": 2, "torn')  # a kill mid-append
    assert not (part / SUMMARY).exists()
    summary = sample_gsm8k(model, tok, entries, config, part, style="plain", seed=3, resume=True,
                           log=lambda line: None)
    assert summary["resumed_from"] == 2
    assert (part / SAMPLES).read_bytes() == (whole / SAMPLES).read_bytes()
    with pytest.raises(Exception, match=re.escape("seed: saved 3, now 4")):
        sample_gsm8k(model, tok, entries, config, part, style="plain", seed=4, resume=True)


def test_run_with_a_verifier_stage_adds_the_reranked_row_and_resumes(tmp_path, gsm8k_dir, scripted_samples, capsys):
    # gptqlora run --verifier-questions N: sample -> train-verifier -> eval --verifier, one more row in the table.
    make_tiny_llama().save_pretrained(tmp_path / "tiny")
    make_tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    out = tmp_path / "run"
    argv = ["run", "--model", str(tmp_path / "tiny"), "--data", str(gsm8k_dir), "--out", str(out), "--test-limit", "2",
            "--train-steps", "1", "--train-limit", "4", "--eval-holdout", "0", "--skip-float-eval",
            "--verifier-questions", "4", "--verifier-samples", "2", "--method", "rtn", "--group-size", "32",
            "--max-new-tokens", "4", "--eval-batch-size", "2", "--no-bf16", "--max-length", "64",
            "--dtype", "float32"]
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    row = results["rows"]["rtn 4-bit + LoRA + verifier"]
    assert row["n"] == 2
    eval_dir = out / "eval" / "rtn_4-bit_+_LoRA_+_verifier"
    records = [json.loads(line) for line in (eval_dir / "predictions.jsonl").read_text().splitlines()]
    # pass@k counted here from each record's sample answers; each rule's accuracy from the records' verdicts.
    assert [r["pass_at_k"] for r in records] == [any(answers_match(a, r["gold"]) for a in r["sample_answers"])
                                                for r in records]
    for key, field in (("self_consistency", "voted_correct"), ("verifier_best_of_k", "best_of_k_correct"),
                       ("verifier_weighted_vote", "weighted_correct"), ("pass_at_k", "pass_at_k")):
        correct = sum(r[field] for r in records)
        assert row[key]["k"] == 2 and (row[key]["correct"], row[key]["accuracy"]) == (correct, correct / 2), key
    assert json.loads((eval_dir / "summary.json").read_text())["pass_at_k"] == row["pass_at_k"]
    assert row["provenance"]["verifier"]["path"] == str((out / "verifier" / "model").resolve())
    samples = [json.loads(line) for line in (out / "verifier" / "samples" / SAMPLES).read_text().splitlines()]
    assert len(samples) == 4 and all(r["sample_correct"] == [True, False] for r in samples)
    config = json.loads((out / "verifier" / "model" / "verifier_config.json").read_text())
    assert config["base"] == base_record(out / "quantized_base")
    table = (out / "results.md").read_text()
    assert "rtn 4-bit + LoRA + verifier: verifier best-of 2 |" in table and "+ verifier: pass@2 |" in table
    # Resuming the finished run keeps the samples, the verifier and every row.
    before = {p: p.read_bytes() for p in (out / "verifier").rglob("*") if p.is_file()}
    assert cli.main(argv + ["--resume"]) == 0
    assert {p: p.read_bytes() for p in (out / "verifier").rglob("*") if p.is_file()} == before
    assert (out / "results.md").read_text() == table
