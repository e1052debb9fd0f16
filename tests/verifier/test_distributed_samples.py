"""Data-parallel sampling under torchrun: two gloo processes on CPU write the samples one process writes, and a killed
two-process sampling resumes to them.

As a script, run by torchrun, this file samples the tiny seeded LLaMA on six made-up questions (``python
test_distributed_samples.py sample OUT [--die-at I] [--slow SECONDS] [--resume]``; ``--die-at I`` makes the rank
that samples question ``I`` SIGKILL itself once that question's batch is on disk, ``--slow`` makes rank 0 sleep
after each of its questions). References are one-process runs in this process, on one thread like each rank.
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

if __name__ == "__main__":  # run as a script by torchrun: make the shared test fixtures importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pytest  # noqa: E402
import torch  # noqa: E402
from conftest import make_tiny_llama, make_tiny_tokenizer  # noqa: E402

from gptqlora import cli, distributed  # noqa: E402
from gptqlora.config import EvalConfig  # noqa: E402
from gptqlora.verifier.samples import SAMPLE_FILES, sample_gsm8k  # noqa: E402

from eval.eval_script import BATCH, ENTRIES  # noqa: E402
from eval.test_distributed_eval import result_of, torchrun  # noqa: E402

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
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path_factory.mktemp("reference")
        run_sample(out)
    finally:
        torch.set_num_threads(threads)
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


def test_cli_sample_on_two_ranks_writes_what_one_process_writes(tmp_path, one_thread, gsm8k_dir, capsys):
    model_dir = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(model_dir)
    make_tiny_tokenizer().save_pretrained(model_dir)
    # 5 questions in batches of 2: rank 0 samples batches [0, 1] and [4], rank 1 [2, 3].
    common = ["sample", "--model", str(model_dir), "--data", str(gsm8k_dir), "--limit", "5", "--batch-size", "2",
              "--max-new-tokens", "12", "--samples", "3", "--seed", "3", "--out"]
    assert cli.main(common + [str(tmp_path / "one")]) == 0
    one = result_of(capsys.readouterr().out)

    proc = torchrun(["-m", "gptqlora.cli", *common, str(tmp_path / "two")], tmp_path)
    two = result_of(proc.stdout)  # rank 0's, printed once
    assert proc.stdout.count('"out"') == 1
    # Each question was sampled by one rank only: its progress line appears once.
    assert sorted(ln.split(" ")[0] for ln in proc.stdout.splitlines() if ln.startswith("[")) == \
        [f"[{i}]" for i in range(5)]
    assert_same_samples(tmp_path / "two", tmp_path / "one", world_size=2)
    assert one["world_size"] == 1 and two["world_size"] == 2 and two["samples"] == 15
    records = [json.loads(line) for line in (tmp_path / "two" / SAMPLE_FILES.records).read_text().splitlines()]
    assert len({s for r in records for s in r["samples"]}) == 15  # sampled, not 15 copies of one text


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


def main() -> None:
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
