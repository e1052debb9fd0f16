"""``--engine vllm`` without vLLM: what it refuses before any work, and our client and engine against a stand-in
server (``fake_vllm.FakeVLLM``). The tests against a real vLLM server are in ``test_vllm_served.py``."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from conftest import make_tiny_llama, make_tiny_tokenizer

from gptqlora import cli
from gptqlora.config import EngineConfig, EvalConfig, QuantConfig
from gptqlora.data.gsm8k import IGNORE_INDEX, GSM8KCoTDataset, load_gsm8k
from gptqlora.errors import UsageError
from gptqlora.eval import vllm
from gptqlora.eval.gsm8k_eval import evaluate_gsm8k
from gptqlora.eval.vllm import VLLMClient, VLLMEngine, gptq_unservable, lora_rank
from gptqlora.lora.adapter import save_adapter
from gptqlora.lora.layer import inject_lora_layers
from gptqlora.quant.checkpoint import save_quantized
from gptqlora.quant.driver import quantize_model_weights
from gptqlora.seeding import request_seed

from eval.fake_vllm import HOLD, FakeVLLM

LLAMA = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32}


def gptq(bits=4, group=128, sym=True, **shape):
    return LLAMA | shape | {"quantization_config": {"quant_method": "gptq", "bits": bits, "group_size": group,
                                                    "sym": sym}}


@pytest.mark.parametrize("config, device, avx512, why", [
    (LLAMA, "cpu", False, None),  # a float model: served everywhere
    (gptq(), "cpu", True, None),
    (gptq(group=-1), "cpu", True, None),
    (gptq(), "cpu", False, "AVX-512"),
    (gptq(bits=3), "cpu", True, "3-bit"),
    (gptq(bits=8), "cpu", True, "8-bit"),
    (gptq(sym=False), "cpu", True, "asymmetric"),
    (gptq(group=256), "cpu", True, "group size 256"),
    (gptq(intermediate_size=11000), "cpu", True, "intermediate_size 11000"),
    (gptq(bits=3, sym=False, group=256), "cuda", False, None),
    (gptq(bits=5), "cuda", False, "5-bit"),
])
def test_what_vllm_serves(config, device, avx512, why):
    reason = gptq_unservable(config, device, avx512)
    assert (reason is None) if why is None else (why in reason)


def test_lora_rank_is_the_smallest_vllm_choice_that_holds_it():
    assert [lora_rank(r) for r in (1, 2, 8, 9, 64, 300, 512)] == [1, 8, 8, 16, 64, 320, 512]
    with pytest.raises(UsageError, match="up to 512"):
        lora_rank(513)


def test_engine_flags_need_the_vllm_engine():
    with pytest.raises(UsageError, match="--engine-url is for --engine vllm"):
        EngineConfig(engine_url="http://127.0.0.1:8000")
    with pytest.raises(UsageError, match="http://HOST:PORT"):
        EngineConfig(engine="vllm", engine_url="127.0.0.1:8000")


def test_request_seeds_are_fixed_and_apart():
    seeds = {request_seed(7, i, j) for i in range(50) for j in range(8)}
    assert len(seeds) == 400 and all(0 <= s < 2**31 for s in seeds)
    assert request_seed(7, 3, 1) == request_seed(7, 3, 1) != request_seed(8, 3, 1)


# ---------------------------------------------------------------------------------------------- refused up front

@pytest.fixture
def tiny_dir(tmp_path):
    make_tiny_llama().save_pretrained(tmp_path / "tiny")
    make_tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def quantized(tmp_path, name, **kw):
    config = QuantConfig(method="rtn", group_size=kw.pop("group_size", 32), **kw)
    model = make_tiny_llama()
    quantize_model_weights(model, None, config, progress=False)
    return save_quantized(model, make_tiny_tokenizer(), tmp_path / name, config)


def refused(argv, capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("kw, avx512, why", [({"bits": 3}, True, "3-bit"), ({"sym": False}, True, "asymmetric"),
                                             ({}, False, "AVX-512")])
def test_an_unservable_model_is_one_line_before_any_work(tmp_path, gsm8k_dir, monkeypatch, capsys, kw, avx512, why):
    monkeypatch.setattr("gptqlora.hardware.cpu_has_avx512", lambda: avx512)
    q = quantized(tmp_path, "q", **kw)
    out = tmp_path / "eval"
    line = refused(["eval", "--engine", "vllm", "--quantized", str(q), "--data", str(gsm8k_dir), "--limit", "2",
                    "--output-dir", str(out), "--device", "cpu"], capsys)
    assert why in line and "--engine ours" in line and not out.exists()


def test_run_refuses_a_base_vllm_cannot_serve_before_quantizing(tmp_path, tiny_dir, gsm8k_dir, monkeypatch, capsys):
    monkeypatch.setattr("gptqlora.hardware.cpu_has_avx512", lambda: True)
    out = tmp_path / "run"
    line = refused(["run", "--engine", "vllm", "--model", str(tiny_dir), "--data", str(gsm8k_dir), "--out", str(out),
                    "--bits", "3", "--device", "cpu", "--vllm-python", "/bin/sh"], capsys)
    assert "3-bit" in line and not out.exists()


def test_gptq_in_float32_is_refused(tmp_path, gsm8k_dir, monkeypatch, capsys):
    monkeypatch.setattr("gptqlora.hardware.cpu_has_avx512", lambda: True)
    q = quantized(tmp_path, "q")
    line = refused(["eval", "--engine", "vllm", "--quantized", str(q), "--data", str(gsm8k_dir), "--limit", "2",
                    "--dtype", "float32", "--output-dir", str(tmp_path / "e"), "--device", "cpu"], capsys)
    assert "bfloat16" in line


def test_no_vllm_environment_is_one_line_naming_make_vllm_env(tmp_path, tiny_dir, gsm8k_dir, capsys):
    line = refused(["sample", "--engine", "vllm", "--model", str(tiny_dir), "--data", str(gsm8k_dir), "--limit", "2",
                    "--samples", "2", "--out", str(tmp_path / "s"), "--vllm-python", str(tmp_path / "none"),
                    "--device", "cpu"], capsys)
    assert "make vllm-env" in line and not (tmp_path / "s").exists()


def test_an_adapter_on_the_head_is_refused(tmp_path, tiny_dir, gsm8k_dir, capsys):
    model = make_tiny_llama()
    inject_lora_layers(model, targets=["q_proj", "lm_head"], r=4, alpha=8)
    adapter = save_adapter(model, tmp_path / "a", str(tiny_dir))
    line = refused(["eval", "--engine", "vllm", "--model", str(tiny_dir), "--adapter", str(adapter), "--data",
                    str(gsm8k_dir), "--limit", "2", "--output-dir", str(tmp_path / "e"), "--device", "cpu",
                    "--vllm-python", "/bin/sh"], capsys)
    assert "lm_head" in line


# ---------------------------------------------------------------------------------------------- against a stand-in

def answer_script(body):
    """A solution whose answer is the prompt's length, then a line past it held until the client closes."""
    return [" We", " add", ".\n####", f" {len(body['prompt'])}", "\n", HOLD, "Then more text", "\n#### 7\n"]


