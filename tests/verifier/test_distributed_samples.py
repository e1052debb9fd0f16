"""Data-parallel sampling under torchrun: two gloo processes on CPU write the samples one process writes, a killed
two-process sampling resumes to them, and ``gptqlora run``'s verifier stage runs on two processes.

As a script, run by torchrun, this file either samples the tiny seeded LLaMA on six made-up questions (``python
test_distributed_samples.py sample OUT [--die-at I] [--slow SECONDS] [--resume]``; ``--die-at I`` makes the rank
that samples question ``I`` SIGKILL itself once that question's batch is on disk, ``--slow`` makes rank 0 sleep
after each of its questions), or runs the CLI with scripted samples (``... cli DATA_DIR ARGV...``, see
``verifier.scripted``). References are one-process runs in this process, on one thread like each rank.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama, make_tiny_tokenizer, one_torch_thread

from gptqlora import cli, distributed
from gptqlora.config import EvalConfig
from gptqlora.eval import engine as engine_module
from gptqlora.verifier import samples as samples_module
from gptqlora.verifier.samples import SAMPLE_FILES, sample_gsm8k

from eval.eval_script import BATCH, ENTRIES
from eval.test_distributed_eval import cli_on_one_and_two_ranks, torchrun
from verifier.scripted import scripted_samples

CONFIG = EvalConfig(eval_batch_size=BATCH, max_new_tokens=12, samples=2, temperature=1.0, top_p=0.9)
SEED = 5
PROVENANCE = {"model": "tiny-llama (seed 0)"}
RUN_ONLY = ("resumed_from", "world_size")  # what a summary says about the run rather than the samples


def run_sample(out: str | Path, resume: bool = False, log=lambda line: None) -> dict:
    """Sample the seeded tiny LLaMA on the six made-up questions (as train questions) into ``out``."""
    return sample_gsm8k(make_tiny_llama(), make_tiny_tokenizer(), ENTRIES, CONFIG, out, style="plain", seed=SEED,
                        resume=resume, provenance=PROVENANCE, log=log)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted one-process sampling of the six questions, on one thread."""
    with one_torch_thread():
        out = tmp_path_factory.mktemp("reference")
        run_sample(out)
    return out


def assert_same_samples(out: Path, ref: Path, world_size: int) -> dict:
    """``out`` holds ``ref``'s samples and settings byte for byte, its summary theirs but for the run's own fields,
    and no part file."""
    for name in (SAMPLE_FILES.records, SAMPLE_FILES.config):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    summary = json.loads((out / SAMPLE_FILES.summary).read_text())
    ref_summary = json.loads((ref / SAMPLE_FILES.summary).read_text())
    assert {k: v for k, v in summary.items() if k not in RUN_ONLY} == \
        {k: v for k, v in ref_summary.items() if k not in RUN_ONLY}
    assert summary["world_size"] == world_size
    assert not list(out.glob(SAMPLE_FILES.parts))  # merged, then removed
    return summary


@pytest.mark.process
def test_cli_sample_on_two_ranks_writes_what_one_process_writes(tmp_path, one_thread, gsm8k_dir, capsys):
    one, two = cli_on_one_and_two_ranks("sample", 3, "--out", tmp_path, gsm8k_dir, capsys)
    assert_same_samples(tmp_path / "two", tmp_path / "one", world_size=2)
    assert one["world_size"] == 1 and two["world_size"] == 2 and two["samples"] == 15
    records = [json.loads(line) for line in (tmp_path / "two" / SAMPLE_FILES.records).read_text().splitlines()]
    assert len({s for r in records for s in r["samples"]}) == 15  # sampled, not 15 copies of one text


@pytest.mark.process
def test_a_sampling_killed_on_two_ranks_resumes_to_an_uninterrupted_one(tmp_path, one_thread, reference):
    out = tmp_path / "killed"
    # Rank 1 samples batch [2, 3] and dies once it is on disk; torchrun then stops rank 0 wherever it is: most
    # likely asleep after its batch [0, 1], so that [4, 5] is left to the resume.
    proc = torchrun([__file__, "sample", str(out), "--die-at", "3", "--slow", "1"], tmp_path, check=False)
    assert proc.returncode != 0
    assert not (out / SAMPLE_FILES.summary).exists() and (out / SAMPLE_FILES.records).read_bytes() == b""
    parts = {r: SAMPLE_FILES.part(out, r) for r in (0, 1)}
    lines = {r: p.read_bytes().count(b"\n") if p.is_file() else 0 for r, p in parts.items()}
    assert lines[1] == BATCH, proc.stderr[-3000:]
    # Whole batches that continue the (empty) merged file are kept: rank 0's [0, 1], then [2, 3], then its [4, 5].
    kept = 0 if lines[0] < BATCH else 2 * BATCH if lines[0] < 2 * BATCH else 3 * BATCH
    one_process = shutil.copytree(out, tmp_path / "killed-copy")

    torchrun([__file__, "sample", str(out), "--resume"], tmp_path)
    assert assert_same_samples(out, reference, world_size=2)["resumed_from"] == kept

    # The same killed sampling resumed by one process.
    log: list[str] = []
    assert run_sample(one_process, resume=True, log=log.append)["resumed_from"] == kept
    assert log[0].startswith(f"resuming: {kept} of {len(ENTRIES)} questions sampled")
    assert [ln.split(" ")[0] for ln in log[1:]] == [f"[{i}]" for i in range(kept, len(ENTRIES))]
    assert_same_samples(one_process, reference, world_size=1)


