"""The answer-token loss: matches a manual computation, ignores prompt and padding, token-weighted; the training
NLL is the evaluation's; a world of one's shard is the whole batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gptqlora.distributed import World
from gptqlora.loss import answer_token_loss, label_count, label_nll, label_nll_sum, rank_shard


def make_batch(seqs: list[list[int]], prompt_lens: list[int], pad_id: int = 258) -> dict[str, torch.Tensor]:
    """Right-padded batch with labels -100 on the prompt and the padding."""
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    labels = torch.full((len(seqs), T), -100)
    for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
        input_ids[i, :len(s)] = torch.tensor(s)
        attention_mask[i, :len(s)] = 1
        labels[i, p:len(s)] = torch.tensor(s[p:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def manual_nll(model, seq: list[int], prompt_len: int) -> tuple[float, int]:
    """Sum of -log p(token_t | tokens_<t) over the answer tokens of one unpadded sequence."""
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq])).logits[0].double(), -1)  # [T, V]
    return -sum(logp[t - 1, seq[t]].item() for t in range(prompt_len, len(seq))), len(seq) - prompt_len


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (12, 7, 20, 9)]
    prompt_lens = [5, 3, 15, 2]
    return seqs, prompt_lens


def test_matches_manual_token_weighted_mean(tiny_llama, data):
    seqs, prompt_lens = data
    batches = [make_batch(seqs[:2], prompt_lens[:2]), make_batch(seqs[2:], prompt_lens[2:])]
    out = answer_token_loss(tiny_llama, batches)
    parts = [manual_nll(tiny_llama, s, p) for s, p in zip(seqs, prompt_lens)]
    total, n = sum(p[0] for p in parts), sum(p[1] for p in parts)
    assert out["tokens"] == n == 7 + 4 + 5 + 7
    assert out["loss"] == pytest.approx(total / n, rel=1e-5)
    assert out["perplexity"] == pytest.approx(math.exp(total / n), rel=1e-5)
    # Token-weighted: not the mean of the two batch means (which differ here).
    batch_means = [answer_token_loss(tiny_llama, [b])["loss"] for b in batches]
    assert out["loss"] != pytest.approx(sum(batch_means) / 2, rel=1e-6)
    # Batching does not change the result.
    one_by_one = [make_batch([s], [p]) for s, p in zip(seqs, prompt_lens)]
    assert answer_token_loss(tiny_llama, one_by_one)["loss"] == pytest.approx(out["loss"], rel=1e-5)


def test_prompt_and_padding_do_not_count(tiny_llama, data):
    seqs, prompt_lens = data
    base = answer_token_loss(tiny_llama, [make_batch(seqs, prompt_lens)])
    full = answer_token_loss(tiny_llama, [make_batch(seqs, [1] * len(seqs))])  # prompt labelled too
    assert full["tokens"] == sum(len(s) - 1 for s in seqs) and full["loss"] != pytest.approx(base["loss"])
    longer_prompts = answer_token_loss(tiny_llama, [make_batch(seqs, [p + 1 for p in prompt_lens])])
    assert longer_prompts["tokens"] == base["tokens"] - len(seqs)
    # A prompt-only row of 30 tokens pads every other row by 10+ more: same tokens, same loss.
    padded = make_batch(seqs + [list(range(30))], prompt_lens + [30])
    assert padded["input_ids"].shape[1] == 30
    out = answer_token_loss(tiny_llama, [padded])
    assert out["tokens"] == base["tokens"] and out["loss"] == pytest.approx(base["loss"], rel=1e-5)


def test_label_nll_sum_matches_cross_entropy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 6, 11, generator=g).bfloat16()
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[:, :2] = -100
    labels[2, 4:] = -100
    total, n = label_nll_sum(logits, labels, chunk_rows=2)  # chunks of 2 rows: several cross-entropy calls
    ref = F.cross_entropy(logits[:, :-1].float().reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="sum")
    assert n == int((labels[:, 1:] != -100).sum()) == 3 * 4 - 2
    assert total == pytest.approx(ref.item(), rel=1e-6)


def test_restores_mode_and_rejects_no_labels(tiny_llama, data):
    seqs, _ = data
    tiny_llama.train()
    answer_token_loss(tiny_llama, [make_batch(seqs[:1], [3])])
    assert tiny_llama.training
    with pytest.raises(ValueError, match="no labelled tokens"):
        answer_token_loss(tiny_llama, [make_batch(seqs[:2], [len(s) for s in seqs[:2]])])


def test_the_training_nll_is_the_evaluations(tiny_llama, data):
    seqs, prompt_lens = data
    batch = make_batch(seqs, prompt_lens)
    with torch.no_grad():
        train_nll = label_nll(tiny_llama.eval(), batch).item()  # summed; differentiable when grads are on
    out = answer_token_loss(tiny_llama, [batch])
    assert out["tokens"] == label_count(batch) == 7 + 4 + 5 + 7
    assert out["loss"] == train_nll / out["tokens"]  # the same logits, rows and sum, to the bit


def test_a_world_of_one_scores_every_batch_whole_and_gets_the_same_bits(tiny_llama, data):
    seqs, prompt_lens = data
    batches = [make_batch(seqs[:2], prompt_lens[:2]), make_batch(seqs[2:], prompt_lens[2:])]
    part, counts = rank_shard(batches[0], 0, 1)
    assert part is batches[0] and counts
    assert answer_token_loss(tiny_llama, batches, world=World()) == answer_token_loss(tiny_llama, batches)
    unlabelled = make_batch(seqs[:1], [len(seqs[0])])  # a prompt only
    assert rank_shard(unlabelled, 0, 1) == (unlabelled, False)
