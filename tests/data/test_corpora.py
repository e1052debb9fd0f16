"""MetaMathQA and MathInstruct read by their fields, weighted mixtures, and the GSM8K-test contamination guard."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from conftest import make_tiny_llama, make_tiny_tokenizer
from gptqlora import cli
from gptqlora.config import TrainDataConfig, parse_mix
from gptqlora.data.corpora import (CONTAMINATED, NO_NUMBER, PROGRAM, build_training_set, drop_contaminated,
                                   gsm8k_reference, is_program_of_thought, load_corpus, normalize_question,
                                   take_share, to_entry, to_gsm8k_solution)
from gptqlora.data.gsm8k import check_answers, extract_answer, format_gsm8k_entry, gold_answer
from gptqlora.errors import InputNotFoundError, UsageError

TEST_Q = "Janet's ducks lay 16 eggs per day. How many dollars does she make every day at the farmers' market?"
GSM8K_TRAIN = [
    {"question": "Tom has 2 apples and buys 2 more. How many?", "answer": "2 + 2 = <<2+2=4>>4\n#### 4"},
    {"question": "A box holds 3 pens. How many in 2 boxes?", "answer": "3 * 2 = <<3*2=6>>6\n#### 6"},
    {"question": "Sam had 9 coins and lost 4. How many left?", "answer": "9 - 4 = <<9-4=5>>5\n#### 5"},
    {"question": "Ann reads 5 pages a day. Pages in 2 days?", "answer": "5 * 2 = <<5*2=10>>10\n#### 10"},
]
GSM8K_TEST = [{"question": TEST_Q, "answer": "16 - 3 - 4 = 9 eggs sell for 9 * 2 = 18 dollars.\n#### 18"},
              {"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"}]
METAMATH = [
    {"query": "Tom had 2 apples and bought 2 more. How many apples does he have?",
     "response": "He has 2 + 2 = 4 apples.\nThe answer is: 4", "type": "GSM_Rephrased",
     "original_question": GSM8K_TRAIN[0]["question"]},
    {"query": "janets ducks lay 16 eggs per day   how many DOLLARS does she make every day at the farmers market",
     "response": "She makes 18 dollars.\nThe answer is: 18", "type": "GSM_AnsAug", "original_question": TEST_Q},
    {"query": "A hen lays x eggs a day; sold at $2 each she makes 18 dollars. What is x?",
     "response": "2x = 18, so x = 9.\nThe answer is: 9", "type": "GSM_FOBAR", "original_question": TEST_Q},
    {"query": "What is half of one?", "response": "Half of 1 is 1/2.\nThe answer is: \\frac{1}{2}",
     "type": "MATH_AnsAug", "original_question": "What is half of one?"},
    {"query": "Mia runs 3 km twice. How many km in total?", "response": "3 * 2 = 6 km.\nThe answer is: 6",
     "type": "GSM_Rephrased", "original_question": "Mia runs 3 km twice. Total km?"},
]
MATHINSTRUCT = [
    {"instruction": "Jo has 7 cards and gets 1. How many now?", "output": "7 + 1 = 8. The answer is 8.",
     "source": "data/CoT/gsm_rft.json"},
    {"instruction": "Lee bakes 4 pies and eats 1. How many are left?",
     "output": "n0 = 4.0\nn1 = 1.0\nanswer = n0 - n1\nprint(answer)", "source": "data/PoT/gsm_gpt4.json"},
    {"instruction": "Compute 6 / 3.", "output": "def solution():\n    return 6 / 3\nprint(solution())",
     "source": "data/CoT/math50k_camel.json"},
    {"instruction": "Which option is prime? (A) 4 (B) 5", "output": "5 is prime. The answer is (B).",
     "source": "data/CoT/aqua_rat.json"},
    {"instruction": "Simplify 10/2.", "output": "10/2 = $\\boxed{5}$.", "source": "data/CoT/MATH_train.json"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_json(path, rows):
    path.write_text(json.dumps(rows, indent=2), encoding="utf-8")  # one field per line: rows start on known lines
    return path


@pytest.fixture
def gsm8k(tmp_path):
    d = tmp_path / "gsm8k"
    d.mkdir()
    write_jsonl(d / "train.jsonl", GSM8K_TRAIN)
    write_jsonl(d / "test.jsonl", GSM8K_TEST)
    return d


# ---------------------------------------------------------------------------------------------- answers

def test_a_metamath_answer_becomes_a_gsm8k_target_the_scorer_reads():
    entry = to_entry({"query": "q?", "response": "2 + 16 = 18 eggs.\nThe answer is: 18"}, "metamath", "x:1")
    assert entry["answer"] == "2 + 16 = 18 eggs.\n#### 18"
    assert gold_answer(entry) == 18 and check_answers([entry], "mm") is None
    _, target = format_gsm8k_entry(entry)  # the training target the CoT dataset builds
    assert target.rstrip().endswith("#### 18") and extract_answer(target) == 18


@pytest.mark.parametrize("text,answer", [
    ("The answer is: 1,234", 1234.0), ("So 3 + 4 = 7. The answer is 7.", 7.0), ("x = $\\boxed{5}$.", 5.0),
    ("24 + 48 = 72\n#### 72", 72.0), ("The answer is: $-2.5$", -2.5), ("Pay $3.\nThe answer is: $3", 3.0)])
def test_numeric_final_answers_map_to_the_gsm8k_line(text, answer):
    solution = to_gsm8k_solution(text)
    assert solution.splitlines()[-1].startswith("#### ") and extract_answer(solution) == answer


@pytest.mark.parametrize("text", ["The answer is: \\frac{1}{2}", "The answer is (B).", "x = \\boxed{\\sqrt{2}}",
                                  "no closing phrase, 12 apples"])
def test_answers_the_scorer_cannot_read_are_refused(text):
    assert to_gsm8k_solution(text) is None


def test_a_closing_sentence_is_kept_and_what_follows_its_line_is_dropped():
    assert to_gsm8k_solution("So 7. The answer is 7.\nA note.") == "So 7. The answer is 7.\n#### 7"


# ---------------------------------------------------------------------------------------------- reading

def test_json_jsonl_and_directories_are_recognised_by_their_fields(tmp_path):
    as_jsonl = load_corpus(str(write_jsonl(tmp_path / "mm.jsonl", METAMATH)))
    as_json = load_corpus(str(write_json(tmp_path / "mm.json", METAMATH)))
    jsonl_named_json = load_corpus(str(write_jsonl(tmp_path / "mm_lines.json", METAMATH)))
    assert as_jsonl.formats == as_json.formats == jsonl_named_json.formats == ("metamath",)
    assert as_jsonl.entries == as_json.entries == jsonl_named_json.entries
    assert (as_json.rows, len(as_json.entries), as_json.dropped) == (5, 4, {NO_NUMBER: 1})

    d = tmp_path / "corpora"
    d.mkdir()
    write_jsonl(d / "b_metamath.jsonl", METAMATH)
    write_json(d / "a_mathinstruct.json", MATHINSTRUCT)
    (d / "notes.txt").write_text("not data")
    both = load_corpus(str(d))
    assert both.formats == ("mathinstruct", "metamath") and both.rows == 10  # name order, .txt ignored
    assert [e["question"] for e in both.entries[:2]] == [MATHINSTRUCT[0]["instruction"],
                                                        MATHINSTRUCT[4]["instruction"]]


def test_a_gsm8k_directory_gives_its_train_split_only(gsm8k):
    corpus = load_corpus(str(gsm8k))
    assert corpus.formats == ("gsm8k",) and corpus.entries == GSM8K_TRAIN


@pytest.mark.parametrize("content,message", [
    ('{"query": "q", "response": "The answer is: 1"}\n\n{"query": "q", "response": oops}\n', ":3: not valid JSON"),
    ('{"query": "q", "response": "The answer is: 1"}\n{"query": "q2"}\n', ":2: missing or non-string 'response'"),
    ('{"query": "q", "response": 7}\n', ":1: missing or non-string 'response'"),
    ('{"prompt": "q", "completion": "a"}\n', ":1: fields ['completion', 'prompt'] match no known corpus"),
    ('[\n  {"query": "q", "response": "The answer is: 1"},\n  {"query": "q2",\n   "type": "x"}\n]',
     ":3: missing or non-string 'response'"),
    ('[\n  {"instruction": "i", "output": "The answer is 2"},\n  ["not", "an object"]\n]', ":3: expected a "),
    ('[\n  {"instruction": "i", "output": "The answer is 2"}\n  {"instruction": "j"}\n]', ":3: expected ',' or ']'"),
    ('[\n  {"instruction": "i", "output": "The answer is 2", "source": 3}\n]', ":2: 'source' must be a string"),
    ("", "holds no problems"),
])
def test_a_malformed_row_is_reported_with_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UsageError) as e:
        load_corpus(str(path))
    assert str(path) in str(e.value) and message in str(e.value)


def test_missing_paths_and_sources_without_usable_rows(tmp_path):
    with pytest.raises(InputNotFoundError, match="does not exist"):
        load_corpus(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="holds no .json or .jsonl file"):
        load_corpus(str(tmp_path / "empty"))
    with pytest.raises(UsageError, match="none of its 1 rows is usable.*--program-of-thought"):
        load_corpus(str(write_jsonl(tmp_path / "pot.jsonl", MATHINSTRUCT[1:2])))


def test_a_hub_id_is_loaded_with_datasets_and_recognised_by_fields(monkeypatch):
    calls = []

    def load_dataset(name, *args, split=None, **kwargs):
        calls.append((name, args, split))
        if name != "TIGER-Lab/MathInstruct":
            raise ConnectionError("offline")
        return MATHINSTRUCT

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    corpus = load_corpus("TIGER-Lab/MathInstruct")
    assert calls == [("TIGER-Lab/MathInstruct", (), "train")]
    assert corpus.formats == ("mathinstruct",) and len(corpus.entries) == 2
    with pytest.raises(UsageError, match="could not be loaded as a hub dataset \\(offline\\)"):
        load_corpus("meta-math/MetaMathQA")


# ---------------------------------------------------------------------------------------------- program of thought

def test_program_of_thought_rows_are_dropped_unless_asked_for(tmp_path):
    path = str(write_json(tmp_path / "mi.json", MATHINSTRUCT))
    cot = load_corpus(path)
    assert [e["question"] for e in cot.entries] == [MATHINSTRUCT[0]["instruction"], MATHINSTRUCT[4]["instruction"]]
    assert cot.dropped == {PROGRAM: 2, NO_NUMBER: 1}
    assert [e["answer"].splitlines()[-1] for e in cot.entries] == ["#### 8", "#### 5"]
    with_pot = load_corpus(path, program_of_thought=True)
    programs = [e for e in with_pot.entries if e.get("program")]
    assert [e["answer"] for e in programs] == [MATHINSTRUCT[1]["output"], MATHINSTRUCT[2]["output"]]
    assert with_pot.dropped == {NO_NUMBER: 1}


@pytest.mark.parametrize("output,source,expected", [
    ("print(3)", "", True), ("import math\nx = math.sqrt(4)", "", True), ("def f():\n  return 1", "", True),
    ("2 + 2 = 4. The answer is 4", "data/PoT/numglue.json", True), ("The answer is 4", "data/CoT/gsm.json", False),
    ("We print(the) result: 4", "data/CoT/teapot.json", False)])
def test_program_of_thought_is_recognised_by_source_or_output(output, source, expected):
    assert is_program_of_thought(output, source) is expected


# ---------------------------------------------------------------------------------------------- contamination

def test_the_guard_matches_questions_up_to_case_whitespace_and_punctuation():
    assert normalize_question("  Janet's ducks\tlay 16 eggs PER day!") == normalize_question("janet s ducks lay 16 "
                                                                                              "eggs per day")
    entries = [{"question": "JANET'S  ducks lay 16 eggs per day. How many dollars does she make every day at the "
                            "farmers' market"},
               {"question": "A new question.", "original_question": TEST_Q.upper()},
               {"question": "A clean question.", "original_question": "A train question."}]
    kept, dropped = drop_contaminated(entries, [TEST_Q])
    assert kept == entries[2:] and dropped == 2


def test_a_training_set_drops_test_questions_and_reports_the_count(gsm8k, tmp_path):
    mm = write_jsonl(tmp_path / "mm.jsonl", METAMATH)
    entries, report = build_training_set([("gsm8k", 1.0), (str(mm), 1.0)], str(gsm8k), seed=0)
    questions = {normalize_question(e["question"]) for e in entries}
    assert not questions & {normalize_question(e["question"]) for e in GSM8K_TEST}
    assert report["contamination"] == {"reference": f"GSM8K test ({gsm8k})", "test_questions": 2, "dropped": 2}
    gsm, meta = report["sources"]
    assert (gsm["rows"], gsm["used"], gsm["dropped"]) == (4, 4, {CONTAMINATED: 0})
    assert (meta["rows"], meta["kept"], meta["dropped"]) == (5, 2, {NO_NUMBER: 1, CONTAMINATED: 2})
    assert entries[:4] == GSM8K_TRAIN and len(entries) == report["examples"] == 6


def test_a_source_made_only_of_test_questions_is_refused(gsm8k, tmp_path):
    leak = write_jsonl(tmp_path / "leak.jsonl", [METAMATH[1]])
    with pytest.raises(UsageError, match="ask a GSM8K test question"):
        build_training_set([(str(leak), 1.0)], str(gsm8k))


# ---------------------------------------------------------------------------------------------- mixtures

@pytest.mark.parametrize("weight,n", [(1.0, 10), (0.3, 3), (0.29, 3), (0.25, 2), (2.0, 20), (2.5, 25), (0.01, 0)])
def test_a_share_is_round_weight_times_size(weight, n):
    entries = [{"i": i} for i in range(10)]
    share = take_share(entries, weight, torch.Generator().manual_seed(0))
    assert len(share) == n
    counts = [share.count(e) for e in entries]
    assert min(counts) == int(weight) and max(counts) <= int(weight) + 1  # whole copies, the rest at most once


def test_a_share_is_seeded():
    entries = [{"i": i} for i in range(100)]
    draw = [take_share(entries, 0.2, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert draw[0] == draw[1] and draw[0] != draw[2]
    assert [e["i"] for e in draw[0]] == sorted(e["i"] for e in draw[0])  # a subset in source order


def test_a_mixture_takes_each_source_by_its_weight(gsm8k, tmp_path):
    rows = [{"query": f"Item {i}: what is {i} + 1?", "response": f"{i} + 1 = {i + 1}\nThe answer is: {i + 1}"}
            for i in range(40)]
    mm = write_jsonl(tmp_path / "mm.jsonl", rows)
    entries, report = build_training_set(parse_mix(f"gsm8k=2,{mm}=0.25"), str(gsm8k), seed=3)
    assert [s["used"] for s in report["sources"]] == [8, 10] and len(entries) == 18
    assert entries[:8] == GSM8K_TRAIN * 2
    again, _ = build_training_set(parse_mix(f"gsm8k=2,{mm}=0.25"), str(gsm8k), seed=3)
    other, _ = build_training_set(parse_mix(f"gsm8k=2,{mm}=0.25"), str(gsm8k), seed=4)
    assert again == entries and other != entries


def test_the_mix_grammar():
    assert parse_mix("gsm8k=1, a=b/mm.jsonl=0.2") == (("gsm8k", 1.0), ("a=b/mm.jsonl", 0.2))
    assert TrainDataConfig().mix == () and TrainDataConfig("gsm8k=1").mix == (("gsm8k", 1.0),)
    for spec, message in [("gsm8k", "not SOURCE=WEIGHT"), ("=1", "not SOURCE=WEIGHT"), ("gsm8k=1,", "not SOURCE"),
                          ("gsm8k=x", "is not a number"), ("gsm8k=0", "must be a positive"),
                          ("gsm8k=inf", "must be a positive"), ("gsm8k=1,gsm8k=2", "twice")]:
        with pytest.raises(UsageError, match=message):
            TrainDataConfig(spec)


def test_the_gsm8k_reference_of_a_run(gsm8k, tmp_path, monkeypatch):
    mm = str(write_jsonl(tmp_path / "mm.jsonl", METAMATH))
    monkeypatch.setenv("GSM8K_DIR", "/elsewhere/gsm8k")
    assert gsm8k_reference(str(gsm8k), mixed=False) == gsm8k_reference(str(gsm8k), mixed=True) == str(gsm8k)
    assert gsm8k_reference("openai/gsm8k", mixed=False) == "openai/gsm8k"
    assert gsm8k_reference(mm, mixed=False) == gsm8k_reference("meta-math/MetaMathQA", False) == "/elsewhere/gsm8k"
    with pytest.raises(UsageError, match="with --train-mix, --data names only the GSM8K source"):
        gsm8k_reference(mm, mixed=True)


# ---------------------------------------------------------------------------------------------- through the CLI

def tiny_finetune(model_dir, out, *data_args):
    return ["finetune", "--model", str(model_dir), *data_args, "--out", str(out), "--device", "cpu",
            "--dtype", "float32", "--method", "rtn", "--group-size", "32", "--prompt-style", "plain", "--lora-r", "2",
            "--max-steps", "1", "--batch-size", "2", "--max-length", "64", "--eval-holdout", "1", "--eval-every", "1",
            "--save-every", "1", "--warmup-steps", "0", "--no-bf16", "--no-gradient-checkpointing"]


def test_finetune_records_the_mixture_and_the_contamination_count(gsm8k, tmp_path, capsys, monkeypatch):
    model_dir = tmp_path / "model"
    make_tiny_llama(num_layers=1).save_pretrained(model_dir)
    make_tiny_tokenizer(chat_template=False).save_pretrained(model_dir)
    mm = write_jsonl(tmp_path / "mm.jsonl", METAMATH)
    out = tmp_path / "run"
    assert cli.main(tiny_finetune(model_dir, out, "--data", str(gsm8k), "--train-mix", f"gsm8k=1,{mm}=1")) == 0
    captured = capsys.readouterr()
    assert "contamination guard: dropped 2 training items" in captured.err
    recorded = json.loads((out / "run_provenance.json").read_text())["training_data"]
    assert recorded["contamination"]["dropped"] == 2 and recorded["examples"] == 6
    assert [(s["source"], s["weight"], s["used"]) for s in recorded["sources"]] == [("gsm8k", 1.0, 4),
                                                                                   (str(mm), 1.0, 2)]
    assert json.loads(captured.out)["training_data"] == recorded

    # --data alone may be MetaMathQA; the guard then compares with $GSM8K_DIR's test split.
    monkeypatch.setenv("GSM8K_DIR", str(gsm8k))
    assert cli.main(tiny_finetune(model_dir, tmp_path / "mm_run", "--data", str(mm))) == 0
    recorded = json.loads((tmp_path / "mm_run" / "run_provenance.json").read_text())["training_data"]
    assert recorded["contamination"] == {"reference": f"GSM8K test ({gsm8k})", "test_questions": 2, "dropped": 2}
    assert recorded["sources"][0]["formats"] == ["metamath"] and recorded["examples"] == 2


def test_finetune_refuses_bad_training_data_before_loading_a_model(gsm8k, tmp_path, capsys, monkeypatch):
    import gptqlora.models

    monkeypatch.setattr(gptqlora.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    model_dir = tmp_path / "model"
    make_tiny_llama(num_layers=1).save_pretrained(model_dir)
    make_tiny_tokenizer(chat_template=False).save_pretrained(model_dir)
    bad = tmp_path / "mm.jsonl"
    bad.write_text(json.dumps(METAMATH[0]) + "\n" + json.dumps({"query": "q"}) + "\n")
    monkeypatch.setenv("GSM8K_DIR", str(gsm8k))  # the guard's reference when --data is not GSM8K
    assert cli.main(tiny_finetune(model_dir, tmp_path / "a", "--data", str(bad))) == 2
    assert f"{bad}:2: missing or non-string 'response'" in capsys.readouterr().err
    assert cli.main(tiny_finetune(model_dir, tmp_path / "b", "--data", str(bad), "--train-mix", "gsm8k=1")) == 2
    assert "--data names only the GSM8K source" in capsys.readouterr().err


def test_calibration_reads_a_corpus_without_its_test_questions(gsm8k, tmp_path):
    from gptqlora.config import CalibConfig
    from gptqlora.data.calibration import calibration_for

    mm = write_jsonl(tmp_path / "mm.jsonl", METAMATH)
    tokenizer = make_tiny_tokenizer()
    calib = CalibConfig(calib_samples=64, calib_seqlen=32, calib_data=str(mm))
    tokens, described = calibration_for(calib, tokenizer, str(gsm8k), seed=0)
    assert tokens.shape == (64, 32)
    assert described == {"source": str(mm), "formats": ["metamath"], "dropped_test_questions": 2, "samples": 64,
                         "seqlen": 32}
    text = " ".join(tokenizer.decode(row, skip_special_tokens=True) for row in tokens)  # 64 windows cover the stream
    assert "apples" in text and "Mia runs" in text and "####" in text  # questions and mapped solutions
    assert "ducks" not in text and "hen lays" not in text and "Ann reads" not in text  # no test, no GSM8K train
    assert torch.equal(tokens, calibration_for(calib, tokenizer, str(gsm8k), seed=0)[0])


def test_cli_quantize_calibrates_on_a_corpus_and_records_it(gsm8k, tmp_path):
    mm = write_jsonl(tmp_path / "mm.jsonl", METAMATH)
    make_tiny_llama().save_pretrained(tmp_path / "tiny")
    make_tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    argv = ["quantize", "--model", str(tmp_path / "tiny"), "--data", str(gsm8k), "--out", str(tmp_path / "q"),
            "--group-size", "32", "--calib-samples", "4", "--calib-seqlen", "32", "--calib-data", str(mm)]
    assert cli.main(argv) == 0
    recorded = json.loads((tmp_path / "q" / "quantize_config.json").read_text())["gptqlora"]["calibration"]
    assert recorded["source"] == str(mm) and recorded["dropped_test_questions"] == 2
    with pytest.raises(SystemExit) as exit_:  # refused while parsing, before any work
        cli.main(argv[:-2] + ["--calib-data", str(mm), "--calib-text", str(mm), "--out", str(tmp_path / "q2")])
    assert exit_.value.code == 2 and not (tmp_path / "q2").exists()


# ---------------------------------------------------------------------------------------------- untrusted inputs

def test_a_byte_that_is_not_utf8_names_the_file_and_its_offset(tmp_path):
    first = json.dumps(METAMATH[0]).encode() + b"\n"
    for name, content in (("bad.jsonl", first + b'{"query": "caf\xe9", "response": "The answer is: 1"}\n'),
                          ("bad.json", b"[\n" + first[:-1] + b',\n{"query": "caf\xe9"}\n]')):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(UsageError) as e:
            load_corpus(str(path))
        offset, line = content.index(0xE9), 2 if name.endswith("jsonl") else 3
        assert f"{path}: byte 0xe9 at offset {offset} (line {line}) is not UTF-8" in str(e.value)


def test_a_byte_order_mark_is_read_as_utf8_sig(tmp_path):
    for path in (write_jsonl(tmp_path / "mm.jsonl", METAMATH), write_json(tmp_path / "mm.json", METAMATH)):
        plain = load_corpus(str(path))
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
        assert load_corpus(str(path)).entries == plain.entries
    gsm8k_dir = tmp_path / "gsm8k"
    gsm8k_dir.mkdir()
    for split, rows in (("train", GSM8K_TRAIN), ("test", GSM8K_TEST)):
        (gsm8k_dir / f"{split}.jsonl").write_bytes(b"\xef\xbb\xbf" + write_jsonl(tmp_path / split, rows).read_bytes())
    # Recognised as a GSM8K directory (its test split is the guard's reference), both splits read.
    assert gsm8k_reference(str(gsm8k_dir), mixed=False) == str(gsm8k_dir)
    entries, report = build_training_set([(str(gsm8k_dir), 1.0)], str(gsm8k_dir))
    assert entries == GSM8K_TRAIN and report["contamination"]["test_questions"] == 2


def test_a_jsonl_line_ends_at_newline_only(tmp_path):
    row = {"query": "Line\u2028separator and next\u0085line: 2 + 2?", "response": "The answer is: 4"}
    path = tmp_path / "mm.jsonl"
    path.write_text(json.dumps(row, ensure_ascii=False) + "\n" + json.dumps(METAMATH[0]) + "\n", encoding="utf-8")
    corpus = load_corpus(str(path))
    assert corpus.rows == 2 and corpus.entries[0]["question"] == row["query"]


def test_a_mix_weight_that_selects_no_rows_names_the_source_and_weight(gsm8k):
    with pytest.raises(UsageError) as e:
        build_training_set(parse_mix("gsm8k=0.001"), str(gsm8k))
    message = str(e.value)
    assert "--train-mix gsm8k=0.001 selects no rows" in message and "x its 4 usable rows" in message
    assert "holdout" not in message
    entries, _ = build_training_set(parse_mix("gsm8k=0.25"), str(gsm8k))  # the weight the message asks for
    assert len(entries) == 1


def _no_model_loads(monkeypatch):
    """Fail the test if a command loads a model's weights (whole, or streamed block by block)."""
    import gptqlora.models
    import gptqlora.quant.streamed

    monkeypatch.setattr(gptqlora.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.setattr(gptqlora.quant.streamed, "quantize_streamed", lambda *a, **k: pytest.fail("read weights"))


def test_a_calibration_corpus_of_test_questions_only_is_one_clear_error(gsm8k, tmp_path):
    from gptqlora.config import CalibConfig
    from gptqlora.data.calibration import calibration_for

    leak = write_jsonl(tmp_path / "leak.jsonl", METAMATH[1:3])  # both rephrase a GSM8K test question
    with pytest.raises(UsageError) as e:
        calibration_for(CalibConfig(calib_samples=2, calib_seqlen=8, calib_data=str(leak)), make_tiny_tokenizer(),
                        str(gsm8k), seed=0)
    assert f"--calib-data {leak}: every one of its 2 usable rows was dropped as a GSM8K test question" in str(e.value)
    assert "calib-seqlen" not in str(e.value)


def test_cli_quantize_refuses_a_calibration_corpus_of_test_questions_before_loading(gsm8k, tmp_path, capsys,
                                                                                    monkeypatch):
    from conftest import error_of

    _no_model_loads(monkeypatch)
    leak = write_jsonl(tmp_path / "leak.jsonl", METAMATH[1:3])
    make_tiny_llama(num_layers=1).save_pretrained(tmp_path / "tiny")
    make_tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    capsys.readouterr()
    out = tmp_path / "q"
    assert cli.main(["quantize", "--model", str(tmp_path / "tiny"), "--data", str(gsm8k), "--out", str(out),
                     "--group-size", "32", "--calib-samples", "4", "--calib-seqlen", "32", "--calib-data",
                     str(leak)]) == 2
    line = error_of(capsys)
    assert "every one of its 2 usable rows was dropped as a GSM8K test question" in line
    assert "calib-seqlen" not in line and not out.exists()


@pytest.mark.parametrize("case", ["finetune corpus", "finetune gsm8k test", "quantize gsm8k train",
                                  "quantize calib corpus"])
def test_cli_a_byte_that_is_not_utf8_in_data_is_one_line_before_loading(gsm8k, tmp_path, capsys, monkeypatch, case):
    from conftest import error_of

    _no_model_loads(monkeypatch)
    model_dir = tmp_path / "model"
    make_tiny_llama(num_layers=1).save_pretrained(model_dir)
    make_tiny_tokenizer(chat_template=False).save_pretrained(model_dir)
    capsys.readouterr()
    monkeypatch.setenv("GSM8K_DIR", str(gsm8k))  # the guard's reference when --data is not GSM8K
    latin1 = '{"query": "Caf\xe9 prices: 2 + 2?", "response": "The answer is: 4"}\n'.encode("latin-1")
    bad = tmp_path / ("corpus.json" if case == "quantize calib corpus" else "bad.jsonl")
    bad.write_bytes(b"\n" + latin1)
    if case.endswith("gsm8k test") or case.endswith("gsm8k train"):  # a GSM8K directory with one bad split
        broken = tmp_path / "broken"
        broken.mkdir()
        split = case.rsplit(" ", 1)[1]
        for s in ("train", "test"):
            (broken / f"{s}.jsonl").write_bytes(latin1 if s == split else (gsm8k / f"{s}.jsonl").read_bytes())
        bad = broken / f"{split}.jsonl"
    out = tmp_path / "out"
    if case.startswith("finetune"):
        argv = tiny_finetune(model_dir, out, "--data", str(bad.parent if "gsm8k" in case else bad))
    else:
        argv = ["quantize", "--model", str(model_dir), "--out", str(out), "--group-size", "32",
                "--data", str(bad.parent if "gsm8k" in case else gsm8k)]
        argv += ["--calib-data", str(bad)] if case.endswith("corpus") else []
    assert cli.main(argv) == 2
    line = error_of(capsys)
    offset, lineno = bad.read_bytes().index(0xE9), 1 if bad.parent.name == "broken" else 2
    assert f"{bad}: byte 0xe9 at offset {offset} (line {lineno}) is not UTF-8" in line
    assert not out.exists()