def test_a_stream_is_cut_and_closed_after_the_answer_line():
    with FakeVLLM([], answer_script) as fake:
        text = VLLMClient(fake.url).complete("base", [5, 6, 7], max_tokens=64)
    assert text == " We add.\n#### 3" and fake.aborted == [True]
    with FakeVLLM([], answer_script) as fake:  # without the stop rule the whole text comes back
        text = VLLMClient(fake.url).complete("base", [5, 6], max_tokens=64, stop_after_answer_line=False)
    assert text == " We add.\n#### 2\nThen more text\n#### 7\n" and fake.aborted == [False]


def test_a_refused_request_is_one_line_with_the_servers_message():
    with FakeVLLM([], answer_script) as fake:
        with pytest.raises(UsageError, match="maximum context length is 10000"):
            VLLMClient(fake.url).complete("base", [1] * 10, max_tokens=20_000)
    with pytest.raises(UsageError, match="cannot be reached"):
        VLLMClient(fake.url).complete("base", [1], max_tokens=1)


def test_the_engine_sends_our_token_ids_budgets_eos_and_a_seed_per_sample():
    tok = make_tiny_tokenizer()
    prompts = ["abc", "a much longer prompt than that", "x" * 50]
    with FakeVLLM([], answer_script) as fake:
        engine = VLLMEngine(VLLMClient(fake.url), "adapter", tok, {3, 1}, context=42)
        texts = engine.greedy(prompts, max_new_tokens=16, batch_size=2, add_special_tokens=False)
        greedy = sorted(fake.requests, key=lambda b: len(b["prompt"]))
        fake.requests.clear()
        samples = engine.samples(prompts[:2], k=3, temperature=0.7, top_p=0.9, seed=11, max_new_tokens=16,
                                 batch_size=2, add_special_tokens=False)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert len(ids[2]) >= 42  # fills the context: no request, no text, as our loop
    assert texts == [f" We add.\n#### {len(ids[0])}", f" We add.\n#### {len(ids[1])}", ""]
    assert [b["prompt"] for b in greedy] == ids[:2]
    assert [b["max_tokens"] for b in greedy] == [min(16, 42 - len(i)) for i in ids[:2]]
    assert all(b["temperature"] == 0.0 and b["stop_token_ids"] == [1, 3] and b["model"] == "adapter" for b in greedy)
    assert samples == [[f" We add.\n#### {len(i)}"] * 3 for i in ids[:2]]
    seeds = sorted((b["prompt"] == ids[1], b["seed"]) for b in fake.requests)
    assert seeds == sorted((i == 1, request_seed(11, i, j)) for i in range(2) for j in range(3))
    assert all(b["temperature"] == 0.7 and b["top_p"] == 0.9 for b in fake.requests)


