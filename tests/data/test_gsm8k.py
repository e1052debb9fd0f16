"""GSM8K loading, answer extraction, prompts and the chain-of-thought dataset."""

from __future__ import annotations

import json

import pytest
import torch

from gptqlora.errors import UsageError
from gptqlora.data.gsm8k import (
    IGNORE_INDEX,
    SYSTEM_PROMPT,
    GSM8KCoTDataset,
    answers_match,
    build_prompt,
    check_answers,
    collate,
    extract_answer,
    format_gsm8k_entry,
    gold_answer,
    load_gsm8k,
    resolve_style,
    strip_calculator,
)

ENTRY = {
    "question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                "How many clips did Natalia sell altogether in April and May?",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
}
EXEMPLAR = {"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}


def write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------- loading

def test_real_files_load(gsm8k_dir):
    train, test = load_gsm8k("train", str(gsm8k_dir)), load_gsm8k("test", str(gsm8k_dir))
    assert (len(train), len(test)) == (7473, 1319)
    assert train[0]["question"].startswith("Natalia sold clips")
    assert gold_answer(train[0]) == 72.0
    # Every gold answer parses: the training targets and the scorer rely on it.
    assert all(isinstance(gold_answer(e), float) for e in train + test)


def test_default_source_is_gsm8k_dir_env(gsm8k_dir, monkeypatch):
    monkeypatch.setenv("GSM8K_DIR", str(gsm8k_dir))
    assert len(load_gsm8k("test")) == 1319


def test_blank_lines_skipped(tmp_path):
    write_jsonl(tmp_path / "test.jsonl", [json.dumps(EXEMPLAR), "", "   ", json.dumps(ENTRY)])
    assert load_gsm8k("test", str(tmp_path)) == [EXEMPLAR, ENTRY]


@pytest.mark.parametrize("bad", [
    "{not json",
    json.dumps({"question": "q"}),
    json.dumps({"question": "q", "answer": 5}),
    json.dumps(["q", "a"]),
])
def test_malformed_line_names_file_and_line(tmp_path, bad):
    write_jsonl(tmp_path / "train.jsonl", [json.dumps(EXEMPLAR), "", bad])
    with pytest.raises(ValueError) as e:
        load_gsm8k("train", str(tmp_path))
    assert f"{tmp_path / 'train.jsonl'}:3" in str(e.value)


def test_missing_split_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"test\.jsonl.*--data"):
        load_gsm8k("test", str(tmp_path))


