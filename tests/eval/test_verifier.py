"""The verifier: selection rules and pass@K as pure functions, the token-level loss, the model's scoring, and a
synthetic task on which a trained verifier must rank correct above incorrect samples."""

import itertools
import math
import random

import pytest
import torch

from conftest import make_tiny_llama, make_tiny_tokenizer
from gptqlora.config import QuantConfig, VerifierTrainConfig
from gptqlora.errors import UsageError
from gptqlora.eval.scoring import majority_vote
from gptqlora.eval.verifier import (LoadedVerifier, best_of_k, pass_at_k, roc_auc, score_solutions, verifier_fields,
                                    verifier_scores, weighted_vote)
from gptqlora.lora.layer import inject_lora_layers
from gptqlora.quant.driver import quantize_model_weights
from gptqlora.quant.linear import QuantizedLinear
from gptqlora.verifier.model import VerifierModel, encode_solution, pad_batch
from gptqlora.verifier.train import class_weights, split_questions, train_verifier, validate, value_loss


# ---------------------------------------------------------------------------------------------- selection rules

def test_best_of_k_takes_the_top_scored_sample_with_an_answer():
    assert best_of_k([1.0, 2.0, 3.0], [0.1, 0.9, 0.5]) == 2.0
    assert best_of_k([None, 2.0], [0.99, 0.1]) == 2.0  # a sample without an answer is never chosen
    assert best_of_k([5.0, 6.0], [0.5, 0.5]) == 5.0  # ties: the earlier sample
    assert best_of_k([None, float("nan")], [0.3, 0.4]) is None


def test_weighted_vote_sums_scores_per_answer():
    # 3 wins by sum (0.3 + 0.3 + 0.3 = 0.9 > 0.8) though 7 has the single best sample; "3" and "3.0" agree.
    assert weighted_vote([3.0, 7.0, 3.0, 3.00001], [0.3, 0.8, 0.3, 0.3]) == 3.0
    assert weighted_vote([3.0, 7.0, 7.0], [0.9, 0.2, 0.2]) == 3.0
    assert weighted_vote([None, None], [1.0, 1.0]) is None


def test_weighted_vote_with_equal_scores_is_majority_vote():
    rng = random.Random(0)
    for _ in range(300):
        answers = [rng.choice([None, 1.0, 2.0, 3.0, 4.0]) for _ in range(rng.randint(1, 8))]
        assert weighted_vote(answers, [0.5] * len(answers)) == majority_vote(answers)


def test_pass_at_k_is_the_unbiased_estimator():
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0 and pass_at_k(4, 4, 1) == 1.0
    # Against enumeration: the fraction of k-subsets of n samples (c correct) holding a correct one.
    for n, c, k in [(5, 2, 2), (6, 1, 3), (7, 3, 1), (8, 0, 5)]:
        samples = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(samples, k))
        assert math.isclose(pass_at_k(n, c, k), sum(any(s) for s in subsets) / len(subsets))
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 2)


def test_best_of_k_with_an_oracle_verifier_equals_pass_at_k():
    rng = random.Random(1)
    for _ in range(200):
        gold = 7.0
        answers = [rng.choice([None, 7.0, 8.0, 9.0]) for _ in range(rng.randint(1, 6))]
        oracle = [1.0 if a == gold else 0.0 for a in answers]  # the verifier that knows the gold answer
        correct = sum(a == gold for a in answers)
        fields = verifier_fields(answers, oracle, gold)
        assert fields["best_of_k_correct"] == fields["pass_at_k"] == (pass_at_k(len(answers), correct,
                                                                                 len(answers)) == 1.0)


def test_roc_auc_against_counting_pairs():
    rng = random.Random(2)
    for _ in range(50):
        scores = [rng.choice([0.1, 0.2, 0.5, 0.7, 0.9]) for _ in range(12)]
        labels = [rng.random() < 0.4 for _ in range(12)]
        if all(labels) or not any(labels):
            continue
        pairs = [(p, q) for p, y in zip(scores, labels) if y for q, z in zip(scores, labels) if not z]
        expected = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in pairs) / len(pairs)
        assert math.isclose(roc_auc(scores, labels), expected)
    assert roc_auc([0.9, 0.1], [True, False]) == 1.0 and roc_auc([0.1, 0.9], [True, False]) == 0.0
    with pytest.raises(ValueError):
        roc_auc([0.1, 0.2], [True, True])


def test_verifier_scores_give_each_rule_a_ci():
    records = [{"index": i, **verifier_fields(a, s, 1.0)} for i, (a, s) in
               enumerate([([1.0, 2.0], [0.9, 0.1]), ([2.0, 1.0], [0.9, 0.1]), ([2.0, 2.0], [0.5, 0.5])])]
    blocks = verifier_scores(records, k=2, verifier={"path": "v"})
    assert blocks["verifier_best_of_k"]["correct"] == 1 and blocks["pass_at_k"]["correct"] == 2
    assert blocks["verifier_weighted_vote"]["k"] == 2 and blocks["verifier"] == {"path": "v"}
    for name in ("verifier_best_of_k", "verifier_weighted_vote", "pass_at_k"):
        lo, hi = blocks[name]["ci95"]
        assert 0 <= lo <= blocks[name]["accuracy"] <= hi <= 1
    with pytest.raises(UsageError, match="no verifier scores"):
        verifier_scores([{"index": 0, "correct": True}], k=2)


# ---------------------------------------------------------------------------------------------- loss and model

