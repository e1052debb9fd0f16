"""Reading the text and JSON files a user gives: UTF-8 text without its byte-order mark, and JSON rows (an array, or
JSON Lines), each with the file and line it came from.

The one reader of GSM8K splits, training corpora and calibration text, so every bad byte or line is named the same way.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from pathlib import Path

from gptqlora.errors import UsageError

_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"\s*")


def read_text(path: Path) -> str:
    """A UTF-8 text file's contents, without the byte-order mark some editors put first (read as ``utf-8-sig``).

    The one reader of the text files a user gives (corpora, GSM8K splits, calibration text).

    Raises:
        UsageError: a byte that is not UTF-8, naming the file, the byte's 0-based offset and its line.
    """
    data = path.read_bytes()
    # The BOM is skipped by hand, not by the utf-8-sig codec, whose error offsets would not count it.
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return str(memoryview(data)[bom:], "utf-8")
    except UnicodeDecodeError as e:
        at = bom + e.start
        line = data.count(b"\n", 0, at) + 1
        raise UsageError(f"{path}: byte 0x{data[at]:02x} at offset {at} (line {line}) is not UTF-8 ({e.reason}): "
                         "save the file as UTF-8") from None


def read_rows(path: Path) -> Iterator[tuple[object, str]]:
    """``(row, "file:line")`` for each element of a JSON array file, or each line of a JSON Lines file.

    A file whose first character (after white space) is ``[`` is an array, whatever its suffix, so a hub snapshot's
    ``MathInstruct.json`` and a ``.jsonl`` export both read. Blank lines of a JSONL file are skipped.

    Raises:
        UsageError: invalid JSON or a broken array, naming the file and the 1-based line; a byte that is not UTF-8
            (see ``read_text``).
    """
    text = read_text(path)
    start = _SPACE.match(text).end()
    if text.startswith("[", start):
        yield from _array_rows(text, start, path)
        return
    # Lines end at "\n" only: str.splitlines would also split at U+2028 or U+0085, which JSON strings may hold raw.
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        yield row, f"{path}:{lineno}"


def _array_rows(text: str, start: int, path: Path) -> Iterator[tuple[object, str]]:
    """The elements of a JSON array, each with the line it starts on (counted as the scan advances)."""
    pos = _SPACE.match(text, start + 1).end()
    line, counted = 1 + text.count("\n", 0, pos), pos
    closed = text.startswith("]", pos)
    while not closed:
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            row, end = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        yield row, f"{path}:{line}"
        pos = _SPACE.match(text, end).end()
        closed = text.startswith("]", pos)
        if not closed and not text.startswith(",", pos):
            raise UsageError(f"{path}:{1 + text.count(chr(10), 0, pos)}: expected ',' or ']' after an array element")
        pos = _SPACE.match(text, pos + 1).end()
    if pos < len(text) and text[pos:].strip():
        raise UsageError(f"{path}:{1 + text.count(chr(10), 0, pos)}: text after the closing ']'")
