"""One run's context, made once per command: who this process is in the job, its device, its seed, and how it claims
its output. Every command reads the same way, on one process or under torchrun::

    with RunContext.start(args.model.device, args.seed) as run:      # joins torchrun's group, leaves it at the end
        with run.output(args.out, inputs=[...], overwrite=args.overwrite) as out:
            ...                                                       # every rank works; rank 0 writes
    return run.main_only(summary)                                     # rank 0 prints the result

Being distributed is decided here and in ``gptqlora.distributed``, not in each command: a world of one is the same
code with no group, every collective a no-op and rank 0 the only rank. The one-process commands (quantize, merge,
perplexity, train-verifier) start with ``torchrun=False`` and read the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from gptqlora import distributed
from gptqlora.files import OutputLock, check_output, clear_output

T = TypeVar("T")


@dataclass(frozen=True)
class RunContext:
    """The decisions a command makes once, before any work, and passes on.

    Attributes:
        world: this process's place in the job (a world of one without torchrun).
        device: this rank's device: ``--device`` resolved (``auto`` -> cuda or cpu), then ``cuda:LOCAL_RANK`` under
            torchrun with CUDA.
        seed: the run's seed (``--seed``; None for a command that draws nothing at random).
    """

    world: distributed.World
    device: str
    seed: int | None

    @classmethod
    @contextmanager
    def start(cls, device: str, seed: int | None, *, torchrun: bool = True) -> Iterator[RunContext]:
        """Resolve the device, join torchrun's process group (a no-op for one process) and, on a CPU shared by several
        processes, take this process's share of its cores; the group is left when the block ends. Code already in
        the group (a test's script) keeps it: it is left to whoever joined it.

        Args:
            seed: the run's ``--seed`` (None for a command that draws nothing at random).
            torchrun: False for a one-process command: a world of one on the device as resolved, with no group,
                even under torchrun.
        Raises:
            UsageError: an unknown or absent device (``gptqlora.models.resolve_device``), a malformed torchrun
                environment.
        """
        from gptqlora.models import resolve_device

        resolved = resolve_device(device)
        if not torchrun:
            yield cls(distributed.World(), resolved, seed)
            return
        joined_here = not distributed.active()
        device = distributed.rank_device(resolved)  # cuda -> cuda:LOCAL_RANK under torchrun
        world = distributed.init(device)
        if joined_here and world.distributed and resolved == "cpu":
            distributed.share_threads()
        try:
            yield cls(world, device, seed)
        finally:
            if joined_here:
                distributed.shutdown()

    def alone(self) -> RunContext:
        """This process as a world of one, on the same device and seed: for a stage rank 0 runs by itself while the
        others wait (``distributed.from_main``), so that its output is claimed without a collective."""
        return RunContext(distributed.World(), self.device, self.seed)

    @contextmanager
    def output(self, out: str | Path, *, inputs: Sequence[str | Path | None] = (), overwrite: bool = False,
               resume: bool = False, what: str = "--out", check: Callable[[Path], None] | None = None,
               staged: bool = False) -> Iterator[Path]:
        """Claim the command's output for the block: rank 0 checks it (``files.check_output``, then ``check``), takes
        its writer lock and, for ``--overwrite``, empties it; a refusal is raised on every rank, before any work.
        Yields the absolute output path on every rank; the lock is released when the block ends, however it ends.

        Args:
            inputs: what the command reads (an output that is, contains or lies inside one is refused).
            resume: the command continues what ``out`` holds.
            check: a further check of the output (e.g. that a ``--resume`` has something to resume).
            staged: the block writes ``out`` whole at the end (``files.staged_dir``, or a writer built on it), which
                replaces it then: an ``--overwrite``'d output is not emptied first, so it stays until the new one
                is complete.
        Raises:
            UsageError: see ``files.check_output``, ``files.OutputLock`` and ``check``.
        """
        lock: list[OutputLock] = []

        def claim() -> Path:
            path = check_output(out, inputs=inputs, overwrite=overwrite, resume=resume, what=what)
            if check is not None:
                check(path)
            lock.append(OutputLock(path).acquire())
            try:
                if overwrite and not staged:
                    clear_output(path)
            except BaseException:
                lock.pop().release()
                raise
            return path

        path = distributed.from_main(claim) if self.world.distributed else claim()
        try:
            yield path
        finally:
            for held in lock:  # rank 0's only
                held.release()

    def main_only(self, value: T) -> T | None:
        """``value`` on rank 0, None on the other ranks (which print nothing)."""
        return value if self.world.main else None

    def say(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on rank 0 only: progress lines appear once per job."""
        if self.world.main:
            print(*args, **kwargs)
