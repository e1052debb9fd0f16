"""Calibration data for GPTQ: random fixed-length windows from one token stream.

As in the GPTQ paper (which samples C4), the texts are tokenized, joined with eos separators into one stream,
and ``n_samples`` windows of ``seqlen`` tokens are cut at random offsets. By default the texts are GSM8K train
problems with their solutions, the same distribution the adapter is then fine-tuned on, without the solutions'
``<<48/2=24>>`` calculator annotations: the model never sees them in fine-tuning or evaluation, and calibrating on
them measured worse (issue 9: answer-token perplexity over float +0.56 with them, +0.39 without, same solver and
seed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gptqlora.data.gsm8k import load_gsm8k, strip_calculator

if TYPE_CHECKING:
    from gptqlora.config import CalibConfig

# Texts tokenized per call while building the GSM8K stream: large enough for fast batch tokenization,
# small enough not to tokenize far past what the windows need.
_CHUNK = 512


def calibration_for(calib: CalibConfig, tokenizer, data: str, seed: int) -> tuple[torch.LongTensor, dict]:
    """The windows a command's calibration options ask for, and their description for its report.

    Args:
        calib: samples, seqlen and the source: ``calib_text``, ``calib_data`` (a corpus read as finetune reads
            --data, less any GSM8K test question), or GSM8K train from ``data``.
        data: the GSM8K directory or hub id (the default source, and the test questions kept out of a corpus).
    """
    entries, described = None, {"source": calib.calib_text or calib.calib_data or data}
    if calib.calib_data is not None:
        from gptqlora.data.corpora import drop_contaminated, load_corpus

        corpus = load_corpus(calib.calib_data)
        entries, dropped = drop_contaminated(corpus.entries, [e["question"] for e in load_gsm8k("test", data)])
        described |= {"formats": list(corpus.formats), "dropped_test_questions": dropped}
    tokens = calibration_tokens(tokenizer, calib.calib_samples, calib.calib_seqlen, source=data,
                                text_file=calib.calib_text, entries=entries, seed=seed)
    return tokens, described | {"samples": calib.calib_samples, "seqlen": calib.calib_seqlen}


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
        ValueError: for non-positive sizes, or a stream shorter than ``seqlen + 1`` tokens.
        FileNotFoundError: when ``text_file`` does not exist.
    """
    if n_samples <= 0 or seqlen <= 0:
        raise ValueError(f"n_samples={n_samples} and seqlen={seqlen} must be positive")
    g = torch.Generator().manual_seed(seed)
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise FileNotFoundError(f"calibration text file {text_file!r} does not exist: give a UTF-8 text file, "
                                    "or leave --calib-text out to calibrate on GSM8K train")
        # verbose=False: a long file is one long sequence on purpose; the model only ever sees windows of it.
        stream = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False, verbose=False)["input_ids"]
        origin = f"calibration text file {text_file!r}"
    else:
        # 2x the tokens the windows cover, so they rarely overlap; the rest of the texts is never tokenized.
        texts = load_gsm8k("train", source) if entries is None else list(entries)
        stream = _gsm8k_stream(tokenizer, texts, 2 * n_samples * seqlen + seqlen + 1, g, keep_calculator)
        origin = "GSM8K train" if entries is None else "the calibration corpus"
    if len(stream) < seqlen + 1:
        raise ValueError(f"{origin} gives only {len(stream)} tokens, fewer than calib_seqlen + 1 = {seqlen + 1}: "
                         "use a smaller --calib-seqlen or a longer --calib-text")
    stream = torch.tensor(stream, dtype=torch.long)  # [L]
    starts = torch.randint(0, len(stream) - seqlen, (n_samples,), generator=g)  # [n_samples]
    return stream[starts[:, None] + torch.arange(seqlen)]  # [n_samples, seqlen]


def _gsm8k_stream(tokenizer, entries: list[dict], n_tokens: int, g: torch.Generator, keep_calculator: bool
                  ) -> list[int]:
    """Problems in a seeded random order, each ``question\\nsolution`` + eos, until ``n_tokens`` are reached."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token to separate calibration texts")
    order = torch.randperm(len(entries), generator=g).tolist()
    solution = (lambda answer: answer) if keep_calculator else strip_calculator
    stream: list[int] = []
    for start in range(0, len(order), _CHUNK):
        texts = [f"{entries[i]['question']}\n{solution(entries[i]['answer'])}" for i in order[start:start + _CHUNK]]
        for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
            stream += ids + [eos]
        if len(stream) >= n_tokens:
            break
    return stream
