"""Streamed quantization: bit-identical to the in-memory path, one block in memory at a time, resumable."""

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from conftest import child_env, make_tiny_llama, make_tiny_tokenizer
from safetensors import safe_open
from safetensors.torch import load_file

from gptqlora.config import QuantConfig
from gptqlora.errors import OutputExistsError, UsageError
from gptqlora.files import DirectoryOwner
from gptqlora.quant import stream
from gptqlora.quant.checkpoint import load_quantized, save_quantized
from gptqlora.quant.driver import quantize_model_weights
from gptqlora.quant.stream import ShardLayout, TensorSpec, parse_size, write_tensors
from gptqlora.quant.streamed import quantize_streamed, work_dir
from gptqlora.quant import weights


def calib(n=8, t=32, seed=0):
    return torch.randint(0, 259, (n, t), generator=torch.Generator().manual_seed(seed))


def write_source(path: Path, layers: int = 3, tied: bool = True, shard: str | None = None) -> Path:
    """A tiny float LLaMA saved by transformers: one model.safetensors, or shards + index with ``shard``."""
    model = make_tiny_llama(num_layers=layers)
    if not tied:  # an untied head of its own
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight) * 0.02)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    make_tiny_tokenizer().save_pretrained(path)
    return path


def in_memory(source: Path, out: Path, config: QuantConfig, dtype=torch.float32, shard="5GB") -> Path:
    """Today's path: load the whole float model, quantize it in place, save it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    losses = quantize_model_weights(model, calib() if config.method == "gptq" else None, config, chunk_size=3,
                                    progress=False)
    save_quantized(model, make_tiny_tokenizer(), out, config, extra={"layer_losses": losses},
                   max_shard_size=shard)
    return out


def streamed(source: Path, out: Path, config: QuantConfig, **kw) -> dict:
    kw = {"chunk_size": 3, "progress": False, "tokenizer": make_tiny_tokenizer()} | kw
    return quantize_streamed(source, out, config, calib() if config.method == "gptq" else None, **kw)


def assert_same_files(a: Path, b: Path) -> None:
    """Every file byte for byte, except the run's own record in quantize_config.json (timings)."""
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.iterdir():
        if p.name == "quantize_config.json":
            ours, theirs = json.loads(p.read_text()), json.loads((b / p.name).read_text())
            assert ours.pop("gptqlora")["layer_losses"].keys() == theirs.pop("gptqlora")["layer_losses"].keys()
            assert ours == theirs
        else:
            assert p.read_bytes() == (b / p.name).read_bytes(), p.name


