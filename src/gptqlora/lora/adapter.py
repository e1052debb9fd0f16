"""Save and load LoRA adapters in PEFT's format, which PEFT and vLLM read.

A directory holds ``adapter_config.json`` and ``adapter_model.safetensors``; tensor keys are
``base_model.model.<module>.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r]. Only safetensors is
read or written: a pickle (``adapter_model.bin``) could run code on load.

Beside them, ``gptqlora_base.json`` records the base the adapter was trained on (a ``gptqlora.provenance`` base
record: path, weights fingerprint, bits, group size, targets). It is a sidecar, not a field of
``adapter_config.json``, so PEFT's own loader never sees it; ``load_adapter(..., base=...)`` warns when the model
it loads onto is another base.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes
from torch import nn

from gptqlora.errors import InputNotFoundError, UsageError
from gptqlora.files import fsync_path, read_json_object, staged_dir, write_atomic
from gptqlora.lora.layer import (PEFT_PREFIX, LoRALinear, adapter_state_dict, find_targets, get_adapter_params,
                                 inject_lora_layers, is_linear, linear_layer_names, lora_modules)
from gptqlora.provenance import base_differences, describe_base
from gptqlora.quant.weights import check_directory_files, read_tensors
from gptqlora.targets import parse_targets

log = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
BASE_FILE = "gptqlora_base.json"  # our sidecar: the base record
_KEY_RE = re.compile(re.escape(PEFT_PREFIX) + r"(?P<module>.+)\.(?P<which>lora_A|lora_B)\.weight")
# Config fields whose non-default values would change the computation in ways we do not implement.
_UNSUPPORTED = {"rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "layers_to_transform": None,
                "fan_in_fan_out": False, "lora_bias": False, "layer_replication": None}


def _shared(modules: dict[str, LoRALinear], attr: str) -> Any:
    """The value of ``attr`` common to every LoRA layer; PEFT's per-layer patterns are not written."""
    values = {getattr(m, attr) for m in modules.values()}
    if len(values) != 1:
        raise ValueError(f"LoRA layers differ in {attr} ({sorted(values)}): one adapter file needs one value")
    return values.pop()


def _target_modules(model: nn.Module, adapted: list[str]) -> list[str] | str:
    """Sorted short names (``["k_proj", "q_proj"]``) when they select exactly the adapted layers, else a regex.

    PEFT matches a list as suffixes of module names and a string with ``re.fullmatch``; the regex of full
    names keeps an adapter on, say, layer 0 only from being re-created on every layer when loaded.
    """
    short = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    selected = {n for n in linear_layer_names(model) if n.rsplit(".", 1)[-1] in short}
    if selected == set(adapted):
        return short
    return _names_regex(adapted)


def _names_regex(names: Iterable[str]) -> str:
    """The regex an adapter's config holds for exactly these full module names: their escaped, sorted '|' join."""
    return "|".join(re.escape(n) for n in sorted(names))


