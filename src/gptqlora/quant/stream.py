"""Safetensors checkpoints read and written a piece at a time, so that no step needs a whole model in memory.

Reading: ``SafetensorsSource`` opens a model directory's ``model.safetensors``, or the shards its
``model.safetensors.index.json`` lists, and returns the tensors asked for, memory-mapped by safetensors' ``safe_open``:
a tensor's pages are read when touched and leave the process when the tensor is dropped. Which files those are, and
the checks each passes before a byte of it is read, is decided by ``gptqlora.quant.weights`` alone.

Writing: a checkpoint is planned before anything is written (``ShardLayout``). Its tensors come in units (the
embeddings and norms, then one unit per decoder block) that never straddle two shards; a shard holds at most
``max_shard_size`` bytes (a larger unit gets a shard of its own), shards take Hugging Face's names
(``model-00001-of-00003.safetensors`` + ``model.safetensors.index.json``, or one ``model.safetensors`` when all fits in
one shard), and every tensor has a fixed place. So each shard's header is written first and a unit's bytes go to their
places as soon as the unit is ready: a unit written before a crash is still there after it (``WorkDir`` records which).

The file format (huggingface/safetensors): an 8-byte little-endian header length; a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`` padded with spaces to a multiple of
8 bytes; then the tensors' bytes back to back, without gaps. Tensors are ordered by alignment, then name (as
safetensors orders them), so each starts at a multiple of its element size.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from gptqlora.errors import InputNotFoundError, UsageError
from gptqlora.files import DirectoryOwner, fsync_path, read_json_object, write_atomic
from gptqlora.quant.weights import INDEX_FILE, SINGLE_FILE, files_sha256, weight_files

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_SIZE = "5GB"  # Hugging Face's save_pretrained default
_DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                torch.bool: "BOOL"}
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as "5GB" (10^9, Hugging Face's convention), "500MiB" (2^20) or "1024".

    Raises:
        UsageError: a value that is not a positive size.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), flags=re.IGNORECASE)
        if match is None:
            raise UsageError(f"max shard size {size!r} is not a size: write e.g. 5GB, 500MB, 2GiB or a number of bytes")
        value = int(float(match[1]) * _SIZE_UNITS[(match[2] or "B").upper()])
    if value <= 0:
        raise UsageError(f"max shard size {size!r} must be positive")
    return value


# ---------------------------------------------------------------------------------------------- reading

class SafetensorsSource:
    """The tensors of a model directory: ``model.safetensors``, or the shards ``model.safetensors.index.json`` lists.

    Raises (on construction):
        InputNotFoundError: neither file, or a shard the index names is missing.
        UsageError: a file that fails ``weight_files``' checks (an index entry leading outside the directory, a
            file that is not safetensors...), or an unreadable single file.
    """

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        found = weight_files(self.directory)
        if found is None:
            raise InputNotFoundError(f"{self.directory} holds no {SINGLE_FILE} and no {INDEX_FILE}: a safetensors "
                                     "model directory is expected")
        self.path, self.paths = found.listing, found.files
        if found.weight_map is None:
            with self._open(SINGLE_FILE) as f:
                self.weight_map = dict.fromkeys(f.keys(), SINGLE_FILE)
        else:
            self.weight_map = found.weight_map

    @property
    def names(self) -> list[str]:
        return list(self.weight_map)

    @property
    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))

    def sha256(self) -> str:
        """The sha256 of the weight files' bytes (``files_sha256``): what ``provenance.weights_fingerprint`` gives."""
        return files_sha256(self.paths)

    def _open(self, file: str):
        try:
            return safe_open(self.directory / file, framework="pt")
        except (SafetensorError, OSError, ValueError) as e:
            raise UsageError(f"cannot read {self.directory / file}: the file is truncated or corrupt ({e})") from None

    def load(self, names: Iterable[str], convert: Callable[[str, Tensor], Tensor] | None = None
             ) -> dict[str, Tensor]:
        """The named tensors, memory-mapped, or what ``convert(name, tensor)`` makes of each (e.g. a dtype or device
        change), called as each is read.

        Each tensor is read through its own short-lived mapping, so a converted tensor's source pages leave the
        process before the next is read: converting a block from fp16 to fp32 never holds both copies of it.

        Raises:
            UsageError: a name the checkpoint lacks, or a file that cannot be read.
        """
        names = list(names)
        absent = [n for n in names if n not in self.weight_map]
        if absent:
            raise UsageError(f"{self.path} lacks {absent[:4]}{'...' if len(absent) > 4 else ''}: the weights do not "
                             "match config.json")
        out = {}
        for n in names:
            file = self.weight_map[n]
            with self._open(file) as f:
                try:
                    t = f.get_tensor(n)
                except (SafetensorError, OSError, ValueError) as e:
                    raise UsageError(f"cannot read {n} from {self.directory / file} ({e}): the file is truncated "
                                     "or corrupt") from None
            out[n] = t if convert is None else convert(n, t)
            del t
        return out


