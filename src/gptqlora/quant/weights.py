"""Which files a model directory's weights are, each checked before a byte of it is read, and their hash.

Whoever wrote a model directory chose its file names and links, so it is read as a stranger's. Its weights are
``model.safetensors`` when present (Hugging Face's order), else the shards ``model.safetensors.index.json`` names,
and each of those files must:

- be named by a relative path without ``..`` (as transformers requires of an index);
- lie inside the directory once links are followed; a Hugging Face hub cache snapshot
  (``models--org--name/snapshots/REV/``) may also link into its own repository's ``blobs/``;
- be a regular file (not a FIFO, a device or a directory), and begin as safetensors does: an 8-byte little-endian
  header length that fits the file, then ``{``.

The index itself must be a regular file inside the directory too, and so must every other file at the directory's
top level (config.json, the tokenizer's files, an adapter's files: ``check_directory_files``), which transformers
and we read by name. While checking, nothing is read but the index and
the first 9 bytes of each regular file found inside; a file that fails a rule is refused in one line naming the index
(or the file), the entry and why. ``weight_files`` applies these rules, ``files_sha256`` hashes what it returns;
``read_tensors`` reads a whole small safetensors file (an adapter, a training checkpoint). This module imports no
torch (``read_tensors`` loads it when called), so the provenance records that hash weights import it freely.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gptqlora.errors import InputNotFoundError, UsageError
from gptqlora.files import read_json_object

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The header's length prefix must leave a JSON object: at least "{}", at most safetensors' own limit (100 MB).
_MIN_HEADER, _MAX_HEADER = 2, 100_000_000
CHUNK_BYTES = 1 << 20  # weight files are streamed through sha256 in 1 MiB reads, never loaded whole


@dataclass(frozen=True)
class WeightFiles:
    """A model directory's safetensors weights, every file checked (``weight_files``).

    Attributes:
        listing: the file that names the tensors: ``model.safetensors`` itself, or the index.
        weight_map: tensor name -> shard name, as the index gives it; None for one ``model.safetensors`` (its
            own header names its tensors).
        files: the weight files, sorted by name (each once).
    """

    listing: Path
    weight_map: dict[str, str] | None
    files: list[Path]


def weight_files(directory: str | os.PathLike) -> WeightFiles | None:
    """The weight files of a model directory, each checked by this module's rules before a byte of it is read.

    Returns:
        The files, or None when the directory holds neither ``model.safetensors`` nor an index.
    Raises:
        InputNotFoundError: a shard the index names is missing.
        UsageError: an index that is not ``{"weight_map": {name: file}}``, or a file that fails a check: one line
            naming the index (or the file), the entry and why.
    """
    directory = Path(directory)
    roots = _allowed_roots(directory)
    single, index = directory / SINGLE_FILE, directory / INDEX_FILE
    if os.path.lexists(single):  # a dangling or bad link is refused below, not passed over for the index
        path = _checked_file(directory, roots, SINGLE_FILE, single)
        if path is None:
            raise InputNotFoundError(f"{single} is a link to a file that does not exist; download or copy the model "
                                     "again")
        return WeightFiles(single, None, [path])
    if not os.path.lexists(index):
        return None
    if _resolved_inside(index, roots) is None or not index.is_file():
        raise UsageError(f"{index} is not a regular file inside {directory}: an index is read only from the model "
                         "directory itself; fix or download the model again")
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UsageError(f"{index} has no \"weight_map\" object of tensor name -> shard file")
    checked = {name: _checked_file(directory, roots, name, index) for name in sorted(set(weight_map.values()))}
    missing = [name for name, path in checked.items() if path is None]
    if missing:
        raise InputNotFoundError(f"{index} names shard files that are missing: {', '.join(missing[:3])}"
                                 f"{'...' if len(missing) > 3 else ''}; download or copy the model again")
    return WeightFiles(index, dict(weight_map), list(checked.values()))


def check_directory_files(directory: str | os.PathLike) -> None:
    """Refuse a model or adapter directory whose top-level entries lead out of it or are not regular files.

    transformers and our loaders open config.json, the tokenizer's files and an adapter's files by name, following
    links: a stranger's ``config.json -> /proc/self/environ`` or ``tokenizer.json -> ~/.ssh/id_rsa`` would be read.
    Each entry that is a link must lead inside the directory (or a hub snapshot's own ``blobs/``), and each that is
    not a directory must be a regular file. Only names are looked at: nothing is read.

    Raises:
        UsageError: naming the entry and where it leads.
    """
    directory = Path(directory)
    roots = _allowed_roots(directory)
    for entry in sorted(directory.iterdir()):
        if entry.is_symlink() and _resolved_inside(entry, roots) is None:
            raise UsageError(f"{entry} is a link to {entry.resolve()}, outside the model directory {directory}: a "
                             "model's (or an adapter's) files are read only from inside it; fix it or download it again")
        try:
            mode = entry.stat().st_mode
        except FileNotFoundError:
            continue  # a dangling link: the file it names is missing, which its reader says
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise UsageError(f"{entry} is not a regular file (a {_kind(mode)}): remove it, or download the model "
                             "again")


def files_sha256(files: Iterable[str | os.PathLike]) -> str:
    """The sha256 (hex) of files read in the given order as one stream, ``CHUNK_BYTES`` at a time.

    For one file it is that file's ``sha256sum``.
    """
    h = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                h.update(chunk)
    return h.hexdigest()


def read_tensors(path: str | os.PathLike, fix: str) -> dict:
    """All tensors of a safetensors file (never a pickle), each floating one checked to be finite.

    Args:
        path: the file.
        fix: what the user can do about a damaged file, the end of both messages ("train the adapter again").
    Returns:
        Tensor name -> tensor (on the CPU).
    Raises:
        UsageError: a truncated or corrupt file; a floating tensor holding NaN or infinity (a run that diverged, or
            damage), naming the file and the first such tensor.
    """
    from safetensors import SafetensorError  # torch is loaded only here (see the module's docstring)
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UsageError(f"cannot read {path}: the file is truncated or corrupt ({e}); {fix}") from e
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise UsageError(f"{path} holds NaN or infinite values (in {len(bad)} tensors, e.g. {bad[0]}): the run that "
                         f"wrote it diverged or the file is damaged; {fix}")
    return tensors


def _allowed_roots(directory: Path) -> list[Path]:
    """Where a model directory's files may lie, links followed: the directory, and for a hub cache snapshot (or a
    folder in one) ``models--org--name/snapshots/REV/...`` that repository's ``blobs/``, where its links point."""
    real = directory.resolve()
    roots = [real]
    for folder in (real, *real.parents):
        if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
            roots.append((folder.parent.parent / "blobs").resolve())
            break
    return roots


