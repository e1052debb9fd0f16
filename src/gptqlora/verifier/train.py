"""Training a verifier on labelled samples: a token-level value loss, optionally plus the LM loss; reads top to bottom.

Value loss (Cobbe et al.'s, as OVM trains it): every solution token of a sample predicts, through the value head,
whether the sample ends correct: binary cross-entropy of each token's value logit against the sample's label,
averaged over the sample's solution tokens (so a long solution weighs as much as a short one), then over the
batch's samples weighted by class (``balance``: each class by ``n / (2 n_class)``, so rare correct samples count as
much as the common incorrect ones). With ``lm_loss_weight > 0`` the next-token NLL of correct solutions is added.

Only the verifier's LoRA and head are trained; the base stays frozen. The data order is a seeded permutation per
epoch (``seed + epoch``), the learning rate warms up then decays (``gptqlora.train.schedule.get_lr``), and each
update is the LoRA trainer's (``gptqlora.train.step.apply_update``: clipping, the finite check, AdamW).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from gptqlora.config import VerifierTrainConfig
from gptqlora.data.gsm8k import pad_token_id
from gptqlora.errors import UsageError
from gptqlora.hardware import resolve_bf16
from gptqlora.lora.layer import get_adapter_params
from gptqlora.seeding import permutation
from gptqlora.train.schedule import count_total_steps, get_lr
from gptqlora.train.step import apply_update
from gptqlora.verifier.model import VerifierModel, encode_solution, pad_batch

MIN_LR_RATIO = 0.1  # the cosine's floor, as a fraction of the peak
# NonFiniteLossError's advice: the verifier directory is written whole at the end, and there is no --resume.
NOTHING_WRITTEN = "nothing was written: train again with a lower --lr or another --max-grad-norm"


# ---------------------------------------------------------------------------------------------- data

def flatten(records: Sequence[dict]) -> list[tuple[str, str, bool]]:
    """(question, solution, correct) for every sample of every labelled record, in order."""
    return [(r["question"], s, bool(c)) for r in records for s, c in zip(r["samples"], r["sample_correct"])]


def split_questions(records: Sequence[dict], n_val: int, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded split of the records into (training, validation) by question: a question's samples stay together,
    so the validation AUC is measured on questions the verifier never saw.

    Raises:
        UsageError: when the validation questions would leave none to train on.
    """
    if n_val >= len(records):
        raise UsageError(f"val_questions={n_val} holds out all {len(records)} sampled questions: use fewer")
    order = permutation(len(records), seed)
    val = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in val], [r for i, r in enumerate(records) if i in val]


def class_weights(labels: Sequence[bool], balance: bool) -> tuple[float, float]:
    """(weight of an incorrect sample, weight of a correct one): ``n / (2 n_class)`` when balancing, else 1 each.

    Raises:
        UsageError: when every sample has the same label: there is nothing to tell apart.
    """
    n, n_pos = len(labels), sum(bool(y) for y in labels)
    if n_pos in (0, n):
        which = "correct" if n_pos else "incorrect"
        raise UsageError(f"all {n} labelled samples are {which}: a verifier needs both kinds; sample more questions "
                         "(--limit) or more samples per question (--samples), or another temperature")
    if not balance:
        return 1.0, 1.0
    return n / (2 * (n - n_pos)), n / (2 * n_pos)


# ---------------------------------------------------------------------------------------------- losses

