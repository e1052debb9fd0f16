"""What a run or an adapter was made from: the base model's location, a fingerprint of its weights, its quantization.

A *base record* is a small JSON-able dict::

    {"path": "/abs/quantized_base", "fingerprint": "9f2c...", "quantized": True, "bits": 4, "group_size": 64,
     "targets": "q_proj,k_proj,v_proj,o_proj"}

``path`` is an absolute directory, or the hub id / alias as given when the model is not a local directory (then
``fingerprint`` is None). The fingerprint is the sha256 of the weight files' bytes, so two copies of the same
weights in different places have the same one: records are compared by fingerprint, and by path only when a
fingerprint is missing (``base_differences``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from gptqlora.errors import InputNotFoundError, UsageError
from gptqlora.quant.weights import INDEX_FILE, SINGLE_FILE, files_sha256
from gptqlora.quant.weights import weight_files as checked_files  # this module's weight_files returns their paths

# The fields that say which weights a record names; "path" joins them only when a fingerprint is missing.
IDENTITY_FIELDS = ("fingerprint", "quantized", "bits", "group_size", "targets")


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The weight files of a Hugging Face directory, sorted by name; empty when it has no safetensors weights.

    ``model.safetensors`` when present, else every shard that ``model.safetensors.index.json`` names; each checked
    before a byte of it is read (``gptqlora.quant.weights.weight_files``: inside the directory, a regular file,
    safetensors).

    Raises:
        UsageError: an index that is not valid JSON or has no ``weight_map``; a file that fails a check.
        InputNotFoundError: the index names a shard that is missing.
    """
    found = checked_files(model_dir)
    return [] if found is None else found.files


def weights_fingerprint(model_dir: str | os.PathLike) -> str:
    """The sha256 (hex) of a model directory's weight files, read in sorted order as one stream.

    For a single ``model.safetensors`` it is that file's ``sha256sum``.

    Raises:
        InputNotFoundError: the directory holds no safetensors weights (or the index names a missing shard).
        UsageError: a weight file that fails ``weight_files``' checks.
    """
    files = weight_files(model_dir)
    if not files:
        raise InputNotFoundError(f"{model_dir} holds neither {SINGLE_FILE} nor {INDEX_FILE}: no weights to "
                                 "fingerprint")
    return files_sha256(files)


def quantization_fields(block: dict[str, Any] | None) -> dict[str, Any]:
    """The record's quantization fields from a ``quantization_config`` block (None: a float model).

    A GPTQ block is read by ``quant_config_from_dict`` (the loader's own reading, targets included); another
    method's block gives its bits and group size as written and no targets.
    """
    if block is None:
        return {"quantized": False, "bits": None, "group_size": None, "targets": None}
    if block.get("quant_method") == "gptq":
        from gptqlora.quant.checkpoint import quant_config_from_dict  # lazy: keeps this module free of torch

        qc = quant_config_from_dict(block)
        return {"quantized": True, "bits": qc.bits, "group_size": qc.group_size, "targets": qc.targets}
    return {"quantized": True, "bits": block.get("bits"), "group_size": block.get("group_size"), "targets": None}


def base_record(model: str | os.PathLike, quantization: dict[str, Any] | None = None) -> dict[str, Any]:
    """Describe a base model: where it is, a fingerprint of its weights, and how it is quantized.

    Args:
        model: a local model directory, or a hub id / alias (recorded as given, without a fingerprint).
        quantization: the ``quantization_config`` block (``gptq_config_dict(qconfig)`` writes one); by default the
            one in the directory's ``config.json``, and a float model when there is none.
    Returns:
        ``{"path", "fingerprint", "quantized", "bits", "group_size", "targets"}``; ``fingerprint`` is None when the
        model is not a directory holding safetensors weights.
    Raises:
        UsageError: an unreadable ``config.json`` or quantization block, a damaged index.
    """
    d = Path(model).expanduser()
    if not d.is_dir():
        return {"path": str(model), "fingerprint": None, **quantization_fields(quantization)}
    if quantization is None and (d / "config.json").is_file():
        try:
            quantization = json.loads((d / "config.json").read_text()).get("quantization_config")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            raise UsageError(f"{d / 'config.json'} is not a JSON object: {e}") from None
    fingerprint = weights_fingerprint(d) if weight_files(d) else None
    return {"path": str(d.resolve()), "fingerprint": fingerprint, **quantization_fields(quantization)}


def base_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The fields in which two base records differ, sorted; empty when they name the same weights.

    ``path`` counts only when either record lacks a fingerprint: a moved or copied base with the same weights is
    the same base. Fields other than ``IDENTITY_FIELDS`` and ``path`` (notes a caller added) are ignored.
    """
    fields = list(IDENTITY_FIELDS)
    if not (saved.get("fingerprint") and current.get("fingerprint")):
        fields.append("path")
    return sorted(k for k in fields if saved.get(k) != current.get(k))


def describe_base(record: dict[str, Any] | None) -> str:
    """One line naming a base: ``/path (fingerprint 9f2c1a0b3d4e, 4-bit, group 64, targets attn)``.

    The record may come from a stranger's file: any JSON value in its fields is shown, never a traceback.
    """
    if record is None:
        return "an unrecorded base"
    parts = [f"fingerprint {str(record['fingerprint'])[:12]}" if record.get("fingerprint") else "no fingerprint"]
    if record.get("quantized"):
        parts += [f"{record.get('bits')}-bit", f"group {record.get('group_size')}"]
        if record.get("targets"):
            parts.append(f"targets {record['targets']}")
    else:
        parts.append("float")
    return f"{record.get('path')} ({', '.join(parts)})"