def test_answer_loss_is_the_mean_logprob_of_the_labelled_tokens(gsm8k_dir):
    tok = make_tiny_tokenizer()
    entries = load_gsm8k("test", str(gsm8k_dir))[:3]

    def logprob(position, token):
        return -((token * 7 + position) % 13) / 10

    with FakeVLLM([], answer_script, logprob=logprob) as fake:
        loss = VLLMEngine(VLLMClient(fake.url), "base", tok, {1}, None).answer_loss(entries, "plain", 2)
    nll, n = 0.0, 0
    for item in GSM8KCoTDataset(entries, tok, style="plain", max_length=512):
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        for t in range(1, len(ids)):
            if labels[t] != IGNORE_INDEX:
                nll, n = nll - logprob(t, ids[t]), n + 1
    assert loss["tokens"] == n and loss["loss"] == pytest.approx(nll / n, rel=1e-12)
    assert loss["perplexity"] == pytest.approx(math.exp(nll / n))


def served(tiny_dir, adapter=None):
    models = [{"id": "base", "root": str(tiny_dir), "parent": None}]
    return models + ([{"id": "mine", "root": str(adapter), "parent": "base"}] if adapter else [])


def test_eval_through_a_running_server_records_the_engine_and_resumes_to_the_same_bytes(tmp_path, tiny_dir,
                                                                                         gsm8k_dir, capsys):
    argv = ["eval", "--engine", "vllm", "--model", str(tiny_dir), "--data", str(gsm8k_dir), "--limit", "5",
            "--batch-size", "2", "--max-new-tokens", "8", "--dtype", "float32", "--device", "cpu"]
    with FakeVLLM(served(tiny_dir), answer_script) as fake:
        out = tmp_path / "e"
        assert cli.main([*argv, "--engine-url", fake.url, "--output-dir", str(out)]) == 0
        printed = capsys.readouterr().out
        printed = json.loads(printed[printed.index("\n{") + 1:])  # the result, after one line per question
        summary = json.loads((out / "summary.json").read_text())
        assert summary["engine"] == "vllm" and summary["provenance"]["engine"] == "vllm 0.0.0-fake"
        assert printed["answer_loss"] == pytest.approx(1.0)  # every token's logprob is -1
        records = (out / "predictions.jsonl").read_text()
        texts = [json.loads(r)["prediction"] for r in records.splitlines()]
        # a prompt longer than the tiny model's context of 512 gets no tokens, as in our loop
        assert len(texts) == 5 and all(t == "" or t.startswith(" We add.\n#### ") for t in texts) and any(texts)
        # Cut after the first batch, as a crash would leave it; the resume ends with the uninterrupted bytes.
        crashed = tmp_path / "crashed"
        shutil.copytree(out, crashed)
        (crashed / "summary.json").unlink()
        (crashed / "predictions.jsonl").write_text("".join(records.splitlines(keepends=True)[:2]))
        asked = len(fake.requests)
        assert cli.main([*argv, "--engine-url", fake.url, "--output-dir", str(crashed), "--resume"]) == 0
        assert (crashed / "predictions.jsonl").read_text() == records
        completions = [b for b in fake.requests[asked:] if b.get("prompt_logprobs") is None]
        assert len(completions) == sum(t != "" for t in texts[2:])  # only the questions left (with room to answer)


