"""A model directory's weight files: each checked before a byte of it is read, then hashed in chunks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gptqlora.errors import UsageError
from gptqlora.quant import weights


def write_weights(d: Path, seed: int, name: str = "model.safetensors") -> Path:
    """A small safetensors file of seeded random tensors."""
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    save_file({"a": torch.randn(64, 32, generator=g), "b": torch.randn(7, generator=g)}, str(d / name))
    return d / name


def test_files_sha256_streams_in_chunks_to_the_same_digest(tmp_path, monkeypatch):
    path = write_weights(tmp_path, seed=1)
    whole = hashlib.sha256(path.read_bytes()).hexdigest()
    monkeypatch.setattr(weights, "CHUNK_BYTES", 1000)  # many reads, the last one partial
    assert path.stat().st_size > 3 * 1000 and path.stat().st_size % 1000
    assert weights.files_sha256([path]) == whole


def test_a_weights_file_that_is_not_safetensors_is_refused(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "model.safetensors").write_text("HOME=/root\nPATH=/usr/bin\n" * 50)
    with pytest.raises(UsageError, match=r"model.safetensors is not a safetensors file, or a truncated one \(its "
                                         r"1250 bytes"):
        weights.weight_files(d)
    header = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    (d / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)  # the smallest
    assert weights.weight_files(d).files == [d / "model.safetensors"]
    (d / "model.safetensors").write_bytes((len(header) + 5).to_bytes(8, "little") + header + b"\0" * 4)
    with pytest.raises(UsageError, match="not a safetensors file"):  # a header longer than the file
        weights.weight_files(d)


def test_an_index_linked_from_outside_the_directory_is_not_read(tmp_path):
    d = tmp_path / "model"
    shard = write_weights(d, seed=0, name="model-00001-of-00001.safetensors")
    elsewhere = tmp_path / "other" / "model.safetensors.index.json"
    elsewhere.parent.mkdir()
    elsewhere.write_text(json.dumps({"weight_map": {"a": shard.name}}))
    (d / "model.safetensors.index.json").symlink_to(elsewhere)
    with pytest.raises(UsageError, match="model.safetensors.index.json is not a regular file inside"):
        weights.weight_files(d)


@pytest.mark.parametrize("planted", ["link-out", "proc-link", "fifo"])
def test_a_directory_file_leading_out_or_special_is_refused_by_name_alone(tmp_path, planted):
    """config.json, the tokenizer's and an adapter's files are opened by name (by transformers too): one that is a
    link out of the directory, or a FIFO, is refused without being read; links inside and a hub snapshot's links
    into its own blobs pass."""
    import os

    repo = tmp_path / "models--org--tiny"
    d = repo / "snapshots" / "rev"
    d.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "blobs" / "abc").write_text("{}")
    (d / "generation_config.json").symlink_to(repo / "blobs" / "abc")  # how the hub cache lays a snapshot out
    (d / "sub").mkdir()
    (d / "sub" / "x.json").write_text("{}")
    (d / "y.json").symlink_to(d / "sub" / "x.json")
    weights.check_directory_files(d)  # all of these are the directory's own

    secret = tmp_path / "secret.txt"
    secret.write_text("not the model's")
    if planted == "fifo":
        os.mkfifo(d / "tokenizer.json")
        match = r"tokenizer.json is not a regular file \(a FIFO\)"
    else:
        (d / "config.json").symlink_to(secret if planted == "link-out" else "/proc/self/environ")
        match = "config.json is a link to .*, outside"
    with pytest.raises(UsageError, match=match):
        weights.check_directory_files(d)
    assert secret.read_text() == "not the model's"
