"""Training checkpoints: everything needed to continue a run exactly, in safetensors and JSON (never pickle).

``<out>/train_state/step-00000120/`` holds one checkpoint:

- ``adapter.safetensors``: the LoRA tensors, PEFT keys (``base_model.model.<module>.lora_A.weight``), fp32.
- ``optimizer.safetensors``: AdamW's state flattened per parameter index ``i`` (the order of
  ``get_adapter_params``): ``state.{i}.exp_avg``, ``state.{i}.exp_avg_sq``, ``state.{i}.step``.
- ``rng.safetensors``: the torch CPU generator state (uint8) and one per CUDA device; in a run of several
  processes (torchrun), each rank's, rank r > 0 under ``rank{r}.``.
- ``trainer_state.json``: the step (the scheduler's position), the data position (epoch, next micro-batch
  within it), tokens and seconds so far, the loss history, the optimizer's param groups and parameter names,
  Python's ``random`` state, and the run's fingerprint (the settings that shape the trajectory; with several
  processes, their number as ``world_size``: the global batch and the data order depend on it).

A checkpoint is written into a hidden temporary directory, every file and the directory fsynced, then renamed
to its final name (a rename is atomic), and only then are the other ``step-*`` directories deleted: a crash at any
point leaves the previous complete checkpoint, or the new one, never a half-written one under a ``step-*`` name.
A ``step-*`` directory that lost a file afterwards is *incomplete*: a resume skips it, says so, and continues from
the newest complete one (``resume_checkpoint``). NumPy's generator is not saved: nothing in training draws from it.

An FSDP-sharded run (``TrainConfig.fsdp``) writes the same files: every rank gathers the whole tensors
(``snapshot``) and rank 0 writes them; ``load_checkpoint`` cuts them into each rank's shards again.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from gptqlora import distributed
from gptqlora.errors import InputNotFoundError, UsageError
from gptqlora.files import staged_dir
from gptqlora.lora.layer import PEFT_PREFIX, adapter_state_dict, get_adapter_params
from gptqlora.provenance import base_differences, describe_base
from gptqlora.quant.weights import read_tensors

FORMAT_VERSION = 1
ADAPTER_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE = ("adapter.safetensors", "optimizer.safetensors",
                                                      "rng.safetensors", "trainer_state.json")
FILES = (ADAPTER_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE)
_STEP_DIR = re.compile(r"step-(\d{8})")
# Fingerprint entries that checkpoints written before they existed lack: one side missing is not a difference.
_RECORDED_LATER = ("base", "provenance")


@dataclass
class TrainState:
    """Where a run stands between two optimizer steps.

    Attributes:
        step: optimizer updates taken.
        epoch: epoch of the next micro-batch.
        batch_index: index of the next micro-batch within that epoch's shuffled order.
        tokens: non-padding input tokens trained on so far.
        elapsed: wall-clock seconds of training so far, over all resumed segments.
        history: every metrics record so far (train steps and evals), oldest first.
    """

    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def finite_record(record: dict[str, Any]) -> dict[str, Any]:
    """A metrics record as strict JSON can hold it: each NaN or infinite float becomes None, its key listed under
    ``non_finite`` (so a reader can tell a diverged value from a missing one). Finite records are returned as is."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return record
    return {**{k: None if k in bad else v for k, v in record.items()}, "non_finite": bad}


