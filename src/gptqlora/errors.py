"""The error classes the command line treats as the user's, not ours.

A ``UsageError`` is a mistake in the user's input, options or environment (a missing file, a bad value, an output
that would destroy something, a disk that is full). Its message says what is wrong and what to do; the CLI prints it
as one line and exits 2. Anything else that escapes a command is a bug and keeps its traceback.

``UsageError`` subclasses ``ValueError`` (and ``InputNotFoundError`` also ``FileNotFoundError``) so that library
callers who catch the built-in classes keep working.
"""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input, a bad option or a bad environment; the message says what to do about it."""


class InputNotFoundError(UsageError, FileNotFoundError):
    """An input file or directory the user named does not exist (or lacks a file it must hold)."""


class OutputExistsError(UsageError, FileExistsError):
    """An output location holds something the command would replace without being told to."""
