"""The llamacpp row of benchmarks/bench_generate.py: its decoding rule on a stand-in ``Llama``, its skips, and (where
llama-cpp-python is installed) one run on the embedded GGUF."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys

import pytest

from conftest import REPO

BENCHMARKS = REPO / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    """bench_generate imported as its script runs: with benchmarks/ on the path (for its ``import common``)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("bench_generate")


class FakeLlama:
    """What ``llamacpp_generate`` uses of ``llama_cpp.Llama``: a context size, ``reset`` and a greedy ``generate``
    that yields a fixed continuation, recording whether it started from an empty cache and how many it yielded."""

    def __init__(self, continuation: list[int], n_ctx: int = 64) -> None:
        self.continuation, self._n_ctx = continuation, n_ctx
        self.n_tokens, self.calls = 0, []

    def n_ctx(self) -> int:
        return self._n_ctx

    def reset(self) -> None:
        self.n_tokens = 0

    def generate(self, tokens, top_k, temp, repeat_penalty):
        assert (top_k, temp, repeat_penalty) == (1, 0.0, 1.0)  # greedy, logits untouched
        call = {"empty_cache": self.n_tokens == 0, "yielded": 0}
        self.calls.append(call)
        self.n_tokens = len(tokens)
        for t in self.continuation:
            call["yielded"] += 1
            self.n_tokens += 1
            yield t


def test_llamacpp_generate_cuts_at_eos_and_starts_empty(bench):
    llm = FakeLlama([5, 6, 2, 7])
    assert bench.llamacpp_generate(llm, [1, 2, 3], eos={2}, max_new_tokens=10) == [5, 6]
    assert bench.llamacpp_generate(llm, [1, 2, 3], eos={2}, max_new_tokens=10) == [5, 6]
    assert [c["empty_cache"] for c in llm.calls] == [True, True]  # no prefix kept from the previous prompt


def test_llamacpp_generate_stops_at_the_budget_and_the_context(bench):
    llm = FakeLlama(list(range(10, 30)), n_ctx=8)
    assert bench.llamacpp_generate(llm, [1], eos={2}, max_new_tokens=3) == [10, 11, 12]
    assert llm.calls[-1]["yielded"] == 3  # asks for no token past the budget
    assert bench.llamacpp_generate(llm, [1, 1, 1, 1, 1], eos={2}, max_new_tokens=10) == [10, 11, 12]  # 8 - 5 left
    assert bench.llamacpp_generate(llm, [1] * 8, eos={2}, max_new_tokens=10) == []


def args_for(bench, *flags: str) -> argparse.Namespace:
    return bench.build_parser().parse_args(["--rows", "llamacpp", *flags])


def test_llamacpp_row_skips_batches_above_one(bench):
    result = bench.run_llamacpp("llamacpp", args_for(bench, "--batch-size", "8"))
    assert "batch 1 only" in result["skipped"]


def test_llamacpp_row_skips_without_llama_cpp(bench, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import raises ImportError
    result = bench.run_llamacpp("llamacpp", args_for(bench, "--batch-size", "1"))
    assert "llama_cpp is not importable" in result["skipped"]


def test_llamacpp_row_skips_without_a_gguf(bench, tmp_path):
    pytest.importorskip("llama_cpp")
    result = bench.run_llamacpp("llamacpp", args_for(bench, "--batch-size", "1", "--gguf", str(tmp_path / "x.gguf")))
    assert "no such file" in result["skipped"]
    result = bench.run_llamacpp("llamacpp", args_for(bench, "--batch-size", "1", "--model", str(tmp_path)))
    assert "pass --gguf" in result["skipped"]


@pytest.mark.slow
@pytest.mark.process
def test_llamacpp_row_runs_on_the_embedded_gguf(gsm8k_dir):
    """The row end to end in its child: llama.cpp's tokenizer gives our prompt ids, and it decodes to the budget or
    eos; its text is compared with hf-float's (the same weights, dequantized) by the parent."""
    pytest.importorskip("llama_cpp")
    cmd = [sys.executable, str(BENCHMARKS / "bench_generate.py"), "--rows", "hf-float,llamacpp", "--prompts", "2",
           "--batch-size", "1", "--max-new-tokens", "8", "--warmup-new-tokens", "1", "--threads", "1",
           "--dtype", "float32", "--data", str(gsm8k_dir)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=600, check=True)
    results = json.loads(proc.stdout.splitlines()[-1])["results"]
    row = results["llamacpp"]
    assert row["same_prompt_ids"] == "2/2"
    assert row["dtype"] == "GGUF Q4_1" and row["counted_by"] == "ids"
    assert all(0 < c <= 8 for c in row["counts"]) and row["tokens"] == sum(row["counts"])
    assert row["same_as_hf"].endswith("/2") and row["tokens_per_s"] > 0


def test_interleaved_rows_alternate_batch_by_batch_and_compare_per_step(bench, monkeypatch):
    clock, order = [0.0], []
    cost = {"hf-float": 0.1, "ours-4bit-lora": 0.05}  # seconds per decode step on this fake clock

    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": text.split()}

    def row_decoder(name, model, tokenizer, args):
        def decode(texts, max_new):
            order.append(name)
            counts = [min(max_new, 3)] * len(texts)  # 3 tokens then eos: 4 steps per batch
            clock[0] += cost[name] * (min(max_new, 3) + 1)
            return [" ".join(["w"] * c) for c in counts], None if name.startswith("ours") else counts
        return decode

    monkeypatch.setattr(bench, "build_model", lambda name, args: (None, Tok(), {}))
    monkeypatch.setattr(bench, "gsm8k_prompts", lambda tok, n, style, data: [f"q {i}" for i in range(n)])
    monkeypatch.setattr(bench, "row_decoder", row_decoder)
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    args = bench.build_parser().parse_args(["--prompts", "3", "--batch-size", "1", "--max-new-tokens", "8",
                                            "--interleave"])
    out = bench.run_interleaved(["hf-float", "ours-4bit-lora"], args)
    rows = ["hf-float", "ours-4bit-lora"]
    assert order == rows + rows + rows[::-1] + rows  # warmups, then the order reversed every other batch
    assert out["ours-4bit-lora"]["ratio_median"] == pytest.approx(0.5)
    assert out["hf-float"]["ms_per_step"] == pytest.approx(100.0)
    assert out["ours-4bit-lora"]["tokens"] == 9 and out["ours-4bit-lora"]["decode_steps"] == 12
    with pytest.raises(SystemExit, match="llamacpp"):
        bench.main(["--interleave", "--rows", "hf-float,llamacpp", "--quick"])
