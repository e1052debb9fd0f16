"""``gptqlora finetune`` under torchrun: two gloo processes train the adapter a one-process run with the same global
batch trains, by DDP or by FSDP2 (``--fsdp``); rank 0 alone writes, and a resume needs the same process count.

The runs go through the CLI end to end on a tiny LLaMA (RTN-quantized by the command, so the rank-0-quantizes path
runs too), with gradient accumulation 2, gradient checkpointing and LoRA dropout 0. Five training examples in global
micro-batches of four leave one example for the last micro-batch of each epoch: the first rank has no row there
and runs the stand-in that does not count. The five held-out examples are read the same way (the first rank's
stand-in in the second batch): a rank scoring fewer batches than another would leave it waiting in FSDP's gathers.
An FSDP run killed mid-way is resumed by ``tiny.py`` (the float base, its frozen weights sharded too).
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import child_env, make_tiny_llama, make_tiny_tokenizer
from gptqlora import distributed
from gptqlora.cli import main
from gptqlora.loss import rank_shard
from gptqlora.train import latest_checkpoint
from gptqlora.train.state import read_state
from train.tiny import ENTRIES

TINY_SCRIPT = Path(__file__).with_name("tiny.py")
STEPS = 3
# Three more examples, so that five are held out and five trained on.
DATA = ENTRIES + [{"question": "Kim has 6 eggs and uses 2. How many left?", "answer": "6 - 2 = <<6-2=4>>4\n#### 4"},
                  {"question": "Two bags hold 4 balls each. Balls in all?", "answer": "4 * 2 = <<4*2=8>>8\n#### 8"},
                  {"question": "Ed saves 3 dollars a week. After 3 weeks?", "answer": "3 * 3 = <<3*3=9>>9\n#### 9"}]
PARALLEL = ("ddp", "fsdp")  # the two-process runs of the fixture

def finetune_argv(model: Path, data: Path, out: Path, batch_size: int, *extra: str) -> list[str]:
    return ["finetune", "--model", str(model), "--data", str(data), "--out", str(out), "--device", "cpu",
            "--dtype", "float32", "--method", "rtn", "--bits", "4", "--group-size", "32", "--prompt-style", "plain",
            "--lora-targets", "all", "--lora-r", "4", "--lora-dropout", "0", "--batch-size", str(batch_size),
            "--grad-accum", "2", "--max-steps", str(STEPS), "--lr", "1e-2", "--warmup-steps", "1",
            "--max-length", "96", "--train-limit", "5", "--eval-holdout", "5", "--eval-every", "2",
            "--save-every", "2", "--no-bf16", "--seed", "3", *extra]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(argv: list[str], nproc: int = 2, program: tuple[str, ...] = ("-m", "gptqlora.cli")
             ) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc-per-node N PROGRAM ARGV`` (the CLI by default) on a free port, one
    thread each."""
    env = child_env(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), *program, *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The tiny model and data on disk, a one-process run with batch 4 and two-process runs with batch 2: DDP's
    (``ddp``) and FSDP's (``fsdp``)."""
    root = tmp_path_factory.mktemp("dist")
    model_dir, data_dir = root / "model", root / "data"
    make_tiny_llama().save_pretrained(model_dir)
    make_tiny_tokenizer(chat_template=False).save_pretrained(model_dir)
    data_dir.mkdir()
    (data_dir / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in DATA))
    # test.jsonl is only the contamination guard's reference here: a copy of train would leave nothing to train on
    (data_dir / "test.jsonl").write_text(json.dumps({"question": "What is 1 + 1?", "answer": "#### 2"}) + "\n")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(finetune_argv(model_dir, data_dir, root / "one", 4)) == 0
    finally:
        torch.set_num_threads(before)
    found = {"model": model_dir, "data": data_dir, "one": root / "one"}
    for name in PARALLEL:
        proc = torchrun(finetune_argv(model_dir, data_dir, root / name, 2, *(["--fsdp"] if name == "fsdp" else [])))
        assert proc.returncode == 0, proc.stderr[-4000:]
        found |= {name: root / name, f"{name}_run": proc}
    return found


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def adapter_config(out: Path) -> dict:
    """The run's adapter_config.json but for the base path (each run's own quantized_base)."""
    config = json.loads((out / "lora_adapter" / "adapter_config.json").read_text())
    return {k: v for k, v in config.items() if k != "base_model_name_or_path"}


