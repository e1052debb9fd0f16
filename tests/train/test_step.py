"""One optimizer step: a world of one accumulates the gradient of the step's token-weighted mean loss over its
micro-batches, and an update with a non-finite loss or gradient norm raises before touching a parameter."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch

from gptqlora.data.gsm8k import collate
from gptqlora.distributed import World
from gptqlora.errors import NonFiniteLossError
from gptqlora.lora import get_adapter_params
from gptqlora.loss import label_count, label_nll
from gptqlora.train.parallel import gradient_sync
from gptqlora.train.step import accumulate_gradients, apply_update

from train.tiny import tiny_data, tiny_lora_model


def grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in get_adapter_params(model).items() if p.grad is not None}


def test_a_world_of_one_takes_the_whole_batch_and_the_mean_over_the_step():
    tok, train, _ = tiny_data(n_train=4)
    micro = [collate([train[i], train[i + 1]], pad_id=tok.pad_token_id) for i in (0, 2)]
    n_labels = sum(label_count(b) for b in micro)
    model = tiny_lora_model(dropout=0.0)
    with torch.no_grad():  # B != 0, so that A gets a gradient too
        for p in get_adapter_params(model).values():
            p.normal_(std=0.02, generator=torch.Generator().manual_seed(1))
    loss = accumulate_gradients(model, micro, n_labels, World(), torch.device("cpu"), nullcontext)
    stepped = grads(model)
    model.zero_grad(set_to_none=True)
    whole = collate([train[i] for i in range(4)], pad_id=tok.pad_token_id)
    (label_nll(model, whole) / n_labels).backward()  # the four examples as one micro-batch
    assert loss == pytest.approx(label_nll(model, whole).item() / n_labels, rel=1e-6)
    assert stepped.keys() == grads(model).keys() and len(stepped) == len(get_adapter_params(model))
    for k, g in grads(model).items():
        torch.testing.assert_close(stepped[k], g, rtol=1e-4, atol=1e-7)


def test_gradient_sync_on_a_plain_model_is_a_no_op():
    model = torch.nn.Linear(2, 2)
    for sync in (False, True):
        with gradient_sync(model, sync):
            model(torch.ones(1, 2)).sum().backward()
    assert torch.equal(model.bias.grad, torch.full((2,), 2.0))


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_a_non_finite_update_raises_before_touching_a_parameter(bad):
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    (weight * (math.inf if bad == "grad" else 1.0)).sum().backward()
    with pytest.raises(NonFiniteLossError, match="at step 7.*nothing was written") as info:
        apply_update(optimizer, [weight], lr=0.5, loss=math.nan if bad == "loss" else 1.0, max_grad_norm=1.0, step=7,
                     fix="nothing was written: train again")
    assert info.value.step == 7 and ("gradient norm" if bad == "grad" else "training loss") in str(info.value)
    assert torch.equal(weight.detach(), torch.ones(3)) and not optimizer.state


def test_an_update_sets_the_lr_clips_and_zeroes_the_gradients():
    weight = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    (weight * torch.tensor([3.0, 4.0, 0.0, 0.0])).sum().backward()  # gradient norm 5
    norm = apply_update(optimizer, [weight], lr=0.5, loss=1.0, max_grad_norm=1.0, step=1)
    assert norm == pytest.approx(5.0) and optimizer.param_groups[0]["lr"] == 0.5
    torch.testing.assert_close(weight.detach(), -0.5 * torch.tensor([0.6, 0.8, 0.0, 0.0]))
    assert weight.grad is None
