"""Per-question record files that survive a crash and split across ranks: what ``gptqlora eval`` and ``gptqlora
sample`` write, told apart only by their file names (:class:`RecordFiles`).

An output directory holds a config file (the settings that determine the records, and the provenance of the model;
a resume must match it), a JSONL file of one record per question in question order, appended and fsynced one
generation batch at a time, and a summary written at the end. The questions go in batches of a fixed size, each
seeded by its first question's index, so a batch's records do not depend on what ran before or on which process
ran it:

- :func:`open_output` starts afresh (:func:`start_fresh`) or resumes (:func:`resume_from`: keep the complete batches,
  :func:`complete_records`), on rank 0 while the others wait;
- :func:`answer_batches` deals the remaining batches (the batches one process makes, in its order) round-robin to
  the ranks under ``torchrun``: each rank appends its batches to its own part file (``NAME.part-RANK.jsonl``), and
  rank 0 appends every rank's records in question order to the records file, which then holds the bytes a
  one-process run writes. A resume, with any number of processes, first folds the whole batches of the part files
  that continue the records file into it (:func:`fold_parts`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptqlora import distributed
from gptqlora.errors import UsageError
from gptqlora.files import append_durable, check_own_file, truncate_durable, write_atomic


@dataclass(frozen=True)
class RecordFiles:
    """The file names of one kind of per-question output, and what to call its run in messages."""

    records: str
    """One JSON record per question, in question order (``predictions.jsonl``)."""
    config: str
    """The settings and provenance a resume must match (``eval_config.json``)."""
    what: str
    """The run, as messages name it (``"evaluation"``)."""
    summary: str = "summary.json"
    """Written at the end; its presence marks the output complete."""

    @property
    def parts(self) -> str:
        """The glob of the ranks' part files (``predictions.part-*.jsonl``), folded into :attr:`records`."""
        return self.records.removesuffix(".jsonl") + ".part-*.jsonl"

    def part(self, out: Path, rank: int) -> Path:
        """Where rank ``rank`` of a distributed run appends its batches' records."""
        return out / self.parts.replace("*", str(rank))


def record_line(record: dict) -> str:
    """One records-file line: strict JSON (no NaN or Infinity), UTF-8 text kept as is, newline-terminated."""
    return json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n"


# ---------------------------------------------------------------------------------------------- settings

_ABSENT = object()


