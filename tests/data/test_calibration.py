"""Calibration windows: shape, determinism, sources and the too-short error."""

from __future__ import annotations

import pytest
import torch

from gptqlora.data.calibration import calibration_tokens
from gptqlora.data.gsm8k import load_gsm8k


class CountingTokenizer:
    """A tokenizer that counts the texts it is asked to tokenize, and is otherwise the one it wraps."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, 0

    def __call__(self, texts, **kwargs):
        self.texts += len(texts)
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_gsm8k_windows_shape_and_determinism(tiny_tokenizer, gsm8k_dir):
    counting = CountingTokenizer(tiny_tokenizer)
    a = calibration_tokens(counting, n_samples=8, seqlen=64, source=str(gsm8k_dir), seed=0)
    # 8 windows of 64 tokens need a few problems: only a small part of GSM8K train is tokenized, not all of it.
    assert 0 < counting.texts <= len(load_gsm8k("train", str(gsm8k_dir))) // 10
    b = calibration_tokens(tiny_tokenizer, n_samples=8, seqlen=64, source=str(gsm8k_dir), seed=0)
    c = calibration_tokens(tiny_tokenizer, n_samples=8, seqlen=64, source=str(gsm8k_dir), seed=1)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len({tuple(row.tolist()) for row in a}) == 8  # distinct windows, not one repeated
    assert int(a.max()) < len(tiny_tokenizer)


def test_gsm8k_windows_are_questions_and_solutions(tiny_tokenizer, gsm8k_dir):
    tokens = calibration_tokens(tiny_tokenizer, n_samples=16, seqlen=256, source=str(gsm8k_dir), seed=0)
    eos = tiny_tokenizer.eos_token_id
    assert (tokens == eos).any()  # texts are joined with eos separators
    text = tiny_tokenizer.decode(tokens.flatten(), skip_special_tokens=True)
    assert "####" in text and "<<" not in text  # solutions are in, calculator annotations are not


def test_text_file(tiny_tokenizer, tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("Größe und Maß. " * 50, encoding="utf-8")
    tokens = calibration_tokens(tiny_tokenizer, n_samples=4, seqlen=32, text_file=str(path), seed=3)
    assert tokens.shape == (4, 32)
    stream = tiny_tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    for row in tokens.tolist():  # every window is a contiguous slice of the file's tokens
        assert any(stream[i:i + 32] == row for i in range(len(stream) - 31))
    assert torch.equal(tokens, calibration_tokens(tiny_tokenizer, 4, 32, text_file=str(path), seed=3))


def test_too_short_stream_says_how_many_tokens(tiny_tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("0123456789", encoding="utf-8")  # 10 byte tokens
    with pytest.raises(ValueError, match=r"only 10 tokens.*calib-seqlen"):
        calibration_tokens(tiny_tokenizer, n_samples=2, seqlen=10, text_file=str(path))
    assert calibration_tokens(tiny_tokenizer, n_samples=2, seqlen=9, text_file=str(path)).shape == (2, 9)


def test_bad_arguments(tiny_tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="calib"):
        calibration_tokens(tiny_tokenizer, 2, 8, text_file=str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="positive"):
        calibration_tokens(tiny_tokenizer, 0, 8, text_file=str(tmp_path / "missing.txt"))


def test_calculator_annotations_kept_only_on_request(tiny_tokenizer, gsm8k_dir):
    kept = calibration_tokens(tiny_tokenizer, n_samples=16, seqlen=256, source=str(gsm8k_dir), seed=0,
                              keep_calculator=True)
    assert "<<" in tiny_tokenizer.decode(kept.flatten(), skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------- untrusted inputs

@pytest.mark.parametrize("content,message", [(b"", "is empty"), (b" \n\t\n", "holds only white space")])
def test_a_text_file_without_text_is_refused_before_tokenizing(tiny_tokenizer, tmp_path, content, message):
    from gptqlora.errors import UsageError

    path = tmp_path / "calib.txt"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=f"calibration text file '{path}' {message}: give a UTF-8 text"):
        calibration_tokens(tiny_tokenizer, n_samples=2, seqlen=1, text_file=str(path))


def test_a_text_file_that_is_not_utf8_names_the_byte(tiny_tokenizer, tmp_path):
    from gptqlora.errors import UsageError

    path = tmp_path / "calib.txt"
    path.write_bytes("Größe\n".encode() + "und Maß".encode("latin-1"))
    with pytest.raises(UsageError, match=f"{path}: byte 0xdf at offset 14 \\(line 2\\) is not UTF-8"):
        calibration_tokens(tiny_tokenizer, n_samples=2, seqlen=4, text_file=str(path))
    path.write_bytes(b"\xef\xbb\xbf" + "Größe und Maß. ".encode() * 8)  # a byte-order mark is not text
    with_bom = calibration_tokens(tiny_tokenizer, n_samples=4, seqlen=8, text_file=str(path), seed=1)
    path.write_bytes("Größe und Maß. ".encode() * 8)
    assert torch.equal(with_bom, calibration_tokens(tiny_tokenizer, n_samples=4, seqlen=8, text_file=str(path), seed=1))


def test_too_short_is_a_usage_error_that_says_what_to_lower(tiny_tokenizer, tmp_path):
    from gptqlora.errors import UsageError

    path = tmp_path / "short.txt"
    path.write_text("0123456789", encoding="utf-8")
    with pytest.raises(UsageError, match=r"gives only 10 tokens, fewer than the 17 that one window of --calib-seqlen "
                                         r"16 needs: lower --calib-seqlen to at most 9"):
        calibration_tokens(tiny_tokenizer, n_samples=2, seqlen=16, text_file=str(path))


def test_the_early_length_check_refuses_what_calibration_refuses_tokenizing_only_short_texts(tiny_tokenizer, tmp_path):
    from gptqlora.config import CalibConfig
    from gptqlora.data.calibration import check_calibration_length, read_calibration
    from gptqlora.data.gsm8k import MAX_TOKEN_CHARS
    from gptqlora.errors import UsageError

    path = tmp_path / "calib.txt"
    for n_chars, seqlen in ((16, 16), (17, 16), (5, 4)):  # byte tokens: as many tokens as characters
        path.write_text("x" * n_chars, encoding="utf-8")
        calib = CalibConfig(calib_samples=2, calib_seqlen=seqlen, calib_text=str(path))
        source = read_calibration(calib, "unused")
        if n_chars < seqlen + 1:
            with pytest.raises(UsageError, match=f"gives only {n_chars} tokens"):
                check_calibration_length(tiny_tokenizer, source, seqlen)
            with pytest.raises(UsageError, match=f"gives only {n_chars} tokens"):
                calibration_tokens(tiny_tokenizer, 2, seqlen, text_file=str(path))
        else:
            check_calibration_length(tiny_tokenizer, source, seqlen)
            assert calibration_tokens(tiny_tokenizer, 2, seqlen, text_file=str(path)).shape == (2, seqlen)

    def no_tokenizer(*args, **kwargs):
        raise AssertionError("tokenized a text long enough to need no count")

    path.write_text("y" * (17 * MAX_TOKEN_CHARS), encoding="utf-8")
    calib = CalibConfig(calib_samples=2, calib_seqlen=16, calib_text=str(path))
    check_calibration_length(no_tokenizer, read_calibration(calib, "unused"), 16)


def _tiny_model(tmp_path, capsys):
    from conftest import make_tiny_llama, make_tiny_tokenizer

    model = tmp_path / "model"
    make_tiny_llama(num_layers=1).save_pretrained(model)
    make_tiny_tokenizer(chat_template=False).save_pretrained(model)
    capsys.readouterr()  # the save's progress bar
    return model


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if a command loads a model's weights (whole, or streamed block by block)."""
    import gptqlora.models
    import gptqlora.quant.streamed

    monkeypatch.setattr(gptqlora.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.setattr(gptqlora.quant.streamed, "quantize_streamed", lambda *a, **k: pytest.fail("read weights"))


BAD_TEXTS = {"empty": (b"", "is empty"), "blank": (b" \n\t\n", "holds only white space"),
             "short": (b"0123456789", "gives only 10 tokens, fewer than the 17 that one window of --calib-seqlen 16 "
                                      "needs: lower --calib-seqlen to at most 9"),
             "latin-1": (b"good text\n caf\xe9 ", "byte 0xe9 at offset 14 (line 2) is not UTF-8")}


@pytest.mark.parametrize("case", list(BAD_TEXTS))
def test_cli_quantize_refuses_a_bad_calibration_text_in_one_line_before_loading(tmp_path, gsm8k_dir, capsys,
                                                                                no_model_loads, case):
    from conftest import error_of

    from gptqlora import cli

    content, message = BAD_TEXTS[case]
    model, calib, out = _tiny_model(tmp_path, capsys), tmp_path / "calib.txt", tmp_path / "q"
    calib.write_bytes(content)
    assert cli.main(["quantize", "--model", str(model), "--data", str(gsm8k_dir), "--out", str(out), "--group-size",
                     "32", "--calib-samples", "2", "--calib-seqlen", "16", "--calib-text", str(calib)]) == 2
    line = error_of(capsys)
    assert str(calib) in line and message in line
    assert not out.exists()


@pytest.mark.parametrize("case", list(BAD_TEXTS))
def test_cli_finetune_refuses_a_bad_calibration_text_before_clearing_its_output(tmp_path, gsm8k_dir, capsys,
                                                                               no_model_loads, case):
    from conftest import error_of

    from gptqlora import cli

    content, message = BAD_TEXTS[case]
    model, calib, out = _tiny_model(tmp_path, capsys), tmp_path / "calib.txt", tmp_path / "run"
    calib.write_bytes(content)
    out.mkdir()
    (out / "metrics.jsonl").write_text("an earlier run's history\n")
    assert cli.main(["finetune", "--model", str(model), "--data", str(gsm8k_dir), "--out", str(out), "--overwrite",
                     "--calib-samples", "2", "--calib-seqlen", "16", "--calib-text", str(calib)]) == 2
    assert message in error_of(capsys)
    assert [p.name for p in out.iterdir()] == ["metrics.jsonl"]  # --overwrite cleared nothing
    assert (out / "metrics.jsonl").read_text() == "an earlier run's history\n"