def test_value_loss_reads_only_solution_tokens_and_weighs_by_class():
    values = torch.tensor([[5.0, -3.0, 2.0], [0.0, -1.0, -4.0]])
    mask = torch.tensor([[False, True, True], [False, False, True]])
    labels, weights = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 3.0])
    loss = value_loss(values, mask, labels, weights)
    changed = values.clone()
    changed[:, 0] = -50.0  # prompt positions: no effect
    assert torch.equal(value_loss(changed, mask, labels, weights), loss)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    first = (bce(torch.tensor(-3.0), torch.tensor(1.0)) + bce(torch.tensor(2.0), torch.tensor(1.0))) / 2
    second = bce(torch.tensor(-4.0), torch.tensor(0.0))
    assert torch.allclose(loss, (first + 3 * second) / 4)


def test_class_weights_balance_and_refuse_one_class():
    w_neg, w_pos = class_weights([True] + [False] * 9, balance=True)
    assert math.isclose(w_pos * 1, w_neg * 9)  # each class carries half the total weight
    assert class_weights([True, False, False], balance=False) == (1.0, 1.0)
    with pytest.raises(UsageError, match="all 3 labelled samples are incorrect"):
        class_weights([False] * 3, balance=True)


def test_encode_keeps_the_solution_end_and_marks_its_tokens():
    tok = make_tiny_tokenizer()
    ids, start = encode_solution(tok, "What is 2+2?", " It is 4.\n#### 4", "plain", max_length=512)
    assert tok.decode(ids[start:]) == " It is 4.\n#### 4"
    cut, cut_start = encode_solution(tok, "What is 2+2?", " It is 4.\n#### 4", "plain", max_length=8)
    assert cut == ids[-8:] and cut_start == 0  # the oldest tokens go; the answer stays
    empty, empty_start = encode_solution(tok, "What is 2+2?", "", "plain", max_length=512)
    assert empty_start == len(empty) - 1  # scored at the prompt's last token


def tiny_verifier(quantized: bool = True, seed: int = 0) -> VerifierModel:
    lm = make_tiny_llama(seed=seed)
    if quantized:
        quantize_model_weights(lm, None, QuantConfig(method="rtn", targets="all", group_size=32), progress=False)
        assert any(isinstance(m, QuantizedLinear) for m in lm.modules())
    torch.manual_seed(seed)
    inject_lora_layers(lm, "attn", r=8, alpha=16, dropout=0.0)
    return VerifierModel(lm)


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


# ---------------------------------------------------------------------------------------------- learnability

def synthetic_items(n_questions: int, k: int, seed: int) -> list[tuple[str, str, bool]]:
    """Solutions whose correctness is one marker character in their middle ('+' correct, '-' not), with random
    letters around it and the same final line: the verifier must carry the marker to the last token."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnop"
    items = []
    for q in range(n_questions):
        question = f"Q{rng.randint(0, 999)}: " + "".join(rng.choice(letters) for _ in range(4))
        for _ in range(k):
            correct = rng.random() < 0.3  # correct samples are the rare class
            body = "".join(rng.choice(letters) for _ in range(rng.randint(2, 6)))
            tail = "".join(rng.choice(letters) for _ in range(rng.randint(2, 6)))
            items.append((question, f" {body}{'+' if correct else '-'}{tail}\n#### 5", correct))
    return items


def test_trained_verifier_ranks_correct_above_incorrect_on_held_out_samples():
    torch.manual_seed(0)
    tok = make_tiny_tokenizer()
    model = tiny_verifier(quantized=True)
    train, held = synthetic_items(48, 4, seed=0), synthetic_items(16, 4, seed=1)
    config = VerifierTrainConfig(max_steps=120, batch_size=16, lr=3e-3, warmup_steps=5, max_length=64, bf16=False)
    before = validate(model, tok, held, "plain", 64)
    assert before["auc"] == 0.5  # every score ties at 0.5
    summary = train_verifier(model, tok, train, config, style="plain", seed=0)
    after = validate(model, tok, held, "plain", 64)
    assert after["auc"] > 0.9, (after, summary["history"][-1])
    # Only LoRA and the head moved: the quantized base is frozen.
    assert all(not p.requires_grad for n, p in model.lm.named_parameters() if "lora_" not in n)


def test_split_questions_keeps_a_questions_samples_together():
    records = [{"index": i, "question": f"q{i}", "samples": ["a", "b"], "sample_correct": [True, False]}
               for i in range(10)]
    train, val = split_questions(records, 3, seed=0)
    assert len(val) == 3 and len(train) == 7
    assert {r["question"] for r in train}.isdisjoint({r["question"] for r in val})
    assert split_questions(records, 3, seed=0) == (train, val)
    with pytest.raises(UsageError):
        split_questions(records, 10, seed=0)


def test_the_lm_loss_joins_on_correct_solutions_only():
    tok = make_tiny_tokenizer()
    items = synthetic_items(4, 4, seed=3)
    config = VerifierTrainConfig(max_steps=2, batch_size=16, lr=1e-3, warmup_steps=0, max_length=64, bf16=False,
                                 lm_loss_weight=0.5)
    history = train_verifier(tiny_verifier(quantized=False), tok, items, config, style="plain")["history"]
    assert all(r["lm_loss"] > 0 and math.isclose(r["loss"], r["value_loss"] + 0.5 * r["lm_loss"], rel_tol=1e-5)
               for r in history)
    wrong_only = [(q, s, False) for q, s, _ in items[:3]] + [items[3][:2] + (True,)]
    from gptqlora.verifier.train import lm_loss

    model = tiny_verifier(quantized=False)
    batch = pad_batch([encode_solution(tok, q, s, "plain", 64) for q, s, _ in wrong_only[:3]], 258)
    _, hidden = model(batch["input_ids"], batch["attention_mask"])
    assert lm_loss(model, hidden, batch["input_ids"], batch["solution_mask"], torch.zeros(3)) == 0