def test_bad_split_and_path_like_sources(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_gsm8k("validation", str(tmp_path))
    with pytest.raises(ValueError, match="empty"):
        load_gsm8k("train", "")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gsm8k("train", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_gsm8k("train", "./no/such/dir")
    write_jsonl(tmp_path / "train.jsonl", [json.dumps(EXEMPLAR)])
    with pytest.raises(UsageError, match="is a file"):
        load_gsm8k("train", str(tmp_path / "train.jsonl"))


def test_hub_path_converts_rows(gsm8k_dir, monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    real_load = datasets.load_dataset
    calls = []

    def fake_load(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return real_load("json", data_files=str(gsm8k_dir / f"{split}.jsonl"), split="train",
                         cache_dir=str(tmp_path / "cache"))

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    entries = load_gsm8k("test", "openai/gsm8k")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert entries == load_gsm8k("test", str(gsm8k_dir))
    assert all(set(e) == {"question", "answer"} for e in entries)


def test_empty_split_file_is_refused(tmp_path):
    (tmp_path / "test.jsonl").write_text("\n")
    with pytest.raises(UsageError, match="holds no problems"):
        load_gsm8k("test", str(tmp_path))


def test_check_answers_refuses_solutions_without_an_answer_line():
    check_answers([EXEMPLAR], "train")
    with pytest.raises(UsageError, match=r"1 of 2 answers have no '#### <number>' line \(first: entry 1"):
        check_answers([EXEMPLAR, {"question": "q", "answer": "It is 4."}], "train")


def test_a_number_too_large_for_a_float_is_no_answer():
    assert extract_answer("#### " + "9" * 400) is None


def test_hub_failure_suggests_local_directory(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UsageError, match=r"not a local directory.*--data DIR.*GSM8K_DIR") as e:
        load_gsm8k("train", "openai/gsm8k")
    assert isinstance(e.value.__cause__, ConnectionError)


# ---------------------------------------------------------------------------------------------- answers

@pytest.mark.parametrize("text, expected", [
    ("#### 72", 72.0),
    ("She sold 24 in May.\n#### 72", 72.0),
    ("#### 1,234", 1234.0),
    ("#### 1,234,567.5", 1234567.5),
    ("#### $5", 5.0),
    ("#### -3", -3.0),
    ("#### 0.5", 0.5),
    ("#### .5", 0.5),
    ("#### 42.", 42.0),
    ("#### 12%", 12.0),
    ("####72", 72.0),
    ("#### 3\n#### 4", 4.0),
    ("Total 5\n#### 7\n\nQuestion: Tom has 9 apples", 7.0),
    ("The answer is 18.", 18.0),
    ("so THE ANSWER IS $1,200.50 in total", 1200.5),
    ("5 + 6 = 11. The answer is 11 apples, not 12", 11.0),
    ("She has 3 apples and buys 4 more, so 7", 7.0),
    ("It costs -4 dollars", -4.0),
    ("5-3=2", 2.0),
    ("1,2,3", 3.0),
    ("x = 1,000,000", 1_000_000.0),
    ("It costs $0.25.", 0.25),
    ("2 apples\n#### unknown", 2.0),  # no number after '####': fall through to the last number
    ("The answer is unclear, maybe 6", 6.0),
    ("no number here", None),
    ("", None),
    ("#### none", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_answers_match():
    assert answers_match(72.0, 72)
    assert answers_match(0.1 + 0.2, 0.3)
    assert answers_match(1e9 + 1e-1, 1e9)  # relative beyond 1
    assert not answers_match(72.01, 72)
    assert not answers_match(None, 0)
    assert not answers_match(-3.0, 3.0)


def test_gold_answer_and_strip_calculator():
    assert gold_answer(ENTRY) == 72.0
    with pytest.raises(ValueError, match="####"):
        gold_answer({"question": "q", "answer": "It is 5"})
    assert strip_calculator("48/2 = <<48/2=24>>24 and $<<12/60=0.2>>0.2") == "48/2 = 24 and $0.2"
    assert strip_calculator("a < b >> c") == "a < b >> c"


# ---------------------------------------------------------------------------------------------- prompts

def test_resolve_style(tiny_tokenizer):
    assert resolve_style("auto", tiny_tokenizer) == "chat"
    assert resolve_style("auto", None) == "plain"
    assert resolve_style("plain", tiny_tokenizer) == "plain"
    with pytest.raises(ValueError, match="unknown prompt style"):
        resolve_style("alpaca", tiny_tokenizer)
    tiny_tokenizer.chat_template = None
    assert resolve_style("auto", tiny_tokenizer) == "plain"
    with pytest.raises(ValueError, match="chat template"):
        resolve_style("chat", tiny_tokenizer)


@pytest.mark.parametrize("style", ["plain", "chat"])
def test_format_entry_keeps_solution_out_of_prompt(tiny_tokenizer, style):
    prompt, target = format_gsm8k_entry(ENTRY, style, tiny_tokenizer)
    assert ENTRY["question"] in prompt
    # The chat system prompt names the '#### <number>' format; the gold line itself never appears.
    assert "#### 72" not in prompt and "Natalia sold 48/2" not in prompt and "72" not in prompt
    assert ("####" in prompt) == (style == "chat")
    assert target.endswith("#### 72") and "<<" not in target
    assert target.startswith(" Natalia") if style == "plain" else target.startswith("Natalia")
    assert extract_answer(target) == gold_answer(ENTRY)


def test_format_entry_prompt_shapes(tiny_tokenizer):
    plain, _ = format_gsm8k_entry(ENTRY, "plain")
    assert plain == f"Question: {ENTRY['question']}\nAnswer:"
    chat, _ = format_gsm8k_entry(ENTRY, "chat", tiny_tokenizer)
    assert chat.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>")
    assert chat.endswith(f"<|im_start|>user\n{ENTRY['question']}<|im_end|>\n<|im_start|>assistant\n")
    _, raw = format_gsm8k_entry(ENTRY, "plain", strip_calc=False)
    assert "<<48/2=24>>" in raw


def test_few_shot_exemplars_come_first_and_solved(tiny_tokenizer):
    plain = build_prompt(ENTRY["question"], "plain", exemplars=[EXEMPLAR])
    assert plain == (f"Question: {EXEMPLAR['question']}\nAnswer: 2 + 3 = 5\n#### 5\n\n"
                     f"Question: {ENTRY['question']}\nAnswer:")
    chat = build_prompt(ENTRY["question"], "chat", tiny_tokenizer, exemplars=[EXEMPLAR])
    assert chat.index(EXEMPLAR["question"]) < chat.index("2 + 3 = 5\n#### 5<|im_end|>") < chat.index(ENTRY["question"])
    assert "<|im_start|>assistant\n2 + 3 = 5" in chat and "<<" not in chat


# ---------------------------------------------------------------------------------------------- dataset

@pytest.mark.parametrize("style", ["plain", "chat"])
def test_dataset_labels(tiny_tokenizer, style):
    eos = tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.pad_token_id == eos  # the case this test is about
    ds = GSM8KCoTDataset([ENTRY], tiny_tokenizer, style=style, max_length=1024)
    item = ds[0]
    prompt, target = format_gsm8k_entry(ENTRY, style, tiny_tokenizer)
    n_prompt = len(tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    ids, labels = item["input_ids"], item["labels"]
    assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape == item["attention_mask"].shape
    assert (labels[:n_prompt] == IGNORE_INDEX).all()
    assert torch.equal(labels[n_prompt:], ids[n_prompt:])
    assert tiny_tokenizer.decode(ids[n_prompt:-1]) == target  # the labels are exactly the solution, then eos
    assert ids[-1] == eos and labels[-1] == eos
    assert (labels == eos).sum() == 1
    assert item["attention_mask"].all()
    assert ds.n_truncated == 0


def test_collate_masks_padding_by_position(tiny_tokenizer):
    eos = pad = tiny_tokenizer.pad_token_id
    ds = GSM8KCoTDataset([ENTRY, EXEMPLAR], tiny_tokenizer, style="plain", max_length=1024)
    long, short = ds[0], ds[1]
    batch = collate([long, short], pad_id=pad)
    T, n = len(long["input_ids"]), len(short["input_ids"])
    assert all(v.shape == (2, T) and v.dtype == torch.long for v in batch.values())
    assert torch.equal(batch["input_ids"][1, :n], short["input_ids"])
    assert (batch["input_ids"][1, n:] == pad).all()
    assert (batch["attention_mask"][1, n:] == 0).all() and batch["attention_mask"][1, :n].all()
    assert (batch["labels"][1, n:] == IGNORE_INDEX).all()
    # The real eos of the short row stays a label although the padding after it has the same id.
    assert batch["labels"][1, n - 1] == eos and batch["attention_mask"][1, n - 1] == 1
    assert ((batch["labels"] == eos).sum(dim=1) == 1).all()
    assert torch.equal(batch["labels"][0], long["labels"])


def test_truncation_keeps_prompt_then_labels(tiny_tokenizer):
    prompt, _ = format_gsm8k_entry(ENTRY, "plain")
    n_prompt = len(tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    ds = GSM8KCoTDataset([ENTRY], tiny_tokenizer, max_length=n_prompt + 10)
    item = ds[0]
    assert len(item["input_ids"]) == n_prompt + 10 and ds.n_truncated == 1
    assert (item["labels"][:n_prompt] == IGNORE_INDEX).all() and (item["labels"][n_prompt:] != IGNORE_INDEX).all()
    # A prompt longer than max_length keeps its end, and half the window is left for labels.
    ds = GSM8KCoTDataset([ENTRY], tiny_tokenizer, max_length=32)
    item = ds[0]
    assert len(item["input_ids"]) == 32 and ds.n_truncated == 1
    assert (item["labels"][:16] == IGNORE_INDEX).all() and (item["labels"][16:] != IGNORE_INDEX).all()
    assert tiny_tokenizer.decode(item["input_ids"][:16]).endswith("May?\nAnswer:")
    with pytest.raises(ValueError, match="max_length"):
        GSM8KCoTDataset([ENTRY], tiny_tokenizer, max_length=1)


def test_plain_style_adds_bos_only_when_tokenizer_does(tiny_tokenizer):
    ds = GSM8KCoTDataset([ENTRY], tiny_tokenizer, style="plain")
    assert ds[0]["input_ids"][0] != tiny_tokenizer.bos_token_id
    tiny_tokenizer.add_bos_token = True
    ds = GSM8KCoTDataset([ENTRY], tiny_tokenizer, style="plain")
    assert ds[0]["input_ids"][0] == tiny_tokenizer.bos_token_id
    assert (ds[0]["input_ids"] == tiny_tokenizer.bos_token_id).sum() == 1
    chat = GSM8KCoTDataset([ENTRY], tiny_tokenizer, style="chat")
    # The chat template writes <|im_start|> (our bos) itself; none is prepended on top.
    assert chat[0]["input_ids"][0] == tiny_tokenizer.bos_token_id != chat[0]["input_ids"][1]


# ---------------------------------------------------------------------------------------------- untrusted inputs

def test_a_split_with_a_byte_that_is_not_utf8_names_the_file_and_offset(tmp_path):
    first, before = json.dumps(EXEMPLAR) + "\n", '{"question": "caf'
    (tmp_path / "train.jsonl").write_bytes(f"{first}{before}".encode() + b'\xe9?", "answer": "#### 1"}\n')
    offset = len(first) + len(before)  # 0-based, in bytes (all ASCII before it)
    with pytest.raises(UsageError, match=f"{tmp_path / 'train.jsonl'}: byte 0xe9 at offset {offset} "
                                         r"\(line 2\) is not UTF-8"):
        load_gsm8k("train", str(tmp_path))


def test_a_split_with_a_byte_order_mark_reads(tmp_path):
    (tmp_path / "test.jsonl").write_bytes(b"\xef\xbb\xbf" + (json.dumps(EXEMPLAR) + "\n").encode())
    assert load_gsm8k("test", str(tmp_path)) == [EXEMPLAR]


def test_a_huge_row_is_cut_before_tokenizing_to_the_ids_of_its_head(tiny_tokenizer):
    import time

    from gptqlora.data.gsm8k import MAX_TOKEN_CHARS, encode_texts

    huge = {"question": "What do two and two make?", "answer": "Two and two make four. " * 2_200_000 + "\n#### 4"}
    assert len(huge["answer"]) > 50_000_000
    start = time.perf_counter()
    ds = GSM8KCoTDataset([huge], tiny_tokenizer, style="plain", max_length=64)
    assert time.perf_counter() - start < 10  # whole, its 50M tokens took minutes
    prompt, target = format_gsm8k_entry(huge, "plain")
    head = encode_texts(tiny_tokenizer, [prompt + target[:64 * MAX_TOKEN_CHARS]], "plain")[0]
    assert ds[0]["input_ids"].tolist() == head[:64] and ds.n_truncated == 1


@pytest.mark.parametrize("style", ["plain", "chat"])
@pytest.mark.parametrize("bos", [False, True])
def test_cutting_long_texts_keeps_the_ids_of_the_whole_texts(tiny_tokenizer, monkeypatch, style, bos):
    from gptqlora.data import gsm8k

    tiny_tokenizer.add_bos_token = bos
    words = " ".join(f"duck{i}" for i in range(900))  # ~7,700 characters, beyond 8 x MAX_TOKEN_CHARS
    entries = [ENTRY, EXEMPLAR,
               {"question": words + " How many?", "answer": ENTRY["answer"]},  # the prompt is cut to its tail
               {"question": ENTRY["question"], "answer": words + "\n#### 7"},  # the target to its head
               {"question": words, "answer": words + "\n#### 7"}]
    for max_length in (8, 9, 64):
        cut = GSM8KCoTDataset(entries, tiny_tokenizer, style=style, max_length=max_length)
        with monkeypatch.context() as m:
            m.setattr(gsm8k, "MAX_TOKEN_CHARS", 10**9)  # nothing cut: every text tokenized whole
            whole = GSM8KCoTDataset(entries, tiny_tokenizer, style=style, max_length=max_length)
        assert cut.examples == whole.examples and cut.n_truncated == whole.n_truncated


@pytest.mark.parametrize("add_bos", [False, True])
def test_one_bos_rule_for_training_and_generation(tiny_tokenizer, add_bos):
    """encode_texts (training, the verifier) prepends the bos exactly when prompt_gets_bos says so, the rule eval and
    sample pass to generation as add_special_tokens: plain prompts of a tokenizer that adds a bos, never chat ones."""
    from gptqlora.data.gsm8k import encode_texts, prompt_gets_bos

    tiny_tokenizer.add_bos_token = add_bos
    for style in ("plain", "chat"):
        gets = prompt_gets_bos(tiny_tokenizer, style)
        assert gets == (add_bos and style == "plain")
        ids = encode_texts(tiny_tokenizer, ["Question: 2 + 3?\nAnswer:"], style)[0]
        assert (ids[0] == tiny_tokenizer.bos_token_id) == gets
        bare = tiny_tokenizer("Question: 2 + 3?\nAnswer:", add_special_tokens=False)["input_ids"]
        assert ids == ([tiny_tokenizer.bos_token_id] if gets else []) + bare