def step_dirs(root: str | os.PathLike) -> list[Path]:
    """Every ``step-*`` directory under ``root``, complete or not, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((d for d in root.iterdir() if _STEP_DIR.fullmatch(d.name) and d.is_dir()), key=lambda d: d.name)


def is_complete(checkpoint: str | os.PathLike) -> bool:
    """Whether a checkpoint directory holds every one of its files."""
    return all((Path(checkpoint) / f).is_file() for f in FILES)


def checkpoint_dirs(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root`` (``step-*`` directories holding every file), oldest first."""
    return [d for d in step_dirs(root) if is_complete(d)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def resume_checkpoint(root: str | os.PathLike) -> tuple[Path, list[Path]]:
    """The checkpoint a resume continues from: the newest complete one, and the newer incomplete ones it skips.

    Args:
        root: the ``train_state`` directory.
    Returns:
        (the newest complete checkpoint, the incomplete ``step-*`` directories newer than it, oldest first).
    Raises:
        InputNotFoundError: ``root`` holds no ``step-*`` directory at all.
        UsageError: it holds some, but none is complete (each names the files it lacks).
    """
    dirs = step_dirs(root)
    if not dirs:
        raise InputNotFoundError(f"--resume: no training checkpoint in {root}; run without --resume to start, or "
                                 "point --out at the earlier run's directory")
    complete = [d for d in dirs if is_complete(d)]
    if not complete:
        lacking = "; ".join(f"{d.name} lacks {', '.join(f for f in FILES if not (d / f).is_file())}" for d in dirs)
        raise UsageError(f"--resume: every checkpoint in {root} is incomplete ({lacking}), so the run cannot be "
                         "continued; start it again with --overwrite (which deletes them) or in a new --out")
    return complete[-1], [d for d in dirs if d.name > complete[-1].name]


@dataclass
class Snapshot:
    """What a checkpoint keeps of the adapter and the optimizer (``snapshot``), whole, on the CPU.

    Attributes:
        adapter: the LoRA tensors under PEFT keys (``adapter_state_dict``), fp32.
        optimizer: AdamW's state flattened, ``state.{i}.{key}`` (i: the parameter's index in ``param_names``).
        optimizer_meta: the JSON-able rest: ``param_names``, ``param_groups`` and ``state_extra`` (non-tensor state).
    """

    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, torch.Tensor]
    optimizer_meta: dict[str, Any]


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> Snapshot:
    """The adapter of ``model`` and the state of ``optimizer`` (AdamW over ``get_adapter_params(model)``, in that
    order) as a checkpoint holds them. The shards of an FSDP-sharded run are gathered: every rank calls it (the
    gathers are collectives), then rank 0 writes it (``save_checkpoint``)."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, dict[str, Any]] = {}
    for index, per_param in sd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = distributed.full_tensor(value.detach()).cpu().contiguous()
            else:
                extra.setdefault(str(index), {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    meta = {"param_names": list(get_adapter_params(model)), "param_groups": groups, "state_extra": extra}
    return Snapshot(adapter_state_dict(model), tensors, meta)


def rng_state() -> dict[str, torch.Tensor]:
    """This process's torch generator states: ``torch_cpu`` (uint8 [N]) and ``cuda.{i}`` per CUDA device."""
    rng = {"torch_cpu": torch.get_rng_state()}  # uint8 [N]
    if torch.cuda.is_available():
        rng |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    return rng


def ranks_rng_state(states: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Every rank's generator states in one file's tensors: rank 0's under their own names (as a one-process run
    saves them), rank r's under ``rank{r}.``; each rank of a resumed run takes its own back (``load_checkpoint``)."""
    merged = dict(states[0])
    for r, state in enumerate(states[1:], start=1):
        merged |= {f"rank{r}.{k}": v for k, v in state.items()}
    return merged


def save_checkpoint(root: str | os.PathLike, tensors: Snapshot, state: TrainState, fingerprint: dict[str, Any],
                    rng: dict[str, torch.Tensor] | None = None) -> Path:
    """Write one complete checkpoint atomically, then delete every other ``step-*`` directory.

    Only a finite step reaches a checkpoint (``train_lora`` raises before saving otherwise), and the trainer state is
    strict JSON: a NaN anywhere in it is a bug and raises ``ValueError``.

    Args:
        root: the ``train_state`` directory (created if needed).
        tensors: the adapter and the optimizer's state (``snapshot(model, optimizer)``).
        state: the run's position; saved as is.
        fingerprint: the settings a resume must match (see ``check_fingerprint``).
        rng: the generator states to save (``ranks_rng_state`` of every rank's, in a run of several processes);
            this process's (``rng_state()``) by default.
    Returns:
        The new checkpoint directory.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step-*"):  # staging left by a run killed mid-write; one trainer writes per --out
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{state.step:08d}"
    # Staged beside its final name, permissions normalized, fsynced and renamed in (gptqlora.files.staged_dir); an
    # incomplete directory of this step, left by a damaged run that was resumed, is replaced.
    with staged_dir(final, overwrite=True) as tmp:
        rng = rng_state() if rng is None else rng
        py_version, py_state, py_gauss = random.getstate()
        meta = {"format": FORMAT_VERSION, **asdict(state), "fingerprint": fingerprint,
                "optimizer": tensors.optimizer_meta, "python_random": [py_version, list(py_state), py_gauss]}
        save_file(tensors.adapter, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        save_file(tensors.optimizer, str(tmp / OPTIMIZER_FILE), metadata={"format": "pt"})
        save_file(rng, str(tmp / RNG_FILE), metadata={"format": "pt"})
        (tmp / STATE_FILE).write_text(json.dumps(meta, allow_nan=False) + "\n")
    for other in step_dirs(root):  # only once the new one is complete: older ones, and incomplete ones skipped
        if other != final:
            shutil.rmtree(other, ignore_errors=True)
    return final


def read_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint directory, as a dict.

    Raises:
        UsageError: the file is unreadable, not JSON, or of another format version.
    """
    path = Path(checkpoint) / STATE_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read {path}: {e}; the checkpoint is damaged: resume from an earlier run's "
                         "directory, or start again with --overwrite") from e
    if meta.get("format") != FORMAT_VERSION:
        raise UsageError(f"{path} has format {meta.get('format')!r}, this version reads {FORMAT_VERSION}")
    return meta


