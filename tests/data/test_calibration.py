"""Calibration windows: shape, determinism, sources and the too-short error."""

from __future__ import annotations

import time

import pytest
import torch

from gptqlora.data.calibration import calibration_tokens


def test_gsm8k_windows_shape_and_determinism(tiny_tokenizer, gsm8k_dir):
    start = time.perf_counter()
    a = calibration_tokens(tiny_tokenizer, n_samples=8, seqlen=64, source=str(gsm8k_dir), seed=0)
    assert time.perf_counter() - start < 10  # only a subset of GSM8K train is tokenized
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
