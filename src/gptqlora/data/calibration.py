"""Calibration data for GPTQ: random fixed-length windows from one token stream.

As in the GPTQ paper (which samples C4), the texts are tokenized, joined with eos separators into one stream,
and ``n_samples`` windows of ``seqlen`` tokens are cut at random offsets. By default the texts are GSM8K train
problems with their solutions, the same distribution the adapter is then fine-tuned on, without the solutions'
``<<48/2=24>>`` calculator annotations: the model never sees them in fine-tuning or evaluation, and calibrating on
them measured worse (issue 9: answer-token perplexity over float +0.56 with them, +0.39 without, same solver and
seed).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gptqlora.data.corpora import drop_contaminated, load_corpus
from gptqlora.data.gsm8k import MAX_TOKEN_CHARS, load_gsm8k, strip_calculator
from gptqlora.data.jsonl import read_text
from gptqlora.errors import InputNotFoundError, UsageError

if TYPE_CHECKING:
    from gptqlora.config import CalibConfig

# Texts tokenized per call while building the GSM8K stream: large enough for fast batch tokenization,
# small enough not to tokenize far past what the windows need.
_CHUNK = 512


@dataclass
class CalibrationSource:
    """What calibration draws its windows from, read and checked without a tokenizer: one text, or entries."""

    origin: str  # how an error names it
    text: str | None = None  # a text file's contents, tokenized as one stream
    entries: list[dict] | None = None  # question/answer entries, each ``question\nsolution`` + eos in the stream
    described: dict = field(default_factory=dict)  # the source, as a command's report records it


def read_calibration(calib: CalibConfig, data: str) -> CalibrationSource:
    """Read the calibration source a command's options name; commands call it before any model loads, so that a
    bad source is refused before any work.

    Args:
        calib: the source: ``calib_text``, ``calib_data`` (a corpus read as finetune reads --data, less any GSM8K
            test question), or GSM8K train from ``data``.
        data: the GSM8K directory or hub id (the default source, and the test questions kept out of a corpus).
    Raises:
        UsageError: a text file that is missing, not UTF-8 or empty; a corpus whose every usable row is a GSM8K
            test question; see ``load_corpus`` and ``load_gsm8k``.
    """
    described = {"source": calib.calib_text or calib.calib_data or data}
    if calib.calib_text is not None:
        return CalibrationSource(_text_origin(calib.calib_text), text=read_calibration_text(calib.calib_text),
                                 described=described)
    if calib.calib_data is None:
        return CalibrationSource("GSM8K train", entries=load_gsm8k("train", data), described=described)
    corpus = load_corpus(calib.calib_data)
    entries, dropped = drop_contaminated(corpus.entries, [e["question"] for e in load_gsm8k("test", data)])
    if not entries:
        raise UsageError(f"--calib-data {calib.calib_data}: every one of its {len(corpus.entries)} usable rows was "
                         f"dropped as a GSM8K test question (of {data}); nothing is left to calibrate on: give a "
                         "corpus of other questions, or leave --calib-data out to calibrate on GSM8K train")
    return CalibrationSource("the calibration corpus", entries=entries,
                             described=described | {"formats": list(corpus.formats), "dropped_test_questions": dropped})


def read_calibration_text(text_file: str) -> str:
    """The contents of a ``--calib-text`` file.

    Raises:
        InputNotFoundError: no such file.
        UsageError: a byte that is not UTF-8 (naming its offset), or no text but white space.
    """
    path = Path(text_file)
    if not path.is_file():
        raise InputNotFoundError(f"calibration text file {text_file!r} does not exist: give a UTF-8 text file, "
                                 "or leave --calib-text out to calibrate on GSM8K train")
    text = read_text(path)
    if not text.strip():
        raise UsageError(f"calibration text file {text_file!r} {'holds only white space' if text else 'is empty'}: "
                         "give a UTF-8 text of at least --calib-seqlen + 1 tokens, or leave --calib-text out to "
                         "calibrate on GSM8K train")
    return text


def check_calibration_length(tokenizer, source: CalibrationSource, seqlen: int) -> None:
    """Refuse a source with fewer tokens than one window needs, tokenizing only a source too short to be sure of:
    one of at least ``(seqlen + 1) x MAX_TOKEN_CHARS`` characters has enough tokens. A command calls it with the
    tokenizer alone, before the model's weights load; ``calibration_for`` refuses the same sources later.

    Raises:
        UsageError: fewer than ``seqlen + 1`` tokens, saying how many there are and which flag to lower.
    """
    texts, chars = [], 0
    for text in _texts(source):
        texts.append(text)
        chars += len(text)
        if chars >= (seqlen + 1) * MAX_TOKEN_CHARS:
            return
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    n = sum(len(x) for x in ids) + (len(ids) if source.entries is not None else 0)  # and an eos after each entry
    if n < seqlen + 1:
        raise _too_short(source.origin, n, seqlen)


def calibration_for(calib: CalibConfig, tokenizer, data: str, seed: int) -> tuple[torch.LongTensor, dict]:
    """The windows a command's calibration options ask for, and their description for its report.

    Args:
        calib: samples, seqlen and the source (see ``read_calibration``).
        data: the GSM8K directory or hub id (the default source, and the test questions kept out of a corpus).
    Raises:
        UsageError: see ``read_calibration`` and ``calibration_tokens``.
    """
    source = read_calibration(calib, data)
    tokens = _windows(tokenizer, source, calib.calib_samples, calib.calib_seqlen, seed)
    return tokens, source.described | {"samples": calib.calib_samples, "seqlen": calib.calib_seqlen}


def calibration_tokens(tokenizer, n_samples: int, seqlen: int, source: str | None = None,
                       text_file: str | None = None, seed: int = 0, keep_calculator: bool = False,
                       entries: Sequence[dict] | None = None) -> torch.LongTensor:
    """Draw calibration sequences.

    Args:
        tokenizer: the model's tokenizer (needs an eos token to separate texts).
        n_samples: number of sequences.
        seqlen: tokens per sequence.
        source: GSM8K source (directory or hub id, see ``load_gsm8k``); None for the default.
        text_file: a UTF-8 text file to calibrate on instead of GSM8K train.
        seed: seeds both the choice of GSM8K problems and the window offsets.
        entries: GSM8K-shaped entries (``question``, ``answer``) to calibrate on instead of GSM8K train, such as a
            corpus read by ``gptqlora.data.corpora.load_corpus``.
        keep_calculator: keep GSM8K's ``<<48/2=24>>`` calculator annotations in the solutions (by default they are
            stripped, as in the texts the adapter is fine-tuned and evaluated on).
    Returns:
        LongTensor [n_samples, seqlen]; the same for the same arguments.
    Raises:
        ValueError: for non-positive sizes.
        UsageError: a stream shorter than ``seqlen + 1`` tokens; a text file that is not UTF-8 or is empty.
        FileNotFoundError: when ``text_file`` does not exist.
    """
    if n_samples <= 0 or seqlen <= 0:
        raise ValueError(f"n_samples={n_samples} and seqlen={seqlen} must be positive")
    if text_file is not None:
        read = CalibrationSource(_text_origin(text_file), text=read_calibration_text(text_file))
    elif entries is not None:
        read = CalibrationSource("the calibration corpus", entries=list(entries))
    else:
        read = CalibrationSource("GSM8K train", entries=load_gsm8k("train", source))
    return _windows(tokenizer, read, n_samples, seqlen, seed, keep_calculator)


def _windows(tokenizer, source: CalibrationSource, n_samples: int, seqlen: int, seed: int,
             keep_calculator: bool = False) -> torch.LongTensor:
    """``n_samples`` windows of ``seqlen`` tokens at seeded random offsets of the source's token stream."""
    g = torch.Generator().manual_seed(seed)
    if source.text is not None:
        # verbose=False: a long file is one long sequence on purpose; the model only ever sees windows of it.
        stream = tokenizer(source.text, add_special_tokens=False, verbose=False)["input_ids"]
    else:
        # 2x the tokens the windows cover, so they rarely overlap; the rest of the texts is never tokenized.
        stream = _gsm8k_stream(tokenizer, source.entries, 2 * n_samples * seqlen + seqlen + 1, g, keep_calculator)
    if len(stream) < seqlen + 1:
        raise _too_short(source.origin, len(stream), seqlen)
    stream = torch.tensor(stream, dtype=torch.long)  # [L]
    starts = torch.randint(0, len(stream) - seqlen, (n_samples,), generator=g)  # [n_samples]
    return stream[starts[:, None] + torch.arange(seqlen)]  # [n_samples, seqlen]