def check_world_size(checkpoint: str | os.PathLike, size: int) -> None:
    """Refuse to resume with another number of processes than the checkpoint's run had (1 when unrecorded).

    The global batch (``batch_size`` x processes x ``grad_accum``), the data position and each rank's generator
    state all depend on it.

    Raises:
        UsageError: naming both process counts and how to launch the resume.
    """
    saved = read_state(checkpoint)["fingerprint"].get("world_size", 1)
    if saved != size:
        launch = f"torchrun --nproc-per-node {saved} gptqlora ..." if saved > 1 else "gptqlora ... without torchrun"
        raise UsageError(f"cannot resume from {checkpoint}: it was written by {saved} process{'es' * (saved > 1)}, "
                         f"this run has {size}; resume with the same count ({launch}), or start a new --out")


def describe_setting(key: str, value: Any) -> str:
    """A fingerprint value for a message: a base as ``describe_base`` names it, ``fsdp`` as on or off (it is
    recorded only when on), anything else as short JSON."""
    if key == "base" and isinstance(value, dict):
        return describe_base(value)
    if key == "fsdp":
        return "on" if value else "off"
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """The fingerprint entries that differ, as ``{key: (saved, current)}``.

    ``base`` records are compared by ``base_differences`` (the same weights elsewhere are the same base).
    """
    diffs = {}
    for k in sorted(saved.keys() | current.keys()):
        s, c = saved.get(k), current.get(k)
        if k == "base" and isinstance(s, dict) and isinstance(c, dict):
            same = not base_differences(s, c)
        else:
            same = s == c
        if not same:
            diffs[k] = (s, c)
    return diffs


# key -> (the rule in words, whether a change from the saved value to the current one is accepted)
ChangeRules = Mapping[str, tuple[str, Callable[[Any, Any], bool]]]


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], where: str | os.PathLike,
                      may_change: ChangeRules | None = None) -> dict[str, tuple[Any, Any]]:
    """Refuse to resume when the settings that shape the trajectory differ, except the changes allowed.

    Args:
        saved: the checkpoint's fingerprint.
        current: this run's.
        where: the checkpoint, for the message.
        may_change: entries that may differ, each with its rule (e.g. ``{"lr": ("lower only", le)}``).
    Returns:
        The accepted differences ``{key: (saved, current)}``: those ``may_change`` allows, and ``base`` or
        ``provenance`` recorded on one side only (checkpoints written before they were recorded).
    Raises:
        UsageError: naming each refused setting with both values (a base by path, fingerprint and quantization).
    """
    may_change = may_change or {}
    accepted, refused = {}, []
    for k, (s, c) in fingerprint_differences(saved, current).items():
        if (k in _RECORDED_LATER and (s is None or c is None)) or (k in may_change and may_change[k][1](s, c)):
            accepted[k] = (s, c)
        elif k == "base":
            fields = ", ".join(base_differences(s, c))
            refused.append(f"base {fields}: checkpoint {describe_setting(k, s)}, now {describe_setting(k, c)}")
        else:
            refused.append(f"{k}: checkpoint {describe_setting(k, s)}, now {describe_setting(k, c)}")
    if refused:
        rules = ", ".join(f"{k} ({rule})" for k, (rule, _) in may_change.items())
        allowed = f" (a resume may change only {rules})" if rules else ""
        raise UsageError(f"cannot resume from {where}: it was written with different settings ({'; '.join(refused)})."
                         f" Resume with the checkpoint's settings{allowed}, or start a fresh run in a new --out")
    return accepted


