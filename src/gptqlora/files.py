"""Writing outputs safely: the one place for atomic files and directories, output checks and the writer's lock.

Rules every command follows (see ``check_output``):

- an existing, non-empty output is refused unless the user said ``--overwrite`` (or ``--resume`` for outputs that
  are continued in place);
- an output that is, contains or lies inside one of the command's inputs is refused, even with ``--overwrite``;
- the location is checked for writability before any model is loaded or any work is done;
- whole directories are written into a temporary sibling ``.NAME.partial-PID`` and renamed into place only when
  complete (``staged_dir``); a killed run's partial sibling is removed by the next run that writes there;
- single files are replaced atomically (``write_atomic``) or appended durably (``append_durable``);
- one process writes one output at a time (``OutputLock``, a pid-stamped ``flock`` on ``.NAME.lock``);
- files and directories get the permissions the user's umask gives (not ``tempfile``'s private 0600/0700).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from gptqlora.errors import OutputExistsError, UsageError

_UMASK: int | None = None


def umask() -> int:
    """The process umask (read once; ``os.umask`` can only be read by setting it)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's contents to disk (a directory fsync makes renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json_object(path: str | os.PathLike) -> dict:
    """A JSON file that must hold an object (a config), read with a clear error otherwise.

    Raises:
        UsageError: invalid JSON, or a value that is not an object (a list, a number...).
    """
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{path} must hold a JSON object, not a {type(value).__name__}")
    return value


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Replace ``path`` with ``data`` atomically: a reader sees the old file or the new one, never a part.

    The data goes to a temporary file in the same directory, is fsynced, given the umask's permissions and renamed
    over ``path``; a crash at any point leaves the old file (and no temporary one once the next write runs).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def append_durable(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """Append text lines (each ending in a newline) to ``path`` and fsync, so they survive a crash that follows."""
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())


def normalize_permissions(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a directory, everything under it) the permissions the umask gives new files.

    Some writers create private files (safetensors writes 0600, ``tempfile`` 0600/0700); outputs are meant to be
    readable by others as files normally are.
    """
    path = Path(path)
    mask = umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(out: str | os.PathLike) -> list[Path]:
    """Delete ``.NAME.partial-PID`` / ``.NAME.old-PID`` siblings of ``out`` left by processes that are gone."""
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = p.name[len(out.name) + 2:].rpartition("-")
        if kind in ("partial", "old") and pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextmanager
def staged_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out`` to write a whole directory into; on success it becomes ``out``.

    On an exception the temporary directory is deleted and ``out`` is untouched. An existing ``out`` is replaced
    only with ``overwrite`` (the old one is moved aside, the new one renamed in, then the old one deleted).

    Raises:
        OutputExistsError: ``out`` appeared meanwhile and ``overwrite`` is false.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        normalize_permissions(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                fsync_path(f)
        fsync_path(tmp)
        if out.exists():
            if not overwrite:
                raise OutputExistsError(f"{out} appeared while this command ran; nothing was replaced, the result "
                                        "is discarded: rerun with a new --out or with --overwrite")
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
        fsync_path(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clear_output(out: str | os.PathLike) -> None:
    """Empty an existing output directory the user allowed to be replaced (``--overwrite``) for an in-place run.

    The old directory is renamed aside first and deleted after a fresh empty one is in place, so a crash in between
    leaves a ``.NAME.old-PID`` sibling that the next run removes, never a half-deleted output.
    """
    out = Path(out)
    if not out.exists():
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.rename(out, old)
    out.mkdir()
    shutil.rmtree(old, ignore_errors=True)


class OutputLock:
    """One writer per output: an exclusive ``flock`` on ``.NAME.lock`` beside it, stamped with the owner's pid.

    The kernel drops the lock when its process dies (even by SIGKILL), so a stale lock file never blocks a rerun.

    Raises (on enter):
        UsageError: another live process holds the lock; the message names its pid.
    """

    def __init__(self, out: str | os.PathLike):
        out = Path(out)
        self.path = out.with_name(f".{out.name}.lock")
        self.out = out
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UsageError(f"{self.out} is being written by another gptqlora process (pid {owner}): wait for "
                                 "it to finish, or choose another output") from None
            try:  # the file may have been unlinked by its previous owner between our open and our lock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _nearest_existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def check_writable(path: str | os.PathLike, what: str = "--out") -> None:
    """Refuse an output location that cannot be written, by creating and deleting a probe file where it would go.

    Raises:
        UsageError: naming the location and the reason (read-only file system, permissions, a file in the way).
    """
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file, not a directory: give a directory path")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise UsageError(f"{what} {path} cannot be created: {base} is a file")
    probe = base / f".gptqlora-probe-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise UsageError(f"{what} {path} is not writable ({base}: {e.strerror}): choose a location you can write "
                         "to") from None


def check_output(out: str | os.PathLike, *, inputs: Sequence[str | os.PathLike | None] = (), overwrite: bool = False,
                 resume: bool = False, what: str = "--out") -> Path:
    """Validate an output location before any work; returns it as an absolute path.

    Args:
        out: the directory the command will write.
        inputs: local paths the command reads (model, adapter, data, calibration text...); None entries are skipped.
        overwrite: the user allowed replacing an existing, non-empty ``out``.
        resume: the command continues what is in ``out`` (its own earlier output), so a non-empty ``out`` is expected.
    Raises:
        UsageError: ``out`` is, contains or is inside an input; ``out`` is a file or not writable.
        OutputExistsError: ``out`` is non-empty and neither ``overwrite`` nor ``resume`` was given.
    """
    path = Path(out).expanduser().absolute()
    real = Path(os.path.realpath(path))
    for given in inputs:
        if given is None:
            continue
        inp = Path(os.path.realpath(Path(given).expanduser()))
        if _is_within(real, inp) or _is_within(inp, real):
            relation = "is" if real == inp else ("is inside" if _is_within(real, inp) else "contains")
            raise UsageError(f"{what} {path} {relation} the input {given}: the command would write over what it "
                             "reads, which --overwrite does not allow; choose another output")
    check_writable(path, what)
    if path.is_dir() and any(path.iterdir()) and not (overwrite or resume):
        raise OutputExistsError(f"{what} {path} exists and is not empty: choose a new directory, or pass --overwrite "
                                "to replace it (nothing was written)")
    return path


def is_disk_error(e: OSError) -> bool:
    """An OSError the environment caused (full, read-only or forbidden location), not a bug."""
    return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                       errno.EISDIR)


class DirectoryOwner:
    """Marks a work directory kept across runs (``.NAME.quantizing``) as in use: an exclusive ``flock`` on its
    ``owner.lock``, stamped with the owner's pid.

    The kernel drops the lock when its process dies (even by SIGKILL), so a directory whose lock can be taken was left
    by a run that is over: its content may be continued or removed. One whose lock is held belongs to a live process.
    """

    FILE = "owner.lock"

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / self.FILE
        self.holder: str | None = None  # the live owner's pid, after a failed ``acquire``
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock (creating the file); False when a live process holds it (its pid is then ``holder``)."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        """Drop the lock (the file stays: the directory is removed with it, or kept for a later run to take)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
