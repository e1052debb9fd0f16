"""The answer-token loss: matches a manual computation, ignores prompt and padding, token-weighted; the training
NLL is the evaluation's; the head run on the label positions alone, in chunks, gives the loss and the LoRA gradients
of the full logits; a world of one's shard is the whole batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gptqlora.distributed import World
from contextlib import nullcontext

from gptqlora import loss as loss_module
from gptqlora.loss import (answer_token_loss, label_count, label_nll, linear_cross_entropy, plain_head,
                           rank_shard)


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


def full_logits_nll(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The plain formula: logits at every position from the model's forward, cross-entropy over the label positions."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # [B, T, V]
    keep = batch["labels"][:, 1:] != -100  # [B, T-1]
    return F.cross_entropy(logits[:, :-1][keep].float(), batch["labels"][:, 1:][keep], reduction="sum")


def lora_llama(seed: int = 0):
    """The tiny LLaMA with LoRA on q/k/v/o whose B is random (B = 0 would give A no gradient to compare)."""
    from conftest import make_tiny_llama
    from gptqlora.lora import inject_lora_layers

    model = make_tiny_llama(seed=seed)
    inject_lora_layers(model, "attn", r=4, alpha=8.0, dropout=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def lora_grads(model, loss_fn) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss and the LoRA gradients of the training step's mean (the summed NLL over a token count)."""
    model.zero_grad(set_to_none=True)
    nll = loss_fn()
    (nll / 23).backward()
    return nll.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("chunk_rows", [1024, 5], ids=["one-chunk", "chunks-of-5"])
def test_label_nll_and_its_lora_gradients_equal_the_full_logits_formula(data, monkeypatch, bf16, chunk_rows):
    seqs, prompt_lens = data
    # Right padding, prompts of different lengths, and a row without any label (a prompt only).
    batch = make_batch(seqs + [seqs[0][:6]], prompt_lens + [6])
    assert not (batch["labels"][-1] != -100).any() and batch["attention_mask"][1].sum() < batch["input_ids"].shape[1]
    model = lora_llama().train()
    assert plain_head(model) is model.lm_head
    monkeypatch.setattr(loss_module, "CHUNK_ROWS", chunk_rows)  # 23 label tokens: 5 chunks of 5 rows, or 1
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else nullcontext

    def ours():
        with autocast():
            return label_nll(model, batch)

    def reference():
        with autocast():
            return full_logits_nll(model, batch)

    nll, grads = lora_grads(model, ours)
    ref_nll, ref_grads = lora_grads(model, reference)
    assert len(grads) == 16 and grads.keys() == ref_grads.keys()
    rel = 2e-3 if bf16 else 1e-6  # bf16: the head's logits round to 8 bits, per row alike in both
    assert nll == pytest.approx(ref_nll, rel=rel)
    for name, g in grads.items():
        ref = ref_grads[name]
        assert ref.abs().max() > 0, name
        # bf16 rounds the logits' gradient before the head's backward, at another scale: the reference rounds it
        # divided by the token count, ours undivided (scaled after), so the two differ by about 1% of the tensor's
        # norm, each about 2% from the float32 gradient; measured as the whole tensor's error, not every entry's.
        assert (g - ref).norm() <= (3e-2 if bf16 else 1e-5) * ref.norm(), name


def test_linear_cross_entropy_in_chunks_equals_cross_entropy_and_its_gradients():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(11, 8, generator=g, requires_grad=True)  # [N, H]
    weight = torch.randn(13, 8, generator=g, requires_grad=True)  # [V, H]: a trainable head too
    targets = torch.randint(0, 13, (11,), generator=g)
    ours = linear_cross_entropy(hidden, weight, targets, chunk_rows=4)  # chunks of 4, 4 and 3 rows
    (ours * 0.5).backward()  # the backward scales the gradients made in the forward
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    (ref * 0.5).backward()
    assert ours.dtype == torch.float32 and ours.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(got[0], hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], weight.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # without gradients: the same forward, to the bit
        assert linear_cross_entropy(hidden, weight, targets, chunk_rows=4).item() == ours.item()
    frozen = linear_cross_entropy(hidden.detach().requires_grad_(), weight.detach(), targets, chunk_rows=4)
    assert frozen.item() == ours.item()


def test_a_model_whose_logits_are_not_its_heads_takes_the_full_path():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0,
                          pad_token_id=258)
    model = Gemma2ForCausalLM(config).eval()
    assert plain_head(model) is None  # its logits are tanh-capped after the head
    seqs = [[1, 5, 9, 13, 17, 21, 25], [2, 4, 6, 8, 10]]
    batch = make_batch(seqs, [3, 2])
    with torch.no_grad():
        assert label_nll(model, batch).item() == pytest.approx(full_logits_nll(model, batch).item(), rel=1e-6)


def test_a_peft_model_gets_the_lean_path_and_the_same_loss(tiny_llama, data):
    from peft import LoraConfig, get_peft_model

    seqs, prompt_lens = data
    batch = make_batch(seqs, prompt_lens)
    with torch.no_grad():
        before = label_nll(tiny_llama, batch).item()
    peft_model = get_peft_model(tiny_llama, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert plain_head(peft_model) is tiny_llama.lm_head
    with torch.no_grad():  # B = 0: the adapter changes nothing yet
        assert label_nll(peft_model, batch).item() == pytest.approx(before, rel=1e-6)
        assert before == pytest.approx(full_logits_nll(tiny_llama, batch).item(), rel=1e-6)


def test_answer_token_loss_under_autocast_matches_the_full_logits_formula(tiny_llama, data):
    seqs, prompt_lens = data
    batch = make_batch(seqs, prompt_lens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = answer_token_loss(tiny_llama, [batch])
        with torch.no_grad():
            ref = full_logits_nll(tiny_llama, batch).item() / label_count(batch)
    assert out["loss"] == pytest.approx(ref, rel=2e-3)


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
