"""Training a verifier: the token-level value loss, class weights, the LM loss on correct solutions only, the split
by question, and a synthetic task on which a trained verifier must rank correct above incorrect samples."""

import math
import random

import pytest
import torch
from conftest import make_tiny_tokenizer

from gptqlora.config import VerifierTrainConfig
from gptqlora.errors import NonFiniteLossError, UsageError
from gptqlora.verifier.model import encode_solution, pad_batch
from gptqlora.verifier.train import class_weights, split_questions, train_verifier, validate, value_loss

from verifier.tiny import tiny_verifier


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


def test_a_non_finite_step_raises_the_trainers_error_and_is_not_applied():
    tok = make_tiny_tokenizer()
    model = tiny_verifier(quantized=False)
    model.lm.model.norm.register_forward_hook(lambda m, args, out: out * float("nan"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = VerifierTrainConfig(max_steps=2, batch_size=8, lr=1e-3, warmup_steps=0, max_length=64, bf16=False)
    with pytest.raises(NonFiniteLossError, match="at step 1.*nothing was written: train again with a lower --lr"):
        train_verifier(model, tok, synthetic_items(4, 4, seed=3), config, style="plain")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