def _resolved_inside(path: Path, roots: Sequence[Path]) -> Path | None:
    """``path`` with its links followed when that lies under one of ``roots``, else None."""
    real = path.resolve()
    return real if any(real.is_relative_to(root) for root in roots) else None


def _checked_file(directory: Path, roots: Sequence[Path], name: str, listed_in: Path) -> Path | None:
    """``directory / name`` once it passes ``weight_files``' checks, or None when it does not exist.

    Nothing but the first bytes of a regular file inside the roots is ever read.
    """
    where = f"{listed_in}: entry {name!r}" if listed_in.name == INDEX_FILE else str(listed_in)

    def refuse(why: str, outside: bool = False) -> UsageError:
        fix = (f"weights are read only from files inside {directory}; fix it or download the model again" if outside
               else "download or copy the model again")
        return UsageError(f"{where} {why}: {fix}")

    if not name or "\0" in name:
        raise refuse("is not a file name")
    if Path(name).anchor:
        raise refuse("is an absolute path", outside=True)
    if ".." in Path(name).parts:
        raise refuse("leaves the directory through '..'", outside=True)
    path = directory / name
    real = _resolved_inside(path, roots)
    if real is None:
        raise refuse(f"is a link to {path.resolve()}, outside the model directory", outside=True)
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        return None
    except OSError as e:
        raise refuse(f"cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(mode):
        raise refuse(f"is not a regular file (a {_kind(mode)})")
    try:
        # O_NONBLOCK: were it swapped for a FIFO since the stat, the open would still not wait for a writer.
        fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as e:
        raise refuse(f"cannot be read ({e.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise refuse(f"is not a regular file (a {_kind(info.st_mode)})")
        head = f.read(9)
    size = info.st_size
    length = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
    if not _MIN_HEADER <= length <= min(_MAX_HEADER, size - 8) or head[8:9] != b"{":
        raise refuse(f"is not a safetensors file, or a truncated one (its {size} bytes do not begin with a header "
                     "length that fits the file, then '{')")
    return path


def _kind(mode: int) -> str:
    return ("directory" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode)
            else "device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "special file")