def save_adapter(model: nn.Module, out_dir: str | os.PathLike, base_model_name_or_path: str,
                 lora_config_extra: dict[str, Any] | None = None, *, base: dict[str, Any] | None = None,
                 weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's LoRA weights and config as a PEFT adapter directory, and the base it was trained on.

    Every file is serialized first. A new directory is staged beside ``out_dir`` and renamed into place whole
    (``gptqlora.files.staged_dir``); in an existing one, which may hold other files (README, tokenizer) that are
    kept, each of ours is written in full under a hidden name before any is renamed over the old ones. Files and
    directories get the user's umask permissions.

    Args:
        model: a model carrying ``LoRALinear`` layers.
        out_dir: the adapter directory (created if needed).
        base_model_name_or_path: what the adapter was trained on (a hub id or path), recorded for loaders.
        lora_config_extra: extra or overriding ``adapter_config.json`` fields (e.g. ``{"revision": "main"}``).
        base: the base record (``gptqlora.provenance.base_record``), written to ``gptqlora_base.json``; without
            one, a sidecar left by an earlier save is removed (it would name the wrong base).
        weights: the adapter's tensors, ``adapter_state_dict(model)`` (read from ``model`` when None): an
            FSDP-sharded model's are gathered by every rank, before the one that writes calls this.
    Returns:
        ``out_dir`` as a Path.
    Raises:
        ValueError: if the model has no LoRA layers or its layers differ in r, alpha, dropout or rslora.
    """
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA layers to save: call inject_lora_layers or load_adapter first")
    alpha = float(_shared(modules, "alpha"))
    config: dict[str, Any] = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": base_model_name_or_path,
        "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "layer_replication": None, "layers_pattern": None, "layers_to_transform": None, "loftq_config": {},
        "lora_alpha": int(alpha) if alpha.is_integer() else alpha, "lora_dropout": _shared(modules, "dropout_p"),
        "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None, "peft_type": "LORA",
        "r": _shared(modules, "r"), "rank_pattern": {}, "revision": None,
        "target_modules": _target_modules(model, list(modules)), "task_type": "CAUSAL_LM", "use_dora": False,
        "use_rslora": _shared(modules, "use_rslora"),
    }
    config.update(lora_config_extra or {})
    weights = adapter_state_dict(model) if weights is None else weights
    files = {WEIGHTS_NAME: safetensors_bytes(weights, metadata={"format": "pt"}),
             CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True) + "\n"}
    if base is not None:
        files[BASE_FILE] = json.dumps(base, indent=2, sort_keys=True, allow_nan=False) + "\n"

    out = Path(out_dir)
    if not out.exists():
        with staged_dir(out) as tmp:  # the whole directory appears at once
            for name, data in files.items():
                (tmp / name).write_bytes(data.encode() if isinstance(data, str) else data)
        return out
    if base is None:
        (out / BASE_FILE).unlink(missing_ok=True)  # first: an unknown base is better than a wrong one
    staged: list[tuple[Path, Path]] = []
    try:
        for name, data in files.items():
            staged.append((write_atomic(out / f".{name}.new-{os.getpid()}", data), out / name))
        for tmp, final in staged:  # the weights first, then the config, then the sidecar
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    fsync_path(out)
    return out


def read_adapter_base(adapter_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The base record saved beside an adapter (``gptqlora_base.json``), or None for an adapter without one.

    Raises:
        UsageError: the sidecar is not a JSON object.
    """
    path = Path(adapter_dir) / BASE_FILE
    if not path.is_file():
        return None
    return read_json_object(path)


def check_adapter_base(adapter_dir: str | os.PathLike, base: dict[str, Any]) -> str | None:
    """Whether ``base`` is the base the adapter was trained on: None when it is (or nothing was recorded), else a
    message naming both bases (path, fingerprint, bits, group size) and the fields that differ."""
    saved = read_adapter_base(adapter_dir)
    if saved is None:
        return None
    fields = base_differences(saved, base)
    if not fields:
        return None
    return (f"the adapter {adapter_dir} was trained on {describe_base(saved)} but is loaded onto "
            f"{describe_base(base)} (they differ in {', '.join(fields)}); its update may not fit these weights: "
            "load it onto the base it was trained on unless this is intended")


def adapter_modules(adapter_dir: str | os.PathLike) -> set[str]:
    """The full names of the modules an adapter's weights file holds LoRA tensors for, read from its header alone.

    Raises:
        UsageError: a weights file that is not safetensors.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(adapter_dir) / WEIGHTS_NAME
    try:
        with safe_open(path, framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{path} is not a readable safetensors file ({e}): save or train the adapter again") from None
    return {m["module"] for key in keys if (m := _KEY_RE.fullmatch(key))}


def adapter_record(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """What a summary says about an adapter: ``{"path": absolute directory, "base": its base record or None}``."""
    return {"path": str(Path(adapter_dir).resolve()), "base": read_adapter_base(adapter_dir)}


def read_adapter_config(adapter_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and validate ``adapter_config.json`` of a PEFT LoRA adapter directory.

    Raises:
        InputNotFoundError: if the directory or either adapter file is missing.
        UsageError: a file that leads out of the directory or is not a regular file
            (``gptqlora.quant.weights.check_directory_files``); an unreadable config, a non-LoRA adapter, DoRA, a trained bias, or other PEFT
            features gptqlora does not implement; a target_modules regex that is invalid or could take too long
            to match (``gptqlora.targets.check_target_regex``).
    """
    d = Path(adapter_dir)
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (d / n).is_file()]
    if missing:
        hint = (f"; {d / 'adapter_model.bin'} is a pickle, which is not loaded for safety: re-save it with "
                "safetensors (PEFT's save_pretrained(safe_serialization=True))"
                if (d / "adapter_model.bin").is_file() else "")
        where = "" if d.is_dir() else " (the directory does not exist)"
        raise InputNotFoundError(f"{d} is not a PEFT LoRA adapter directory{where}: expected {CONFIG_NAME} and "
                                 f"{WEIGHTS_NAME}, missing {', '.join(missing)}{hint}")
    check_directory_files(d)  # an adapter's files are read only from inside it
    path = d / CONFIG_NAME
    config = read_json_object(path)
    if config.get("peft_type") != "LORA":
        raise UsageError(f"{path}: peft_type is {config.get('peft_type')!r}; only 'LORA' adapters are supported")
    if config.get("use_dora"):
        raise UsageError(f"{path}: use_dora is true; DoRA adapters are not supported, only plain LoRA")
    if config.get("bias", "none") != "none":
        raise UsageError(f"{path}: bias is {config['bias']!r}; only bias 'none' is supported (as in vLLM)")
    for key in ("r", "lora_alpha", "target_modules"):
        if config.get(key) is None:
            raise UsageError(f"{path}: the field {key!r} is missing")
    modules = config["target_modules"]
    if not (isinstance(modules, str) or isinstance(modules, list) and all(isinstance(m, str) for m in modules)):
        raise UsageError(f"{path}: target_modules is {modules!r}; PEFT writes a list of module names or a regex string")
    # A regex from a stranger's adapter could backtrack for hours (Python's re has no timeout): refuse one whose
    # matching is not bounded now, before any model is loaded or any name matched.
    parse_targets(_targets_from_config(modules), where=f"{path}: target_modules")
    for key, default in _UNSUPPORTED.items():
        if config.get(key, default) not in (default, None, {}, False):
            raise UsageError(f"{path}: {key}={config[key]!r} is not supported by gptqlora; "
                             f"only adapters with {key}={default!r} can be loaded")
    return config