def run_argv(model: Path, data: Path, out: Path, batch_size: int) -> list[str]:
    """A small ``gptqlora run`` with the verifier stage: 4 train questions sampled twice each, 4 test questions."""
    return ["run", "--model", str(model), "--data", str(data), "--out", str(out), "--test-limit", "4",
            "--train-steps", "1", "--train-limit", "4", "--eval-holdout", "0", "--skip-float-eval",
            "--verifier-questions", "4", "--verifier-samples", "2", "--method", "rtn", "--group-size", "32",
            "--max-new-tokens", "4", "--eval-batch-size", "2", "--no-bf16", "--max-length", "64", "--dtype",
            "float32", "--lora-dropout", "0", "--batch-size", str(batch_size)]


@pytest.mark.process
def test_run_with_the_verifier_stage_on_two_ranks(tmp_path, one_thread, gsm8k_dir, monkeypatch):
    make_tiny_llama().save_pretrained(tmp_path / "tiny")
    make_tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    one, two = tmp_path / "one", tmp_path / "two"
    monkeypatch.setattr(engine_module, "generate_samples", scripted_samples(gsm8k_dir))
    assert cli.main(run_argv(tmp_path / "tiny", gsm8k_dir, one, batch_size=2)) == 0
    # Two processes with the global batch of one (1 x 2 processes).
    proc = torchrun([__file__, "cli", str(gsm8k_dir), *run_argv(tmp_path / "tiny", gsm8k_dir, two, batch_size=1)],
                    tmp_path)
    assert proc.stdout.count("verifier best-of 2 |") == 1  # rank 0 alone prints the table
    # The samples of one process; the settings too, and the provenance but for the run's own path.
    samples = {d: d / "verifier" / "samples" for d in (one, two)}
    assert (samples[two] / SAMPLE_FILES.records).read_bytes() == (samples[one] / SAMPLE_FILES.records).read_bytes()
    summaries = {d: json.loads((samples[d] / SAMPLE_FILES.summary).read_text()) for d in (one, two)}
    assert summaries[two]["world_size"] == 2 and summaries[two]["settings"] == summaries[one]["settings"]
    assert summaries[two]["samples"] == 8 and summaries[two]["pass_at_k"] == summaries[one]["pass_at_k"]
    assert summaries[two]["provenance"]["base"]["fingerprint"] == summaries[one]["provenance"]["base"]["fingerprint"]
    assert not list(samples[two].glob(SAMPLE_FILES.parts))
    # Rank 0 alone trained the verifier, on those samples over the same base: the same weights.
    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        assert (two / "verifier" / "model" / name).read_bytes() == (one / "verifier" / "model" / name).read_bytes()
    rows = {d: json.loads((d / "results.json").read_text())["rows"] for d in (one, two)}
    assert list(rows[two]) == list(rows[one]) == ["rtn 4-bit base", "rtn 4-bit + LoRA", "rtn 4-bit + LoRA + verifier"]
    # The reranked evaluation ran on both ranks, with that verifier.
    row = rows[two]["rtn 4-bit + LoRA + verifier"]
    assert row["world_size"] == 2 and row["n"] == 4
    assert row["provenance"]["verifier"]["path"] == str((two / "verifier" / "model").resolve())
    for key in ("self_consistency", "verifier_best_of_k", "verifier_weighted_vote", "pass_at_k"):
        assert row[key]["k"] == 2, key
    evaluated = (two / "eval" / "rtn_4-bit_+_LoRA_+_verifier" / "predictions.jsonl").read_text().splitlines()
    assert [len(json.loads(line)["verifier_scores"]) for line in evaluated] == [2] * 4

    # Resumed on two processes, the finished run keeps the samples, the verifier and every row.
    before = {p: p.read_bytes() for p in (two / "verifier").rglob("*") if p.is_file()}
    table = (two / "results.md").read_text()
    torchrun([__file__, "cli", str(gsm8k_dir), *run_argv(tmp_path / "tiny", gsm8k_dir, two, batch_size=1),
              "--resume"], tmp_path)
    assert {p: p.read_bytes() for p in (two / "verifier").rglob("*") if p.is_file()} == before
    assert (two / "results.md").read_text() == table


def main() -> None:
    if sys.argv[1] == "cli":  # cli DATA_DIR ARGV...: the CLI with scripted samples
        engine_module.generate_samples = scripted_samples(sys.argv[2])
        sys.exit(cli.main(sys.argv[3:]))
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["sample"])
    parser.add_argument("out")
    parser.add_argument("--die-at", type=int, default=None)
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    distributed.init("cpu")
    torch.set_num_threads(1)

    def log(line: str) -> None:
        if args.die_at is not None and line.startswith(f"[{args.die_at}] "):
            os.kill(os.getpid(), signal.SIGKILL)  # after the batch was appended, before anything else
        if distributed.world().main:
            time.sleep(args.slow)

    try:
        run_sample(args.out, resume=args.resume, log=log)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    main()
    distributed.exit_process(0)  # as the CLI's torchrun workers leave
