"""``gptqlora finetune`` under torchrun: two gloo processes train the adapter a one-process run with the same global
batch trains, rank 0 alone writes, and a resume needs the same process count.

The runs go through the CLI end to end on a tiny LLaMA (RTN-quantized by the command, so the rank-0-quantizes path
runs too), with gradient accumulation 2, gradient checkpointing and LoRA dropout 0. Five training examples in global
micro-batches of four leave one example for the last micro-batch of each epoch: the second rank has no row there
and runs the stand-in that does not count.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_llama, make_tiny_tokenizer
from gptqlora import distributed
from gptqlora.cli import main
from gptqlora.train.parallel import rank_shard
from train.tiny import ENTRIES

REPO = Path(__file__).resolve().parents[2]
STEPS = 3


def finetune_argv(model: Path, data: Path, out: Path, batch_size: int, *extra: str) -> list[str]:
    return ["finetune", "--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu",
            "--dtype", "float32", "--method", "rtn", "--bits", "4", "--group-size", "32", "--prompt-style", "plain",
            "--lora-targets", "all", "--lora-r", "4", "--lora-dropout", "0", "--batch-size", str(batch_size),
            "--grad-accum", "2", "--max-steps", str(STEPS), "--lr", "1e-2", "--warmup-steps", "1",
            "--max-length", "96", "--train-limit", "5", "--eval-holdout", "2", "--eval-every", "2",
            "--save-every", "2", "--no-bf16", "--seed", "3", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(argv: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node N -m gptqlora.cli ARGV`` on a free port, one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "-m", "gptqlora.cli", *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny model and data on disk, a one-process run with batch 4 and a two-process run with batch 2."""
    root = tmp_path_factory.mktemp("dist")
    model_dir, data_dir = root / "model", root / "data"
    make_tiny_llama().save_pretrained(model_dir)
    make_tiny_tokenizer(chat_template=False).save_pretrained(model_dir)
    data_dir.mkdir()
    (data_dir / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ENTRIES))
    # test.jsonl is only the contamination guard's reference here: a copy of train would leave nothing to train on
    (data_dir / "test.jsonl").write_text(json.dumps({"question": "What is 1 + 1?", "answer": "#### 2"}) + "\n")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(finetune_argv(model_dir, data_dir, root / "one", 4)) == 0
    finally:
        torch.set_num_threads(before)
    two = torchrun(finetune_argv(model_dir, data_dir, root / "two", 2))
    assert two.returncode == 0, two.stderr[-4000:]
    return {"model": model_dir, "data": data_dir, "one": root / "one", "two": root / "two", "two_run": two}


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_train_the_adapter_of_one_with_the_global_batch(runs):
    one = load_file(runs["one"] / "lora_adapter" / "adapter_model.safetensors")
    two = load_file(runs["two"] / "lora_adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    start = load_file(runs["one"] / "train_state" / f"step-{STEPS:08d}" / "adapter.safetensors")
    assert any(t.abs().max() > 0 for k, t in start.items() if "lora_B" in k)  # trained: B left zero
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    # rank 0 quantized the base, the same one a single process makes
    q1 = load_file(next((runs["one"] / "quantized_base").glob("*.safetensors")))
    q2 = load_file(next((runs["two"] / "quantized_base").glob("*.safetensors")))
    assert q1.keys() == q2.keys() and all(torch.equal(q1[k], q2[k]) for k in q1)


def test_metrics_are_reduced_across_ranks(runs):
    m1, m2 = metrics(runs["one"]), metrics(runs["two"])
    assert [sorted(r) for r in m1] == [sorted(r) for r in m2]
    assert sum("loss" in r for r in m1) == STEPS and sum("eval_loss" in r for r in m1) >= 2
    for r1, r2 in zip(m1, m2, strict=True):
        assert r1["step"] == r2["step"]
        for key in ("tokens", "eval_tokens"):
            assert r1.get(key) == r2.get(key), (key, r1, r2)
        for key in ("loss", "eval_loss", "grad_norm", "lr"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-5), (key, r1, r2)


def test_rank_zero_alone_writes_and_prints(runs):
    names = lambda out: sorted(str(p.relative_to(out)) for p in out.rglob("*"))  # noqa: E731
    assert names(runs["two"]) == names(runs["one"])
    state = json.loads(next((runs["two"] / "train_state").glob("step-*/trainer_state.json")).read_text())
    assert state["fingerprint"]["world_size"] == 2
    assert "world_size" not in json.loads(next((runs["one"] / "train_state").glob(
        "step-*/trainer_state.json")).read_text())["fingerprint"]  # a one-process run's checkpoint is as before
    rng = load_file(next((runs["two"] / "train_state").glob("step-*/rng.safetensors")))
    assert {"torch_cpu", "rank1.torch_cpu"} <= rng.keys()
    err = runs["two_run"].stderr
    assert err.count("global batch: 2 per process x 2 processes x 2 accumulation = 8 examples per step") == 1
    assert runs["two_run"].stdout.count('"quantized_base"') == 1  # one summary, rank 0's


def test_resume_needs_the_same_process_count(runs, capsys):
    argv = finetune_argv(runs["model"], runs["data"], runs["two"], 4, "--resume")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "written by 2 processes, this run has 1" in err and "--nproc-per-node 2" in err
    assert len(err.strip().splitlines()) == 1
    adapter = runs["two"] / "lora_adapter" / "adapter_model.safetensors"
    before = load_file(adapter)
    again = torchrun(finetune_argv(runs["model"], runs["data"], runs["two"], 2, "--resume"))
    assert again.returncode == 0, again.stderr[-4000:]  # the same count resumes (a finished run: nothing to do)
    after = load_file(adapter)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_rank_shards_put_back_together_are_the_global_batch():
    ids = torch.arange(5 * 6).reshape(5, 6)  # [B, T]
    mask = torch.ones_like(ids)
    mask[:, 4:] = 0
    mask[0, 4:] = 1  # only row 0 needs all six columns
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}
    parts = [rank_shard(batch, r, 2) for r in range(2)]
    assert [p["input_ids"].shape for p, _ in parts] == [(2, 6), (3, 4)]  # cut to the longest row of each part
    assert all(counts for _, counts in parts)
    assert torch.equal(torch.cat([p["input_ids"][:, :4] for p, _ in parts]), ids[:, :4])
    one = {k: v[:1] for k, v in batch.items()}
    assert [distributed.shard_bounds(1, r, 2) for r in range(2)] == [(0, 0), (0, 1)]
    stand_in, counts = rank_shard(one, 0, 2)  # no row for rank 0: the first labelled row, not counted
    assert not counts and torch.equal(stand_in["input_ids"], ids[:1])
    assert [distributed.shard_bounds(5, r, 2) for r in range(2)] == [(0, 2), (2, 5)]