def test_a_running_server_that_serves_another_model_is_refused_before_any_work(tmp_path, tiny_dir, gsm8k_dir,
                                                                              capsys):
    with FakeVLLM([{"id": "other", "root": "/models/other", "parent": None}], answer_script) as fake:
        line = refused(["eval", "--engine", "vllm", "--engine-url", fake.url, "--model", str(tiny_dir), "--data",
                        str(gsm8k_dir), "--limit", "2", "--output-dir", str(tmp_path / "e"), "--device", "cpu"],
                       capsys)
    assert "does not serve the model" in line and "other (/models/other)" in line
    assert not (tmp_path / "e").exists() and fake.requests == []


def test_evaluate_gsm8k_over_the_engine_writes_what_our_loop_writes(tmp_path, gsm8k_dir):
    """The records around the engine do not know which one ran: the same fields, only the texts differ."""
    tok = make_tiny_tokenizer()
    entries = load_gsm8k("test", str(gsm8k_dir))[:4]
    config = EvalConfig(eval_batch_size=2, max_new_tokens=8, samples=2)
    with FakeVLLM([], answer_script) as fake:
        engine = VLLMEngine(VLLMClient(fake.url), "base", tok, {1}, None)
        summary = evaluate_gsm8k(engine, tok, entries, config, style="plain", out_dir=tmp_path / "v", log=lambda _: 0,
                                 seed=3)
    ours = evaluate_gsm8k(make_tiny_llama(), tok, entries, config, style="plain", out_dir=tmp_path / "o",
                          log=lambda _: 0, seed=3)
    assert summary["engine"] == "vllm" and ours["engine"] == "ours" and summary["kernels"] is None
    read = [[json.loads(r) for r in (tmp_path / d / "predictions.jsonl").read_text().splitlines()] for d in "vo"]
    assert [sorted(r) for r in read[0]] == [sorted(r) for r in read[1]]
    assert [len(r["samples"]) for r in read[0]] == [2] * 4


def seeded_script(body):
    """A solution whose answer depends on the prompt and, when sampled, on the request's seed."""
    return [" So", f"\n#### {(len(body['prompt']) + body.get('seed', 0)) % 97}\n", "never read"]


