"""Nothing lost, nothing silent: outputs never replace what the user did not ask to replace, every user mistake is one
line (exit 2) before any work, and a killed command leaves nothing half-written. Through the CLI on a tiny model."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import child_env, error_of, make_tiny_llama, make_tiny_tokenizer
from gptqlora import cli
from gptqlora.files import OutputLock

QUANT = ["--group-size", "32", "--calib-samples", "2", "--calib-seqlen", "16", "--targets", "attn"]


@pytest.fixture
def tiny_model_dir(tmp_path):
    d = tmp_path / "float_user"
    make_tiny_llama().save_pretrained(d)
    make_tiny_tokenizer().save_pretrained(d)
    (d / "my_notes.txt").write_text("a user's own file")
    return d


@pytest.fixture
def quantized_dir(tmp_path, tiny_model_dir, gsm8k_dir):
    out = tmp_path / "q"
    assert cli.main(["quantize", "--model", str(tiny_model_dir), "--data", str(gsm8k_dir), "--method", "rtn",
                     "--out", str(out), *QUANT]) == 0
    return out


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- 1. outputs

@pytest.mark.parametrize("where", ["same", "inside", "parent"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_quantize_never_writes_over_its_input(tmp_path, tiny_model_dir, gsm8k_dir, capsys, where, overwrite):
    before = snapshot(tiny_model_dir)
    out = {"same": tiny_model_dir, "inside": tiny_model_dir / "q", "parent": tmp_path}[where]
    argv = ["quantize", "--model", str(tiny_model_dir), "--data", str(gsm8k_dir), "--method", "rtn", "--out",
            str(out), *QUANT] + (["--overwrite"] if overwrite else [])
    assert cli.main(argv) == 2
    assert "input" in error_of(capsys)
    assert snapshot(tiny_model_dir) == before


def test_quantize_refuses_the_embedded_models_cache_as_output(tmp_path, tiny_model_dir, gsm8k_dir, capsys):
    cache = tmp_path / "cache"
    (cache / "smollm2-135m").mkdir(parents=True)
    for f in tiny_model_dir.iterdir():
        (cache / "smollm2-135m" / f.name).write_bytes(f.read_bytes())
    before = snapshot(cache)
    assert cli.main(["quantize", "--model", "smollm2-135m", "--cache-dir", str(cache), "--data", str(gsm8k_dir),
                     "--method", "rtn", "--out", str(cache / "smollm2-135m"), "--overwrite", *QUANT]) == 2
    assert "is the input" in error_of(capsys)
    assert snapshot(cache) == before


def test_an_existing_output_survives_unless_overwrite(tmp_path, tiny_model_dir, gsm8k_dir, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    argv = ["quantize", "--model", str(tiny_model_dir), "--data", str(gsm8k_dir), "--method", "rtn", "--out",
            str(out), *QUANT]
    assert cli.main(argv) == 2
    assert "--overwrite" in error_of(capsys)
    assert (out / "keep.txt").read_text() == "precious"
    assert cli.main(argv + ["--overwrite"]) == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial, lock or old dir left


def test_merge_refuses_to_write_over_the_base_or_the_adapter(tmp_path, quantized_dir, gsm8k_dir, capsys):
    adapter = tmp_path / "adapter"
    _train_adapter(quantized_dir, gsm8k_dir, tmp_path / "ft")
    (tmp_path / "ft" / "lora_adapter").rename(adapter)
    capsys.readouterr()
    before = snapshot(quantized_dir), snapshot(adapter)
    for out in (quantized_dir, adapter, adapter / "sub"):
        assert cli.main(["merge", "--quantized", str(quantized_dir), "--adapter", str(adapter), "--data",
                         str(gsm8k_dir), "--out", str(out), "--overwrite", "--calib-samples", "2", "--calib-seqlen",
                         "16", "--ppl-limit", "2"]) == 2
        assert "input" in error_of(capsys)
    assert (snapshot(quantized_dir), snapshot(adapter)) == before


def _train_adapter(quantized_dir, gsm8k_dir, out, *extra):
    assert cli.main(["finetune", "--quantized", str(quantized_dir), "--data", str(gsm8k_dir), "--out", str(out),
                     "--max-steps", "2", "--train-limit", "4", "--eval-holdout", "2", "--max-length", "48",
                     "--no-bf16", "--no-gradient-checkpointing", "--lora-r", "2", *extra]) == 0


def test_a_fresh_finetune_over_an_earlier_run_is_refused_before_any_work(tmp_path, tiny_model_dir, gsm8k_dir, capsys):
    out = tmp_path / "run"
    argv = ["finetune", "--model", str(tiny_model_dir), "--data", str(gsm8k_dir), "--out", str(out), "--max-steps",
            "1", "--train-limit", "4", "--eval-holdout", "2", "--max-length", "48", "--no-bf16",
            "--no-gradient-checkpointing", "--method", "rtn", *QUANT]
    assert cli.main(argv) == 0
    capsys.readouterr()
    before = snapshot(out)
    assert cli.main(argv[:-len(QUANT)] + ["--bits", "2", *QUANT]) == 2  # a 2-bit base over the 4-bit run
    assert "--overwrite" in error_of(capsys)
    assert snapshot(out) == before  # quantized_base, adapter and metrics untouched
    # Resuming with other quantization options is refused too, naming the setting.
    assert cli.main(argv[:-len(QUANT)] + ["--bits", "2", "--resume", *QUANT]) == 2
    assert "bits: run 4, now 2" in error_of(capsys)
    assert snapshot(out) == before


def test_outputs_get_the_umask_permissions(tmp_path, tiny_model_dir, gsm8k_dir):
    old = os.umask(0o022)
    try:
        out = tmp_path / "q"
        assert cli.main(["quantize", "--model", str(tiny_model_dir), "--data", str(gsm8k_dir), "--method", "rtn",
                         "--out", str(out), *QUANT]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for f in out.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_a_second_writer_on_the_same_output_is_refused(tmp_path, tiny_model_dir, gsm8k_dir, capsys):
    out = tmp_path / "q"
    with OutputLock(out):
        assert cli.main(["quantize", "--model", str(tiny_model_dir), "--data", str(gsm8k_dir), "--method", "rtn",
                         "--out", str(out), *QUANT]) == 2
    assert f"pid {os.getpid()}" in error_of(capsys)
    assert not out.exists()


def test_a_link_planted_at_the_lock_is_refused_in_one_line_and_its_target_survives(tmp_path, tiny_model_dir,
                                                                                  gsm8k_dir, capsys, monkeypatch):
    import gptqlora.models

    monkeypatch.setattr(gptqlora.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    precious = tmp_path / "precious.txt"
    precious.write_bytes(b"a file the link points at")
    link = tmp_path / ".q.lock"
    link.symlink_to(precious)  # where quantize --out q takes its writer's lock
    assert cli.main(["quantize", "--model", str(tiny_model_dir), "--data", str(gsm8k_dir), "--method", "rtn",
                     "--out", str(tmp_path / "q"), *QUANT]) == 2
    line = error_of(capsys)
    assert str(link) in line and "symbolic link" in line and "remove" in line, line
    assert precious.read_bytes() == b"a file the link points at" and link.is_symlink()
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("case", ["file", "under_a_file", "read_only"])
def test_unwritable_outputs_are_refused_before_loading(tmp_path, gsm8k_dir, capsys, case, monkeypatch):
    import gptqlora.models

    monkeypatch.setattr(gptqlora.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    (tmp_path / "a_file").write_text("x")
    out = {"file": tmp_path / "a_file", "under_a_file": tmp_path / "a_file" / "q",
           "read_only": Path("/proc/gptqlora-cannot-write-here")}[case]
    model = tmp_path / "m"
    make_tiny_llama().save_pretrained(model)
    make_tiny_tokenizer().save_pretrained(model)
    capsys.readouterr()
    assert cli.main(["quantize", "--model", str(model), "--data", str(gsm8k_dir), "--out", str(out), *QUANT]) == 2
    assert str(out) in error_of(capsys)
    # eval's output directory is checked before generating anything, too.
    assert cli.main(["eval", "--model", str(model), "--data", str(gsm8k_dir), "--limit", "1", "--output-dir",
                     str(out)]) == 2
    assert str(out) in error_of(capsys)


SLOW_SAVE = """
import sys, time
import gptqlora.files as files
real = files.normalize_permissions
def slow(*a, **k):  # called on the complete staged directory, just before it is renamed into place
    real(*a, **k)
    print("saved", flush=True)
    time.sleep(60)
