"""Training checkpoints: atomic, pickle-free, and a resumed run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import child_env
from safetensors.torch import load_file, save_file

from gptqlora import files
from gptqlora.errors import InputNotFoundError, OutputExistsError, UsageError
from gptqlora.lora.adapter import read_adapter_base
from gptqlora.provenance import base_record
from gptqlora.train import latest_checkpoint, train_lora
from gptqlora.train.state import ADAPTER_FILE, FILES, OPTIMIZER_FILE, RNG_FILE, STATE_FILE, read_state

from train.tiny import SCRIPT_SEED, script_config, tiny_config, tiny_data, tiny_lora_model

TINY_SCRIPT = Path(__file__).with_name("tiny.py")


class Interrupt(Exception):
    """Raised from on_metrics to stop a run mid-way, as a crash would."""


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "lora_adapter" / "adapter_model.safetensors"))


def curve(out: Path) -> list[tuple]:
    """(step, train loss, lr) and (step, eval loss) from metrics.jsonl: the loss curve, without timings."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) if "loss" in r else (r["step"], r["eval_loss"]) for r in records
            if "loss" in r or "eval_loss" in r]


def run(out: Path, **overrides) -> dict:
    tok, train, held_out = tiny_data()
    kwargs = {k: overrides.pop(k) for k in ("on_metrics", "provenance", "overwrite") if k in overrides}
    config = tiny_config(out, **overrides)
    return train_lora(tiny_lora_model(), tok, train, held_out, config, seed=SCRIPT_SEED, progress=False, **kwargs)


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file under ``out`` by relative path, with its bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


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


@pytest.mark.process
def test_resume_after_sigkill_matches_the_uninterrupted_run(tmp_path):
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    with (tmp_path / "stderr.txt").open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, str(TINY_SCRIPT), str(killed), "--slow", "0.4"],
                                stdout=subprocess.DEVNULL, stderr=stderr, env=child_env())
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
    with pytest.raises(InputNotFoundError, match="no training checkpoint"):
        run(tmp_path, max_steps=2, resume=True)


@pytest.mark.parametrize("change", [dict(batch_size=3), dict(lr=2e-2), dict(weight_decay=0.1), "rank"],
                         ids=["batch_size", "higher lr", "weight_decay", "rank"])
def test_resume_with_other_settings_is_a_clear_error(tmp_path, change):
    run(tmp_path, max_steps=2)
    tok, train, held_out = tiny_data()
    config = tiny_config(tmp_path, max_steps=2, resume=True, **(change if isinstance(change, dict) else {}))
    model = tiny_lora_model(r=8 if change == "rank" else 4)
    key = "lora_r" if change == "rank" else next(iter(change))
    with pytest.raises(UsageError, match=f"different settings.*{key}: checkpoint.*may change only lr \\(lower only\\)"):
        train_lora(model, tok, train, held_out, config, seed=SCRIPT_SEED, progress=False)


def test_a_fresh_run_refuses_an_earlier_run_before_any_work_and_leaves_it_untouched(tmp_path):
    run(tmp_path, max_steps=2)
    before = snapshot(tmp_path)
    seen = []
    with pytest.raises(OutputExistsError, match="--resume.*--overwrite") as info:
        run(tmp_path, max_steps=2, on_metrics=seen.append)
    assert isinstance(info.value, FileExistsError)  # older callers catch the built-in class
    assert seen == [] and snapshot(tmp_path) == before  # no step-0 eval, metrics.jsonl not truncated

    # A run that died before its first checkpoint left only metrics.jsonl: that is refused too.
    shutil.rmtree(tmp_path / "train_state")
    with pytest.raises(OutputExistsError, match="metrics.jsonl"):
        run(tmp_path, max_steps=2)
    with pytest.raises(UsageError, match="only one of them"):
        run(tmp_path, max_steps=2, resume=True, overwrite=True)


def test_overwrite_starts_again_as_in_a_new_directory_and_keeps_other_files(tmp_path):
    out, reference = tmp_path / "out", tmp_path / "reference"
    run(out, max_steps=4, save_every=1)
    (out / "quantized_base").mkdir()
    (out / "quantized_base" / "config.json").write_text("{}")  # the CLI keeps the run's base here
    summary = run(out, max_steps=2, overwrite=True)
    run(reference, max_steps=2)
    assert summary["resumed_from"] is None and summary["steps"] == 2
    assert curve(out) == curve(reference)  # no line of the old run is left
    assert [d.name for d in (out / "train_state").iterdir()] == ["step-00000002"]
    assert all(torch.equal(adapter(out)[k], adapter(reference)[k]) for k in adapter(reference))
    assert (out / "quantized_base" / "config.json").read_text() == "{}"


def interrupted_run(out: Path, max_steps: int = 6, crash_at: int = 5, **kwargs) -> Path:
    """A run saving every 2 steps, stopped (as by a crash) once step ``crash_at`` is logged; its latest checkpoint."""
    def crash(record):
        if record.get("step") == crash_at and "loss" in record:
            raise Interrupt

    with pytest.raises(Interrupt):
        run(out, max_steps=max_steps, save_every=2, on_metrics=crash, **kwargs)
    return latest_checkpoint(out / "train_state")