# ---------------------------------------------------------------------------------------------- writing

@dataclass(frozen=True)
class TensorSpec:
    """What will be written under a name: dtype and shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize

    @classmethod
    def of(cls, name: str, t: Tensor) -> TensorSpec:
        return cls(name, t.dtype, tuple(t.shape))


def _header(specs: Sequence[TensorSpec], metadata: Mapping[str, str]) -> tuple[bytes, dict[str, int]]:
    """The encoded header (length prefix included) and each tensor's absolute offset in the file."""
    ordered = sorted(specs, key=lambda s: (-s.dtype.itemsize, s.name))
    entries: dict[str, dict] = {"__metadata__": dict(metadata)}
    offsets, position = {}, 0
    for s in ordered:
        if s.dtype not in _DTYPE_NAMES:
            raise ValueError(f"{s.name}: dtype {s.dtype} cannot be written to safetensors")
        entries[s.name] = {"dtype": _DTYPE_NAMES[s.dtype], "shape": list(s.shape),
                           "data_offsets": [position, position + s.nbytes]}
        offsets[s.name] = position
        position += s.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    return struct.pack("<Q", len(text)) + text, {name: start + off for name, off in offsets.items()}


def _raw_bytes(t: Tensor) -> memoryview:
    """The bytes of a tensor as stored (little-endian, C order), without a copy for a contiguous CPU tensor."""
    t = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


class ShardLayout:
    """Where every tensor of a checkpoint goes, fixed before any is written.

    Args:
        units: the tensors in groups that are written together (never split across shards), in file order.
        max_shard_size: bytes (or "5GB") per shard; units are packed greedily in order, a larger unit alone.
        name: file stem; one shard is ``{name}.safetensors``, several ``{name}-0000i-of-0000n.safetensors``.
    """

    def __init__(self, units: Sequence[Sequence[TensorSpec]], max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                 name: str = "model", metadata: Mapping[str, str] | None = None) -> None:
        if sys.byteorder != "little":
            raise RuntimeError("safetensors files are little-endian: writing them from this machine is not supported")
        limit = parse_size(max_shard_size)
        groups: list[list[int]] = []
        size = 0
        for i, unit in enumerate(units):
            unit_bytes = sum(s.nbytes for s in unit)
            if not groups or (size and size + unit_bytes > limit):
                groups.append([])
                size = 0
            groups[-1].append(i)
            size += unit_bytes
        n = len(groups)
        self.files = [f"{name}.safetensors"] if n == 1 else [f"{name}-{k + 1:05d}-of-{n:05d}.safetensors"
                                                             for k in range(n)]
        self.units = [list(u) for u in units]
        self.unit_file: list[str] = [""] * len(units)
        self.headers: dict[str, bytes] = {}
        self.sizes: dict[str, int] = {}
        self.offsets: dict[str, int] = {}
        self.weight_map: dict[str, str] = {}
        for file, group in zip(self.files, groups):
            specs = [s for i in group for s in units[i]]
            header, offsets = _header(specs, metadata or {"format": "pt"})
            self.headers[file] = header
            self.sizes[file] = len(header) + sum(s.nbytes for s in specs)
            self.offsets |= offsets
            self.weight_map |= dict.fromkeys((s.name for s in specs), file)
            for i in group:
                self.unit_file[i] = file
        self.total_size = sum(s.nbytes for u in units for s in u)

    def index(self) -> dict | None:
        """The ``model.safetensors.index.json`` object for several shards; None for one file."""
        if len(self.files) == 1:
            return None
        return {"metadata": {"total_size": self.total_size},
                "weight_map": dict(sorted(self.weight_map.items()))}

    def output_files(self) -> list[str]:
        return self.files + ([INDEX_FILE] if self.index() is not None else [])

    def create(self, directory: Path) -> None:
        """Write every shard's header and give it its final size (the data region reads as zeros until written)."""
        for file in self.files:
            with open(directory / file, "wb") as f:
                f.write(self.headers[file])
                f.truncate(self.sizes[file])
                f.flush()
                os.fsync(f.fileno())
        index = self.index()
        if index is not None:
            write_atomic(directory / INDEX_FILE, json.dumps(index, indent=2))
        fsync_path(directory)

    def matches(self, directory: Path) -> bool:
        """Whether ``directory`` holds these shards (same headers and sizes), as ``create`` made them."""
        for file in self.files:
            path = directory / file
            if not path.is_file() or path.stat().st_size != self.sizes[file]:
                return False
            with open(path, "rb") as f:
                if f.read(len(self.headers[file])) != self.headers[file]:
                    return False
        return True

    def write_unit(self, directory: Path, unit: int, tensors: Mapping[str, Tensor]) -> None:
        """Write unit ``unit``'s tensors at their places and fsync the shard.

        Raises:
            ValueError: the tensors are not exactly the unit's planned names, dtypes and shapes.
        """
        specs = {s.name: s for s in self.units[unit]}
        if set(tensors) != set(specs):
            raise ValueError(f"unit {unit}: got {sorted(set(tensors) ^ set(specs))[:4]} that differ from the plan")
        for name, t in tensors.items():
            if TensorSpec.of(name, t) != specs[name]:
                raise ValueError(f"{name}: {t.dtype} {tuple(t.shape)} differs from the planned "
                                 f"{specs[name].dtype} {specs[name].shape}")
        with open(directory / self.unit_file[unit], "r+b") as f:
            for name, t in tensors.items():
                f.seek(self.offsets[name])
                f.write(_raw_bytes(t))
            f.flush()
            os.fsync(f.fileno())


