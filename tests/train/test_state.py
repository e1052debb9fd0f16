"""Training checkpoints: atomic, pickle-free, and a resumed run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gptqlora.train import latest_checkpoint, train_lora
from gptqlora.train.state import FILES, OPTIMIZER_FILE, RNG_FILE, STATE_FILE, read_state

from train.tiny import SCRIPT_SEED, script_config, tiny_config, tiny_data, tiny_lora_model

TINY_SCRIPT = Path(__file__).with_name("tiny.py")


class Interrupt(Exception):
    """Raised from on_metrics to stop a run mid-way, as a crash would."""


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "lora_adapter" / "adapter_model.safetensors"))


def curve(out: Path) -> list[tuple]:
    """(step, train loss, lr) and (step, eval loss) from metrics.jsonl: the loss curve, without timings."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) if "loss" in r else (r["step"], r["eval_loss"]) for r in records]


def run(out: Path, **overrides) -> dict:
    tok, train, held_out = tiny_data()
    on_metrics = overrides.pop("on_metrics", None)
    config = tiny_config(out, **overrides)
    return train_lora(tiny_lora_model(), tok, train, held_out, config, seed=SCRIPT_SEED, progress=False,
                      on_metrics=on_metrics)


def test_resume_in_process_matches_the_uninterrupted_run(tmp_path):
    # 6 examples in micro-batches of 2: 3 per epoch, so the checkpoint at step 4 sits inside epoch 1; LoRA
    # dropout draws from the global RNG, so its state must be restored too.
    run(tmp_path / "full", max_steps=6, save_every=2)

    def crash_at_step_5(record):
        if record.get("step") == 5 and "loss" in record:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(tmp_path / "cut", max_steps=6, save_every=2, on_metrics=crash_at_step_5)
    ckpt = latest_checkpoint(tmp_path / "cut" / "train_state")
    assert ckpt is not None and ckpt.name == "step-00000004"
    meta = read_state(ckpt)
    assert (meta["step"], meta["epoch"], meta["batch_index"]) == (4, 1, 1)
    assert not (tmp_path / "cut" / "lora_adapter").exists()

    # The fresh model's LoRA init reseeds the global RNG, which is then not the checkpoint's: resume restores it.
    summary = run(tmp_path / "cut", max_steps=6, save_every=2, resume=True)
    assert summary["resumed_from"] == 4 and summary["steps"] == 6
    full, resumed = adapter(tmp_path / "full"), adapter(tmp_path / "cut")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert curve(tmp_path / "cut") == curve(tmp_path / "full")  # the log lost step 5's orphan line


def test_resume_after_sigkill_matches_the_uninterrupted_run(tmp_path):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    with (tmp_path / "stderr.txt").open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, str(TINY_SCRIPT), str(killed), "--slow", "0.4"],
                                stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                ckpt = latest_checkpoint(killed / "train_state")
                if ckpt is not None and read_state(ckpt)["step"] >= 3:
                    break
                time.sleep(0.02)
            alive = proc.poll() is None
            proc.send_signal(signal.SIGKILL)  # mid-run: it sleeps 0.4 s after each of its 8 steps
        finally:
            proc.kill()
            proc.wait()
    assert alive and proc.returncode == -signal.SIGKILL, (tmp_path / "stderr.txt").read_text()[-2000:]
    assert not (killed / "lora_adapter").exists()  # it died mid-run
    step = read_state(latest_checkpoint(killed / "train_state"))["step"]
    assert 3 <= step < 8

    tok, train, held_out = tiny_data()
    train_lora(tiny_lora_model(), tok, train, held_out, script_config(reference), seed=SCRIPT_SEED, progress=False)
    summary = train_lora(tiny_lora_model(), tok, train, held_out, script_config(killed, resume=True),
                         seed=SCRIPT_SEED, progress=False)
    assert summary["resumed_from"] == step
    ref, resumed = adapter(reference), adapter(killed)
    assert ref.keys() == resumed.keys()
    assert all(torch.allclose(ref[k], resumed[k], rtol=0, atol=1e-6) for k in ref)
    got, want = curve(killed), curve(reference)
    assert [r[0] for r in got] == [r[0] for r in want]
    assert all(g[1:] == pytest.approx(w[1:], abs=1e-6) for g, w in zip(got, want))


def test_checkpoint_holds_safetensors_and_json_only_and_keeps_just_the_latest(tmp_path):
    run(tmp_path, max_steps=4, save_every=1, grad_accum=2)
    root = tmp_path / "train_state"
    assert [d.name for d in root.iterdir()] == ["step-00000004"]  # older ones deleted, no temporary left
    ckpt = root / "step-00000004"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(FILES)
    opt = load_file(str(ckpt / OPTIMIZER_FILE))
    n_params = len(adapter(tmp_path))
    assert set(opt) == {f"state.{i}.{k}" for i in range(n_params) for k in ("exp_avg", "exp_avg_sq", "step")}
    assert all(float(opt[f"state.{i}.step"]) == 4 for i in range(n_params))
    rng = load_file(str(ckpt / RNG_FILE))
    assert rng["torch_cpu"].dtype == torch.uint8
    meta = json.loads((ckpt / STATE_FILE).read_text())
    assert meta["step"] == 4 and meta["epoch"] == 2 and meta["batch_index"] == 2  # 8 micro-batches of 3 per epoch
    assert [r["step"] for r in meta["history"] if "loss" in r] == [1, 2, 3, 4]


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no training checkpoint"):
        run(tmp_path, max_steps=2, resume=True)


@pytest.mark.parametrize("change", [dict(batch_size=3), dict(lr=5e-3), "rank"], ids=["batch_size", "lr", "rank"])
def test_resume_with_other_settings_is_a_clear_error(tmp_path, change):
    run(tmp_path, max_steps=2)
    tok, train, held_out = tiny_data()
    config = tiny_config(tmp_path, max_steps=2, resume=True, **(change if isinstance(change, dict) else {}))
    model = tiny_lora_model(r=8 if change == "rank" else 4)
    key = "lora_r" if change == "rank" else next(iter(change))
    with pytest.raises(ValueError, match=f"different settings.*{key}: checkpoint"):
        train_lora(model, tok, train, held_out, config, seed=SCRIPT_SEED, progress=False)


def test_a_fresh_run_refuses_to_mix_with_an_earlier_runs_checkpoints(tmp_path):
    run(tmp_path, max_steps=2)
    with pytest.raises(FileExistsError, match="--resume"):
        run(tmp_path, max_steps=2)