def test_an_incomplete_latest_checkpoint_is_skipped_with_a_warning_and_the_run_still_matches(tmp_path):
    run(tmp_path / "full", max_steps=8, save_every=2)
    cut = tmp_path / "cut"
    good = interrupted_run(cut, max_steps=8, crash_at=5)
    assert good.name == "step-00000004"
    # A newer checkpoint that lost a file (a damaged disk, a careless cleanup): not to be taken for "none".
    damaged = cut / "train_state" / "step-00000006"
    shutil.copytree(good, damaged)
    (damaged / OPTIMIZER_FILE).unlink()
    assert latest_checkpoint(cut / "train_state") == good

    with pytest.warns(UserWarning, match=f"skipping incomplete checkpoint {damaged}.*continuing from {good}"):
        summary = run(cut, max_steps=8, save_every=2, resume=True)
    assert summary["resumed_from"] == 4
    assert all(torch.equal(adapter(tmp_path / "full")[k], t) for k, t in adapter(cut).items())
    assert curve(cut) == curve(tmp_path / "full")
    assert [d.name for d in (cut / "train_state").iterdir()] == ["step-00000008"]  # the damaged one is gone


def test_only_incomplete_checkpoints_is_not_reported_as_none(tmp_path):
    ckpt = interrupted_run(tmp_path)
    (ckpt / STATE_FILE).unlink()
    with pytest.raises(UsageError, match=f"every checkpoint in .* is incomplete \\({ckpt.name} lacks {STATE_FILE}\\)"
                       ".*--overwrite") as info:
        run(tmp_path, max_steps=6, save_every=2, resume=True)
    assert "no training checkpoint" not in str(info.value)
    with pytest.raises(OutputExistsError, match=ckpt.name):  # nor is a fresh run let in to overwrite it
        run(tmp_path, max_steps=6)


def test_a_checkpoint_with_non_finite_tensors_is_refused_naming_the_file(tmp_path):
    ckpt = interrupted_run(tmp_path)
    tensors = load_file(str(ckpt / ADAPTER_FILE))
    key = next(iter(tensors))
    tensors[key][0, 0] = float("inf")
    save_file(tensors, str(ckpt / ADAPTER_FILE))
    with pytest.raises(UsageError, match=f"{ckpt / ADAPTER_FILE} holds NaN or infinite values"):
        run(tmp_path, max_steps=6, save_every=2, resume=True)


def fake_base(d: Path, seed: int) -> dict:
    """The base record of a directory holding seeded weights and a GPTQ-looking config."""
    d.mkdir(parents=True)
    save_file({"w": torch.randn(8, 8, generator=torch.Generator().manual_seed(seed))}, str(d / "model.safetensors"))
    block = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True,
             "checkpoint_format": "gptq"}
    (d / "config.json").write_text(json.dumps({"quantization_config": block}))
    return base_record(d)


def test_provenance_is_recorded_and_a_resume_over_another_base_is_refused_naming_both(tmp_path):
    base, other = fake_base(tmp_path / "base", 0), fake_base(tmp_path / "other", 1)
    out = tmp_path / "out"
    provenance = {"base": base, "data": "tiny-gsm8k", "seed": SCRIPT_SEED}
    assert interrupted_run(out, max_steps=4, crash_at=3, provenance=provenance).name == "step-00000002"
    assert json.loads((out / "run_provenance.json").read_text()) == provenance

    with pytest.raises(UsageError, match="cannot resume") as info:
        run(out, max_steps=4, save_every=2, resume=True, provenance={**provenance, "base": other})
    message = str(info.value)
    assert "base fingerprint: checkpoint" in message
    for record in (base, other):
        assert record["path"] in message and record["fingerprint"][:12] in message
    with pytest.raises(UsageError, match="provenance: checkpoint"):  # another data source is another run
        run(out, max_steps=4, save_every=2, resume=True, provenance={**provenance, "data": "other"})

    # The same weights copied elsewhere are the same base: the resume goes on, and the adapter records the base.
    shutil.copytree(tmp_path / "base", tmp_path / "copy")
    summary = run(out, max_steps=4, save_every=2, resume=True, provenance={**provenance,
                                                                          "base": base_record(tmp_path / "copy")})
    assert summary["resumed_from"] == 2 and summary["warnings"] == []
    assert json.loads((out / "run_provenance.json").read_text()) == provenance  # a resume does not rewrite it
    assert read_adapter_base(out / "lora_adapter")["fingerprint"] == base["fingerprint"]


def test_a_checkpoint_that_predates_provenance_resumes_with_a_warning(tmp_path):
    interrupted_run(tmp_path)  # written without a base record, as checkpoints were before they kept one
    base = fake_base(tmp_path / "base", 0)
    with pytest.warns(UserWarning, match=r"resumed at step 4 with base .*base \(fingerprint .*\(checkpoint null\)"):
        summary = run(tmp_path, max_steps=6, save_every=2, resume=True, provenance={"base": base, "data": "tiny"})
    assert summary["steps"] == 6 and len(summary["warnings"]) == 2  # the base, and the rest of the provenance


def test_checkpoint_files_follow_the_umask(tmp_path):
    run(tmp_path, max_steps=1)
    ckpt = latest_checkpoint(tmp_path / "train_state")
    mask = files.umask()
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o777 & ~mask  # not tempfile's 0700
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in ckpt.iterdir()} == {n: 0o666 & ~mask for n in FILES}
