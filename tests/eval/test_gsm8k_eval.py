"""The GSM8K driver: no leakage into prompts, a copying model scores 0 while an oracle scores 1, self-consistency
wiring, output files, crash-safe resuming (an interrupted-then-resumed run writes what an uninterrupted one does)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import child_env, make_tiny_tokenizer, one_torch_thread
from torch import nn
from transformers import LlamaConfig

from gptqlora.config import EvalConfig
from gptqlora.data.gsm8k import gold_answer, load_gsm8k, strip_calculator
from gptqlora.errors import UsageError
from gptqlora.eval import engine as engine_module
from gptqlora.eval import gsm8k_eval
from gptqlora.eval.gsm8k_eval import (
    build_eval_prompts,
    eval_settings,
    evaluate_gsm8k,
    fewshot_exemplars,
    format_number,
    score_text,
    vote_samples,
    write_results,
)
from gptqlora.eval.records import record_line
from gptqlora.eval.scoring import accuracy_with_ci

from eval.eval_script import BATCH, ENTRIES, PROVENANCE, run_eval

EVAL_SCRIPT = Path(__file__).with_name("eval_script.py")

VOCAB = 259
EOS = 258  # <|im_end|> in the tiny tokenizer (also its pad)
NUMBER_RE = re.compile(r"\d[\d,]*(?:\.\d+)?")


@pytest.fixture(scope="module")
def tok():
    return make_tiny_tokenizer()


@pytest.fixture
def test_entries(gsm8k_dir: Path) -> list[dict]:
    return load_gsm8k("test", str(gsm8k_dir))


@pytest.fixture
def train_entries(gsm8k_dir: Path) -> list[dict]:
    return load_gsm8k("train", str(gsm8k_dir))


def numbers_in(text: str) -> set[float]:
    return {float(m.replace(",", "")) for m in NUMBER_RE.findall(text)}


class ScriptedLM(nn.Module):
    """A fake causal LM for our decoding loop: on a batch's first forward it reads each row's prompt ids and asks
    ``script(prompt_ids)`` for the ids to write; each later forward emits the next scripted id per row (eos after).

    It has a config (the loop builds a KV cache from it) and one parameter (the loop reads the device from it). Its
    cache holds each row's place in the batch, so it follows the rows the decoder still computes.
    """

    def __init__(self, script: Callable[[list[int]], list[int]]):
        super().__init__()
        self.config = LlamaConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1)
        self.anchor = nn.Parameter(torch.zeros(1))
        self.script = script
        self.scripts: list[list[int]] = []
        self.step = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache, **kwargs) -> SimpleNamespace:
        if input_ids.shape[1] == attention_mask.shape[1]:  # the prompt pass: later passes feed one token
            self.scripts = [self.script(row[mask.bool()].tolist()) for row, mask in zip(input_ids, attention_mask)]
            self.step = 0
            place = torch.arange(len(input_ids), dtype=torch.float)[:, None, None, None]  # [B, 1, 1, 1]
            cache.update(place, place, 0)
        scripts = [self.scripts[row] for row in cache.layers[0].keys[:, 0, 0, 0].long().tolist()]
        next_ids = [s[self.step] if self.step < len(s) else EOS for s in scripts]
        self.step += 1
        logits = torch.full((len(next_ids), 1, VOCAB), -1e4)  # [B, 1, V]
        logits[torch.arange(len(next_ids)), 0, next_ids] = 0.0
        return SimpleNamespace(logits=logits)


def copy_model() -> ScriptedLM:
    """Re-emits its prompt token by token (eos tokens inside a chat prompt left out, so the copy runs to the end)."""
    return ScriptedLM(lambda ids: [t for t in ids if t != EOS])


def oracle_model(tokenizer, entries: Sequence[dict]) -> ScriptedLM:
    """Finds the question in its prompt and writes the gold answer line, then junk that the stop rule must cut."""

    def script(ids: list[int]) -> list[int]:
        prompt = tokenizer.decode(ids)
        entry = next(e for e in entries if e["question"] in prompt)
        text = f"Some reasoning.\n#### {format_number(gold_answer(entry))}\nThe answer is 999\n"
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return ScriptedLM(script)


def scripted_generate(greedy: dict[str, str], samples: dict[str, list[str]], calls: list[dict]):
    """Stand-ins for generate/generate_samples that answer each prompt by the question it holds."""

    def lookup(table: dict, prompt: str):
        return next(v for q, v in table.items() if q in prompt)

    def fake_generate(model, tokenizer, prompts, **kw):
        calls.append({"fn": "generate", "n": len(prompts), **kw})
        return [lookup(greedy, p) for p in prompts]

    def fake_samples(model, tokenizer, prompts, k, temperature, top_p, seed, **kw):
        calls.append({"fn": "samples", "n": len(prompts), "k": k, "temperature": temperature, "top_p": top_p,
                      "seed": seed, **kw})
        return [lookup(samples, p) for p in prompts]

    return fake_generate, fake_samples


# Four made-up questions: greedy gets 1 right (Q1); voting gets 2 right (Q0 by majority, Q3 by a tie to the first).
SC_ENTRIES = [
    {"question": "Tom has 3 apples and buys 2 more. How many apples does he have?", "answer": "3+2=5\n#### 5"},
    {"question": "Ann reads 2 pages a day for 2 days. How many pages?", "answer": "2*2=4\n#### 4"},
    {"question": "A box holds 6 eggs. How many eggs are in 2 boxes?", "answer": "6*2=12\n#### 12"},
    {"question": "A car costs $1,000 plus $234 in fees. What is the total?", "answer": "1000+234=1234\n#### 1,234"},
]
SC_GREEDY = {e["question"]: t for e, t in zip(SC_ENTRIES, ["#### 6", "so #### 4", "no number here", "#### 1200"])}
SC_SAMPLES = {e["question"]: t for e, t in zip(SC_ENTRIES, [
    ["#### 5", "#### 7", "I think 5", "no answer"],  # 5 wins 2:1 -> correct
    ["#### 3", "#### 4", "#### 4.0", "#### 3"],  # 3 and 4 tie; 3 came first -> wrong
    ["none", "nothing", "?", "no"],  # nobody answers -> None, wrong
    ["$1,234.", "#### 99", "#### 1234", "#### 99"],  # 1234 and 99 tie; 1234 came first -> correct
])}


def scripted_config(samples: int, batch: int = 3) -> EvalConfig:
    sampling = dict(temperature=0.5, top_p=0.9) if samples else {}
    return EvalConfig(eval_batch_size=batch, max_new_tokens=32, samples=samples, **sampling)


def run_scripted(monkeypatch, tok, samples: int, out_dir=None, batch: int = 3, seed: int = 7,
                 provenance: dict | None = None):
    calls: list[dict] = []
    fake_generate, fake_samples = scripted_generate(SC_GREEDY, SC_SAMPLES, calls)
    monkeypatch.setattr(engine_module, "generate", fake_generate)
    monkeypatch.setattr(engine_module, "generate_samples", fake_samples)
    lines: list[str] = []
    summary = evaluate_gsm8k(None, tok, SC_ENTRIES, scripted_config(samples, batch), style="plain", out_dir=out_dir,
                             log=lines.append, seed=seed, split="test", provenance=provenance)
    return summary, lines, calls


# ---------------------------------------------------------------------------------------------- prompts

def test_fewshot_exemplars_are_a_seeded_permutation_prefix():
    train = [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(20)]
    three = fewshot_exemplars(train, 3, seed=1)
    assert three == fewshot_exemplars(train, 3, seed=1)
    assert three == fewshot_exemplars(train, 5, seed=1)[:3]
    assert len({e["question"] for e in three}) == 3 and all(e in train for e in three)
    assert three != fewshot_exemplars(train, 3, seed=2)
    assert three != train[:3]  # shuffled, not the head of the file
    assert fewshot_exemplars(train, 0) == []
    three[0]["question"] = "changed"
    assert all(e["question"] != "changed" for e in train)  # copies: editing an exemplar leaves train alone
    with pytest.raises(UsageError, match="more exemplars"):
        fewshot_exemplars(train, 21)


def test_build_eval_prompts_passes_only_the_question(monkeypatch, tok):
    seen = []
    monkeypatch.setattr(gsm8k_eval, "build_prompt", lambda q, style, tokenizer, exemplars: seen.append(q) or q)
    entries = [{"question": "Q one?", "answer": "secret\n#### 1"}, {"question": "Q two?", "answer": "secret\n#### 2"}]
    assert build_eval_prompts(entries, "plain", tok) == ["Q one?", "Q two?"]
    assert seen == ["Q one?", "Q two?"]  # plain strings, never the entry dict


def test_build_eval_prompts_refuses_exemplars_among_the_evaluated(tok):
    entries = [{"question": "Q one?", "answer": "#### 1"}, {"question": "Q two?", "answer": "#### 2"}]
    assert build_eval_prompts([{"question": "Q one?"}], "plain", tok) == ["Question: Q one?\nAnswer:"]
    with pytest.raises(UsageError, match="among the evaluated questions"):
        build_eval_prompts(entries, "plain", tok, exemplars=[entries[1]])


@pytest.mark.parametrize("style", ["plain", "chat"])
@pytest.mark.parametrize("shots", [0, 2])
def test_no_solution_leaks_into_prompts(monkeypatch, tok, test_entries, train_entries, style, shots):
    entries = test_entries[:6]
    exemplars = fewshot_exemplars(train_entries, shots, seed=0)
    test_questions = {e["question"] for e in test_entries}
    train_questions = {e["question"] for e in train_entries}
    assert all(e["question"] in train_questions and e["question"] not in test_questions for e in exemplars)
    gold_lines = [e["answer"].strip().splitlines()[-1].strip() for e in entries]
    # The check below needs exemplar answer lines that differ from the evaluated ones; fail loudly if data changes.
    assert not {e["answer"].strip().splitlines()[-1].strip() for e in exemplars} & set(gold_lines)

    captured: list[str] = []
    monkeypatch.setattr(engine_module, "generate", lambda m, t, prompts, **kw: captured.extend(prompts) or [""] * len(prompts))
    evaluate_gsm8k(None, tok, entries, EvalConfig(eval_batch_size=4), style=style, exemplars=exemplars,
                   log=lambda line: None)
    assert captured == build_eval_prompts(entries, style, tok, exemplars)
    for entry, prompt, gold_line in zip(entries, captured, gold_lines):
        assert entry["question"] in prompt
        assert gold_line.startswith("####") and gold_line not in prompt
        assert len(re.findall(r"####\s*-?\$?\d", prompt)) == shots  # the exemplars' answer lines, nothing more
        solution_lines = [ln.strip() for ln in strip_calculator(entry["answer"]).splitlines()]
        for line in solution_lines:
            if len(line) > 10 and not line.startswith("####"):
                assert line not in prompt
        if style == "chat":
            assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
        else:
            assert prompt.endswith(f"Question: {entry['question']}\nAnswer:")


# ---------------------------------------------------------------------------------------------- scoring

def test_score_text_and_vote_samples():
    assert score_text("so 3 + 4 = 7\n#### 7", 7.0) == (7.0, True)
    assert score_text("#### 1,234", 1234.0) == (1234.0, True)
    assert score_text("no idea", 7.0) == (None, False)
    assert vote_samples(["#### 2", "#### 3", "#### 3"], 3.0) == ([2.0, 3.0, 3.0], 3.0, True)
    assert vote_samples(["#### 4", "#### 3", "#### 3", "#### 4"], 3.0)[1:] == (4.0, False)  # tie: first seen wins
    assert vote_samples(["#### 3", "#### 4", "#### 4", "#### 3"], 3.0)[1:] == (3.0, True)
    assert vote_samples(["none", "nope"], 3.0) == ([None, None], None, False)
    assert [format_number(x) for x in (18.0, 70000.0, 2.5, -3.0, None)] == ["18", "70000", "2.5", "-3", "None"]


# ---------------------------------------------------------------------------------------------- controls

@pytest.mark.parametrize("style", ["plain", "chat"])
def test_copying_model_scores_zero_and_oracle_scores_one(tok, test_entries, style):
    entries = test_entries[:4]
    for e in entries:  # a copy of the question could only be right if the question held the answer
        assert gold_answer(e) not in numbers_in(e["question"]), e["question"]
    prompts = build_eval_prompts(entries, style, tok)
    budget = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts) + 4
    config = EvalConfig(eval_batch_size=3, max_new_tokens=budget)

    lines: list[str] = []
    copied = evaluate_gsm8k(copy_model(), tok, entries, config, style=style, log=lines.append)
    assert copied["n"] == 4 and copied["greedy"]["correct"] == 0 and copied["greedy"]["accuracy"] == 0.0
    assert len(lines) == 4
    for i, (line, e) in enumerate(zip(lines, entries)):
        assert line.startswith(f"[{i}] ") and f"gold={format_number(gold_answer(e))}" in line
        assert "predicted=None" not in line  # it copied numbers, wrong ones
        assert line.endswith(" correct=False")

    oracle_lines: list[str] = []
    # The oracle also samples, through the real generate_samples (its logits leave sampling no choice); it stops
    # after a short answer line, so this costs little, unlike sampling a whole copied prompt.
    config = EvalConfig(eval_batch_size=3, max_new_tokens=budget, samples=2)
    oracle = evaluate_gsm8k(oracle_model(tok, entries), tok, entries, config, style=style, log=oracle_lines.append)
    assert oracle["greedy"]["correct"] == 4 and oracle["greedy"]["accuracy"] == 1.0
    assert oracle["self_consistency"]["accuracy"] == 1.0
    assert all(" correct=True " in line and line.endswith("voted_correct=True") for line in oracle_lines)


def test_copying_model_copies_the_whole_prompt(tok, test_entries, tmp_path):
    entries = test_entries[:2]
    prompts = build_eval_prompts(entries, "plain", tok)
    budget = max(len(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts) + 4
    evaluate_gsm8k(copy_model(), tok, entries, EvalConfig(eval_batch_size=2, max_new_tokens=budget), style="plain",
                   out_dir=tmp_path, log=lambda line: None)
    records = [json.loads(ln) for ln in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in records] == prompts  # the zero above is not from a broken fake
    assert [r["predicted_answer"] for r in records] == [2.0, 2.0]  # last number in each question ($2, 2/2)


def test_oracle_output_is_cut_after_the_answer_line(tok, test_entries, tmp_path):
    entries = test_entries[:2]
    evaluate_gsm8k(oracle_model(tok, entries), tok, entries, EvalConfig(eval_batch_size=2, max_new_tokens=64),
                   style="plain", out_dir=tmp_path, log=lambda line: None)
    records = [json.loads(ln) for ln in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in records] == ["Some reasoning.\n#### 18", "Some reasoning.\n#### 3"]


# ---------------------------------------------------------------------------------------------- self-consistency

def test_self_consistency_wiring(monkeypatch, tok):
    summary, lines, calls = run_scripted(monkeypatch, tok, samples=4)
    assert summary["n"] == 4
    acc, lo, hi = accuracy_with_ci([False, True, False, False])
    assert summary["greedy"] == {"correct": 1, "accuracy": acc, "ci95": [lo, hi]}
    acc, lo, hi = accuracy_with_ci([True, False, False, True])
    assert summary["self_consistency"] == {"k": 4, "temperature": 0.5, "top_p": 0.9, "correct": 2, "accuracy": acc,
                                           "ci95": [lo, hi]}
    assert lines == [
        "[0] predicted=6 gold=5 correct=False voted=5 voted_correct=True",
        "[1] predicted=4 gold=4 correct=True voted=3 voted_correct=False",
        "[2] predicted=None gold=12 correct=False voted=None voted_correct=False",
        "[3] predicted=1200 gold=1234 correct=False voted=1234 voted_correct=True",
    ]
    # Batches of eval_batch_size; greedy decoding with the answer-line stop; sampling seeded per batch.
    assert [(c["fn"], c["n"]) for c in calls] == [("generate", 3), ("samples", 3), ("generate", 1), ("samples", 1)]
    assert all(c["max_new_tokens"] == 32 and c["batch_size"] == 3 and c["stop_after_answer_line"] for c in calls)
    assert all("temperature" not in c for c in calls if c["fn"] == "generate")  # greedy: generate's default 0
    assert [(c["k"], c["temperature"], c["top_p"], c["seed"]) for c in calls if c["fn"] == "samples"] == [
        (4, 0.5, 0.9, 7), (4, 0.5, 0.9, 10)]
    again, again_lines, _ = run_scripted(monkeypatch, tok, samples=4)
    assert again_lines == lines and again["self_consistency"] == summary["self_consistency"]


def test_greedy_only_makes_no_samples(monkeypatch, tok):
    summary, lines, calls = run_scripted(monkeypatch, tok, samples=0, batch=8)
    assert "self_consistency" not in summary and summary["greedy"]["correct"] == 1
    assert [(c["fn"], c["n"]) for c in calls] == [("generate", 4)]
    assert all("voted" not in line for line in lines)


# ---------------------------------------------------------------------------------------------- output files

def test_predictions_and_summary_files(monkeypatch, tok, tmp_path):
    out = tmp_path / "new" / "eval"
    provenance = {"model": "some/model", "fingerprint": "abc123", "adapter": None}
    summary, _, _ = run_scripted(monkeypatch, tok, samples=4, out_dir=out, provenance=provenance)
    assert sorted(os.listdir(out)) == ["eval_config.json", "predictions.jsonl", "summary.json"]  # no temp files
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["generated_tokens_this_run"] > 0 and summary["seconds_this_run"] >= 0 and summary["shots"] == 0
    assert summary["resumed_from"] == 0
    records = [json.loads(ln) for ln in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert set(records[0]) == {"index", "question", "gold", "prediction", "predicted_answer", "correct", "samples",
                               "sample_answers", "voted_answer", "voted_correct"}
    assert records[0]["question"] == SC_ENTRIES[0]["question"] and records[0]["gold"] == 5.0
    assert records[0]["prediction"] == "#### 6" and records[0]["predicted_answer"] == 6.0
    assert records[0]["samples"] == SC_SAMPLES[SC_ENTRIES[0]["question"]]
    assert records[0]["sample_answers"] == [5.0, 7.0, 5.0, None]
    assert (records[0]["voted_answer"], records[0]["voted_correct"], records[0]["correct"]) == (5.0, True, False)
    assert records[2]["predicted_answer"] is None and records[2]["voted_answer"] is None
    assert records[3]["gold"] == 1234.0 and records[3]["voted_answer"] == 1234.0

    # The summary names what it scored: the caller's provenance and the settings, as eval_config.json holds them.
    settings = eval_settings(SC_ENTRIES, scripted_config(4), "plain", (), seed=7, split="test")
    assert summary["provenance"] == provenance and summary["settings"] == settings
    assert json.loads((out / "eval_config.json").read_text()) == {"settings": settings, "provenance": provenance}
    assert {k: settings[k] for k in ("n", "split", "style", "shots", "max_new_tokens", "eval_batch_size", "samples",
                                     "temperature", "top_p", "seed")} == {
        "n": 4, "split": "test", "style": "plain", "shots": 0, "max_new_tokens": 32, "eval_batch_size": 3,
        "samples": 4, "temperature": 0.5, "top_p": 0.9, "seed": 7}

    run_scripted(monkeypatch, tok, samples=0, out_dir=out)  # a fresh run starts every file anew
    records = [json.loads(ln) for ln in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == 4 and "samples" not in records[0]
    summary = json.loads((out / "summary.json").read_text())
    assert "self_consistency" not in summary and summary["provenance"] is None
    saved = json.loads((out / "eval_config.json").read_text())
    assert saved["settings"]["samples"] == 0 and saved["settings"]["seed"] is None  # greedy uses no seed


def test_eval_settings_change_with_what_changes_the_records(tok):
    base = eval_settings(SC_ENTRIES, scripted_config(4), "plain", (), seed=7)
    assert base == eval_settings([dict(e) for e in SC_ENTRIES], scripted_config(4), "plain", [], seed=7)
    changed = {
        "questions_sha256": eval_settings(SC_ENTRIES[::-1], scripted_config(4), "plain", (), seed=7),  # order counts
        "exemplars_sha256": eval_settings(SC_ENTRIES, scripted_config(4), "plain", SC_ENTRIES[:1], seed=7),
        "eval_batch_size": eval_settings(SC_ENTRIES, scripted_config(4, batch=2), "plain", (), seed=7),
        "seed": eval_settings(SC_ENTRIES, scripted_config(4), "plain", (), seed=8),
        "style": eval_settings(SC_ENTRIES, scripted_config(4), "chat", (), seed=7),
        "split": eval_settings(SC_ENTRIES, scripted_config(4), "plain", (), seed=7, split="train"),
    }
    for key, settings in changed.items():
        assert settings[key] != base[key], key
    # Greedy records do not depend on the sampling settings, so they do not block a resume.
    greedy = eval_settings(SC_ENTRIES, scripted_config(0), "plain", (), seed=7)
    assert greedy == eval_settings(SC_ENTRIES, EvalConfig(eval_batch_size=3, max_new_tokens=32), "plain", (), seed=1)



def test_records_are_strict_json_even_for_an_out_of_range_answer(monkeypatch, tok, tmp_path):
    huge = "#### " + "9" * 400  # beyond float range: no answer (JSON has no inf), so the vote ignores it
    monkeypatch.setattr(engine_module, "generate", lambda m, t, prompts, **kw: [huge] * len(prompts))
    monkeypatch.setattr(engine_module, "generate_samples", lambda m, t, ps, k, **kw: [[huge, "#### 5"]] * len(ps))
    lines: list[str] = []
    evaluate_gsm8k(None, tok, SC_ENTRIES[:1], scripted_config(2), style="plain", out_dir=tmp_path, log=lines.append)
    assert lines == ["[0] predicted=None gold=5 correct=False voted=5 voted_correct=True"]

    def no_constants(name):
        raise AssertionError(f"{name} in a record")

    record = json.loads((tmp_path / "predictions.jsonl").read_text(), parse_constant=no_constants)
    assert record["prediction"] == huge and record["predicted_answer"] is None and record["correct"] is False
    assert record["sample_answers"] == [None, 5.0] and record["voted_answer"] == 5.0
    assert record["voted_correct"] is True
    with pytest.raises(ValueError):
        record_line({"x": float("nan")})


def test_write_results_keeps_the_old_files_on_failure(monkeypatch, tmp_path):
    write_results(tmp_path, [{"index": 0}], {"n": 1})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert before["predictions.jsonl"] == b'{"index": 0}\n'

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_results(tmp_path, [{"index": 0}, {"index": 1}], {"n": 2})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old files, no temporary left


def test_evaluate_checks_before_generating(monkeypatch, tok, tmp_path):
    monkeypatch.setattr(engine_module, "generate", lambda *a, **kw: pytest.fail("generated before checking"))
    with pytest.raises(UsageError, match="no GSM8K entries"):
        evaluate_gsm8k(None, tok, [], EvalConfig(), style="plain")
    with pytest.raises(UsageError, match="entry 1 cannot be scored.*#### <number>"):
        evaluate_gsm8k(None, tok, [SC_ENTRIES[0], {"question": "q?", "answer": "no final line"}], EvalConfig(),
                       style="plain", out_dir=tmp_path)
    with pytest.raises(ValueError, match="chat template"):
        evaluate_gsm8k(None, make_tiny_tokenizer(chat_template=False), SC_ENTRIES, EvalConfig(), style="chat")
    assert not any(tmp_path.iterdir())  # refused before writing anything


# ---------------------------------------------------------------------------------------------- resuming

TIMING = ("resumed_from", "seconds_this_run", "generated_tokens_this_run", "tokens_per_s_this_run")


def untimed(summary: dict) -> dict:
    """A summary without what describes only the last run segment."""
    return {k: v for k, v in summary.items() if k not in TIMING}


@pytest.fixture
def one_thread():
    """Generate as the subprocess does (one thread), so the kernels, and thus the generations, are the same."""
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Callable[[int], Path]:
    """``reference(samples)``: the output directory of an uninterrupted tiny evaluation (made once per module)."""
    dirs: dict[int, Path] = {}

    def get(samples: int) -> Path:
        if samples not in dirs:
            with one_torch_thread():
                out = tmp_path_factory.mktemp(f"reference-samples-{samples}")
                run_eval(out, samples)
            dirs[samples] = out
        return dirs[samples]

    return get


def copy_of(src: Path, dst: Path, keep_lines: int | None = None, torn: int = 0) -> Path:
    """Copy an evaluation directory; keep only the first ``keep_lines`` predictions plus ``torn`` bytes of the next."""
    shutil.copytree(src, dst)
    if keep_lines is not None:
        data = (src / "predictions.jsonl").read_bytes()
        lines = data.splitlines(keepends=True)
        (dst / "predictions.jsonl").write_bytes(b"".join(lines[:keep_lines]) + lines[keep_lines][:torn])
        (dst / "summary.json").unlink()
    return dst


def assert_same_as_reference(out: Path, ref: Path, summary: dict) -> None:
    assert (out / "predictions.jsonl").read_bytes() == (ref / "predictions.jsonl").read_bytes()
    assert (out / "eval_config.json").read_bytes() == (ref / "eval_config.json").read_bytes()
    assert json.loads((out / "summary.json").read_text()) == summary
    assert untimed(summary) == untimed(json.loads((ref / "summary.json").read_text()))


def n_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def test_reference_runs_differ_where_they_should(reference):
    ref, sampled = reference(0), reference(2)
    records = [json.loads(ln) for ln in (sampled / "predictions.jsonl").read_text().splitlines()]
    assert [r["index"] for r in records] == list(range(len(ENTRIES)))
    assert all(len(r["samples"]) == 2 for r in records)
    # Samples differ from each other and from batch to batch (seeded per batch), or resuming would prove little.
    assert len({s for r in records for s in r["samples"]}) == 2 * len(ENTRIES)
    greedy = [json.loads(ln)["prediction"] for ln in (ref / "predictions.jsonl").read_text().splitlines()]
    assert greedy == [r["prediction"] for r in records]  # sampling does not touch the greedy answers


class Interrupt(Exception):
    """Raised from the log callback to stop a run mid-way, as a crash would."""


@pytest.mark.parametrize("samples", [0, 2])
def test_each_batch_is_on_disk_before_it_is_logged_and_a_resume_completes_it(tmp_path, one_thread, reference,
                                                                               samples):
    out = tmp_path / "cut"
    on_disk: list[int] = []

    def log(line: str) -> None:
        on_disk.append(n_lines(out / "predictions.jsonl"))
        if line.startswith("[3] "):  # the last question of the second batch
            raise Interrupt

    with pytest.raises(Interrupt):
        run_eval(out, samples, log=log)
    assert on_disk == [2, 2, 4, 4]  # each batch appended as a whole, before its lines are logged
    ref = reference(samples)
    want = (ref / "predictions.jsonl").read_bytes().splitlines(keepends=True)
    assert (out / "predictions.jsonl").read_bytes() == b"".join(want[:2 * BATCH])
    assert not (out / "summary.json").exists()

    lines: list[str] = []
    summary = run_eval(out, samples, resume=True, log=lines.append)
    assert lines[0].startswith("resuming: 4 of 6 questions answered") and "cut off" not in lines[0]
    assert [ln.split(" ")[0] for ln in lines[1:]] == ["[4]", "[5]"]  # only the rest is generated
    assert summary["resumed_from"] == 4 and summary["n"] == len(ENTRIES)
    assert_same_as_reference(out, ref, summary)


@pytest.mark.process
@pytest.mark.parametrize("samples", [0, 2])
def test_resume_after_sigkill_writes_what_an_uninterrupted_run_writes(tmp_path, one_thread, reference, samples):
    out = tmp_path / "killed"
    with (tmp_path / "stderr.txt").open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, str(EVAL_SCRIPT), str(out), "--samples", str(samples),
                                 "--slow", "0.5"], stdout=subprocess.DEVNULL, stderr=stderr, env=child_env())
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                if n_lines(out / "predictions.jsonl") >= BATCH:
                    break
                time.sleep(0.02)
            alive = proc.poll() is None
            proc.send_signal(signal.SIGKILL)  # mid-run: it sleeps 0.5 s after each of its 6 questions
        finally:
            proc.kill()
            proc.wait()
    assert alive and proc.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-2000:]
    answered = n_lines(out / "predictions.jsonl")
    assert BATCH <= answered < len(ENTRIES) and not (out / "summary.json").exists()

    lines: list[str] = []
    summary = run_eval(out, samples, resume=True, log=lines.append)
    kept = answered - answered % BATCH
    assert summary["resumed_from"] == kept
    assert [ln.split(" ")[0] for ln in lines[1:]] == [f"[{i}]" for i in range(kept, len(ENTRIES))]
    assert_same_as_reference(out, reference(samples), summary)


@pytest.mark.parametrize("samples", [0, 2])
@pytest.mark.parametrize("keep_lines, torn, kept", [(3, 20, 2), (4, 7, 4), (1, 0, 0)],
                         ids=["torn-line-in-a-partial-batch", "torn-line-after-a-batch", "partial-batch"])
def test_a_torn_line_and_an_incomplete_batch_are_answered_again(tmp_path, one_thread, reference, samples,
                                                                 keep_lines, torn, kept):
    ref = reference(samples)
    out = copy_of(ref, tmp_path / "cut", keep_lines=keep_lines, torn=torn)
    lines: list[str] = []
    summary = run_eval(out, samples, resume=True, log=lines.append)
    assert lines[0].startswith(f"resuming: {kept} of 6") and lines[0].endswith("cut off, to be answered again)")
    assert [ln.split(" ")[0] for ln in lines[1:]] == [f"[{i}]" for i in range(kept, len(ENTRIES))]
    assert summary["resumed_from"] == kept
    assert_same_as_reference(out, ref, summary)


def test_resuming_a_finished_run_only_rescores(monkeypatch, tmp_path, reference):
    ref = reference(2)
    out = copy_of(ref, tmp_path / "done")
    (out / "summary.json").unlink()
    monkeypatch.setattr(engine_module, "generate", lambda *a, **kw: pytest.fail("generated with nothing left"))
    lines: list[str] = []
    summary = run_eval(out, 2, resume=True, log=lines.append)
    assert lines == [f"resuming: 6 of 6 questions answered in {out / 'predictions.jsonl'}"]
    assert summary["resumed_from"] == 6 and summary["generated_tokens_this_run"] == 0
    assert_same_as_reference(out, ref, summary)



@pytest.mark.parametrize("change, named", [
    (dict(max_new_tokens=13), "max_new_tokens: saved 12, now 13"),
    (dict(provenance={"model": "another model", "adapter": None}),
     'provenance.model: saved "tiny-llama (seed 0)", now "another model"'),
    (dict(provenance={**PROVENANCE, "adapter": "run/lora_adapter"}), 'provenance.adapter: saved null, now "run/'),
    (dict(samples=2), "samples: saved 0, now 2"),
    (dict(eval_batch_size=3), "eval_batch_size: saved 2, now 3"),
    (dict(entries=ENTRIES[:4]), "n: saved 6, now 4"),
], ids=["max_new_tokens", "model", "adapter", "samples", "batch", "entries"])
def test_resume_with_other_settings_is_refused_and_changes_nothing(monkeypatch, tmp_path, reference, change, named):
    out = copy_of(reference(0), tmp_path / "cut", keep_lines=3, torn=9)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(engine_module, "generate", lambda *a, **kw: pytest.fail("generated despite other settings"))
    with pytest.raises(UsageError, match="other settings.*" + re.escape(named)):
        run_eval(out, resume=True, **change)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("present", [(), ("predictions.jsonl",), ("eval_config.json",), None],
                         ids=["empty", "no-config", "no-predictions", "no-out-dir"])
def test_resume_with_nothing_to_resume_is_refused(monkeypatch, tmp_path, reference, present):
    monkeypatch.setattr(engine_module, "generate", lambda *a, **kw: pytest.fail("generated with nothing to resume"))
    if present is None:
        with pytest.raises(UsageError, match="resume needs the output directory"):
            run_eval(None, resume=True)
        return
    for name in present:
        shutil.copy(reference(0) / name, tmp_path / name)
    with pytest.raises(UsageError, match="nothing to resume in .*run without --resume"):
        run_eval(tmp_path, resume=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(present)
