"""The verifier's input encoding, and its files: a config from elsewhere is checked before anything loads."""

import json

import pytest
from conftest import make_tiny_tokenizer

from gptqlora.errors import UsageError
from gptqlora.verifier.model import CONFIG_FILE, FORMAT, HEAD_FILE, VERSION, encode_solution, read_verifier_config


def test_a_verifier_config_whose_base_is_not_a_record_is_refused_naming_the_file(tmp_path):
    for name in (HEAD_FILE, "adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / name).write_bytes(b"")
    config = {"format": FORMAT, "version": VERSION, "style": "plain", "max_length": 64, "hidden_size": 64}
    for base in ("/some/base", ["/some/base"], 7):
        (tmp_path / CONFIG_FILE).write_text(json.dumps(config | {"base": base}))
        with pytest.raises(UsageError, match=f"{CONFIG_FILE}: 'base' is {type(base).__name__}, not a base record"):
            read_verifier_config(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config | {"base": {"path": "/some/base", "fingerprint": None}}))
    assert read_verifier_config(tmp_path)["base"]["path"] == "/some/base"


def test_encode_keeps_the_solution_end_and_marks_its_tokens():
    tok = make_tiny_tokenizer()
    ids, start = encode_solution(tok, "What is 2+2?", " It is 4.\n#### 4", "plain", max_length=512)
    assert tok.decode(ids[start:]) == " It is 4.\n#### 4"
    cut, cut_start = encode_solution(tok, "What is 2+2?", " It is 4.\n#### 4", "plain", max_length=8)
    assert cut == ids[-8:] and cut_start == 0  # the oldest tokens go; the answer stays
    empty, empty_start = encode_solution(tok, "What is 2+2?", "", "plain", max_length=512)
    assert empty_start == len(empty) - 1  # scored at the prompt's last token