def write_tensors(directory: Path, units: Sequence[Mapping[str, Tensor]],
                  max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE, name: str = "model") -> ShardLayout:
    """Write tensors held in memory, unit by unit, as (sharded) safetensors in ``directory``."""
    layout = ShardLayout([[TensorSpec.of(n, t) for n, t in u.items()] for u in units], max_shard_size, name)
    layout.create(directory)
    for i, unit in enumerate(units):
        layout.write_unit(directory, i, unit)
    return layout


# ---------------------------------------------------------------------------------------------- resumable work

# Fingerprint entries that hash the source's files, and what they hash.
_SOURCE_HASHES = {"source_sha256": "weights", "source_config_sha256": "config.json"}


def _settings_differences(run: Mapping, now: Mapping) -> list[str]:
    """How a work directory's fingerprint differs from this run's, one entry per setting: "bits: run 4, now 3".

    A group of settings (a dict, such as the quantization config) is compared field by field; a changed hash of
    the source's bytes names the source.
    """
    lines = []
    for key in sorted(run.keys() | now.keys()):
        a, b = run.get(key), now.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            lines += _settings_differences(a, b)
        elif key in _SOURCE_HASHES:
            lines.append(f"the {_SOURCE_HASHES[key]} of {now.get('source', 'the source')} changed since that run, "
                         f"sha256 run {str(a)[:12]}, now {str(b)[:12]}")
        else:
            lines.append(f"{key}: run {_short(a)}, now {_short(b)}")
    return lines


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


