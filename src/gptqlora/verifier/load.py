"""Loading a trained verifier (``gptqlora train-verifier``) onto its base, and scoring solutions with it.

A verifier's score of a solution is ``sigmoid(value)`` at the solution's last token (:mod:`gptqlora.verifier.model`).
:func:`load_verifier` checks the verifier's files and its base before any weights load; :func:`score_solutions`
and :func:`score_samples` score solutions; :class:`VerifierRerank` is a loaded verifier in the form the evaluator
takes (``rerank(questions, samples) -> scores``, see :mod:`gptqlora.eval.rerank`), so that evaluation never imports
the verifier. The selection rules over the scores are :mod:`gptqlora.eval.scoring`'s.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gptqlora.data.gsm8k import pad_token_id
from gptqlora.errors import UsageError
from gptqlora.lora.adapter import load_adapter
from gptqlora.models import load_model
from gptqlora.provenance import base_differences, base_record, describe_base
from gptqlora.quant.linear import check_quantized, set_kernel
from gptqlora.verifier.model import VerifierModel, encode_solution, load_head, pad_batch, read_verifier_config

log = logging.getLogger(__name__)


@dataclass
class LoadedVerifier:
    """A verifier ready to score: the model (eval mode), its tokenizer, and how it encodes solutions."""
    model: VerifierModel
    tokenizer: Any
    style: str
    max_length: int
    record: dict[str, Any]  # for summaries: {"path", "base"}


# ---------------------------------------------------------------------------------------------- loading

def check_verifier_base(verifier_dir: str | os.PathLike, saved: dict[str, Any],
                        scored: dict[str, Any] | None) -> str | None:
    """Whether a verifier trained over ``saved`` reranks the samples of a model over that base: None when it does
    (or ``scored`` is unknown), else a message naming both bases and the fields that differ.

    Its scores are still computed on its own base, so nothing breaks; but it learned to judge the solutions of its
    base's generator, and another base's solutions are not what it was trained on.
    """
    if scored is None or not (fields := base_differences(saved, scored)):
        return None
    return (f"the verifier {verifier_dir} was trained over {describe_base(saved)} but reranks the samples of a model "
            f"over {describe_base(scored)} (they differ in {', '.join(fields)}); its scores may not fit these "
            "solutions: rerank with a verifier trained over the evaluated base unless this is intended")


def load_verifier(verifier_dir: str | os.PathLike, *, base_dir: str | os.PathLike | None = None,
                  dtype: str = "auto", device: str = "auto", kernel: str = "auto",
                  scored_base: dict[str, Any] | None = None) -> LoadedVerifier:
    """Load a verifier onto its base: the recorded base path, or ``base_dir`` (a copy: its weights must match).

    Args:
        scored_base: the base record of the model whose samples the verifier will rerank; when the verifier was
            trained over another base, a warning names both (``logging`` and ``warnings.warn``, as
            ``load_adapter`` warns), before any weights load. Not an error: it may be intended.
    Raises:
        InputNotFoundError, UsageError: see ``read_verifier_config``; a base that is not the one the verifier was
            trained on (the fingerprints or quantization differ: its values would mean nothing there).
    """
    config = read_verifier_config(verifier_dir)
    saved = config["base"]
    if mismatch := check_verifier_base(verifier_dir, saved, scored_base):
        log.warning(mismatch)
        warnings.warn(mismatch, stacklevel=2)
    base_path = Path(base_dir if base_dir is not None else saved["path"]).expanduser()
    if not base_path.is_dir():
        raise UsageError(f"the verifier's base {base_path} is not a directory: it was trained on "
                         f"{describe_base(saved)}; pass the base's new location")
    current = base_record(base_path)
    if fields := base_differences(saved, current):
        raise UsageError(f"the verifier {verifier_dir} was trained on {describe_base(saved)}, not on "
                         f"{describe_base(current)} (they differ in {', '.join(fields)}): load it onto its own base")
    lm, tokenizer = load_model(str(base_path), dtype, device, inference=True)
    if saved.get("quantized"):
        check_quantized(lm)
        set_kernel(lm, kernel)
    load_adapter(lm, verifier_dir, base=current)
    head = load_head(verifier_dir, config["hidden_size"], next(lm.parameters()).device)
    model = VerifierModel(lm, head).eval()
    return LoadedVerifier(model, tokenizer, config["style"], int(config["max_length"]),
                          {"path": str(Path(verifier_dir).resolve()), "base": saved})


# ---------------------------------------------------------------------------------------------- scoring

@torch.no_grad()
def score_solutions(verifier: LoadedVerifier, questions: Sequence[str], solutions: Sequence[str],
                    batch_size: int = 16) -> list[float]:
    """The verifier's probability that each solution is correct: ``sigmoid(value at its last token)``.

    Args:
        questions, solutions: one question per solution (repeat a question for each of its samples).
        batch_size: solutions per forward pass (right-padded: padding never changes a row's values).
    Returns:
        One score in (0, 1) per solution, in order.
    Raises:
        ValueError: when ``questions`` and ``solutions`` differ in length.
    """
    if len(questions) != len(solutions):
        raise ValueError(f"{len(questions)} questions for {len(solutions)} solutions: give one question per solution")
    tok = verifier.tokenizer
    pad_id = pad_token_id(tok)
    device = next(verifier.model.parameters()).device
    scores: list[float] = []
    was_training = verifier.model.training
    verifier.model.eval()
    try:
        for start in range(0, len(solutions), batch_size):
            encoded = [encode_solution(tok, q, s, verifier.style, verifier.max_length)
                       for q, s in zip(questions[start:start + batch_size], solutions[start:start + batch_size])]
            batch = pad_batch(encoded, pad_id)
            values, _ = verifier.model(batch["input_ids"].to(device), batch["attention_mask"].to(device))  # [B, T]
            last = values.gather(1, batch["last"].to(device)[:, None]).squeeze(1)  # [B]
            scores += torch.sigmoid(last).tolist()
    finally:
        verifier.model.train(was_training)
    return scores


def score_samples(verifier: LoadedVerifier, questions: Sequence[str], samples: Sequence[Sequence[str]],
                  batch_size: int = 16) -> list[list[float]]:
    """:func:`score_solutions` for K samples per question (``generate_samples``'s output): one list per question.

    Raises:
        ValueError: when ``questions`` and ``samples`` differ in length.
    """
    if len(questions) != len(samples):
        raise ValueError(f"{len(questions)} questions for {len(samples)} lists of samples")
    flat = score_solutions(verifier, [q for q, per_q in zip(questions, samples) for _ in per_q],
                           [s for per_q in samples for s in per_q], batch_size)
    out, at = [], 0
    for per_q in samples:
        out.append(flat[at:at + len(per_q)])
        at += len(per_q)
    return out


@dataclass(frozen=True)
class VerifierRerank:
    """A loaded verifier as the evaluator's reranker (``gptqlora.eval.rerank.Rerank``):
    ``rerank(questions, samples)`` is :func:`score_samples` with ``batch_size`` solutions per forward pass.

    Pass the evaluation's batch size, so that the verifier scores in the batches an evaluation always used.
    """
    verifier: LoadedVerifier
    batch_size: int

    @property
    def record(self) -> dict[str, Any]:
        """The verifier's path and base, for the summary and the provenance."""
        return self.verifier.record

    def __call__(self, questions: Sequence[str], samples: Sequence[Sequence[str]]) -> list[list[float]]:
        """One list of scores per question, one per sample."""
        return score_samples(self.verifier, questions, samples, self.batch_size)
