"""train_lora on a tiny seeded LLaMA: it learns, touches only LoRA, weighs tokens, logs, and stops on NaN."""

from __future__ import annotations

import json
import math
import random
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from gptqlora.config import QuantConfig
from gptqlora.data.gsm8k import IGNORE_INDEX, collate
from gptqlora.errors import NonFiniteLossError, UsageError
from gptqlora.lora import get_adapter_params, inject_lora_layers, load_adapter
from gptqlora.loss import answer_token_loss, label_nll
from gptqlora.quant.driver import quantize_model_weights
from gptqlora.quant.linear import QuantizedLinear, dense_copy_bytes
from gptqlora.seeding import seed_everything
from gptqlora.train import get_lr, latest_checkpoint, train_lora, trainable_report
from gptqlora.train.state import ADAPTER_FILE, STATE_FILE, read_state

from conftest import make_tiny_llama
from train.tiny import tiny_config, tiny_data, tiny_lora_model

WALL_CLOCK = ("elapsed", "tokens_per_s")
STEP_PATH = ("train/loop.py", "train/run.py", "train/step.py", "gptqlora/loss.py")  # the code a training step runs


def strict_json(line: str):
    """json.loads that refuses the NaN / Infinity extensions, as strict readers (jq, JavaScript) do."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=refuse)


def read_metrics(out) -> list[dict]:
    return [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def frozen_snapshot(model) -> dict[str, torch.Tensor]:
    """Every parameter and buffer that is not LoRA, cloned."""
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


def test_overfits_four_examples_with_gradient_checkpointing_and_writes_its_outputs(tmp_path):
    tok, train, _ = tiny_data(n_train=4)
    model = tiny_lora_model(r=16, dropout=0.0)
    config = tiny_config(tmp_path, max_steps=16, batch_size=4, lr=1e-2, warmup_steps=2, eval_every=8, save_every=8,
                         gradient_checkpointing=True)
    seen = []
    summary = train_lora(model, tok, train, train, config, seed=0, progress=False, on_metrics=seen.append,
                         base_model_name_or_path="tiny-llama")

    losses = [r["loss"] for r in seen if "loss" in r]
    assert len(losses) == 16 and losses[-1] < losses[0] - 0.5
    assert summary["eval_loss_after"] < summary["eval_loss_before"] - 0.5  # evaluated on the training examples
    assert summary["steps"] == 16 and summary["train_loss"] == losses[-1] and summary["tokens_per_s"] > 0
    # The caller's state is restored: eval mode, no checkpointing, no grad-requiring embedding outputs.
    assert not model.is_activation_checkpointing and not model.training
    assert not model.model.embed_tokens(torch.tensor([[1, 2]])).requires_grad

    metrics = read_metrics(tmp_path)
    assert metrics == seen  # each logged record is both written and passed to on_metrics
    assert [r["step"] for r in metrics if "eval_loss" in r] == [0, 8, 16]
    assert [r["step"] for r in metrics if "loss" in r] == list(range(1, 17))
    assert all(set(r) >= {"step", "loss", "lr", "tokens", "tokens_per_s", "elapsed"} for r in metrics if "loss" in r)
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert latest_checkpoint(tmp_path / "train_state").name == "step-00000016"

    # The final adapter is a PEFT directory that loads back into a fresh model as the trained tensors.
    config_json = json.loads((tmp_path / "lora_adapter" / "adapter_config.json").read_text())
    assert config_json["base_model_name_or_path"] == "tiny-llama" and config_json["r"] == 16
    fresh = load_adapter(make_tiny_llama(), tmp_path / "lora_adapter")  # injects r=16 from the config
    trained = get_adapter_params(model)
    assert all(torch.equal(p, trained[k]) for k, p in get_adapter_params(fresh).items())


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "gptq"])
def test_only_lora_parameters_change(tmp_path, quantized):
    tok, train, held_out = tiny_data()
    model = make_tiny_llama()
    if quantized:
        calib = torch.randint(0, 259, (8, 32), generator=torch.Generator().manual_seed(0))  # [8, 32] token ids
        quantize_model_weights(model, calib, QuantConfig(targets="all", group_size=32), progress=False)
        assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == 14  # 7 linears x 2 blocks
    inject_lora_layers(model, "all", r=4, alpha=8.0, dropout=0.1)
    before_frozen = frozen_snapshot(model)
    before_lora = {k: p.detach().clone() for k, p in get_adapter_params(model).items()}

    train_lora(model, tok, train, held_out, tiny_config(tmp_path, max_steps=3), progress=False)

    after = frozen_snapshot(model)
    assert after.keys() == before_frozen.keys()
    assert all(torch.equal(before_frozen[k], after[k]) for k in after), "a frozen tensor changed"
    changed = {k: not torch.equal(before_lora[k], p) for k, p in get_adapter_params(model).items()}
    assert all(changed.values()), f"LoRA tensors that did not train: {[k for k, c in changed.items() if not c]}"


def test_dequantize_once_trains_the_same_adapter_and_follows_its_setting(tmp_path, monkeypatch):
    from gptqlora.train import run as train_run

    tok, train, held_out = tiny_data()

    def trained(setting: str) -> tuple[dict, dict[str, torch.Tensor]]:
        model = make_tiny_llama()
        quantize_model_weights(model, None, QuantConfig(method="rtn", targets="all", group_size=32), progress=False)
        inject_lora_layers(model, "all", r=4, alpha=8.0, dropout=0.1)  # dropout: the recompute's masks matter too
        out = tmp_path / setting
        summary = train_lora(model, tok, train, held_out, tiny_config(out, max_steps=3, grad_accum=2,
                                                                      gradient_checkpointing=True,
                                                                      dequantize_once=setting), progress=False)
        return summary, load_file(str(out / "lora_adapter" / "adapter_model.safetensors"))

    runs = {setting: trained(setting) for setting in ("off", "on")}
    assert [runs[s][0]["dequantize_once"] for s in ("off", "on")] == [False, True]
    assert all(torch.equal(runs["on"][1][k], runs["off"][1][k]) for k in runs["off"][1])  # bit for bit
    # auto: on while the dense copies fit an eighth of the free memory, else off; off for a float base.
    need = dense_copy_bytes(_tiny_quantized())
    assert need > 0
    for free, keeps in ((8 * need, True), (8 * need - 1, False), (None, False)):
        monkeypatch.setattr(train_run, "free_memory", lambda device, free=free: free)
        assert train_run.resolve_dequantize_once("auto", _tiny_quantized(), torch.device("cpu")) is keeps, free
    assert not train_run.resolve_dequantize_once("on", make_tiny_llama(), torch.device("cpu"))


def test_checkpointing_one_block_in_k_trains_the_same_adapter(tmp_path):
    from gptqlora.train import loop

    tok, train, held_out = tiny_data()
    forwards = []  # per run, each block's MLP calls: a recomputed block runs it twice per micro-batch

    def trained(name: str, **kw) -> dict[str, torch.Tensor]:
        model = make_tiny_llama(num_layers=3)
        quantize_model_weights(model, None, QuantConfig(method="rtn", targets="all", group_size=32), progress=False)
        inject_lora_layers(model, "all", r=4, alpha=8.0, dropout=0.1)  # dropout: the recompute's masks matter too
        blocks = loop._blocks(model)
        calls = [0] * len(blocks)
        for i, block in enumerate(blocks):
            block.mlp.register_forward_pre_hook(lambda *_a, i=i: calls.__setitem__(i, calls[i] + 1))
        out = tmp_path / name
        train_lora(model, tok, train, held_out, tiny_config(out, max_steps=2, grad_accum=2, **kw), progress=False)
        forwards.append(calls)
        assert not any(b.gradient_checkpointing for b in blocks)  # undone
        return load_file(str(out / "lora_adapter" / "adapter_model.safetensors"))

    every = [trained(f"every{k}", gradient_checkpointing=True, checkpoint_every=k) for k in (1, 2)]
    none = trained("none", gradient_checkpointing=False)
    base = forwards[-1]
    recomputed = [[c > b for c, b in zip(calls, base)] for calls in forwards]
    assert recomputed == [[True] * 3, [True, False, True], [False] * 3]
    assert all(torch.equal(every[0][k], adapter[k]) for adapter in (every[1], none) for k in every[0])  # bit for bit
    with pytest.raises(UsageError, match="checkpoint_every"):
        tiny_config(tmp_path / "x", checkpoint_every=0)


def _block_gradients(compiled: bool, checkpointing: bool, dropout: float) -> dict[str, torch.Tensor]:
    """The LoRA gradients of one forward and backward of a tiny 4-bit LoRA model, its blocks compiled or not."""
    from gptqlora.train.loop import _compile_blocks, _enable_checkpointing

    torch._dynamo.reset()
    model = _tiny_quantized()
    torch.manual_seed(1)
    inject_lora_layers(model, "all", r=4, alpha=8.0, dropout=dropout)
    for p in get_adapter_params(model).values():
        nn.init.normal_(p, std=0.1)  # B != 0: every LoRA gradient is non-zero and depends on the masks
    undo = (_compile_blocks(model, checkpointing) if compiled
            else _enable_checkpointing(model) if checkpointing else lambda: None)
    model.train()
    ids = torch.randint(0, 259, (2, 24), generator=torch.Generator().manual_seed(0))  # [2, 24]
    torch.manual_seed(2)  # the dropout masks' draws
    label_nll(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}).backward()
    undo()
    assert all("forward" not in vars(m) for m in model.modules())  # the blocks' own forward again
    torch._dynamo.reset()
    return {k: p.grad for k, p in get_adapter_params(model).items()}


@pytest.mark.slow  # compiling takes about a minute per run here
def test_compiled_blocks_give_the_eager_gradients_and_recompute_their_own_dropout():
    eager = _block_gradients(compiled=False, checkpointing=True, dropout=0.0)
    compiled = _block_gradients(compiled=True, checkpointing=True, dropout=0.0)
    assert compiled.keys() == eager.keys() and len(eager) == 28  # A and B of 14 layers
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=1e-4, atol=1e-6)
    # With dropout the compiled graph draws its masks from inductor's generator (seeded from torch's): the
    # checkpoint's recompute must draw the masks the forward drew, as without checkpointing.
    kept = _block_gradients(compiled=True, checkpointing=False, dropout=0.3)
    recomputed = _block_gradients(compiled=True, checkpointing=True, dropout=0.3)
    for k in kept:
        torch.testing.assert_close(recomputed[k], kept[k], rtol=1e-4, atol=1e-6)
    assert any(not torch.allclose(kept[k], eager[k], rtol=1e-2) for k in kept)  # the masks mattered


def _tiny_quantized():
    model = make_tiny_llama()
    quantize_model_weights(model, None, QuantConfig(method="rtn", targets="all", group_size=32), progress=False)
    return model


def test_grad_accumulation_weighs_every_label_token_equally(tmp_path):
    tok, train, _ = tiny_data(n_train=4)
    # Whole-step micro-batches of 2 examples have different label counts, so a mean of per-micro-batch means
    # would differ from the token-weighted mean the loop promises.
    runs = {}
    for batch_size, accum in ((4, 1), (2, 2), (1, 4)):
        model = tiny_lora_model(dropout=0.0)
        out = tmp_path / f"b{batch_size}"
        seen = []
        train_lora(model, tok, train, None, tiny_config(out, max_steps=1, batch_size=batch_size, grad_accum=accum,
                                                        max_grad_norm=0.0), progress=False, on_metrics=seen.append)
        runs[batch_size] = (seen[0]["loss"], load_file(str(out / "lora_adapter" / "adapter_model.safetensors")))

    # The step's loss is the token-weighted mean NLL of its four examples (B = 0, so LoRA is still a no-op),
    # which differs from the mean of the two micro-batch means: their label counts differ.
    model = tiny_lora_model(dropout=0.0)
    expected = answer_token_loss(model, [collate([train[i] for i in range(4)], pad_id=tok.pad_token_id)])["loss"]
    order = torch.randperm(4, generator=torch.Generator().manual_seed(0)).tolist()  # epoch 0's order, seed 0
    halves = [answer_token_loss(model, [collate([train[i] for i in order[h:h + 2]], tok.pad_token_id)])["loss"]
              for h in (0, 2)]
    assert abs(sum(halves) / 2 - expected) > 1e-3
    for loss, adapter in runs.values():
        assert loss == pytest.approx(expected, abs=1e-5)
        assert all(torch.allclose(adapter[k], runs[4][1][k], atol=1e-5) for k in adapter)


def test_refuses_a_model_that_trains_more_than_lora(tmp_path):
    tok, train, held_out = tiny_data()
    with pytest.raises(ValueError, match="inject_lora_layers"):
        train_lora(make_tiny_llama(), tok, train, held_out, tiny_config(tmp_path), progress=False)
    model = tiny_lora_model()
    model.model.norm.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="model.norm.weight.*mark_only_lora_trainable"):
        train_lora(model, tok, train, held_out, tiny_config(tmp_path), progress=False)
    assert not (tmp_path / "train_state").exists()


def test_non_finite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    tok, train, held_out = tiny_data()
    model = tiny_lora_model()
    q_proj = model.model.layers[0].self_attn.q_proj

    def poison(record):
        if record.get("step") == 3 and "loss" in record:
            with torch.no_grad():
                q_proj.lora_B.weight.mul_(float("inf"))  # step 4's forward overflows

    with pytest.raises(NonFiniteLossError, match="at step 4") as info:
        train_lora(model, tok, train, held_out, tiny_config(tmp_path, save_every=2), progress=False,
                   on_metrics=poison)
    assert info.value.step == 4 and "step-00000002" in str(info.value)
    ckpt = latest_checkpoint(tmp_path / "train_state")
    assert ckpt is not None and ckpt.name == "step-00000002"  # nothing saved after the bad step
    assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / ADAPTER_FILE)).values())
    assert max(r["step"] for r in read_metrics(tmp_path)) == 3
    assert not (tmp_path / "lora_adapter").exists()


def test_bf16_autocast_trains_on_cpu(tmp_path):
    tok, train, held_out = tiny_data()
    model = tiny_lora_model()
    summary = train_lora(model, tok, train, held_out, tiny_config(tmp_path, max_steps=2, bf16=True), progress=False)
    assert summary["bf16"] is True and summary["steps"] == 2
    assert torch.isfinite(torch.tensor([summary["train_loss"], summary["eval_loss_after"]])).all()
    assert all(p.dtype == torch.float32 for p in get_adapter_params(model).values())  # master weights stay fp32


def test_trainable_report_counts_lora_against_the_whole_model():
    model = make_tiny_llama()
    total_before = trainable_report(model)["total"]
    inject_lora_layers(model, "attn", r=4)
    report = trainable_report(model)
    lora = sum(p.numel() for p in get_adapter_params(model).values())
    assert report["trainable"] == lora and report["total"] == total_before + lora
    assert report["trainable_percent"] == pytest.approx(100 * lora / report["total"])


def test_gradient_checkpointing_changes_memory_not_results(tmp_path):
    # Recomputation replays LoRA dropout with the same RNG state, so both runs take identical steps.
    tok, train, held_out = tiny_data()
    adapters = []
    for checkpointing in (False, True):
        out = tmp_path / str(checkpointing)
        train_lora(tiny_lora_model(dropout=0.2), tok, train, held_out,
                   tiny_config(out, max_steps=2, gradient_checkpointing=checkpointing), progress=False)
        adapters.append(load_file(str(out / "lora_adapter" / "adapter_model.safetensors")))
    assert all(torch.allclose(adapters[0][k], adapters[1][k], rtol=0, atol=1e-6) for k in adapters[0])


def test_seed_everything_seeds_torch_python_and_numpy():
    draws = []
    for _ in range(2):
        seed_everything(11)
        draws.append((torch.rand(3), random.random(), np.random.rand()))
        torch.rand(5), random.random(), np.random.rand()  # whatever ran next does not matter
    (t0, r0, n0), (t1, r1, n1) = draws
    assert torch.equal(t0, t1) and r0 == r1 and n0 == n1
    seed_everything(12)
    assert not torch.equal(torch.rand(3), t0)


def seeded_run(out, seed: int, draws_between: int) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """inject + train_lora as the CLI runs them; the adapter tensors and the metrics without wall-clock fields."""
    tok, train, held_out = tiny_data()
    model = make_tiny_llama()
    seed_everything(seed)  # before inject_lora_layers: LoRA's init is seeded too
    inject_lora_layers(model, "all", r=4, alpha=8.0, dropout=0.2)
    torch.rand(draws_between)  # loading data, or anything else, may draw from the global generator meanwhile
    train_lora(model, tok, train, held_out, tiny_config(out, max_steps=4), seed=seed, progress=False)
    metrics = [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in read_metrics(out)]
    return load_file(str(out / "lora_adapter" / "adapter_model.safetensors")), metrics


def test_the_same_seed_gives_the_same_run_bit_for_bit_and_another_seed_another(tmp_path):
    first, first_metrics = seeded_run(tmp_path / "a", seed=5, draws_between=1)
    again, again_metrics = seeded_run(tmp_path / "b", seed=5, draws_between=7)
    other, other_metrics = seeded_run(tmp_path / "c", seed=6, draws_between=1)
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert first_metrics == again_metrics and len(first_metrics) == 4 + 3  # 4 steps; evals at 0, 3 and 4
    assert not any(torch.equal(first[k], other[k]) for k in first)
    assert [r.get("loss") for r in other_metrics] != [r.get("loss") for r in first_metrics]


def test_the_logged_loss_is_the_float64_sum_of_the_micro_batch_nlls(tmp_path):
    # One sync per step (the NLLs are read together) must not change the arithmetic: the micro-batch NLLs (fp32)
    # are summed in float64, as when each was read with .item(); an fp32 sum would differ in the last bits.
    tok, train, _ = tiny_data()
    seen = []
    train_lora(tiny_lora_model(dropout=0.0), tok, train, None,
               tiny_config(tmp_path, max_steps=1, batch_size=1, grad_accum=5), progress=False,
               on_metrics=seen.append)
    model = tiny_lora_model(dropout=0.0)  # the same init: B = 0, so the step's forward is this model's
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()[:5]
    batches = [collate([train[i]], pad_id=tok.pad_token_id) for i in order]
    n_labels = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    with torch.no_grad():
        nlls = [label_nll(model, b).item() for b in batches]
    assert seen[0]["loss"] == sum(nlls) / n_labels


def nan_once_hook(armed: list[bool]):
    """A forward hook on the final norm: while ``armed[0]`` is set, the next forward's output becomes NaN once."""
    def hook(module, args, output):
        if armed[0]:
            armed[0] = False
            return output * float("nan")
        return output

    return hook


