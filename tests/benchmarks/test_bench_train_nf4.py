"""The NF4 yardsticks of benchmarks/bench_train.py (QLoRA as users run it): bitsandbytes' Linear4bit under PEFT and
torchtune's LoRA over torchao's NF4Tensor, on a tiny seeded LLaMA; and their skip when the package is missing."""

from __future__ import annotations

import importlib
import importlib.util
import json

import pytest
import torch

from conftest import REPO, make_tiny_llama

BENCHMARKS = REPO / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    """bench_train imported as its script runs: with benchmarks/ on the path (for its ``import common``)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("bench_train")


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def trainable_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_torchao_nf4_lora_starts_as_its_base_and_trains_only_lora(bench):
    pytest.importorskip("torchao")
    model = make_tiny_llama()
    ids = torch.randint(0, 259, (2, 12))
    float_logits = logits(model, ids)
    bench.to_torchao_nf4(model)
    assert not bench.block_linears(model)  # every block linear swapped
    base_logits = logits(model, ids)
    bench.add_nf4_lora(model, bench.LORA_TARGETS, r=4, alpha=8.0, dropout=0.0)
    torch.testing.assert_close(logits(model, ids), base_logits, rtol=0, atol=0)  # lora_b = 0: the base exactly
    rel = (base_logits - float_logits).norm() / float_logits.norm()
    assert 0 < rel < 0.3  # a 4-bit grid on random weights: near the float model (a wrong one is ~1), not equal
    names = trainable_names(model)
    assert names and all(".lora_a." in n or ".lora_b." in n for n in names)
    assert len(names) == 2 * 4 * len(model.model.layers)  # q/k/v/o, A and B each
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_bnb_nf4_under_peft_starts_as_its_base_and_trains_only_lora(bench):
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    model = make_tiny_llama()
    ids = torch.randint(0, 259, (2, 12))
    float_bytes = bench.block_weight_bytes(model)
    float_logits = logits(model, ids)
    bench.to_bnb_nf4(model, torch.float32)
    assert not bench.block_linears(model)
    nf4_bytes = bench.block_weight_bytes(model)
    codes = sum(m.weight.numel() for m in model.model.layers.modules() if type(m).__name__ == "Linear4bit")
    assert codes < nf4_bytes < float_bytes / 4  # 4-bit codes (one byte holds two) plus their statistics
    base_logits = logits(model, ids)
    rel = (base_logits - float_logits).norm() / float_logits.norm()
    assert 0 < rel < 0.3
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none",
                                                       target_modules=list(bench.LORA_TARGETS)))
    torch.testing.assert_close(logits(model, ids), base_logits, rtol=0, atol=0)
    names = trainable_names(model)
    assert len(names) == 2 * 4 * len(model.base_model.model.model.layers)
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_torchao_nf4_weights_count_their_scalers(bench):
    pytest.importorskip("torchao")
    model = make_tiny_llama()
    float_bytes = bench.block_weight_bytes(model)
    bench.to_torchao_nf4(model)
    codes = sum(m.weight.numel() // 2 for m in model.model.layers.modules()
                if isinstance(m, bench.FrozenNF4Linear))
    assert codes < bench.block_weight_bytes(model) < float_bytes / 4


def test_a_missing_yardstick_is_skipped_with_a_note(bench, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes"
                        else real(name, *a))
    assert bench.missing_yardstick("ours-4bit") is None
    assert "bitsandbytes" in bench.missing_yardstick("peft-bnb-nf4")
    monkeypatch.setattr(bench.common, "run_children", lambda *a, **k: pytest.fail("a skipped config was run"))
    assert bench.main(["--configs", "peft-bnb-nf4", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "skipped: bitsandbytes is not installed" in out
    assert "skipped" in json.loads(out.strip().splitlines()[-1])["results"]["peft-bnb-nf4"]


def test_uncheckpointed_configurations_train_without_checkpointing(bench):
    args = bench.build_parser().parse_args(["--uncheckpointed", "ours-4bit", "--no-bf16"])
    for name, on in [("ours-4bit", False), ("ours-float", True)]:
        model = make_tiny_llama()
        trainer = bench.Trainer(name, model, model, args)
        assert trainer.checkpointing is on and model.is_gradient_checkpointing is on
    with pytest.raises(SystemExit, match="unknown"):
        bench.main(["--uncheckpointed", "ours-4bits", "--quick"])
