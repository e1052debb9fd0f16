"""gptqlora.files never writes through a name a stranger could plant: each file or directory it makes by a predictable
name (lock, owner.lock, temporary, partial, old, probe, appended records) refuses a symbolic link there, in one
UsageError naming it, and leaves the link and its target as they were."""

import os
import signal
import stat
from pathlib import Path

import pytest

from gptqlora import files
from gptqlora.errors import UsageError

PRECIOUS = b"a stranger's link points here: these bytes must survive\n"


@pytest.fixture
def victim(tmp_path) -> Path:
    """A file outside the output's directory, the target of every planted link."""
    d = tmp_path / "elsewhere"
    d.mkdir()
    f = d / "precious.txt"
    f.write_bytes(PRECIOUS)
    return f


@pytest.fixture
def work(tmp_path) -> Path:
    """The directory where the tool writes, and where a stranger plants links."""
    d = tmp_path / "work"
    d.mkdir()
    return d


def plant(link: Path, target: Path) -> Path:
    link.symlink_to(target)
    return link


def assert_refused_and_untouched(e: pytest.ExceptionInfo, link: Path, victim: Path) -> None:
    message = str(e.value)
    assert str(link) in message and "symbolic link" in message and "remove" in message, message
    assert "\n" not in message
    assert link.is_symlink() and os.readlink(link) == str(victim)  # the link stays, for the user to see
    assert victim.read_bytes() == PRECIOUS


def test_the_output_lock_refuses_a_planted_link(work, victim):
    link = plant(work / ".out.lock", victim)
    with pytest.raises(UsageError) as e:
        with files.OutputLock(work / "out"):
            pytest.fail("took a lock through a link")
    assert_refused_and_untouched(e, link, victim)


def test_check_output_refuses_a_planted_lock_before_any_work(work, victim):
    link = plant(work / ".out.lock", victim)
    with pytest.raises(UsageError) as e:
        files.check_output(work / "out")
    assert_refused_and_untouched(e, link, victim)


def test_a_killed_owners_lock_is_free_and_on_exit_only_our_own_lock_file_is_removed(work, victim):
    out = work / "out"
    (work / ".out.lock").write_text("12345\n")  # a lock file left by a killed process: no flock on it
    with files.OutputLock(out) as lock:
        assert lock.path.read_text() == f"{os.getpid()}\n"
        with pytest.raises(UsageError, match=f"pid {os.getpid()}"):
            files.OutputLock(out).__enter__()
        plant(work / "swap", victim).replace(lock.path)  # a link put in its place while we ran
    assert lock.path.is_symlink() and victim.read_bytes() == PRECIOUS  # left for the user to see


def test_write_atomic_refuses_a_link_at_its_temporary_name(work, victim):
    link = plant(work / f".result.json.tmp-{os.getpid()}", victim)
    with pytest.raises(UsageError) as e:
        files.write_atomic(work / "result.json", "{}")
    assert_refused_and_untouched(e, link, victim)
    assert not (work / "result.json").exists()


def test_write_atomic_never_writes_into_a_file_hard_linked_at_its_temporary_name(work, victim):
    os.link(victim, work / f".result.json.tmp-{os.getpid()}")
    files.write_atomic(work / "result.json", "{}")
    assert (work / "result.json").read_text() == "{}"
    assert victim.read_bytes() == PRECIOUS


def test_staged_dir_refuses_a_link_at_its_partial_name_before_the_block_runs(work, tmp_path):
    elsewhere = tmp_path / "a_directory"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_bytes(PRECIOUS)
    link = plant(work / f".out.partial-{os.getpid()}", elsewhere)
    with pytest.raises(UsageError) as e:
        with files.staged_dir(work / "out"):
            pytest.fail("staged into a link")
    assert str(link) in str(e.value) and "symbolic link" in str(e.value)
    assert link.is_symlink() and (elsewhere / "keep.txt").read_bytes() == PRECIOUS
    assert [p.name for p in elsewhere.iterdir()] == ["keep.txt"]


def test_staged_dir_refuses_a_link_at_its_old_name_before_the_block_runs(work, victim):
    out = work / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("the output being replaced")
    link = plant(work / f".out.old-{os.getpid()}", victim)
    with pytest.raises(UsageError) as e:
        with files.staged_dir(out, overwrite=True):
            pytest.fail("worked although the result could not be renamed in")
    assert_refused_and_untouched(e, link, victim)
    assert (out / "earlier.txt").read_text() == "the output being replaced"