def test_a_non_finite_step_is_never_applied_and_a_resume_with_a_lower_lr_continues(tmp_path):
    tok, train, held_out = tiny_data()
    model = tiny_lora_model()
    armed, after_step_3 = [False], {}
    model.model.norm.register_forward_hook(nan_once_hook(armed))

    def arm_after_step_3(record):
        if record.get("step") == 3 and "loss" in record:
            after_step_3.update({k: p.detach().clone() for k, p in get_adapter_params(model).items()})
            armed[0] = True  # step 4's forward (no eval in between) gives a NaN loss

    config = dict(max_steps=6, save_every=2, eval_every=10)
    with pytest.raises(NonFiniteLossError, match="at step 4.*--resume and a lower --lr") as info:
        train_lora(model, tok, train, held_out, tiny_config(tmp_path, **config), progress=False,
                   on_metrics=arm_after_step_3)
    assert "\n" not in str(info.value)  # one line: the CLI prints it as is
    assert all(torch.equal(p, after_step_3[k]) for k, p in get_adapter_params(model).items())  # step 4 not applied
    ckpt = latest_checkpoint(tmp_path / "train_state")
    assert ckpt.name == "step-00000002" and str(ckpt) in str(info.value)
    assert all(math.isfinite(r["loss"]) for r in read_state(ckpt)["history"] if "loss" in r)
    assert max(r["step"] for r in read_metrics(tmp_path)) == 3

    # The advice works: resume with a lower lr (and another clipping norm); the log says so.
    lower = tiny_config(tmp_path, **config, lr=5e-3, max_grad_norm=0.5, resume=True)
    seen = []
    with pytest.warns(UserWarning) as caught:
        summary = train_lora(tiny_lora_model(), tok, train, held_out, lower, progress=False, on_metrics=seen.append)
    assert summary["resumed_from"] == 2 and summary["steps"] == 6
    records = read_metrics(tmp_path)
    notes = [r for r in records if "warning" in r]
    assert [r["warning"] for r in notes] == [str(w.message) for w in caught] == [
        "resumed at step 2 with lr 0.005 (checkpoint 0.01)",
        "resumed at step 2 with max_grad_norm 0.5 (checkpoint 1.0)"]
    assert [r["step"] for r in notes] == [2, 2] and notes == [r for r in seen if "warning" in r]
    steps = {r["step"]: r for r in records if "loss" in r}
    assert sorted(steps) == list(range(1, 7))
    assert records[records.index(notes[0]) - 1] == steps[2]  # in the log where the run resumed
    for step in range(3, 7):  # the schedule now peaks at the new lr
        assert steps[step]["lr"] == get_lr(step - 1, peak_lr=5e-3, warmup_steps=1, total_steps=6, min_lr_ratio=0.1)
    assert summary["warnings"] == [r["warning"] for r in notes]

    # The lowered settings are now the run's: resuming with them again says nothing new.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = train_lora(tiny_lora_model(), tok, train, held_out, lower, progress=False)
    assert again["warnings"] == summary["warnings"]