_DAMAGED = "resume from an earlier checkpoint, or start again with --overwrite or in a new --out"


def load_checkpoint(checkpoint: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    fingerprint: dict[str, Any], may_change: ChangeRules | None = None, rank: int = 0
                    ) -> tuple[TrainState, dict[str, tuple[Any, Any]]]:
    """Restore the LoRA tensors, the optimizer, the RNG states and the run's position from a checkpoint.

    Everything is read and checked before anything is changed.

    Args:
        checkpoint: a complete ``step-*`` directory (see ``resume_checkpoint``).
        model: the same base model with the same LoRA layers injected (FSDP-sharded or not: each rank takes its
            shards of the whole tensors saved).
        optimizer: a fresh AdamW over ``get_adapter_params(model)``.
        fingerprint: this run's settings; they must equal the checkpoint's, but for ``may_change``.
        may_change: the settings that may differ, with their rules (see ``check_fingerprint``).
        rank: this process's rank: it takes back the generator states saved for it (``ranks_rng_state``).
    Returns:
        (the run's position to continue from, the accepted differences ``{key: (checkpoint's, this run's)}``).
    Raises:
        UsageError: for refused settings, different LoRA layers, or a damaged checkpoint (unreadable, or holding
            non-finite tensors), naming the file.
    """
    d = Path(checkpoint)
    meta = read_state(d)
    changed = check_fingerprint(meta["fingerprint"], fingerprint, d, may_change)
    params = get_adapter_params(model)
    adapter = read_tensors(d / ADAPTER_FILE, _DAMAGED)
    expected = {PEFT_PREFIX + k: tuple(p.shape) for k, p in params.items()}
    if {k: tuple(t.shape) for k, t in adapter.items()} != expected:
        raise UsageError(f"{d / ADAPTER_FILE} does not match this model's LoRA layers (names or shapes differ)")
    if meta["optimizer"]["param_names"] != list(params):
        raise UsageError(f"{d}: the optimizer state was saved for other parameters or another order")
    flat = read_tensors(d / OPTIMIZER_FILE, _DAMAGED)
    rng = read_tensors(d / RNG_FILE, _DAMAGED)
    if rank:
        prefix = f"rank{rank}."
        rng = {k[len(prefix):]: t for k, t in rng.items() if k.startswith(prefix)}
        if "torch_cpu" not in rng:
            raise UsageError(f"{d / RNG_FILE} holds no generator state for rank {rank}: it was written by a run of "
                             "fewer processes; resume with that run's process count")

    with torch.no_grad():
        for key, p in params.items():
            p.copy_(distributed.shard_like(adapter[PEFT_PREFIX + key], p))
    ordered = list(params.values())
    per_param: dict[int, dict[str, Any]] = {}
    for key, t in flat.items():
        _, index, name = key.split(".", 2)
        p = ordered[int(index)]  # a state shaped as its parameter (exp_avg, exp_avg_sq) is sharded as it is
        per_param.setdefault(int(index), {})[name] = distributed.shard_like(t, p) if t.shape == p.shape else t
    for index, extra in meta["optimizer"]["state_extra"].items():
        per_param.setdefault(int(index), {}).update(extra)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["optimizer"]["param_groups"]]
    optimizer.load_state_dict({"state": per_param, "param_groups": groups})

    torch.set_rng_state(rng["torch_cpu"])
    cuda_states = [rng[k] for k in sorted((k for k in rng if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[:torch.cuda.device_count()])
    py_version, py_state, py_gauss = meta["python_random"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    state = TrainState(step=meta["step"], epoch=meta["epoch"], batch_index=meta["batch_index"], tokens=meta["tokens"],
                       elapsed=meta["elapsed"], history=[finite_record(r) for r in meta["history"]])
    return state, changed
