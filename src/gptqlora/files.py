"""Writing outputs safely: the one place for atomic files and directories, output checks and the writer's lock.

Rules every command follows (see ``check_output``):

- an existing, non-empty output is refused unless the user said ``--overwrite`` (or ``--resume`` for outputs that
  are continued in place);
- an output that is, contains or lies inside one of the command's inputs is refused, even with ``--overwrite``;
- the location is checked for writability before any model is loaded or any work is done;
- whole directories are written into a temporary sibling ``.NAME.partial-PID`` and renamed into place only when
  complete (``staged_dir``); a killed run's partial sibling is removed by the next run that writes there;
- single files are replaced atomically (``write_atomic``) or appended to and cut durably (``append_durable``,
  ``truncate_durable``);
- one process writes one output at a time (``OutputLock``, a pid-stamped ``flock`` on ``.NAME.lock``);
- files and directories get the permissions the user's umask gives (not ``tempfile``'s private 0600/0700);
- a name the tool makes for itself beside or inside an output (the lock, ``owner.lock``, a temporary, partial, old or
  probe name, a record file appended to or cut) is never followed: files there are opened with ``O_NOFOLLOW`` (new
  ones with ``O_EXCL``, so never a hard-linked file either), and a symbolic link or anything else that is not the
  tool's kind of file there is refused with a ``UsageError`` naming it and left as it is, its target untouched (the
  lock's name already by ``check_output``, staging names before the staged block runs); a stale partial that is a
  link is removed as a link (``_open_own``, ``_refusal``, ``check_own_file`` for a file about to be continued).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
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


_KINDS = {stat.S_IFDIR: "directory", stat.S_IFREG: "regular file", stat.S_IFIFO: "named pipe",
          stat.S_IFSOCK: "socket", stat.S_IFCHR: "character device", stat.S_IFBLK: "block device"}


def _refusal(path: Path, what: str, directory: bool = False, dir_fd: int | None = None) -> UsageError | None:
    """Why the tool will not put its own ``what`` at ``path``: a symbolic link (a stranger may have planted it to make
    us write through it) or another kind of file than ours; None when nothing is there or what is there is our kind
    (a regular file, or with ``directory`` a directory). ``dir_fd``: ``path``'s name is read in that directory."""
    try:
        st = os.stat(path.name if dir_fd is not None else path, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return UsageError(f"{path} is a symbolic link where gptqlora puts its own {what}: it will not follow a link "
                          "there (nothing was written through it); remove the link and rerun")
    if stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode):
        return None
    kind = _KINDS.get(stat.S_IFMT(st.st_mode), "special file")
    return UsageError(f"{path} is a {kind} where gptqlora puts its own {what}: remove it and rerun")


def _open_own(path: Path, flags: int, what: str, dir_fd: int | None = None) -> int:
    """``os.open`` one of our own regular files by its predictable name, never through a link, and never blocking
    on a named pipe planted there.

    Raises:
        UsageError: a symbolic link or something other than a regular file is at ``path`` (``_refusal``); it is left
            as it is.
    """
    try:
        fd = os.open(path.name if dir_fd is not None else path,
                     flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o666, dir_fd=dir_fd)
    except OSError as e:  # ELOOP (a link), ENXIO (a pipe), EISDIR, EEXIST (with O_EXCL)...: refuse what is not ours
        refusal = _refusal(path, what, dir_fd=dir_fd)
        if refusal is not None:
            raise refusal from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _refusal(path, what, dir_fd=dir_fd) or UsageError(f"{path} is not a regular file: remove it and rerun")
    os.set_blocking(fd, True)
    return fd


def _create_own(path: Path, flags: int, what: str) -> int:
    """Create a fresh regular file of ours at ``path`` (``O_EXCL``: a new file, never a link's target nor a file
    hard-linked there). A regular file already there is a leftover of an earlier process with our pid: its name is
    removed first.

    Raises:
        UsageError: see ``_open_own``.
    """
    flags |= os.O_CREAT | os.O_EXCL
    try:
        return _open_own(path, flags, what)
    except FileExistsError:
        os.unlink(path)  # a regular file: anything else was refused
    return _open_own(path, flags, what)


def _free_own_name(path: Path, what: str) -> None:
    """Free ``path`` for a directory of ours: a directory or file left there by an earlier process with our pid is
    deleted (``rmtree`` never follows links inside it).

    Raises:
        UsageError: ``path`` is a symbolic link or a special file; it is left as it is, its target untouched.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    elif stat.S_ISREG(st.st_mode):
        os.unlink(path)
    else:
        raise _refusal(path, what, directory=True) or UsageError(f"{path} is in the way: remove it and rerun")


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

    Raises:
        UsageError: a symbolic link or a special file sits at the temporary name ``.NAME.tmp-PID``.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = _create_own(tmp, os.O_WRONLY, "temporary file")
    try:
        with open(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # renames over a link at ``path`` itself, never writing through it
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def append_durable(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """Append text lines (each ending in a newline) to ``path`` and fsync, so they survive a crash that follows.

    Raises:
        UsageError: ``path`` is a symbolic link or a special file (in a resumed output, a stranger may have put it
            there); nothing is written.
    """
    fd = _open_own(Path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, "record file")
    with open(fd, "a", encoding="utf-8") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())


def truncate_durable(path: str | os.PathLike, size: int) -> None:
    """Cut ``path`` (a record file of ours, e.g. after a torn last line) to ``size`` bytes and fsync.

    Raises:
        UsageError: ``path`` is a symbolic link or a special file; nothing is cut.
    """
    fd = _open_own(Path(path), os.O_WRONLY, "record file")
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def check_own_file(path: str | os.PathLike, what: str = "file") -> None:
    """Refuse to read or continue ``path``, one of our files in an output, when it is a symbolic link or a special
    file (a resumed output may hold what a stranger put there); nothing there, or a regular file, passes.

    Raises:
        UsageError: naming ``path`` and what to do.
    """
    refusal = _refusal(Path(path), what)
    if refusal is not None:
        raise refusal


def normalize_permissions(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a directory, everything under it) the permissions the umask gives new files.

    Some writers create private files (safetensors writes 0600, ``tempfile`` 0600/0700); outputs are meant to be
    readable by others as files normally are.
    """
    path = Path(path)
    mask = umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():  # chmod would change the link's target, which is not ours
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
    """Delete ``.NAME.partial-PID`` / ``.NAME.old-PID`` siblings of ``out`` left by processes that are gone.

    One that is a symbolic link (ours never are) is unlinked as a link: what it points to is never deleted.
    """
    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.glob(f".{out.name}.*-*"):
        kind, _, pid = p.name[len(out.name) + 2:].rpartition("-")
        if kind in ("partial", "old") and pid.isdigit() and not _pid_alive(int(pid)):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


