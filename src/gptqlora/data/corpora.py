"""Training corpora beyond GSM8K: readers that recognise a corpus by its fields, weighted mixtures, and the guard
that keeps GSM8K test questions out of training.

Every corpus is mapped to GSM8K's entry form, ``{"question", "answer"}`` with a solution ending in ``#### N``, so the
CoT dataset, ``check_answers`` and the scorer read all of them as they read GSM8K:

- GSM8K (``question``, ``answer`` ending in ``#### N``): as released.
- MetaMathQA (``query``, ``response`` ending in ``The answer is: N``; ``type``, ``original_question``): the closing
  line becomes ``#### N``. Rows whose answer is not a number (MATH's LaTeX answers) are dropped and counted: the
  GSM8K scorer reads numbers, so such a target could only teach a wrong final line.
- MathInstruct (``instruction``, ``output``, ``source``): chain-of-thought rows as MetaMathQA's (the final answer
  after ``####``, "The answer is" or in ``\\boxed{}``); program-of-thought rows (a source naming ``PoT``, or an
  output that is a Python program) are dropped unless asked for, and then kept as their program, with no ``####``
  line, since nothing here runs programs.

An entry may carry ``original_question`` (MetaMathQA: the GSM8K or MATH train question it rephrases), which the
contamination guard checks too, and ``program: True`` for a kept program-of-thought row.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptqlora.config import MIX_GSM8K, default_data_source
from gptqlora.data.gsm8k import load_gsm8k, parse_number
from gptqlora.data.jsonl import read_rows
from gptqlora.errors import InputNotFoundError, UsageError

# Each format's required fields; a file's first row decides its format, every later row must have the same fields.
FIELDS = {"gsm8k": ("question", "answer"), "metamath": ("query", "response"),
          "mathinstruct": ("instruction", "output")}
SUFFIXES = (".json", ".jsonl")
# Why rows are left out, as counted in the report.
NO_NUMBER, PROGRAM, CONTAMINATED = "no_numeric_answer", "program_of_thought", "gsm8k_test_question"

_ANSWER_IS = re.compile(r"the answer is\s*:?\s*", re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_POT_SOURCE = re.compile(r"(?<![a-z])pot(?![a-z])", re.IGNORECASE)  # "data/PoT/gsm.json", not "teapot"
_PROGRAM_LINE = re.compile(r"^(?:def |import |from [\w.]+ import |print\()", re.MULTILINE)
_PUNCT = re.compile(r"[^\w\s]")


@dataclass
class Corpus:
    """One source read and mapped to GSM8K entries, with what was left out and why."""

    source: str
    formats: tuple[str, ...]
    rows: int  # rows read
    entries: list[dict]
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rows


# ---------------------------------------------------------------------------------------------- formats

def detect_format(row: object, where: str) -> str:
    """The corpus a row belongs to, from its fields (see ``FIELDS``).

    Raises:
        UsageError: a row that is not an object, or whose fields match no corpus (or more than one).
    """
    if not isinstance(row, dict):
        raise UsageError(f"{where}: expected a JSON object, got {type(row).__name__}")
    found = [name for name, keys in FIELDS.items() if all(k in row for k in keys)]
    if len(found) != 1:
        known = "; ".join(f"{name}: {', '.join(keys)}" for name, keys in FIELDS.items())
        raise UsageError(f"{where}: fields {sorted(row)[:8]} match {'no' if not found else 'more than one'} known "
                         f"corpus: rows need the fields of one of ({known})")
    return found[0]


# ---------------------------------------------------------------------------------------------- answers

def final_answer(text: str) -> tuple[str, str] | None:
    """Split a worked solution into (reasoning, final answer) by its closing convention.

    Tried in order: the line after the last ``####``; the rest of the line after the last "The answer is" (with
    or without a colon, any case); the content of the last ``\\boxed{}``. A closing phrase on a line of its own is
    left out of the reasoning (``#### N`` takes its place); one inside a sentence stays, up to the end of its line.

    Returns:
        ``(reasoning, answer)``, the answer without a trailing period or ``$...$`` math delimiters; None when the
        text has no closing convention.
    """
    at = text.rfind("####")
    if at >= 0:
        return text[:at].rstrip(), _clean(text[at + 4:].strip().split("\n", 1)[0])
    phrase = None
    for phrase in _ANSWER_IS.finditer(text):
        pass
    if phrase is not None:
        before, answer = text[:phrase.start()], text[phrase.end():].split("\n", 1)[0]
        own_line = not before.strip() or before.rstrip(" \t").endswith("\n")
        # A closing line of its own gives way to '#### N'; a closing sentence stays (what follows its line goes).
        reasoning = before if own_line else text[:phrase.end()] + answer
        return reasoning.rstrip(), _clean(answer)
    boxed = _BOXED.findall(text)
    return (text.rstrip(), _clean(boxed[-1])) if boxed else None


def _clean(answer: str) -> str:
    answer = answer.strip().rstrip(".").strip()
    boxed = _BOXED.fullmatch(answer)
    if boxed:
        answer = boxed.group(1).strip()
    if len(answer) > 1 and answer.startswith("$") and answer.endswith("$"):
        answer = answer.strip("$").strip()
    return answer


def to_gsm8k_solution(text: str) -> str | None:
    """A solution in GSM8K's form: the reasoning, then ``#### N``; None when its final answer is not a number."""
    split = final_answer(text)
    if split is None or parse_number(split[1]) is None:
        return None
    reasoning, answer = split
    return f"{reasoning}\n#### {answer.replace('$', '')}" if reasoning else f"#### {answer.replace('$', '')}"


def is_program_of_thought(output: str, source: str = "") -> bool:
    """Whether a MathInstruct row is program-of-thought: its source names ``PoT`` or its output is a Python program
    (a line opening with ``def``, ``import``, ``from ... import`` or ``print(``)."""
    return bool(_POT_SOURCE.search(source) or _PROGRAM_LINE.search(output))


def to_entry(row: dict, fmt: str, where: str, program_of_thought: bool = False) -> dict | str:
    """Map one row of a known format to a GSM8K entry.

    Returns:
        The entry, or the reason it is left out (``NO_NUMBER`` or ``PROGRAM``).
    Raises:
        UsageError: a missing or non-string field, naming the row's file and line.
    """
    question_key, answer_key = FIELDS[fmt]
    optional = {"metamath": ("type", "original_question"), "mathinstruct": ("source",)}.get(fmt, ())
    for key in (question_key, answer_key):
        if not isinstance(row.get(key), str):
            raise UsageError(f"{where}: missing or non-string {key!r} (a {fmt} row needs "
                             f"{question_key!r} and {answer_key!r})")
    for key in optional:
        if row.get(key) is not None and not isinstance(row[key], str):
            raise UsageError(f"{where}: {key!r} must be a string, got {type(row[key]).__name__}")
    question, answer = row[question_key], row[answer_key]
    if fmt == "gsm8k":  # as released; check_answers refuses a set whose answers lack '#### N'
        return {"question": question, "answer": answer}
    if fmt == "mathinstruct" and is_program_of_thought(answer, row.get("source") or ""):
        return {"question": question, "answer": answer.strip(), "program": True} if program_of_thought else PROGRAM
    solution = to_gsm8k_solution(answer)
    if solution is None:
        return NO_NUMBER
    entry = {"question": question, "answer": solution}
    if row.get("original_question"):
        entry["original_question"] = row["original_question"]
    return entry


# ---------------------------------------------------------------------------------------------- sources

def load_corpus(source: str, program_of_thought: bool = False) -> Corpus:
    """Read a training source and map its rows to GSM8K entries.

    Args:
        source: a JSON or JSON Lines file; a directory (its ``train.jsonl``/``train.json`` when present, as in a
            GSM8K directory, whose test split is never read here; else every ``.json``/``.jsonl`` file in it, in
            name order); or a hub dataset id (its train split, through ``datasets.load_dataset``).
        program_of_thought: keep MathInstruct's program-of-thought rows (dropped by default).
    Returns:
        The corpus; each file's format is recognised by the fields of its first row.
    Raises:
        UsageError: a malformed row (file and line), fields of no known corpus, a source with no rows or with no
            usable row, or a hub id that cannot be loaded.
        InputNotFoundError: a path that does not exist.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        named = [path / f"train{s}" for s in (".jsonl", ".json") if (path / f"train{s}").is_file()]
        files = named[:1] or sorted(p for p in path.iterdir() if p.suffix in SUFFIXES and p.is_file())
        if not files:
            raise UsageError(f"{path} holds no .json or .jsonl file: give a directory with train.jsonl, or with "
                             "MetaMathQA or MathInstruct JSON/JSONL files")
        parts = [_rows_of(read_rows(f), str(f), program_of_thought) for f in files]
    elif path.is_file():
        parts = [_rows_of(read_rows(path), str(path), program_of_thought)]
    elif source.startswith((".", "/", "~")) or path.exists():
        raise InputNotFoundError(f"training data {source!r} does not exist: give a JSON/JSONL file, a directory, or "
                                 "a hub dataset id such as meta-math/MetaMathQA")
    else:
        parts = [_rows_of(_hub_rows(source), source, program_of_thought)]
    corpus = Corpus(source, tuple(dict.fromkeys(p.formats[0] for p in parts)), sum(p.rows for p in parts),
                    [e for p in parts for e in p.entries])
    for p in parts:
        for reason, n in p.dropped.items():
            corpus.dropped[reason] = corpus.dropped.get(reason, 0) + n
    if not corpus.entries:
        raise UsageError(f"{source}: none of its {corpus.rows} rows is usable ({_describe(corpus.dropped)}): "
                         "chain-of-thought rows need a numeric final answer"
                         + ("; add --program-of-thought to keep program rows" if corpus.dropped.get(PROGRAM) else ""))
    return corpus


def _rows_of(rows: Iterable[tuple[object, str]], name: str, program_of_thought: bool) -> Corpus:
    fmt, entries, dropped, n = None, [], {}, 0
    for row, where in rows:
        n += 1
        if fmt is None:
            fmt = detect_format(row, where)
        elif not isinstance(row, dict) or not all(k in row for k in FIELDS[fmt]):
            if isinstance(row, dict) and any(k in row for k in FIELDS[fmt]):
                to_entry(row, fmt, where)  # names the missing field
            raise UsageError(f"{where}: expected a {fmt} row with fields {', '.join(FIELDS[fmt])} (as the file's "
                             f"first row), got {sorted(row)[:8] if isinstance(row, dict) else type(row).__name__}")
        entry = to_entry(row, fmt, where, program_of_thought)
        if isinstance(entry, str):
            dropped[entry] = dropped.get(entry, 0) + 1
        else:
            entries.append(entry)
    if fmt is None:
        raise UsageError(f"{name} holds no problems: give one JSON object per line (JSONL) or a JSON array of "
                         "objects")
    return Corpus(name, (fmt,), n, entries, dropped)


def is_gsm8k_hub_id(dataset_id: str) -> bool:
    """Whether a hub id names GSM8K (``openai/gsm8k``, ``gsm8k`` or a copy ending in ``/gsm8k``): GSM8K on the hub
    needs its "main" config, which ``load_gsm8k`` asks for, so it cannot be recognised by loading it plainly."""
    return dataset_id.rsplit("/", 1)[-1].lower() == "gsm8k"


def _hub_rows(dataset_id: str) -> Iterator[tuple[object, str]]:
    if is_gsm8k_hub_id(dataset_id):
        for i, entry in enumerate(load_gsm8k("train", dataset_id)):
            yield entry, f"{dataset_id} [train] row {i}"
        return
    import datasets  # lazy: a heavy import that only the hub path needs

    try:
        ds = datasets.load_dataset(dataset_id, split="train")
    except Exception as e:  # network, auth or a wrong id: all get the same way out
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UsageError(f"training data {dataset_id!r} is not a local path (none at {Path(dataset_id).absolute()}) "
                         f"and could not be loaded as a hub dataset ({first}): give a local JSON/JSONL file or "
                         "directory") from e
    for i, row in enumerate(ds):
        yield row, f"{dataset_id} [train] row {i}"


def _describe(dropped: dict[str, int]) -> str:
    return ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in dropped.items()) or "none dropped"


# ---------------------------------------------------------------------------------------------- contamination

def normalize_question(text: str) -> str:
    """A question as the contamination guard compares it: case-folded, punctuation removed, white space collapsed."""
    return " ".join(_PUNCT.sub(" ", text.casefold()).split())


def drop_contaminated(entries: Sequence[dict], test_questions: Iterable[str]) -> tuple[list[dict], int]:
    """Leave out every entry whose question, or the ``original_question`` it rephrases, equals a test question
    once both are normalised (``normalize_question``).

    Returns:
        (the kept entries in order, how many were dropped).
    """
    test = {normalize_question(q) for q in test_questions}
    kept = [e for e in entries if normalize_question(e["question"]) not in test
            and normalize_question(e.get("original_question") or "") not in test]
    return kept, len(entries) - len(kept)


# ---------------------------------------------------------------------------------------------- mixtures

def take_share(entries: Sequence[dict], weight: float, g: torch.Generator) -> list[dict]:
    """``round(weight * len(entries))`` entries: every entry ``floor`` times over, then a seeded sample without
    replacement for the rest (kept in source order, so the share is a subset, not a reshuffle)."""
    n = len(entries)
    copies, extra = divmod(round(weight * n), n)
    picked = sorted(torch.randperm(n, generator=g)[:extra].tolist())
    return list(entries) * copies + [entries[i] for i in picked]


def gsm8k_reference(data: str, mixed: bool) -> str:
    """The GSM8K source of a fine-tuning run: its test split is the contamination reference, its train split is
    ``gsm8k`` in a mixture and the default calibration text.

    Without a mixture ``--data`` is the training corpus, and the GSM8K source when it is a GSM8K directory or hub id;
    a MetaMathQA or MathInstruct ``--data`` leaves it to ``$GSM8K_DIR``, else openai/gsm8k. With a mixture ``--data``
    names the GSM8K source and nothing else.

    Raises:
        UsageError: a mixture beside a local ``--data`` that is not a GSM8K directory (the mix would ignore it).
    """
    path = Path(data).expanduser()
    if mixed:
        if path.exists() and not _is_gsm8k_dir(path):
            raise UsageError(f"--data {data} is not a GSM8K directory (train.jsonl/test.jsonl): with --train-mix, "
                             "--data names only the GSM8K source (the guard's test split, 'gsm8k' in the mix); put "
                             "this corpus in the mix instead")
        return data
    if _is_gsm8k_dir(path) or (not path.exists() and is_gsm8k_hub_id(data)):
        return data
    return default_data_source()


def _is_gsm8k_dir(path: Path) -> bool:
    """A directory with a test.jsonl whose first row has GSM8K's fields (or cannot be read: load_gsm8k then says
    why, naming the line or the byte)."""
    test = path / "test.jsonl"
    if not (path.is_dir() and test.is_file()):
        return False
    try:
        with test.open(encoding="utf-8-sig") as f:
            first = next((line for line in f if line.strip()), None)
    except UnicodeDecodeError:
        return True
    try:
        row = json.loads(first) if first else None
    except json.JSONDecodeError:
        return True
    return not isinstance(row, dict) or all(k in row for k in FIELDS["gsm8k"])


def build_training_set(sources: Sequence[tuple[str, float]], gsm8k_source: str, program_of_thought: bool = False,
                       seed: int = 0) -> tuple[list[dict], dict]:
    """The training entries of a (weighted) mixture, without GSM8K test questions, and a record of how it was made.

    Args:
        sources: (source, weight) pairs in order; ``"gsm8k"`` names GSM8K train from ``gsm8k_source``, anything else
            is read by ``load_corpus``; a weight is a multiple of the source's size after the guard (see
            ``take_share``).
        gsm8k_source: the GSM8K directory or hub id whose test split no training question may equal.
        program_of_thought: keep MathInstruct's program-of-thought rows.
        seed: seeds each fractional share, drawn in ``sources`` order.
    Returns:
        (entries, report): the entries source after source, in ``sources`` order (``split_train`` shuffles them);
        the report records per source its rows read, rows dropped by reason (``gsm8k_test_question`` being the
        guard's), rows kept and rows used, and the total the guard dropped against how many test questions.
    Raises:
        UsageError: see ``load_corpus`` and ``load_gsm8k``; a source the guard leaves empty, or whose weight
            selects none of its rows.
    """
    # Every source is read (and a malformed row reported) before GSM8K test, which may come from the hub.
    corpora = [load_corpus(gsm8k_source if source == MIX_GSM8K else source, program_of_thought)
               for source, _ in sources]
    test = [e["question"] for e in load_gsm8k("test", gsm8k_source)]
    g = torch.Generator().manual_seed(seed)
    entries: list[dict] = []
    report: dict = {"sources": [], "contamination": {"reference": f"GSM8K test ({gsm8k_source})",
                                                     "test_questions": len(test), "dropped": 0}}
    for (source, weight), corpus in zip(sources, corpora):
        clean, n_contaminated = drop_contaminated(corpus.entries, test)
        if not clean:
            raise UsageError(f"{source}: all {len(corpus.entries)} usable rows ask a GSM8K test question "
                             f"({gsm8k_source}); nothing is left to train on")
        used = take_share(clean, weight, g)
        if not used:  # else the run would train without it, or split_train would blame --eval-holdout
            raise UsageError(f"--train-mix {source}={weight:g} selects no rows: {weight:g} x its {len(clean)} "
                             f"usable rows rounds to 0; give it a weight of at least {1 / len(clean):.3g}, or "
                             "leave it out of the mix")
        entries += used
        report["contamination"]["dropped"] += n_contaminated
        report["sources"].append({"source": source, "formats": list(corpus.formats), "weight": weight,
                                  "rows": corpus.rows, "dropped": corpus.dropped | {CONTAMINATED: n_contaminated},
                                  "kept": len(clean), "used": len(used)})
    report["examples"] = len(entries)
    return entries, report


def describe_report(report: dict) -> str:
    """One line per source and one for the guard, as finetune prints them."""
    lines = [f"training data: {s['source']} ({'+'.join(s['formats'])}): {s['used']} examples (weight {s['weight']:g}"
             f" of {s['kept']} kept of {s['rows']} rows; dropped: {_describe(s['dropped'])})"
             for s in report["sources"]]
    c = report["contamination"]
    lines.append(f"contamination guard: dropped {c['dropped']} training items whose question equals one of the "
                 f"{c['test_questions']} questions of {c['reference']}")
    return "\n".join(lines)
