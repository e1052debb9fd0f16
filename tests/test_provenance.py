"""Base records: a streamed fingerprint of the weight files, the quantization read from config.json, comparison."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gptqlora.config import QuantConfig
from gptqlora.errors import InputNotFoundError, UsageError
from gptqlora.provenance import base_differences, base_record, describe_base, weight_files, weights_fingerprint
from gptqlora.quant.checkpoint import gptq_config_dict


def write_weights(d: Path, seed: int, name: str = "model.safetensors") -> Path:
    """A small safetensors file of seeded random tensors."""
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"a": torch.randn(64, 32, generator=g), "b": torch.randn(7, generator=g)}, str(d / name))
    return d / name


def write_model_dir(d: Path, seed: int, quantization: dict | None = None) -> Path:
    write_weights(d, seed)
    config = {"model_type": "llama"} | ({"quantization_config": quantization} if quantization else {})
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_single_file_fingerprint_is_the_files_sha256_and_sees_one_changed_byte(tmp_path):
    path = write_weights(tmp_path, seed=0)
    before = weights_fingerprint(tmp_path)
    assert before == hashlib.sha256(path.read_bytes()).hexdigest()  # what `sha256sum model.safetensors` prints
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    assert weights_fingerprint(tmp_path) != before


def test_sharded_fingerprint_hashes_the_indexed_shards_in_sorted_order(tmp_path):
    shards = [write_weights(tmp_path, seed=s, name=f"model-0000{s}-of-00002.safetensors") for s in (1, 2)]
    write_weights(tmp_path, seed=9, name="stray.safetensors")  # not in the index: not part of the model
    weight_map = {"b": shards[1].name, "a": shards[0].name, "c": shards[1].name}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    expected = hashlib.sha256(shards[0].read_bytes() + shards[1].read_bytes()).hexdigest()
    assert weights_fingerprint(tmp_path) == expected
    shards[1].unlink()
    with pytest.raises(InputNotFoundError, match="model-00002-of-00002.safetensors"):
        weights_fingerprint(tmp_path)


def test_a_directory_without_weights_has_no_fingerprint(tmp_path):
    with pytest.raises(InputNotFoundError, match="model.safetensors"):
        weights_fingerprint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(UsageError, match="must hold a JSON object"):
        weights_fingerprint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(UsageError, match="weight_map"):
        weights_fingerprint(tmp_path)


def test_base_record_of_a_quantized_directory_reads_its_config(tmp_path):
    qconfig = QuantConfig(bits=3, group_size=32, targets="attn")
    d = write_model_dir(tmp_path / "q", seed=0, quantization=gptq_config_dict(qconfig))
    record = base_record(d)
    assert {k: v for k, v in record.items() if k != "targets"} == {
        "path": str(d.resolve()), "fingerprint": weights_fingerprint(d), "quantized": True, "bits": 3, "group_size": 32}
    assert QuantConfig(targets=record["targets"]).target_names == qconfig.target_names  # the same linears
    json.dumps(record, allow_nan=False)  # a record is plain JSON
    # An explicit block wins over the directory's.
    assert base_record(d, gptq_config_dict(QuantConfig(bits=4, group_size=64, targets="all")))["bits"] == 4


def test_base_record_of_a_float_directory_and_of_a_hub_id(tmp_path):
    d = write_model_dir(tmp_path / "f", seed=0)
    record = base_record(d)
    assert record["quantized"] is False and record["bits"] is None and record["fingerprint"] is not None
    hub = base_record("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert hub["path"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and hub["fingerprint"] is None
    assert hub["quantized"] is False


def test_base_differences_go_by_fingerprint_and_by_path_only_without_one(tmp_path):
    a = base_record(write_model_dir(tmp_path / "a", seed=0))
    moved = base_record(write_model_dir(tmp_path / "elsewhere", seed=0))
    other = base_record(write_model_dir(tmp_path / "b", seed=1))
    assert moved["path"] != a["path"] and base_differences(a, moved) == []  # same weights, another place
    assert base_differences(a, other) == ["fingerprint"]
    requantized = {**a, "bits": 8}
    assert base_differences(a, requantized) == ["bits"]
    assert base_differences(base_record("org/m"), base_record("org/other")) == ["path"]
    assert base_differences(base_record("org/m"), base_record("org/m")) == []
    assert base_differences(a, base_record("org/m")) == ["fingerprint", "path"]


def test_describe_base_names_path_fingerprint_and_quantization(tmp_path):
    d = write_model_dir(tmp_path / "q", seed=0, quantization=gptq_config_dict(QuantConfig(bits=4, group_size=64)))
    text = describe_base(base_record(d))
    assert text.startswith(str(d.resolve())) and weights_fingerprint(d)[:12] in text
    assert "4-bit" in text and "group 64" in text
    assert "float" in describe_base(base_record("org/m"))
    # A stranger's record (an adapter's or a verifier's sidecar) with values of other types is still one line.
    assert describe_base({"path": ["x"], "fingerprint": 123456789012345, "quantized": True, "bits": "4"}) == \
        "['x'] (fingerprint 123456789012, 4-bit, group None)"


ESCAPES = {  # how a weights file leads outside the directory -> what the refusal says
    "dotdot": "leaves the directory through '..'",
    "absolute": "is an absolute path",
    "link-out": "outside the model directory",
    "proc-link": "outside the model directory",
    "fifo": r"is not a regular file \(a FIFO\)",
    "single-proc-link": "outside the model directory",
}


@pytest.mark.parametrize("case", list(ESCAPES))
def test_weight_files_leading_outside_the_directory_are_refused_before_any_is_hashed(tmp_path, monkeypatch, case):
    message = ESCAPES[case]
    d = tmp_path / "model"
    inside = write_weights(d, seed=0, name="model-00001-of-00002.safetensors")
    outside = write_weights(tmp_path / "other", seed=1, name="w.safetensors")
    entry = {"dotdot": "../other/w.safetensors", "absolute": str(outside)}.get(case, "model-00002-of-00002.safetensors")
    target = {"proc-link": Path("/proc/self/environ"), "single-proc-link": Path("/proc/self/environ"),
              "fifo": d / entry}.get(case, outside)
    if case == "single-proc-link":
        (d / "model.safetensors").symlink_to(target)
        listing = d / "model.safetensors"
    else:
        if case in ("link-out", "proc-link"):
            (d / entry).symlink_to(target)
        elif case == "fifo":
            os.mkfifo(target)
        listing = d / "model.safetensors.index.json"
        listing.write_text(json.dumps({"weight_map": {"a": inside.name, "b": entry}}))
    hashed = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda file, *a, **k: hashed.append(os.path.realpath(file))
                        or real_open(file, *a, **k))
    for read in (weight_files, weights_fingerprint, base_record):
        with pytest.raises(UsageError, match=message) as refused:
            read(d)
        assert str(listing) in str(refused.value) and (case.startswith("single") or repr(entry) in str(refused.value))
    assert hashed == []  # not a byte hashed: the inside shard neither, nor the target