@pytest.mark.process
def test_eval_through_a_server_on_two_ranks_writes_what_one_process_writes(tmp_path, tiny_dir, gsm8k_dir, capsys):
    from eval.test_distributed_eval import result_of, torchrun

    with FakeVLLM(served(tiny_dir), seeded_script) as fake:
        common = ["eval", "--engine", "vllm", "--engine-url", fake.url, "--model", str(tiny_dir), "--data",
                  str(gsm8k_dir), "--limit", "5", "--batch-size", "2", "--max-new-tokens", "12", "--samples", "2",
                  "--seed", "3", "--dtype", "float32", "--device", "cpu", "--output-dir"]
        assert cli.main([*common, str(tmp_path / "one")]) == 0
        one = result_of(capsys.readouterr().out)
        two = result_of(torchrun(["-m", "gptqlora.cli", *common, str(tmp_path / "two")], tmp_path).stdout)
    one_file, two_file = (tmp_path / d / "predictions.jsonl" for d in ("one", "two"))
    assert two_file.read_bytes() == one_file.read_bytes()
    assert (one["world_size"], two["world_size"]) == (1, 2) and two["answer_loss"] == pytest.approx(one["answer_loss"])
    records = [json.loads(r) for r in (tmp_path / "one" / "predictions.jsonl").read_text().splitlines()]
    assert any(len(set(r["samples"])) == 2 for r in records)  # each sample drew with a seed of its own


@pytest.fixture
def fake_vllm_python(tmp_path, monkeypatch):
    """A "Python of the vLLM environment" that runs ``fake_vllm.py`` as the server, recording its pid and flags."""
    import sys
    from pathlib import Path

    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).parent / 'fake_vllm.py'} \"$@\"\n")
    script.chmod(0o755)
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(tmp_path / "server.json"))
    return script


def pid_alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
        return f.read().split(") ")[1][0] != "Z"


@pytest.mark.process
def test_the_command_starts_the_server_with_the_plan_and_stops_it(tmp_path, tiny_dir, gsm8k_dir, fake_vllm_python,
                                                                  capsys):
    model = make_tiny_llama()
    inject_lora_layers(model, targets="attn", r=12, alpha=24)
    adapter = save_adapter(model, tmp_path / "a", str(tiny_dir))
    argv = ["eval", "--engine", "vllm", "--vllm-python", str(fake_vllm_python), "--model", str(tiny_dir),
            "--adapter", str(adapter), "--data", str(gsm8k_dir), "--limit", "2", "--max-new-tokens", "8",
            "--dtype", "float32", "--device", "cpu", "--seed", "5", "--output-dir"]
    assert cli.main([*argv, str(tmp_path / "e")]) == 0
    server = json.loads((tmp_path / "server.json").read_text())
    flags = server["argv"]
    assert flags[flags.index("--model") + 1] == str(tiny_dir) and flags[flags.index("--dtype") + 1] == "float32"
    assert flags[flags.index("--lora-modules") + 1] == f"adapter={adapter.resolve()}"
    assert flags[flags.index("--max-lora-rank") + 1] == "16" and flags[flags.index("--seed") + 1] == "5"
    assert flags[flags.index("--max-model-len") + 1] == "512" and flags[flags.index("--host") + 1] == "127.0.0.1"
    records = [json.loads(r) for r in (tmp_path / "e" / "predictions.jsonl").read_text().splitlines()]
    assert {r["prediction"] for r in records} <= {" So\n#### 42", ""}
    assert not pid_alive(server["pid"])  # stopped with the command


@pytest.mark.process
def test_a_server_that_fails_to_start_is_one_line_naming_its_error(tmp_path, tiny_dir, gsm8k_dir, fake_vllm_python,
                                                                   monkeypatch, capsys):
    monkeypatch.setenv("FAKE_VLLM_FAIL", "start")
    line = refused(["eval", "--engine", "vllm", "--vllm-python", str(fake_vllm_python), "--model", str(tiny_dir),
                    "--data", str(gsm8k_dir), "--limit", "2", "--dtype", "float32", "--device", "cpu",
                    "--output-dir", str(tmp_path / "e")], capsys)
    assert "exited (1) before serving" in line and "the fake server was told to fail" in line and "its log:" in line