class WorkDir:
    """The finished part of a streamed quantization, kept next to its output so that a killed run can resume.

    Holds the output shards with the units written so far, ``state.json`` (what produced them, how many units are
    done, their GPTQ losses, the file holding the next block's calibration inputs) and that activations file. The
    state file is replaced atomically after a unit's bytes and the activations are on disk: it is the commit point.
    The running process holds the directory's ``owner.lock`` (``gptqlora.files.DirectoryOwner``): a work directory
    whose lock is free was left by a run that is over (killed, or stopped by an error).
    """

    STATE = "state.json"

    def __init__(self, path: Path, layout: ShardLayout, state: dict, owner: DirectoryOwner) -> None:
        self.path, self.layout, self.state, self.owner = path, layout, state, owner

    @classmethod
    def open(cls, path: str | os.PathLike, layout: ShardLayout, fingerprint: dict, resume: bool) -> WorkDir:
        """Start a work directory, or continue the one at ``path`` when ``resume`` and it was made the same way.

        A directory left by a run that is over is continued with ``resume`` and removed without it (a fresh start:
        the finished blocks are discarded, as the user did not ask to keep them). The caller must ``close`` the
        returned work directory (or ``remove`` it) when done.

        Raises:
            UsageError: the directory belongs to a live process (its pid is named); ``resume`` over work made from
                other inputs or settings (the differing fields are named), or over a damaged work directory.
        """
        path = Path(path)
        state_file = path / cls.STATE
        if path.exists():
            owner = cls._take(path)
            if resume and state_file.is_file():
                try:
                    return cls._continue(path, layout, fingerprint, owner)
                except BaseException:
                    owner.release()
                    raise
            log.warning("removing %s, left by a run that is over (%s of %d parts written)%s", path,
                        cls._units_done_in(state_file), len(layout.units),
                        "" if resume else "; pass --resume to continue such a run instead")
            shutil.rmtree(path)
            owner.release()
        try:
            path.mkdir(parents=True)
        except FileExistsError:  # another run created it since: its lock names it when it holds it
            cls._take(path).release()
            raise UsageError(f"{path} appeared while this run started: another quantization to the same output is "
                             "starting; run one at a time") from None
        owner = cls._take(path)
        try:
            layout.create(path)
            work = cls(path, layout, {"fingerprint": fingerprint, "units_done": 0, "losses": {}, "activations": None},
                       owner)
            work._save_state()
        except BaseException:
            owner.release()
            raise
        return work

    @staticmethod
    def _take(path: Path) -> DirectoryOwner:
        owner = DirectoryOwner(path)
        if not owner.acquire():
            raise UsageError(f"{path} belongs to a quantization still running (pid {owner.holder}): wait for it to "
                             "finish, or choose another output")
        return owner

    @classmethod
    def _continue(cls, path: Path, layout: ShardLayout, fingerprint: dict, owner: DirectoryOwner) -> WorkDir:
        state = read_json_object(path / cls.STATE)
        old = state.get("fingerprint", {})
        if not isinstance(old, dict) or old.get("format") != fingerprint.get("format"):
            raise UsageError(f"cannot resume from {path}: it was written by another version of gptqlora (work format "
                             f"{old.get('format') if isinstance(old, dict) else None}, now {fingerprint.get('format')}"
                             "); rerun without resume (--resume) to start again")
        differ = _settings_differences(old, fingerprint)
        if differ:
            raise UsageError(f"cannot resume from {path}: it was made with different inputs or settings "
                             f"({'; '.join(differ)}). Resume with that run's inputs and settings, or rerun without "
                             "resume (--resume) to start again")
        if not layout.matches(path):
            raise UsageError(f"cannot resume from {path}: its shard files are missing or damaged; rerun without "
                             "resume (--resume) to start again")
        work = cls(path, layout, state, owner)
        work._remove_stale_activations()
        log.info("resuming from %s: %d of %d units already written", path, work.units_done, len(layout.units))
        return work

    @staticmethod
    def _units_done_in(state_file: Path) -> int | str:
        try:
            return int(read_json_object(state_file)["units_done"])
        except (UsageError, OSError, KeyError, TypeError, ValueError):
            return "an unknown number of"

    @property
    def units_done(self) -> int:
        return int(self.state["units_done"])

    @property
    def losses(self) -> dict[str, float]:
        return dict(self.state["losses"])

    def _save_state(self) -> None:
        write_atomic(self.path / self.STATE, json.dumps(self.state, indent=1))

    def _remove_stale_activations(self) -> None:
        for p in self.path.glob("activations-*.safetensors"):
            if p.name != self.state.get("activations"):
                p.unlink()

    def commit(self, unit: int, tensors: Mapping[str, Tensor], losses: Mapping[str, float],
               activations: Sequence[Tensor] | None) -> None:
        """Write unit ``unit`` (the next one) and, with it, the calibration inputs of the next block; then record both.

        A crash before the state file is replaced leaves the previous state, which still describes files on disk.
        """
        if unit != self.units_done:
            raise ValueError(f"unit {unit} written out of order: {self.units_done} units are done")
        self.layout.write_unit(self.path, unit, tensors)
        name = None
        if activations is not None:
            name = f"activations-{unit + 1:05d}.safetensors"
            write_tensors(self.path, [{f"chunk.{j:05d}": x for j, x in enumerate(activations)}], sys.maxsize,
                          name=name.removesuffix(".safetensors"))
        self.state = self.state | {"units_done": unit + 1, "losses": self.losses | dict(losses), "activations": name}
        self._save_state()
        self._remove_stale_activations()

    def activations(self) -> list[Tensor] | None:
        """The recorded calibration inputs of the next block, in chunks (memory-mapped), or None."""
        name = self.state.get("activations")
        if name is None:
            return None
        try:
            with safe_open(self.path / name, framework="pt") as f:
                return [f.get_tensor(k) for k in sorted(f.keys())]
        except (SafetensorError, OSError) as e:
            raise UsageError(f"cannot resume from {self.path}: {name} is unreadable ({e}); rerun without resume "
                             "(--resume) to start again") from None

    def close(self) -> None:
        """Let the directory go (kept for a later run: see ``open``)."""
        self.owner.release()

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
        self.owner.release()
