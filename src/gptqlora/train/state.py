"""Training checkpoints: everything needed to continue a run exactly, in safetensors and JSON (never pickle).

``<out>/train_state/step-00000120/`` holds one checkpoint:

- ``adapter.safetensors``: the LoRA tensors, PEFT keys (``base_model.model.<module>.lora_A.weight``), fp32.
- ``optimizer.safetensors``: AdamW's state flattened per parameter index ``i`` (the order of
  ``get_adapter_params``): ``state.{i}.exp_avg``, ``state.{i}.exp_avg_sq``, ``state.{i}.step``.
- ``rng.safetensors``: the torch CPU generator state (uint8) and one per CUDA device.
- ``trainer_state.json``: the step (the scheduler's position), the data position (epoch, next micro-batch
  within it), tokens and seconds so far, the loss history, the optimizer's param groups and parameter names,
  Python's ``random`` state, and the run's fingerprint (the settings that shape the trajectory).

A checkpoint is written into a hidden temporary directory, every file and the directory fsynced, then renamed
to its final name (a rename is atomic), and only then are older checkpoints deleted: a crash at any point leaves
the previous complete checkpoint, or the new one, never a half-written one under a ``step-*`` name.
NumPy's generator is not saved: nothing in training draws from it.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from gptqlora.lora.layer import PEFT_PREFIX, adapter_state_dict, get_adapter_params

FORMAT_VERSION = 1
ADAPTER_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE = ("adapter.safetensors", "optimizer.safetensors",
                                                      "rng.safetensors", "trainer_state.json")
FILES = (ADAPTER_FILE, OPTIMIZER_FILE, RNG_FILE, STATE_FILE)
_STEP_DIR = re.compile(r"step-(\d{8})")


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


def checkpoint_dirs(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root`` (``step-*`` directories holding every file), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [d for d in root.iterdir() if _STEP_DIR.fullmatch(d.name) and all((d / f).is_file() for f in FILES)]
    return sorted(found, key=lambda d: d.name)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def _fsync_path(path: Path) -> None:
    """Flush a file's or a directory's contents to disk (a directory fsync makes renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into flat tensors ``state.{i}.{key}`` and the JSON-able rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    extra: dict[str, dict[str, Any]] = {}
    for index, per_param in sd["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                extra.setdefault(str(index), {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "state_extra": extra}


def save_checkpoint(root: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, state: TrainState,
                    fingerprint: dict[str, Any]) -> Path:
    """Write one complete checkpoint atomically and delete the older ones.

    Args:
        root: the ``train_state`` directory (created if needed).
        model: the model carrying the LoRA layers being trained.
        optimizer: AdamW over ``get_adapter_params(model)``, in that order.
        state: the run's position; saved as is.
        fingerprint: the settings a resume must match (see ``check_fingerprint``).
    Returns:
        The new checkpoint directory.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-write; one trainer writes per --out
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{state.step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        opt_tensors, opt_rest = _optimizer_tensors(optimizer)
        rng = {"torch_cpu": torch.get_rng_state()}  # uint8 [N]
        if torch.cuda.is_available():
            rng |= {f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
        py_version, py_state, py_gauss = random.getstate()
        meta = {"format": FORMAT_VERSION, **asdict(state), "fingerprint": fingerprint,
                "optimizer": {"param_names": list(get_adapter_params(model)), **opt_rest},
                "python_random": [py_version, list(py_state), py_gauss]}
        save_file(adapter_state_dict(model), str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
        save_file(opt_tensors, str(tmp / OPTIMIZER_FILE), metadata={"format": "pt"})
        save_file(rng, str(tmp / RNG_FILE), metadata={"format": "pt"})
        (tmp / STATE_FILE).write_text(json.dumps(meta, allow_nan=True) + "\n")
        for name in FILES:
            _fsync_path(tmp / name)
        _fsync_path(tmp)
        if final.exists():  # the same step saved again (cannot happen in train_lora; kept safe for callers)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoint_dirs(root):  # only once the new one is complete
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The ``trainer_state.json`` of a checkpoint directory, as a dict."""
    path = Path(checkpoint) / STATE_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}; the checkpoint is damaged") from e
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} has format {meta.get('format')!r}, this version reads {FORMAT_VERSION}")
    return meta


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], where: str | os.PathLike) -> None:
    """Refuse to resume when the settings that shape the trajectory differ.

    Raises:
        ValueError: naming each differing setting with both values.
    """
    def show(v: Any) -> str:
        text = json.dumps(v)
        return text if len(text) <= 60 else text[:57] + "..."

    diffs = [f"{k}: checkpoint {show(saved.get(k))}, now {show(current.get(k))}"
             for k in sorted(saved.keys() | current.keys()) if saved.get(k) != current.get(k)]
    if diffs:
        raise ValueError(f"cannot resume from {where}: it was written with different settings ({'; '.join(diffs)}). "
                         "Resume with the checkpoint's settings, or start a fresh run in a new --out")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read {path}: the file is truncated or corrupt ({e})") from e


def load_checkpoint(checkpoint: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    fingerprint: dict[str, Any]) -> TrainState:
    """Restore the LoRA tensors, the optimizer, the RNG states and the run's position from a checkpoint.

    Everything is read and checked before anything is changed.

    Args:
        checkpoint: a ``step-*`` directory (see ``latest_checkpoint``).
        model: the same base model with the same LoRA layers injected.
        optimizer: a fresh AdamW over ``get_adapter_params(model)``.
        fingerprint: this run's settings; they must equal the checkpoint's.
    Returns:
        The run's position, to continue from.
    Raises:
        ValueError: for different settings, different LoRA layers or a damaged checkpoint.
    """
    d = Path(checkpoint)
    meta = read_state(d)
    check_fingerprint(meta["fingerprint"], fingerprint, d)
    params = get_adapter_params(model)
    adapter = _read_tensors(d / ADAPTER_FILE)
    expected = {PEFT_PREFIX + k: tuple(p.shape) for k, p in params.items()}
    if {k: tuple(t.shape) for k, t in adapter.items()} != expected:
        raise ValueError(f"{d / ADAPTER_FILE} does not match this model's LoRA layers (names or shapes differ)")
    if meta["optimizer"]["param_names"] != list(params):
        raise ValueError(f"{d}: the optimizer state was saved for other parameters or another order")
    flat = _read_tensors(d / OPTIMIZER_FILE)
    rng = _read_tensors(d / RNG_FILE)

    with torch.no_grad():
        for key, p in params.items():
            p.copy_(adapter[PEFT_PREFIX + key])
    per_param: dict[int, dict[str, Any]] = {}
    for key, t in flat.items():
        _, index, name = key.split(".", 2)
        per_param.setdefault(int(index), {})[name] = t
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
    return TrainState(step=meta["step"], epoch=meta["epoch"], batch_index=meta["batch_index"], tokens=meta["tokens"],
                      elapsed=meta["elapsed"], history=meta["history"])