@pytest.mark.process
@pytest.mark.parametrize("parallel", PARALLEL)
def test_two_processes_train_the_adapter_of_one_with_the_global_batch(runs, parallel):
    one = load_file(runs["one"] / "lora_adapter" / "adapter_model.safetensors")
    two = load_file(runs[parallel] / "lora_adapter" / "adapter_model.safetensors")
    assert one.keys() == two.keys()
    start = load_file(runs["one"] / "train_state" / f"step-{STEPS:08d}" / "adapter.safetensors")
    assert any(t.abs().max() > 0 for k, t in start.items() if "lora_B" in k)  # trained: B left zero
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5, msg=key)
    assert adapter_config(runs[parallel]) == adapter_config(runs["one"])
    # rank 0 quantized the base, the same one a single process makes
    q1 = load_file(next((runs["one"] / "quantized_base").glob("*.safetensors")))
    q2 = load_file(next((runs[parallel] / "quantized_base").glob("*.safetensors")))
    assert q1.keys() == q2.keys() and all(torch.equal(q1[k], q2[k]) for k in q1)


@pytest.mark.process
@pytest.mark.parametrize("parallel", PARALLEL)
def test_checkpoints_hold_the_tensors_of_one_process_whole(runs, parallel):
    # FSDP's shards (LoRA weights, AdamW moments) are gathered before rank 0 writes: the files a single process writes
    step = f"step-{STEPS:08d}"
    for name in ("adapter.safetensors", "optimizer.safetensors"):
        one = load_file(runs["one"] / "train_state" / step / name)
        two = load_file(runs[parallel] / "train_state" / step / name)
        assert {k: (t.dtype, t.shape) for k, t in two.items()} == {k: (t.dtype, t.shape) for k, t in one.items()}
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.process
@pytest.mark.parametrize("parallel", PARALLEL)
def test_metrics_are_reduced_across_ranks(runs, parallel):
    m1, m2 = metrics(runs["one"]), metrics(runs[parallel])
    assert [sorted(r) for r in m1] == [sorted(r) for r in m2]
    assert sum("loss" in r for r in m1) == STEPS and sum("eval_loss" in r for r in m1) >= 2
    for r1, r2 in zip(m1, m2, strict=True):
        assert r1["step"] == r2["step"]
        for key in ("tokens", "eval_tokens"):
            assert r1.get(key) == r2.get(key), (key, r1, r2)
        for key in ("loss", "eval_loss", "grad_norm", "lr"):
            if key in r1:
                assert r2[key] == pytest.approx(r1[key], rel=1e-5), (key, r1, r2)


@pytest.mark.process
@pytest.mark.parametrize("parallel", PARALLEL)
def test_rank_zero_alone_writes_and_prints(runs, parallel):
    names = lambda out: sorted(str(p.relative_to(out)) for p in out.rglob("*"))  # noqa: E731
    assert names(runs[parallel]) == names(runs["one"])
    state = json.loads(next((runs[parallel] / "train_state").glob("step-*/trainer_state.json")).read_text())
    assert state["fingerprint"]["world_size"] == 2
    assert state["fingerprint"].get("fsdp", False) == (parallel == "fsdp")
    assert "world_size" not in json.loads(next((runs["one"] / "train_state").glob(
        "step-*/trainer_state.json")).read_text())["fingerprint"]  # a one-process run's checkpoint is as before
    rng = load_file(next((runs[parallel] / "train_state").glob("step-*/rng.safetensors")))
    assert {"torch_cpu", "rank1.torch_cpu"} <= rng.keys()
    err = runs[f"{parallel}_run"].stderr
    assert err.count("global batch: 2 per process x 2 processes x 2 accumulation = 8 examples per step") == 1
    assert runs[f"{parallel}_run"].stdout.count('"quantized_base"') == 1  # one summary, rank 0's