def _text_origin(text_file: str) -> str:
    return f"calibration text file {text_file!r}"


def _too_short(origin: str, n: int, seqlen: int) -> UsageError:
    lower = f"lower --calib-seqlen to at most {n - 1}" if n > 1 else "lower --calib-seqlen"
    return UsageError(f"{origin} gives only {n} tokens, fewer than the {seqlen + 1} that one window of --calib-seqlen "
                      f"{seqlen} needs: {lower}, or calibrate on a longer text")


def _texts(source: CalibrationSource) -> Iterator[str]:
    """The source's texts as the stream holds them."""
    if source.text is not None:
        yield source.text
        return
    for e in source.entries:
        yield _entry_text(e, keep_calculator=False)


def _entry_text(entry: dict, keep_calculator: bool) -> str:
    """An entry as the stream holds it: its question, a newline, its solution."""
    answer = entry["answer"] if keep_calculator else strip_calculator(entry["answer"])
    return f"{entry['question']}\n{answer}"


def _gsm8k_stream(tokenizer, entries: list[dict], n_tokens: int, g: torch.Generator, keep_calculator: bool
                  ) -> list[int]:
    """Problems in a seeded random order, each ``question\\nsolution`` + eos, until ``n_tokens`` are reached."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token to separate calibration texts")
    order = torch.randperm(len(entries), generator=g).tolist()
    stream: list[int] = []
    for start in range(0, len(order), _CHUNK):
        texts = [_entry_text(entries[i], keep_calculator) for i in order[start:start + _CHUNK]]
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            stream += ids + [eos]
        if len(stream) >= n_tokens:
            break
    return stream
