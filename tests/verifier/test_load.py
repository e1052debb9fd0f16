"""Scoring with a loaded verifier: a fresh one scores one half, batching and padding change nothing, and the
reranker the evaluator receives is score_samples in the evaluation's batches."""

import pytest
import torch
from conftest import make_tiny_tokenizer

from gptqlora.verifier.load import LoadedVerifier, VerifierRerank, score_samples, score_solutions
from gptqlora.verifier.model import encode_solution, pad_batch

from verifier.tiny import tiny_verifier


def test_a_fresh_verifier_scores_one_half_and_padding_changes_nothing():
    tok = make_tiny_tokenizer()
    model = tiny_verifier(quantized=False)
    scorer = LoadedVerifier(model, tok, "plain", 64, {})
    questions, solutions = ["Q1", "A longer question two"], [" x #### 1", " yy\n#### 22 and more"]
    assert score_solutions(scorer, questions, solutions) == [0.5, 0.5]  # zero head: logit 0
    with torch.no_grad():
        model.head.weight.normal_()
        model.head.bias.fill_(0.3)
    batched = score_solutions(scorer, questions, solutions, batch_size=2)
    alone = [score_solutions(scorer, [q], [s])[0] for q, s in zip(questions, solutions)]
    assert batched == pytest.approx(alone, abs=1e-6)
    enc = pad_batch([encode_solution(tok, q, s, "plain", 64) for q, s in zip(questions, solutions)], 258)
    assert enc["solution_mask"].sum(1).tolist() == [len(tok(s)["input_ids"]) for s in solutions]


def test_the_reranker_is_score_samples_in_the_given_batches():
    tok = make_tiny_tokenizer()
    model = tiny_verifier(quantized=False)
    with torch.no_grad():
        model.head.weight.normal_(generator=torch.Generator().manual_seed(0))
    scorer = LoadedVerifier(model, tok, "plain", 64, {"path": "v"})
    questions, samples = ["Q1", "Q2"], [[" #### 1", " so #### 2"], [" a\n#### 3", " #### 4", " #### 5"]]
    rerank = VerifierRerank(scorer, batch_size=2)
    assert rerank.record == {"path": "v"}
    assert rerank(questions, samples) == score_samples(scorer, questions, samples, batch_size=2)
    assert [len(s) for s in rerank(questions, samples)] == [2, 3]
    with pytest.raises(ValueError, match="2 questions for 1 lists"):
        rerank(questions, samples[:1])