@pytest.mark.process
def test_resume_needs_the_same_process_count(runs, capsys):
    argv = finetune_argv(runs["model"], runs["data"], runs["ddp"], 4, "--resume")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "written by 2 processes, this run has 1" in err and "--nproc-per-node 2" in err
    assert len(err.strip().splitlines()) == 1
    adapter = runs["ddp"] / "lora_adapter" / "adapter_model.safetensors"
    before = load_file(adapter)
    again = torchrun(finetune_argv(runs["model"], runs["data"], runs["ddp"], 2, "--resume"))
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


@pytest.mark.process
def test_a_worker_leaves_with_its_status_and_its_output_flushed():
    # torchrun workers end by os._exit (distributed.exit_process), skipping finalization: what they printed into
    # pipes (block-buffered) must still arrive, and the status must be the command's.
    script = ("import sys; from gptqlora import distributed; print('the result', end=''); "
              "sys.stderr.write('a warning'); distributed.exit_process(3); print('never')")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "the result", "a warning")


@pytest.mark.process
def test_fsdp_without_torchrun_is_refused_in_one_line_before_any_work(runs, tmp_path, capsys):
    out = tmp_path / "one-fsdp"
    run_argv = ["run", "--model", str(runs["model"]), "--data", str(runs["data"]), "--out", str(out), "--fsdp"]
    for argv in (finetune_argv(runs["model"], runs["data"], out, 4, "--fsdp"), run_argv):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"gptqlora {argv[0]}: error: --fsdp") and "torchrun --nproc-per-node" in err
        assert len(err.strip().splitlines()) == 1
        assert not out.exists()


def curve(out: Path) -> list[tuple]:
    """(step, train loss, lr, grad norm) and (step, eval loss) from metrics.jsonl, without timings."""
    return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) if "loss" in r else (r["step"], r["eval_loss"])
            for r in metrics(out) if "loss" in r or "eval_loss" in r]


@pytest.mark.process
def test_an_fsdp_run_killed_and_resumed_ends_where_an_uninterrupted_one_does(tmp_path):
    # tiny.py: 8 steps, a checkpoint after each, LoRA dropout on (each rank's generator is restored).
    tiny = lambda out, *args: torchrun([str(out), *args], program=(str(TINY_SCRIPT),))  # noqa: E731
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    proc = tiny(reference, "--fsdp")
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = tiny(killed, "--fsdp", "--die-after", "3")  # rank 0 dies as it logs step 4, once step 3 is on disk
    assert proc.returncode != 0 and not (killed / "lora_adapter").exists()
    meta = read_state(latest_checkpoint(killed / "train_state"))
    assert meta["step"] == 3 and meta["fingerprint"]["fsdp"] is True
    by_ddp = shutil.copytree(killed, tmp_path / "by-ddp")

    proc = tiny(killed, "--fsdp", "--resume")
    assert proc.returncode == 0, proc.stderr[-4000:]
    ref = load_file(reference / "lora_adapter" / "adapter_model.safetensors")
    resumed = load_file(killed / "lora_adapter" / "adapter_model.safetensors")
    assert ref.keys() == resumed.keys() and all(torch.equal(ref[k], resumed[k]) for k in ref)
    assert curve(killed) == curve(reference)

    # Resumed without --fsdp, by DDP: the same steps, up to float rounding, and the switch is logged.
    proc = tiny(by_ddp, "--resume")
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = load_file(by_ddp / "lora_adapter" / "adapter_model.safetensors")
    for key in ref:
        torch.testing.assert_close(resumed[key], ref[key], rtol=1e-5, atol=1e-7, msg=key)
    assert [r["warning"] for r in metrics(by_ddp) if "warning" in r] == [
        "resumed at step 3 with fsdp off (checkpoint on)"]