def _flatten(value: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}, "c": 2}`` -> ``{"a.b": 1, "c": 2}`` (an empty dict stays a value)."""
    flat = {}
    for key, sub in value.items():
        name = f"{prefix}{key}"
        flat |= _flatten(sub, name + ".") if isinstance(sub, dict) and sub else {name: sub}
    return flat


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value, ensure_ascii=False)


def settings_diff(saved: dict, current: dict) -> list[str]:
    """``"name: saved X, now Y"`` for each setting that differs; nested dicts are named by dotted paths, sorted."""
    a, b = _flatten(saved), _flatten(current)
    return [f"{k}: saved {_show(a.get(k, _ABSENT))}, now {_show(b.get(k, _ABSENT))}"
            for k in sorted(a.keys() | b.keys()) if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


# ---------------------------------------------------------------------------------------------- resuming

def complete_records(data: bytes, entries: Sequence[dict], batch_size: int,
                     files: RecordFiles) -> tuple[list[dict], int]:
    """The records of a records file that a resumed run keeps, and the file length that holds exactly them.

    A kill mid-append leaves a prefix of the file: an unterminated last line is dropped, and so is a batch whose
    records are not all there, since a batch is regenerated whole (its sampling seed is ``seed + first index``).

    Args:
        data: the file's bytes.
        entries: the run's entries (record ``i`` must be entry ``i``'s).
        batch_size: questions per generation batch.
        files: the output's file names, for the error message.
    Returns:
        (the kept records, in order; the byte length of their lines).
    Raises:
        UsageError: a complete line that is not JSON, or not the record of the question at its position: the file
            was not written by this run alone.
    """
    lines = data.split(b"\n")[:-1]  # the part after the last newline is a torn line, or b""
    records = []
    for i, raw in enumerate(lines):
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        if not (isinstance(record, dict) and i < len(entries) and record.get("index") == i
                and record.get("question") == entries[i]["question"]):
            raise UsageError(f"line {i + 1} of {files.records} is not the record of question {i}: the file was "
                             f"changed by something other than this {files.what}, so it cannot be resumed; run "
                             "without --resume to start afresh")
        records.append(record)
    keep = len(records) if len(records) == len(entries) else len(records) - len(records) % batch_size
    return records[:keep], sum(len(line) + 1 for line in lines[:keep])


def part_batches(data: bytes, entries: Sequence[dict], batch_size: int, files: RecordFiles) -> dict[int, str]:
    """The whole batches in a rank's part file (of ``files.parts``): first question index -> the batch's lines, as
    written.

    A rank appends each of its batches whole, so a kill leaves at most one torn line and one partial batch at the
    end; both are dropped, like any batch whose records are not exactly its questions in order.

    Raises:
        UsageError: a complete line that is not the record of the question it names (the file was not written by
            this run).
    """
    lines: dict[int, list[str]] = {}
    for raw in data.split(b"\n")[:-1]:  # the part after the last newline is a torn line, or b""
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        index = record.get("index") if isinstance(record, dict) else None
        if not (isinstance(index, int) and 0 <= index < len(entries)
                and record.get("question") == entries[index]["question"]):
            raise UsageError(f"a line of a {files.parts} file is not a record of this {files.what}'s questions: "
                             f"the file was changed by something other than this {files.what}, so it cannot be "
                             "resumed; run without --resume to start afresh")
        lines.setdefault(index - index % batch_size, []).append(raw.decode("utf-8") + "\n")
    return {start: "".join(batch) for start, batch in lines.items()
            if len(batch) == min(batch_size, len(entries) - start)
            and [json.loads(ln)["index"] for ln in batch] == list(range(start, start + len(batch)))}


def fold_parts(answered: int, parts: Sequence[bytes], entries: Sequence[dict], batch_size: int,
               files: RecordFiles) -> list[str]:
    """The batches of the part files that continue the ``answered`` questions of the records file, in order.

    Only the run of whole batches that follows on directly is kept: a batch after a gap (one a killed rank never
    finished) is answered again, so the records file stays one record per question, in question order.

    Returns:
        The batches' lines, to append to the records file.
    """
    found: dict[int, str] = {}
    for data in parts:
        found |= part_batches(data, entries, batch_size, files)
    folded = []
    while answered in found:
        folded.append(found[answered])
        answered += min(batch_size, len(entries) - answered)
    return folded


def start_fresh(out: Path, files: RecordFiles, run_config: dict) -> None:
    """Begin a run in ``out``: no summary and no part files, an empty records file, then the config file.

    An earlier run's config file (and its part files) are deleted first, so a crash in between leaves nothing to
    resume rather than this run's records under another run's settings.
    """
    out.mkdir(parents=True, exist_ok=True)
    for path in [out / files.config, out / files.summary, *sorted(out.glob(files.parts))]:
        path.unlink(missing_ok=True)
    write_atomic(out / files.records, "")
    write_atomic(out / files.config, json.dumps(run_config, indent=2, ensure_ascii=False, allow_nan=False) + "\n")


def resume_from(out: Path, files: RecordFiles, run_config: dict, entries: Sequence[dict],
                batch_size: int) -> tuple[list[dict], bool]:
    """Continue a run in ``out``: check its settings, cut the records file back to its complete batches and append
    the part files' batches that continue them (:func:`fold_parts`); the part files are then deleted.

    Args:
        run_config: ``{"settings": ..., "provenance": ...}`` as :func:`start_fresh` saved it.
    Returns:
        (the kept records, whether a torn line or an incomplete batch, or a batch after a gap, was cut off).
    Raises:
        UsageError: nothing to resume (no config or records file), different settings (each one named with both
            values), a records file this run did not write, or a record file that is a symbolic link or a special
            file (a stranger's, not ours). Nothing is changed then.
    """
    config_path, records_path = out / files.config, out / files.records
    for path in (config_path, records_path, *out.glob(files.parts)):  # a link planted there is neither read nor cut
        check_own_file(path, "record file")
    if not (config_path.is_file() and records_path.is_file()):
        raise UsageError(f"nothing to resume in {out}: it holds no {files.config} and {files.records} from an "
                         f"earlier {files.what}; run without --resume")
    try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as e:
        saved = f"not valid JSON ({e})"
    if not isinstance(saved, dict):
        raise UsageError(f"{config_path} is {saved}, not the saved settings of an earlier {files.what}: run "
                         "without --resume to start afresh")
    current = {**run_config["settings"], "provenance": run_config["provenance"]}
    if diff := settings_diff({**saved.get("settings", {}), "provenance": saved.get("provenance")}, current):
        raise UsageError(f"cannot resume the {files.what} in {out}: it was run with other settings ("
                         + "; ".join(diff) + "). Resume with the saved settings, or run without --resume")
    data = records_path.read_bytes()
    records, keep = complete_records(data, entries, batch_size, files)
    parts = sorted(out.glob(files.parts))
    part_data = [p.read_bytes() for p in parts]
    folded = fold_parts(len(records), part_data, entries, batch_size, files)
    (out / files.summary).unlink(missing_ok=True)  # written again once every question is answered
    if keep < len(data):
        truncate_durable(records_path, keep)
    if folded:  # appended before the parts go: a kill in between leaves them to fold again
        append_durable(records_path, folded)
        records += [json.loads(line) for batch in folded for line in batch.splitlines()]
    for path in parts:
        path.unlink()
    dropped = sum(1 for d in part_data for line in d.split(b"\n")[:-1] if json.loads(line)["index"] >= len(records))
    return records, keep < len(data) or dropped > 0 or any(d and not d.endswith(b"\n") for d in part_data)


# ---------------------------------------------------------------------------------------------- driver

def open_output(out: Path | None, files: RecordFiles, run_config: dict, entries: Sequence[dict], batch_size: int,
                resume: bool) -> tuple[list[dict], bool]:
    """Every rank calls it: check that the ranks agree on ``run_config``, then rank 0 starts afresh in ``out`` or
    resumes it while the others wait. ``out`` None writes nothing (and cannot be resumed).

    Returns:
        On every rank, (the records kept, in order; whether anything was cut off): see :func:`resume_from`.
    Raises:
        UsageError: ranks given other settings; a resume without ``out``; see :func:`resume_from`.
    """
    world = distributed.joined()
    if world.distributed:
        distributed.agree(run_config, f"the {files.what}'s settings and provenance")
    if resume and out is None:
        raise UsageError(f"resume needs the output directory of the {files.what} to continue (out_dir)")

    def prepare() -> tuple[list[dict], bool]:  # rank 0 alone, while the others wait
        if resume:
            return resume_from(out, files, run_config, entries, batch_size)
        if out is not None:
            start_fresh(out, files, run_config)
        return [], False

    return distributed.from_main(prepare)


def rank_batches(n: int, batch_size: int, first: int) -> list[int]:
    """The first question of each batch this rank answers (of questions ``first`` to ``n - 1``; see
    :func:`answer_batches`)."""
    world = distributed.joined()
    return list(range(first, n, batch_size))[world.rank::world.size]


def answer_batches(out: Path | None, files: RecordFiles, n: int, batch_size: int, first: int,
                   answer: Callable[[int], list[tuple[dict, str]]], log: Callable[[str], Any]) -> list[dict]:
    """Answer questions ``first`` to ``n - 1`` in batches, each batch on disk before its lines are logged.

    One process appends each batch to ``out``'s records file. Under ``torchrun`` every rank calls this with the
    same arguments: rank ``r`` of ``W`` answers the ``r``-th, ``(r + W)``-th... of the batches one process would
    make, appending them to its own part file; at the end rank 0 appends every rank's records, in question order, to
    the records file, and the part files are removed.

    Args:
        out: the output directory (opened by :func:`open_output`); None writes nothing.
        files: its file names.
        n: the number of questions.
        batch_size: questions per batch.
        first: the first question not answered yet (a multiple of ``batch_size``, or ``n``).
        answer: the batch starting at question ``start`` -> one (record with ``"index"``, log line) per question.
        log: called with each line of this rank's questions.
    Returns:
        Every rank's new records, in question order, on every rank.
    """
    world = distributed.joined()
    mine = None if out is None else out / files.records if not world.distributed else files.part(out, world.rank)
    if mine is not None and world.distributed:
        write_atomic(mine, "")
    new: list[dict] = []
    for start in rank_batches(n, batch_size, first):
        scored = answer(start)
        if mine is not None:  # the batch is on disk before anything else can fail
            append_durable(mine, [record_line(r) for r, _ in scored])
        for record, line in scored:
            new.append(record)
            log(line)
    if not world.distributed:
        return new
    new = sorted((r for rank_records in distributed.gather_objects(new) for r in rank_records),
                 key=lambda r: r["index"])
    if out is not None and world.main:  # then the parts may go: a kill in between leaves them to fold again
        append_durable(out / files.records, [record_line(r) for r in new])
    distributed.barrier()
    if mine is not None:
        mine.unlink(missing_ok=True)
    distributed.barrier()
    return new