files.normalize_permissions = slow
from gptqlora import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.process
@pytest.mark.parametrize("command", ["quantize", "merge"])
def test_kill_during_the_write_leaves_no_partial_output_and_the_rerun_succeeds(tmp_path, tiny_model_dir, gsm8k_dir,
                                                                              command):
    out = tmp_path / "out"
    if command == "quantize":
        argv = ["quantize", "--model", str(tiny_model_dir), "--data", str(gsm8k_dir), "--method", "rtn", "--out",
                str(out), *QUANT]
    else:
        q = tmp_path / "q"
        assert cli.main(["quantize", "--model", str(tiny_model_dir), "--data", str(gsm8k_dir), "--method", "rtn",
                         "--out", str(q), *QUANT]) == 0
        _train_adapter(q, gsm8k_dir, tmp_path / "ft")
        argv = ["merge", "--quantized", str(q), "--adapter", str(tmp_path / "ft" / "lora_adapter"), "--data",
                str(gsm8k_dir), "--out", str(out), "--calib-samples", "2", "--calib-seqlen", "16", "--ppl-limit", "2"]
    before = sorted(p.name for p in tmp_path.iterdir())
    env = child_env(OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, *argv], stdout=subprocess.PIPE, env=env, text=True)
    try:
        line = proc.stdout.readline()
        while line and line.strip() != "saved":  # the command's own output comes first
            line = proc.stdout.readline()
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
        assert len(partial) == 1 and (partial[0] / "config.json").is_file()  # all staged, nothing in place
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not out.exists()  # nothing under the output's name
    if command == "quantize":  # streamed: the killed run's finished blocks are kept beside the output
        assert (tmp_path / ".out.quantizing" / "state.json").is_file()
    assert cli.main(argv) == 0  # without --resume: the dead run's work directory is no reason to refuse
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before + ["out"])  # the killed run's partial is gone