def test_a_non_finite_eval_loss_is_logged_as_null_with_a_flag(tmp_path):
    tok, train, held_out = tiny_data()
    model = tiny_lora_model()
    model.model.norm.register_forward_hook(lambda m, args, out: out if m.training else out * float("nan"))
    summary = train_lora(model, tok, train, held_out, tiny_config(tmp_path, max_steps=3), progress=False)
    records = read_metrics(tmp_path)  # strict JSON throughout
    evals = [r for r in records if "eval_tokens" in r]
    assert [r["step"] for r in evals] == [0, 3]
    assert all(r["eval_loss"] is None and r["non_finite"] == ["eval_loss"] for r in evals)
    assert all(math.isfinite(r["loss"]) and "non_finite" not in r for r in records if "loss" in r)
    strict_json((latest_checkpoint(tmp_path / "train_state") / STATE_FILE).read_text())
    assert summary["eval_loss_after"] is None and (tmp_path / "loss_curve.png").is_file()


@pytest.mark.gpu
def test_the_loop_syncs_with_the_device_per_step_not_per_micro_batch(tmp_path):
    tok, train, _ = tiny_data()
    syncs = {}
    for accum in (1, 4):
        model = tiny_lora_model(dropout=0.1).cuda()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                train_lora(model, tok, train, None, tiny_config(tmp_path / str(accum), max_steps=3, batch_size=1,
                                                                grad_accum=accum, save_every=100), progress=False)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        # Only the lines of the loop and its step: the model's forward (transformers) is not ours to change.
        syncs[accum] = sum(w.filename.endswith(STEP_PATH) for w in caught)
    assert syncs[1] > 0 and syncs[4] == syncs[1]
