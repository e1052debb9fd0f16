"""The error classes the command line treats as the user's, not ours.

A ``UsageError`` is a mistake in the user's input, options or environment (a missing file, a bad value, an output
that would destroy something, a disk that is full). Its message says what is wrong and what to do; the CLI prints it
as one line and exits 2. Anything else that escapes a command is a bug and keeps its traceback.

``UsageError`` subclasses ``ValueError`` (and ``InputNotFoundError`` also ``FileNotFoundError``) so that library
callers who catch the built-in classes keep working. A ``NonFiniteLossError`` (a diverged training step) is neither
the user's mistake nor a bug; the CLI prints its one-line advice as it prints a ``UsageError``'s.
"""

from __future__ import annotations

import math
from pathlib import Path


class UsageError(ValueError):
    """Bad input, a bad option or a bad environment; the message says what to do about it."""


class InputNotFoundError(UsageError, FileNotFoundError):
    """An input file or directory the user named does not exist (or lacks a file it must hold)."""


class OutputExistsError(UsageError, FileExistsError):
    """An output location holds something the command would replace without being told to."""


class NonFiniteLossError(RuntimeError):
    """The loss (or the gradient norm) of an optimizer step is NaN or infinite; the step was not applied.

    Its message is one line saying what to do: resume from the last checkpoint (all of whose steps were finite)
    with a lower ``--lr`` or another ``--max-grad-norm``, which a resume accepts, or start again.

    Args:
        step: the 1-based number of the step that was not applied.
        value: the non-finite value.
        what: what it is (``"training loss"``, ``"gradient norm"``).
        checkpoint: the last good checkpoint, when the trainer writes any.
        fix: what to do instead of the default advice (for a trainer without checkpoints or ``--resume``).
    """

    def __init__(self, step: int, value: float = math.nan, what: str = "training loss", checkpoint: Path | None = None,
                 fix: str | None = None):
        self.step, self.value, self.checkpoint = step, value, checkpoint
        self._given = (step, value, what, checkpoint, fix)  # to be rebuilt whole on another rank (``__reduce__``)
        where = fix or (f"the last good checkpoint, {checkpoint}, is kept: continue with --resume and a lower --lr "
                        "or another --max-grad-norm" if checkpoint else
                        "no checkpoint was written yet: rerun with --overwrite and a lower --lr or another "
                        "--max-grad-norm")
        super().__init__(f"non-finite {what} ({value}) at step {step}; training stopped before applying it, and "
                         f"{where}")

    def __reduce__(self):
        """Pickled with its arguments, so ``distributed.from_main`` raises the same message on every rank."""
        return type(self), self._given