@contextmanager
def staged_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``out`` to write a whole directory into; on success it becomes ``out``.

    On an exception the temporary directory is deleted and ``out`` is untouched. An existing ``out`` is replaced
    only with ``overwrite`` (the old one is moved aside, the new one renamed in, then the old one deleted).

    Raises:
        OutputExistsError: ``out`` appeared meanwhile and ``overwrite`` is false.
        UsageError: a symbolic link or a special file sits at ``.NAME.partial-PID`` or ``.NAME.old-PID`` (refused
            before the block runs).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    _free_own_name(tmp, "staging directory")
    _free_own_name(old, "staging directory")
    try:
        os.mkdir(tmp)
    except FileExistsError:  # something appeared there since
        raise _refusal(tmp, "staging directory", directory=True) or UsageError(
            f"{tmp} appeared while this command started: is another gptqlora writing {out}? Rerun") from None
    try:
        yield tmp
        normalize_permissions(tmp)
        for f in tmp.rglob("*"):
            if f.is_file() and not f.is_symlink():
                fsync_path(f)
        fsync_path(tmp)
        if out.exists():
            if not overwrite:
                raise OutputExistsError(f"{out} appeared while this command ran; nothing was replaced, the result "
                                        "is discarded: rerun with a new --out or with --overwrite")
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

    Raises:
        UsageError: a symbolic link or a special file sits at ``.NAME.old-PID``; ``out`` is left as it is.
    """
    out = Path(out)
    if not out.exists():
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    _free_own_name(old, "staging directory")
    os.rename(out, old)
    out.mkdir()
    shutil.rmtree(old, ignore_errors=True)


class OutputLock:
    """One writer per output: an exclusive ``flock`` on ``.NAME.lock`` beside it, stamped with the owner's pid.

    The kernel drops the lock when its process dies (even by SIGKILL), so a stale lock file never blocks a rerun.

    Raises (on enter):
        UsageError: another live process holds the lock; the message names its pid. A symbolic link or a special
            file sits at the lock's name.
    """

    def __init__(self, out: str | os.PathLike):
        out = Path(out)
        self.path = lock_path(out)
        self.out = out
        self._fd: int | None = None

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> OutputLock:
        """Take the lock (see the class); returns self."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = _open_own(self.path, os.O_RDWR | os.O_CREAT, "lock file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UsageError(f"{self.out} is being written by another gptqlora process (pid {owner}): wait for "
                                 "it to finish, or choose another output") from None
            if _names(fd, self.path):  # else its previous owner unlinked it between our open and our lock
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock and remove its file (when the name is still ours); a no-op when not held."""
        if self._fd is not None:
            if _names(self._fd, self.path):  # the name is still our file, not something put there since
                self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


def lock_path(out: str | os.PathLike) -> Path:
    """The writer's lock of output ``out``: ``.NAME.lock`` beside it."""
    out = Path(out)
    return out.with_name(f".{out.name}.lock")


def _names(fd: int, path: Path) -> bool:
    """Whether ``path`` itself (not a link's target) is the file open as ``fd``."""
    try:
        return os.path.samestat(os.fstat(fd), os.lstat(path))
    except FileNotFoundError:
        return False


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def _nearest_existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def check_writable(path: str | os.PathLike, what: str = "--out") -> None:
    """Refuse an output location that cannot be written, by creating and deleting a probe file where it would go.

    Raises:
        UsageError: naming the location and the reason (read-only file system, permissions, a file in the way, a
            symbolic link at the probe's name).
    """
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file, not a directory: give a directory path")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise UsageError(f"{what} {path} cannot be created: {base} is a file")
    probe = base / f".gptqlora-probe-{os.getpid()}"
    try:
        os.close(_create_own(probe, os.O_WRONLY, "probe file"))
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
        UsageError: ``out`` is, contains or is inside an input; ``out`` is a file or not writable; a symbolic link
            or a special file sits at its lock's name (``lock_path``).
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
    refusal = _refusal(lock_path(path), "lock file")  # refused here, on every rank, before any work
    if refusal is not None:
        raise refusal
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
        """Take the lock (creating the file); False when a live process holds it (its pid is then ``holder``).

        Raises:
            UsageError: the directory or its ``owner.lock`` is a symbolic link or of another kind than ours (the
                file is opened in the directory itself, so a link planted in place of the directory is not followed
                either).
        """
        directory = self.path.parent
        try:
            dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            refusal = _refusal(directory, "work directory", directory=True)
            if refusal is not None:
                raise refusal from None
            raise
        try:
            fd = _open_own(self.path, os.O_RDWR | os.O_CREAT, "lock file", dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
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