def test_clear_output_refuses_a_link_at_its_old_name(work, victim):
    out = work / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("kept")
    link = plant(work / f".out.old-{os.getpid()}", victim)
    with pytest.raises(UsageError) as e:
        files.clear_output(out)
    assert_refused_and_untouched(e, link, victim)
    assert (out / "earlier.txt").read_text() == "kept"


def test_the_writability_probe_refuses_a_planted_link(work, victim):
    link = plant(work / f".gptqlora-probe-{os.getpid()}", victim)
    with pytest.raises(UsageError) as e:
        files.check_writable(work / "out")
    assert_refused_and_untouched(e, link, victim)


def test_the_writability_probe_never_creates_a_dangling_links_target(work, tmp_path):
    target = tmp_path / "elsewhere-new.txt"
    plant(work / f".gptqlora-probe-{os.getpid()}", target)
    with pytest.raises(UsageError, match="symbolic link"):
        files.check_writable(work / "out")
    assert not target.exists()


def test_append_durable_refuses_a_planted_link(work, victim):
    link = plant(work / "predictions.jsonl", victim)
    with pytest.raises(UsageError) as e:
        files.append_durable(link, ['{"index": 0}\n'])
    assert_refused_and_untouched(e, link, victim)


@pytest.mark.parametrize("reader", [False, True])
def test_append_durable_refuses_a_named_pipe_without_blocking(work, reader):
    pipe = work / "predictions.jsonl"
    os.mkfifo(pipe)
    fd = os.open(pipe, os.O_RDONLY | os.O_NONBLOCK) if reader else None  # without one, opening to write would wait

    def hung(*_):
        raise TimeoutError("append_durable waited on the pipe")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        with pytest.raises(UsageError, match=f"{pipe} is a named pipe"):
            files.append_durable(pipe, ['{"index": 0}\n'])
        assert fd is None or os.read(fd, 100) == b""  # nothing went down the pipe
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        if fd is not None:
            os.close(fd)
    assert stat.S_ISFIFO(os.lstat(pipe).st_mode)


def test_the_work_directorys_owner_lock_refuses_a_planted_link(work, victim):
    link = plant(work / files.DirectoryOwner.FILE, victim)
    with pytest.raises(UsageError) as e:
        files.DirectoryOwner(work).acquire()
    assert_refused_and_untouched(e, link, victim)


def test_a_work_directory_that_is_a_link_is_refused(work, tmp_path):
    elsewhere = tmp_path / "a_directory"
    elsewhere.mkdir()
    link = plant(work / ".out.quantizing", elsewhere)
    with pytest.raises(UsageError, match="symbolic link"):
        files.DirectoryOwner(link).acquire()
    assert link.is_symlink() and list(elsewhere.iterdir()) == []  # no owner.lock made in there


def test_remove_stale_partials_unlinks_a_planted_link_and_never_its_target(work, tmp_path):
    elsewhere = tmp_path / "a_directory"
    (elsewhere / "sub").mkdir(parents=True)
    (elsewhere / "sub" / "keep.txt").write_bytes(PRECIOUS)
    dead = 2**22 + 1  # above Linux's largest pid: no process has it
    link = plant(work / f".out.partial-{dead}", elsewhere)
    stale = work / f".out.old-{dead}"
    (stale / "sub").mkdir(parents=True)  # a real directory left by a killed run: deleted
    assert sorted(files.remove_stale_partials(work / "out")) == sorted([link, stale])
    assert not os.path.lexists(link) and not stale.exists()
    assert (elsewhere / "sub" / "keep.txt").read_bytes() == PRECIOUS


def test_staging_never_changes_the_permissions_of_a_links_target(work, victim):
    victim.chmod(0o600)
    with files.staged_dir(work / "out") as tmp:
        (tmp / "weights.bin").write_bytes(b"ours")
        (tmp / "link").symlink_to(victim)  # a writer that copied a link in: its target is not ours
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert (work / "out" / "weights.bin").read_bytes() == b"ours"


def test_a_resumed_record_file_that_is_a_link_is_refused_before_it_is_read_or_cut(work, victim):
    link = plant(work / "predictions.jsonl", victim)
    with pytest.raises(UsageError) as e:
        files.check_own_file(link, "record file")
    assert_refused_and_untouched(e, link, victim)
    with pytest.raises(UsageError) as e:
        files.truncate_durable(link, 0)  # a torn last line is cut off: never the link's target
    assert_refused_and_untouched(e, link, victim)
    ours = work / "summary.jsonl"
    ours.write_bytes(b'{"index": 0}\n{"ind')
    files.check_own_file(ours)
    files.truncate_durable(ours, 13)
    assert ours.read_bytes() == b'{"index": 0}\n'