CASES = {
    "gptq-all": QuantConfig(targets="all", group_size=32),
    "gptq-attn-act-asym": QuantConfig(targets="attn", group_size=32, act_order=True, static_groups=False, sym=False),
    "gptq-all-act-static-3bit": QuantConfig(targets="all", bits=3, group_size=32, act_order=True, static_groups=True),
    "gptq-one-pass": QuantConfig(targets="q_proj,down_proj", group_size=32, true_sequential=False),
    "rtn-all": QuantConfig(method="rtn", targets="all", group_size=32),
    "rtn-attn": QuantConfig(method="rtn", targets="attn", group_size=-1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streamed_equals_in_memory_bit_for_bit(tmp_path, case):
    config = CASES[case]
    source = write_source(tmp_path / "src", shard="60KB")  # several source shards, an index
    reference = in_memory(source, tmp_path / "mem", config, shard="60KB")
    report = streamed(source, tmp_path / "out", config, max_shard_size="60KB")
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file() and report["shards"] > 1
    assert_same_files(reference, tmp_path / "out")
    theirs = json.loads((reference / "quantize_config.json").read_text())["gptqlora"]["layer_losses"]
    assert report["layer_losses"] == {k: round(v, 6) for k, v in theirs.items()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mem", "out", "src"]  # no work directory left


@pytest.mark.parametrize("tied,dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_single_file_source_untied_head_and_bf16(tmp_path, tied, dtype):
    config = QuantConfig(targets="all", group_size=32, act_order=True, static_groups=False, calib_dtype="float32")
    source = write_source(tmp_path / "src", tied=tied)
    reference = in_memory(source, tmp_path / "mem", config, dtype=dtype)
    streamed(source, tmp_path / "out", config, dtype=dtype)
    assert (tmp_path / "out" / "model.safetensors").is_file()  # small: one file, no index, as Hugging Face writes
    assert_same_files(reference, tmp_path / "out")
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert ("lm_head.weight" in tensors) == (not tied)
    assert tensors["model.embed_tokens.weight"].dtype == dtype


def test_one_block_at_a_time_and_embeddings_alone(tmp_path, monkeypatch):
    """Each read is one unit (the outside tensors, or one block), and a block's tensors are gone before the next."""
    source = write_source(tmp_path / "src", layers=4, shard="60KB")
    reads: list[tuple[set, list]] = []
    original = stream.SafetensorsSource.load

    def spy(self, names, convert=None):
        names = list(names)
        for _, refs in reads:  # everything read before, block weights included, has been freed by now
            assert all(r() is None for r in refs)
        tensors = original(self, names, convert)
        reads.append(({n.split(".")[2] if n.startswith("model.layers.") else "outside" for n in names},
                      [weakref.ref(t) for t in tensors.values()]))
        return tensors

    monkeypatch.setattr(stream.SafetensorsSource, "load", spy)
    streamed(source, tmp_path / "out", QuantConfig(targets="all", group_size=32, calib_dtype="float32"),
             dtype=torch.bfloat16)  # converted copies: the source's own mapped tensors must go too
    assert [units for units, _ in reads] == [{"outside"}, {"0"}, {"1"}, {"2"}, {"3"}]


class Interrupt(Exception):
    """Raised from on_block, as a crash after a block would stop the run."""


def interrupt_after(k):
    def on_block(i, _):
        if i == k:
            raise Interrupt

    return on_block


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_resume_after_an_interruption_equals_the_uninterrupted_run(tmp_path, method):
    config = QuantConfig(method=method, targets="all", group_size=32, act_order=method == "gptq",
                         static_groups=False)
    source = write_source(tmp_path / "src", layers=4, shard="60KB")
    streamed(source, tmp_path / "whole", config, max_shard_size="60KB")
    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        streamed(source, out, config, max_shard_size="60KB", on_block=interrupt_after(1))
    assert not out.exists() and work_dir(out).is_dir()
    owner = DirectoryOwner(work_dir(out))  # as a run still going would hold it
    assert owner.acquire()
    try:
        for resume in (False, True):  # a live run's work is neither removed nor continued
            with pytest.raises(UsageError, match=f"still running \\(pid {os.getpid()}\\)"):
                streamed(source, out, config, max_shard_size="60KB", resume=resume)
    finally:
        owner.release()
    seen = []
    report = streamed(source, out, config, max_shard_size="60KB", resume=True, on_block=lambda i, _: seen.append(i))
    assert seen == [2, 3] and report["resumed_blocks"] == 2
    assert_same_files(tmp_path / "whole", out)
    assert not work_dir(out).exists()


@pytest.mark.process
def test_resume_after_sigkill_equals_the_uninterrupted_run(tmp_path):
    config = QuantConfig(targets="all", group_size=32)
    source = write_source(tmp_path / "src", layers=4)
    streamed(source, tmp_path / "whole", config)
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal, torch
        from conftest import make_tiny_tokenizer
        from gptqlora.config import QuantConfig
        from gptqlora.quant.streamed import quantize_streamed
        ids = torch.randint(0, 259, (8, 32), generator=torch.Generator().manual_seed(0))
        def on_block(i, _):
            if i == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        quantize_streamed({str(source)!r}, {str(out)!r}, QuantConfig(targets="all", group_size=32), ids,
                          tokenizer=make_tiny_tokenizer(), chunk_size=3, progress=False, on_block=on_block)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=child_env(OMP_NUM_THREADS="1"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert json.loads((work_dir(out) / "state.json").read_text())["units_done"] == 4  # outside + blocks 0-2
    report = streamed(source, out, config, resume=True)
    assert report["resumed_blocks"] == 3
    assert_same_files(tmp_path / "whole", out)


@pytest.mark.parametrize("change,named", [
    ({"bits": 3}, "bits: run 4, now 3"),
    ({"bits": 3, "group_size": 64}, "bits: run 4, now 3; group_size: run 32, now 64"),
    ({"chunk_size": 4}, "chunk_size: run 3, now 4"),
])
def test_resume_with_other_settings_is_refused_naming_them(tmp_path, change, named):
    config = QuantConfig(targets="all", group_size=32)
    source = write_source(tmp_path / "src")
    with pytest.raises(Interrupt):
        streamed(source, tmp_path / "out", config, on_block=interrupt_after(0))
    other = QuantConfig(targets="all", bits=change.get("bits", 4), group_size=change.get("group_size", 32))
    kw = {"chunk_size": change["chunk_size"]} if "chunk_size" in change else {}
    with pytest.raises(UsageError, match=f"cannot resume .* different inputs or settings \\({named}\\)"):
        streamed(source, tmp_path / "out", other, resume=True, **kw)
    report = streamed(source, tmp_path / "out", other, **kw)  # without resume: the finished blocks are discarded
    assert report["resumed_blocks"] == 0 and not work_dir(tmp_path / "out").exists()


def test_block_with_another_forward_is_refused(tmp_path, monkeypatch):
    """A block whose forward is not LLaMA's staged data flow must not be calibrated on wrong inputs."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    source = write_source(tmp_path / "src")
    original = LlamaMLP.forward
    monkeypatch.setattr(LlamaMLP, "forward", lambda self, x: 0.5 * original(self, x))
    config = QuantConfig(targets="all", group_size=32)
    with pytest.raises(UsageError, match=r"decoder block 0 \(LlamaDecoderLayer\) does not compute"):
        streamed(source, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UsageError, match="--no-true-sequential"):
        quantize_model_weights(make_tiny_llama(), calib(), config, progress=False)
    # Hooks on the block's own forward need no hand-written data flow: one-pass GPTQ still runs.
    streamed(source, tmp_path / "one-pass", QuantConfig(targets="all", group_size=32, true_sequential=False))


def test_existing_output_and_quantized_source_are_refused(tmp_path):
    config = QuantConfig(method="rtn", targets="attn", group_size=32)
    source = write_source(tmp_path / "src")
    streamed(source, tmp_path / "out", config)
    with pytest.raises(OutputExistsError, match="--overwrite"):
        streamed(source, tmp_path / "out", config)
    streamed(source, tmp_path / "out", config, overwrite=True)
    with pytest.raises(UsageError, match="already quantized"):
        streamed(tmp_path / "out", tmp_path / "again", config)
    with pytest.raises(UsageError, match="calibration"):
        quantize_streamed(source, tmp_path / "gptq", QuantConfig(), None)


def test_sharded_output_loads_with_our_loader_and_safetensors(tmp_path):
    config = QuantConfig(targets="attn", group_size=32)
    source = write_source(tmp_path / "src", shard="60KB")
    streamed(source, tmp_path / "out", config, max_shard_size="40KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    total = 0
    for f in files:
        with safe_open(tmp_path / "out" / f, "pt") as h:
            total += sum(h.get_tensor(k).nbytes for k in h.keys())
            assert all(index["weight_map"][k] == f for k in h.keys())
    assert index["metadata"]["total_size"] == total
    model, tokenizer, qconfig = load_quantized(tmp_path / "out")
    reference, _, _ = load_quantized(in_memory(source, tmp_path / "mem", config))  # one model.safetensors
    for k, v in reference.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    with torch.no_grad():
        assert torch.equal(model(calib()).logits, reference(calib()).logits)
    assert model.lm_head.weight is model.model.embed_tokens.weight and tokenizer is not None


# ---------------------------------------------------------------------------------------------- layout and sizes

def test_layout_packs_whole_units_under_the_limit_with_hf_names(tmp_path):
    units = [{"a": torch.arange(10, dtype=torch.int32)},  # 40 bytes
             {"b.x": torch.randn(3, 5), "b.y": torch.randn(7).to(torch.bfloat16),
              "b.z": torch.ones(3, dtype=torch.int8)},
             {"c": torch.randn(30)},  # 120 bytes: over the limit, alone
             {"d": torch.randn(5).half(), "e": torch.tensor([1, 2], dtype=torch.int64)}]
    layout = write_tensors(tmp_path, units, max_shard_size=100)
    assert layout.files == [f"model-0000{i}-of-00004.safetensors" for i in (1, 2, 3, 4)]
    assert [layout.unit_file[i] for i in range(4)] == layout.files  # 40 + 77 > 100: every unit starts a shard
    for unit in units:
        for name, t in unit.items():
            with safe_open(tmp_path / layout.weight_map[name], "pt") as f:
                assert torch.equal(f.get_tensor(name), t)
                assert f.metadata() == {"format": "pt"}
    header = (tmp_path / layout.files[1]).read_bytes()
    assert int.from_bytes(header[:8], "little") % 8 == 0  # the data region starts aligned
    (tmp_path / "one").mkdir()
    single = write_tensors(tmp_path / "one", units, "1GB")
    assert single.files == ["model.safetensors"] and single.index() is None
    assert load_file(tmp_path / "one" / "model.safetensors").keys() == {n for u in units for n in u}


def test_layout_refuses_tensors_that_differ_from_the_plan(tmp_path):
    layout = ShardLayout([[TensorSpec("w", torch.float32, (2, 2))]], 1000)
    layout.create(tmp_path)
    with pytest.raises(ValueError, match="differs from the planned"):
        layout.write_unit(tmp_path, 0, {"w": torch.zeros(2, 2, dtype=torch.float16)})
    with pytest.raises(ValueError, match="differ from the plan"):
        layout.write_unit(tmp_path, 0, {"v": torch.zeros(2, 2)})


@pytest.mark.parametrize("text,size", [("5GB", 5 * 10**9), ("500MiB", 500 * 2**20), ("1024", 1024), (7, 7),
                                       ("1.5kb", 1500)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["five", "0", "-3GB", "5XB"])
def test_parse_size_refuses_nonsense(text):
    with pytest.raises(UsageError, match="max shard size"):
        parse_size(text)


# ---------------------------------------------------------------------------------------------- through the CLI

STREAM_ONLY = ("seconds", "blocks", "resumed_blocks", "shards")  # the streamed report's own record of the run


def assert_same_cli_outputs(a: Path, b: Path) -> None:
    """Every file byte for byte, and quantize_config.json's report equal but for timings and streaming facts."""
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.iterdir():
        if p.name == "quantize_config.json":
            ours, theirs = json.loads(p.read_text()), json.loads((b / p.name).read_text())
            ours["gptqlora"], theirs["gptqlora"] = ({k: v for k, v in r["gptqlora"].items() if k not in STREAM_ONLY}
                                                    for r in (ours, theirs))
            assert ours == theirs
        else:
            assert p.read_bytes() == (b / p.name).read_bytes(), p.name


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_cli_quantize_streams_and_equals_the_in_memory_path(tmp_path, gsm8k_dir, monkeypatch, method):
    from gptqlora import cli
    from gptqlora.workflows import quantize as command

    source = write_source(tmp_path / "src", shard="60KB")
    argv = ["quantize", "--model", str(source), "--data", str(gsm8k_dir), "--method", method, "--group-size", "32",
            "--act-order", "--calib-samples", "4", "--calib-seqlen", "16", "--max-shard-size", "40KB"]
    loads = []
    real = stream.SafetensorsSource.load
    monkeypatch.setattr(stream.SafetensorsSource, "load",
                        lambda self, names, convert=None: _spy_load(real, loads, self, names, convert))
    assert cli.main(argv + ["--out", str(tmp_path / "streamed")]) == 0
    assert len(loads) == 1 + 3  # the outside tensors, then each of the 3 blocks alone: streamed
    monkeypatch.setattr(command, "streamable_source", lambda *a: None)  # as for a hub model with .bin weights
    assert cli.main(argv + ["--out", str(tmp_path / "in_memory")]) == 0
    assert (tmp_path / "streamed" / "model.safetensors.index.json").is_file()
    assert_same_cli_outputs(tmp_path / "in_memory", tmp_path / "streamed")
    report = json.loads((tmp_path / "streamed" / "quantize_config.json").read_text())["gptqlora"]
    assert report["base_model"] == str(source) and report["weight_bytes_after"] < report["weight_bytes_before"]
    assert (report["calibration"] is None) == (method == "rtn")


def _spy_load(real, loads, self, names, convert):
    names = list(names)
    loads.append(names)
    return real(self, names, convert)


def test_cli_max_shard_size_is_checked_before_any_work(tmp_path, gsm8k_dir, capsys, monkeypatch):
    from gptqlora import cli
    from gptqlora.workflows import quantize as command

    monkeypatch.setattr(command, "streamable_source", lambda *a: pytest.fail("started work"))
    with pytest.raises(SystemExit) as exit_:  # a bad flag value, like argparse's own refusals
        cli.main(["quantize", "--model", str(write_source(tmp_path / "src")), "--data", str(gsm8k_dir),
                  "--out", str(tmp_path / "q"), "--max-shard-size", "five"])
    assert exit_.value.code == 2 and "max shard size 'five' is not a size" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


# ---------------------------------------------------------------------------------------------- untrusted directories

ESCAPES = {  # case -> what the message says
    "dotdot": "leaves the directory through '..'",
    "absolute": "is an absolute path",
    "link-out": "outside the model directory",
    "proc-link": "outside the model directory",
    "fifo": r"is not a regular file \(a FIFO\)",
    "not-safetensors": "is not a safetensors file, or a truncated one",
}


def lead_outside(model: Path, case: str) -> tuple[str, Path]:
    """Point ``model``'s first shard entry (or its model.safetensors) where ``case`` says; returns (the entry in
    the index, or the file name, and the target that must never be read: a shard moved outside, /proc/self/environ,
    a FIFO, a text file)."""
    index_file = model / "model.safetensors.index.json"
    if not index_file.exists():  # one model.safetensors: the same checks through a link or a special file
        name = "model.safetensors"
    else:
        index = json.loads(index_file.read_text())
        name = sorted(set(index["weight_map"].values()))[0]
    outside = model.parent / f"outside-{model.name}" / name
    outside.parent.mkdir()
    (model / name).rename(outside)
    entry = {"dotdot": f"../{outside.parent.name}/{name}", "absolute": str(outside)}.get(case, name)
    target = outside
    if case in ("link-out", "proc-link"):
        target = outside if case == "link-out" else Path("/proc/self/environ")
        (model / name).symlink_to(target)
    elif case == "fifo":
        os.mkfifo(model / name)
        target = model / name
    elif case == "not-safetensors":
        target = model / name
        target.write_text("{\"not\": \"weights\"}\n" * 100)
    if entry != name:
        index["weight_map"] = {k: entry if v == name else v for k, v in index["weight_map"].items()}
        index_file.write_text(json.dumps(index))
    return entry, target


@pytest.fixture
def opened(monkeypatch):
    """Every path opened while the test runs, links followed, by the function that opened it: ``os.open`` (the
    checks' look at a file's first bytes), ``open`` (hashing) or safetensors' ``safe_open`` (reading tensors)."""
    paths: dict[str, list[str]] = {"os.open": [], "open": [], "safe_open": []}

    def spy(real, kind):
        def opener(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)):
                paths[kind].append(os.path.realpath(file))
            return real(file, *args, **kwargs)
        return opener

    monkeypatch.setattr("builtins.open", spy(open, "open"))
    monkeypatch.setattr(os, "open", spy(os.open, "os.open"))
    monkeypatch.setattr(stream, "safe_open", spy(stream.safe_open, "safe_open"))
    return paths


def never_read(opened: dict[str, list[str]], target: Path, case: str) -> bool:
    """Whether ``target`` was never opened; a file inside the directory may have its first bytes looked at."""
    kinds = ("open", "safe_open") if case == "not-safetensors" else tuple(opened)
    return all(os.path.realpath(target) not in opened[k] for k in kinds)


@pytest.mark.parametrize("case,sharded", [(case, True) for case in ESCAPES] +  # one model.safetensors: no entry
                         [(case, False) for case in ESCAPES if case not in ("dotdot", "absolute")])
def test_weights_leading_outside_the_directory_are_refused_before_a_byte_is_read(tmp_path, case, sharded, opened):
    from gptqlora.quant.checkpoint import read_quantized_config

    source = write_source(tmp_path / "src", shard="60KB" if sharded else None)
    quantized = tmp_path / "q"
    streamed(source, quantized, QuantConfig(method="rtn", targets="attn", group_size=32),
             max_shard_size="40KB" if sharded else "5GB")
    for model in (source, quantized):
        entry, target = lead_outside(model, case)
        listing = model / ("model.safetensors.index.json" if sharded else "model.safetensors")
        for paths in opened.values():
            paths.clear()
        readers = [lambda: stream.SafetensorsSource(model), lambda: weights.weight_files(model)]
        if model == quantized:  # eval --quantized checks its directory before any work, then loads it
            readers += [lambda: read_quantized_config(model), lambda: load_quantized(model)]
        for read in readers:
            with pytest.raises(UsageError) as refused:
                read()
            message = str(refused.value)
            assert re.search(ESCAPES[case], message) and str(listing) in message and "\n" not in message
            assert sharded is False or repr(entry) in message
        assert never_read(opened, target, case)


def test_a_hub_cache_snapshot_reads_links_into_its_own_blobs_only(tmp_path):
    """Hugging Face's cache keeps files in models--org--name/blobs and links to them from snapshots/REV/."""
    source = write_source(tmp_path / "src", shard="60KB")
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for p in sorted(source.iterdir()):
        blob = repo / "blobs" / hashlib.sha256(p.read_bytes()).hexdigest()
        p.rename(blob)
        (snapshot / p.name).symlink_to(Path("../..") / "blobs" / blob.name)  # as huggingface_hub links them
    weights = stream.SafetensorsSource(snapshot)
    tensors = weights.load(weights.names)
    assert len(weights.files) > 1 and tensors["model.norm.weight"].shape == (64,)
    report = streamed(snapshot, tmp_path / "q", QuantConfig(method="rtn", targets="attn", group_size=32))
    assert report["blocks"] == 3 and (tmp_path / "q" / "model.safetensors").is_file()
    # A link into another repository's blobs is outside this model.
    other = tmp_path / "hub" / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    shard = weights.files[0]
    (snapshot / shard).resolve().rename(other / "stolen")
    (snapshot / shard).unlink()
    (snapshot / shard).symlink_to(Path("../../..") / "models--org--other" / "blobs" / "stolen")
    with pytest.raises(UsageError, match="outside the model directory"):
        stream.SafetensorsSource(snapshot)


def error_line(capsys) -> str:
    """The CLI's one-line error: no traceback, one line."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("case", ["dotdot", "absolute", "proc-link", "fifo"])
def test_cli_quantize_refuses_an_escaping_index_in_one_line_and_writes_nothing(tmp_path, gsm8k_dir, capsys, case,
                                                                               opened):
    from gptqlora import cli

    source = write_source(tmp_path / "src", shard="60KB")
    entry, target = lead_outside(source, case)
    before = sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()  # save_pretrained's progress bars
    assert cli.main(["quantize", "--model", str(source), "--data", str(gsm8k_dir), "--method", "rtn",
                     "--group-size", "32", "--out", str(tmp_path / "q")]) == 2
    line = error_line(capsys)
    assert line.startswith("gptqlora quantize: error: ") and repr(entry) in line and re.search(ESCAPES[case], line)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output, no work directory, no lock
    assert never_read(opened, target, case)


def test_resume_over_a_source_rewritten_with_the_same_size_is_refused_naming_it(tmp_path):
    config = QuantConfig(targets="all", group_size=32)
    source = write_source(tmp_path / "src")
    with pytest.raises(Interrupt):
        streamed(source, tmp_path / "out", config, on_block=interrupt_after(0))
    size = (source / "model.safetensors").stat().st_size
    make_tiny_llama(num_layers=3, seed=1).save_pretrained(source)  # other weights, in place, the same shapes
    assert (source / "model.safetensors").stat().st_size == size
    with pytest.raises(UsageError, match=f"cannot resume .*the weights of {re.escape(str(source))} changed"):
        streamed(source, tmp_path / "out", config, resume=True)
    assert (work_dir(tmp_path / "out") / "state.json").is_file()  # refused, not discarded: nothing changed
    assert not (tmp_path / "out").exists()