KILL_AFTER_BLOCK = """
import os, signal, sys
from gptqlora.quant.stream import WorkDir
real = WorkDir.commit
def commit(self, unit, *args, **kwargs):
    real(self, unit, *args, **kwargs)
    if unit == 2:  # the embeddings and blocks 0 and 1 are on disk
        os.kill(os.getpid(), signal.SIGKILL)
WorkDir.commit = commit
from gptqlora import cli
sys.exit(cli.main(sys.argv[1:]))
"""


def _report(out: Path) -> dict:
    config = json.loads((out / "quantize_config.json").read_text())
    return config.pop("gptqlora"), config


@pytest.mark.process
def test_quantize_killed_mid_way_resumes_to_the_uninterrupted_result(tmp_path, gsm8k_dir):
    source = tmp_path / "float4"
    make_tiny_llama(num_layers=4).save_pretrained(source)
    make_tiny_tokenizer().save_pretrained(source)
    argv = ["quantize", "--model", str(source), "--data", str(gsm8k_dir), "--method", "gptq", "--act-order",
            "--group-size", "32", "--calib-samples", "4", "--calib-seqlen", "16", "--max-shard-size", "40KB"]
    assert cli.main(argv + ["--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "out"
    env = child_env(OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", KILL_AFTER_BLOCK, *argv, "--out", str(out)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not out.exists()  # never a partial output
    assert json.loads((tmp_path / ".out.quantizing" / "state.json").read_text())["units_done"] == 3
    assert cli.main(argv + ["--out", str(out), "--resume"]) == 0
    (report, config), (whole_report, whole_config) = _report(out), _report(tmp_path / "whole")
    assert report.pop("resumed_blocks") == 2 and whole_report.pop("resumed_blocks") == 0
    for r in (report, whole_report):
        r.pop("seconds")
    assert (report, config) == (whole_report, whole_config)
    for p in (tmp_path / "whole").iterdir():
        if p.name != "quantize_config.json":
            assert p.read_bytes() == (out / p.name).read_bytes(), p.name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float4", "out", "whole"]  # no work dir, lock or partial


# ---------------------------------------------------------------------------------------------- 3. same seed

def test_the_same_seed_gives_bit_identical_adapters_and_metrics(tmp_path, quantized_dir, gsm8k_dir):
    runs = []
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        _train_adapter(quantized_dir, gsm8k_dir, tmp_path / name, "--seed", seed, "--lora-dropout", "0.1")
        metrics = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        timeless = [{k: v for k, v in r.items() if k not in ("elapsed", "tokens_per_s")} for r in metrics]
        runs.append(((tmp_path / name / "lora_adapter" / "adapter_model.safetensors").read_bytes(), timeless))
    assert runs[0] == runs[1]
    assert runs[0][0] != runs[2][0]


# ---------------------------------------------------------------------------------------------- 5. one-line errors

def test_offline_hub_data_and_a_relative_path_typo_are_one_line(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import datasets

    import gptqlora.models

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(gptqlora.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.delenv("GSM8K_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    for data in ([], ["--data", "data/gsm8k"]):
        assert cli.main(["quantize", "--model", str(tiny_model_dir), "--out", str(tmp_path / "q"), *data]) == 2
        line = error_of(capsys)
        assert "not a local directory" in line and "--data DIR" in line


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "config.json").write_text("[1, 2]"), "must hold a JSON object"),
    (lambda d: _edit_config(d, lambda c: c["quantization_config"].pop("bits")), "bits missing"),
    (lambda d: _edit_config(d, lambda c: c.update(dtype="bogus")), "dtype 'bogus' is unknown"),
    (lambda d: (d / "tokenizer_config.json").unlink(), "no tokenizer files"),
    (lambda d: _edit_json(d / "quantize_config.json", lambda c: c.update(bits=2)), "disagree on bits"),
    (lambda d: _nan_scales(d), "NaN or infinite"),
])
def test_damaged_quantized_directories_are_one_line(quantized_dir, gsm8k_dir, capsys, damage, message):
    damage(quantized_dir)
    assert cli.main(["eval", "--quantized", str(quantized_dir), "--data", str(gsm8k_dir), "--limit", "1",
                     "--output-dir", str(quantized_dir.parent / "ev")]) == 2
    assert message in error_of(capsys)


def _edit_json(path, change):
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


def _edit_config(d, change):
    _edit_json(d / "config.json", change)


def _nan_scales(d):
    from safetensors.torch import load_file, save_file

    state = load_file(d / "model.safetensors")
    key = next(k for k in state if k.endswith("scales"))
    state[key][0, 0] = float("nan")
    save_file(state, d / "model.safetensors")


@pytest.mark.parametrize("split,content,message", [
    ("test", "", "holds no problems"),
    ("train", "", "holds no problems"),
    ("train", json.dumps({"question": "1+1?", "answer": "It is 2."}) + "\n", "no '#### <number>' line"),
])
def test_unusable_data_is_refused_before_loading(tmp_path, tiny_model_dir, gsm8k_dir, capsys, monkeypatch, split,
                                                 content, message):
    import gptqlora.models

    monkeypatch.setattr(gptqlora.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    data = tmp_path / "data"
    data.mkdir()
    for s in ("train", "test"):
        (data / f"{s}.jsonl").write_text(content if s == split else (gsm8k_dir / f"{s}.jsonl").read_text())
    command = ["eval", "--output-dir", str(tmp_path / "ev")] if split == "test" else ["finetune", "--out",
                                                                                       str(tmp_path / "ft")]
    assert cli.main([*command, "--model", str(tiny_model_dir), "--data", str(data)]) == 2
    assert message in error_of(capsys)


def test_ctrl_c_says_how_to_resume(monkeypatch, capsys):
    from gptqlora import commands

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(commands.COMMANDS, "finetune", commands.COMMANDS["finetune"]._replace(run=interrupted))
    assert cli.main(["finetune"]) == 130
    assert "--resume" in capsys.readouterr().err


def test_sigterm_stops_like_ctrl_c_releasing_the_lock(tmp_path, monkeypatch, capsys):
    from gptqlora import commands

    def outside(signum, frame):  # SIGTERM's handler outside the CLI (the default would end pytest itself)
        raise AssertionError("SIGTERM reached the handler in place outside the CLI")

    def terminated(args):
        with OutputLock(tmp_path / "out"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the handler raises in here, at once

    monkeypatch.setitem(commands.COMMANDS, "eval", commands.COMMANDS["eval"]._replace(run=terminated))
    previous = signal.signal(signal.SIGTERM, outside)
    try:
        assert cli.main(["eval"]) == 143
        assert signal.getsignal(signal.SIGTERM) is outside  # the CLI's handler was for its run only
    finally:
        signal.signal(signal.SIGTERM, previous)
    err = capsys.readouterr().err
    assert "SIGTERM" in err and "--resume" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # the lock was released and its file removed


SLOW_LOG = """
import sys, time
import gptqlora.workflows.scored as common
real = common.print_line
def slow(line):  # a question's line comes once its batch is on disk; the pause lets SIGTERM arrive mid-run
    real(line)
    time.sleep(0.5)
common.print_line = slow
from gptqlora import cli
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.process
def test_sigterm_during_eval_exits_143_with_the_resume_hint_and_a_resume_writes_the_uninterrupted_bytes(
        tmp_path, tiny_model_dir, gsm8k_dir, one_thread):
    argv = ["eval", "--model", str(tiny_model_dir), "--data", str(gsm8k_dir), "--limit", "5", "--batch-size", "2",
            "--max-new-tokens", "6"]
    assert cli.main(argv + ["--output-dir", str(tmp_path / "whole")]) == 0
    part = tmp_path / "part"
    records = part / "predictions.jsonl"
    env = child_env(OMP_NUM_THREADS="1")
    with (tmp_path / "stderr.txt").open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", SLOW_LOG, *argv, "--output-dir", str(part)],
                                stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and proc.poll() is None:
                if records.is_file() and records.read_bytes().count(b"\n") >= 2:  # the first batch is on disk
                    break
                time.sleep(0.02)
            alive = proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
        finally:
            proc.kill()
            proc.wait()
    err = (tmp_path / "stderr.txt").read_text()
    assert alive and proc.returncode == 143, err[-2000:]
    assert "SIGTERM" in err and "--resume" in err and "Traceback" not in err
    assert 2 <= records.read_bytes().count(b"\n") < 5 and not (part / "summary.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float_user", "part", "stderr.txt", "whole"]  # no lock
    assert cli.main(argv + ["--output-dir", str(part), "--resume"]) == 0
    assert records.read_bytes() == (tmp_path / "whole" / "predictions.jsonl").read_bytes()


def test_a_bug_keeps_its_traceback(monkeypatch):
    from gptqlora import commands

    def buggy(args):
        raise ValueError("an internal bug, not the user's mistake")

    monkeypatch.setitem(commands.COMMANDS, "eval", commands.COMMANDS["eval"]._replace(run=buggy))
    with pytest.raises(ValueError, match="internal bug"):
        cli.main(["eval"])


def test_a_full_disk_is_one_line(monkeypatch, capsys):
    import errno

    from gptqlora import commands

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/model.safetensors")

    monkeypatch.setitem(commands.COMMANDS, "quantize", commands.COMMANDS["quantize"]._replace(run=full))
    assert cli.main(["quantize", "--out", "x"]) == 2
    assert "No space left on device" in error_of(capsys)


@pytest.mark.parametrize("targets,message", [("foo_proj", "match no linear layer"),
                                             ("q_proj,foo_proj", "['foo_proj'] match no linear layer")])
def test_lora_targets_are_checked_before_loading(tmp_path, tiny_model_dir, gsm8k_dir, capsys, monkeypatch, targets,
                                                 message):
    import gptqlora.models

    monkeypatch.setattr(gptqlora.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    out = tmp_path / "ft"
    assert cli.main(["finetune", "--model", str(tiny_model_dir), "--data", str(gsm8k_dir), "--out", str(out),
                     "--lora-targets", targets]) == 2
    assert message in error_of(capsys)
    assert not out.exists()