def _targets_from_config(target_modules: list[str] | str) -> list[str] | str:
    """PEFT's target_modules as our targets: a list is matched as name suffixes, a string is a full-match regex."""
    if isinstance(target_modules, str):
        return "all" if target_modules == "all-linear" else "re:" + target_modules
    return list(target_modules)


def load_adapter(model: nn.Module, adapter_dir: str | os.PathLike, strict: bool = True, *,
                 base: dict[str, Any] | None = None) -> nn.Module:
    """Load a PEFT LoRA adapter into ``model``, injecting ``LoRALinear`` layers first if it has none.

    Everything is checked before the model is changed, so a failed load leaves it as it was.

    Args:
        model: the base model the adapter was trained on (float or quantized linears), with or without LoRA.
        adapter_dir: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.
        strict: if true, every LoRA layer must receive both of its tensors.
        base: the record of ``model``'s base (``gptqlora.provenance.base_record``); when the adapter recorded
            another one, a warning names both (``logging`` and ``warnings.warn``). Loading onto another base may
            be intended (e.g. a float base for an adapter trained on its quantized copy), so it is not an error.
    Returns:
        ``model``, with the adapter loaded and only LoRA trainable.
    Raises:
        InputNotFoundError, UsageError: see ``read_adapter_config``; also for a damaged weights file or one holding
            NaN/inf, a key whose module this model lacks (an adapter for another base), a shape mismatch,
            mismatched LoRA hyperparameters on an already-injected model, and (if strict) missing keys.
    """
    d = Path(adapter_dir)
    config = read_adapter_config(d)
    tensors = read_tensors(d / WEIGHTS_NAME, fix="save or train the adapter again, or use another one")
    mismatch = check_adapter_base(d, base) if base is not None else None
    if mismatch:
        log.warning(mismatch)
        warnings.warn(mismatch, stacklevel=2)
    trained_for = config.get("base_model_name_or_path")
    r, alpha = int(config["r"]), float(config["lora_alpha"])
    dropout, rslora = float(config.get("lora_dropout", 0.0)), bool(config.get("use_rslora", False))

    existing = lora_modules(model)
    if existing:
        for name, m in existing.items():
            if (m.r, m.alpha, m.use_rslora) != (r, alpha, rslora):
                raise UsageError(f"{name} already has LoRA with r={m.r}, alpha={m.alpha}, rslora={m.use_rslora} but "
                                 f"the adapter in {d} has r={r}, lora_alpha={alpha}, use_rslora={rslora}")
        targets = list(existing)
    else:
        keyed = {m["module"] for key in tensors if (m := _KEY_RE.fullmatch(key))}
        if keyed and config["target_modules"] == _names_regex(keyed):
            # The regex save_adapter writes: the tensor names already say which modules to wrap, so the regex is
            # never run (a stranger's other regexes were bounded by read_adapter_config).
            targets = [n for n in linear_layer_names(model) if n in keyed]
        else:
            try:
                targets = find_targets(model, _targets_from_config(config["target_modules"]),
                                       where=f"{d / CONFIG_NAME}: target_modules")
            except ValueError as e:
                raise UsageError(f"the adapter in {d} (trained for {trained_for}) does not fit this model: "
                                 f"{e}") from e

    # Validate every key against the layer it will fill: [r, in] for A, [out, r] for B.
    found: set[str] = set()
    for key, t in tensors.items():
        m = _KEY_RE.fullmatch(key)
        if m is None:
            raise UsageError(f"{d / WEIGHTS_NAME}: unexpected key {key!r}; a PEFT LoRA adapter has only "
                             f"'{PEFT_PREFIX}<module>.lora_A.weight' and '.lora_B.weight' keys")
        name = m["module"]
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise UsageError(f"adapter key {key!r} is for module {name!r}, which this model does not have: the "
                             f"adapter was trained for another base model ({trained_for})") from None
        if name not in targets or not (is_linear(module) or isinstance(module, LoRALinear)):
            raise UsageError(f"adapter key {key!r} is for {name!r}, which is not among the LoRA layers selected by "
                             f"target_modules={str(config['target_modules'])[:200]!r}; the adapter is inconsistent")
        rank = module.r if isinstance(module, LoRALinear) else r
        expected = (rank, module.in_features) if m["which"] == "lora_A" else (module.out_features, rank)
        if tuple(t.shape) != expected:
            raise UsageError(f"shape mismatch for {key!r}: this model expects {expected} but the adapter has "
                             f"{tuple(t.shape)}; the adapter was trained for another base model ({trained_for}) "
                             "or rank")
        found.add(key)
    wanted = {f"{PEFT_PREFIX}{n}.{w}.weight" for n in targets for w in ("lora_A", "lora_B")}
    missing = sorted(wanted - found)
    if missing and strict:
        raise UsageError(f"{d / WEIGHTS_NAME} lacks {len(missing)} LoRA tensors, e.g. {missing[:3]}; "
                         "pass strict=False to leave those layers at their initial (zero) update")

    if not existing:
        inject_lora_layers(model, targets, r=r, alpha=alpha, dropout=dropout, use_rslora=rslora)
    params = get_adapter_params(model)
    with torch.no_grad():
        for key in found:
            params[key[len(PEFT_PREFIX):]].copy_(tensors[key])
    return model