def value_loss(values: Tensor, solution_mask: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """Token-level BCE of the value logits against each sample's label.

    Args:
        values: [B, T] value logits.
        solution_mask: [B, T] bool, the solution tokens (at least one per row).
        labels: [B] 1.0 for a correct sample, 0.0 otherwise.
        weights: [B] per-sample weights (class weights).
    Returns:
        The weighted mean over samples of each sample's mean token BCE (a scalar).
    """
    target = labels[:, None].expand_as(values)  # [B, T]
    bce = F.binary_cross_entropy_with_logits(values, target, reduction="none")  # [B, T]
    mask = solution_mask.to(values.dtype)  # [B, T]
    per_sample = (bce * mask).sum(1) / mask.sum(1)  # [B]
    return (weights * per_sample).sum() / weights.sum()


def lm_loss(model: VerifierModel, hidden: Tensor, input_ids: Tensor, solution_mask: Tensor,
            labels: Tensor) -> Tensor:
    """Mean next-token NLL of the solution tokens of correct samples; 0 when the batch has none.

    Only the positions that predict such a token go through the output layer (``hidden[t]`` predicts ``ids[t+1]``).
    """
    keep = solution_mask[:, 1:] & (labels[:, None] > 0.5)  # [B, T-1]: position t predicts token t + 1
    if not bool(keep.any()):
        return hidden.new_zeros((), dtype=torch.float32)
    logits = model.lm.lm_head(hidden[:, :-1][keep])  # [N, V]
    return F.cross_entropy(logits.float(), input_ids[:, 1:][keep])


# ---------------------------------------------------------------------------------------------- loop

def encode_all(tokenizer, items: Sequence[tuple[str, str, bool]], style: str,
               max_length: int) -> list[tuple[list[int], int]]:
    return [encode_solution(tokenizer, q, s, style, max_length) for q, s, _ in items]


def trainable_params(model: VerifierModel) -> list[torch.nn.Parameter]:
    """The verifier's LoRA and head parameters, after checking that nothing else of the base would train.

    Raises:
        ValueError: a model without LoRA, or a base parameter that requires grad.
    """
    lora = list(get_adapter_params(model.lm).values())
    if not lora:
        raise ValueError("the verifier's LM has no LoRA layers: inject them before training")
    chosen = {id(p) for p in lora} | {id(p) for p in model.head.parameters()}
    if others := [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in chosen]:
        raise ValueError(f"only LoRA and the value head may train, but {others[:3]} require grad")
    return lora + list(model.head.parameters())


def train_verifier(model: VerifierModel, tokenizer, items: Sequence[tuple[str, str, bool]],
                   config: VerifierTrainConfig, *, style: str, seed: int = 0,
                   log: Callable[[dict[str, Any]], Any] | None = None) -> dict[str, Any]:
    """Train the verifier's LoRA and head in place on labelled (question, solution, correct) items.

    Args:
        model: a verifier whose LM carries LoRA (only LoRA trainable) and whose head is fresh or loaded.
        tokenizer: its tokenizer (the pad id is its pad token, else eos).
        items: the training samples (see :func:`flatten`).
        config: the training options.
        style: the resolved prompt style (``"plain"`` or ``"chat"``) of the verifier's input.
        seed: seeds the data order.
        log: called with each step's record (``step``, ``loss``, ``value_loss``, ``lm_loss``, ``lr``, ``grad_norm``).
    Returns:
        ``{"steps", "examples", "class_weights", "history", "seconds", "bf16"}``.
    Raises:
        UsageError: no items, or only one class.
        NonFiniteLossError: a non-finite loss or gradient norm (the update is not applied).
    """
    if not items:
        raise UsageError("no labelled samples to train on")
    params = trainable_params(model)
    labels = [y for _, _, y in items]
    w_neg, w_pos = class_weights(labels, config.balance)
    encoded = encode_all(tokenizer, items, style, config.max_length)
    pad_id = pad_token_id(tokenizer)
    device = params[0].device
    bf16 = resolve_bf16(config.bf16, device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    total = count_total_steps(len(items), batch_size=config.batch_size, grad_accum=1, epochs=config.epochs,
                              max_steps=config.max_steps)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    history: list[dict[str, Any]] = []

    def batches():
        epoch = 0
        while True:
            order = permutation(len(items), seed + epoch)
            for start in range(0, len(order), config.batch_size):
                yield order[start:start + config.batch_size]
            epoch += 1

    was_training = model.training
    model.train()  # LoRA dropout on
    t0 = time.perf_counter()
    stream = batches()
    try:
        for step in range(total):
            idx = next(stream)
            batch = {k: v.to(device) for k, v in pad_batch([encoded[i] for i in idx], pad_id).items()}
            y = torch.tensor([float(labels[i]) for i in idx], device=device)  # [B]
            w = torch.where(y > 0.5, w_pos, w_neg)  # [B]
            with autocast():
                values, hidden = model(batch["input_ids"], batch["attention_mask"])  # [B, T], [B, T, H]
                v_loss = value_loss(values.float(), batch["solution_mask"], y, w)
                l_loss = (lm_loss(model, hidden, batch["input_ids"], batch["solution_mask"], y)
                          if config.lm_loss_weight > 0 else torch.zeros((), device=device))
                loss = v_loss + config.lm_loss_weight * l_loss
            loss.backward()
            loss_value = float(loss.detach())
            lr = get_lr(step, peak_lr=config.lr, warmup_steps=config.warmup_steps, total_steps=total,
                        min_lr_ratio=MIN_LR_RATIO)
            grad_norm = apply_update(optimizer, params, lr=lr, loss=loss_value, max_grad_norm=config.max_grad_norm,
                                     step=step + 1, fix=NOTHING_WRITTEN)
            record = {"step": step + 1, "loss": loss_value, "value_loss": float(v_loss.detach()),
                      "lm_loss": float(l_loss.detach()), "lr": lr, "grad_norm": grad_norm}
            history.append(record)
            if log is not None:
                log(record)
    finally:
        model.train(was_training)
    return {"steps": total, "examples": len(items), "correct_examples": sum(labels),
            "class_weights": {"incorrect": w_neg, "correct": w_pos}, "history": history,
            "seconds": time.perf_counter() - t0, "bf16": bf16}


def validate(model: VerifierModel, tokenizer, items: Sequence[tuple[str, str, bool]], style: str, max_length: int,
             batch_size: int = 16) -> dict[str, Any]:
    """Scores of held-out samples: their AUC (correct above incorrect; None with one class only), and the
    accuracy of thresholding the score at 0.5."""
    from gptqlora.eval.scoring import roc_auc
    from gptqlora.verifier.load import LoadedVerifier, score_solutions

    scorer = LoadedVerifier(model, tokenizer, style, max_length, {})
    scores = score_solutions(scorer, [q for q, _, _ in items], [s for _, s, _ in items], batch_size)
    labels = [y for _, _, y in items]
    both = 0 < sum(labels) < len(labels)
    return {"samples": len(items), "auc": roc_auc(scores, labels) if both else None,
            "accuracy_at_0.5": sum((s > 0.5) == y for s, y in zip(scores, labels)) / len(items)}
