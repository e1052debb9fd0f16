"""Per-question record files (``gptqlora.eval.records``): the settings a resume compares, the complete batches a
records file keeps, and the whole batches of the ranks' part files that a resume folds in."""

from __future__ import annotations

import json

import pytest

from gptqlora.errors import UsageError
from gptqlora.eval.gsm8k_eval import EVAL_FILES
from gptqlora.eval.records import complete_records, fold_parts, part_batches, record_line, settings_diff

from eval.eval_script import BATCH, ENTRIES


def test_settings_diff_names_each_difference_with_both_values():
    saved = {"n": 6, "max_new_tokens": 12, "provenance": {"model": "a", "adapter": None}}
    assert settings_diff(saved, json.loads(json.dumps(saved))) == []
    now = {"n": 6, "max_new_tokens": 16, "provenance": {"model": "b", "extra": [1]}}
    assert settings_diff(saved, now) == ["max_new_tokens: saved 12, now 16",
                                         "provenance.adapter: saved null, now (absent)",
                                         "provenance.extra: saved (absent), now [1]",
                                         'provenance.model: saved "a", now "b"']
    assert settings_diff({"provenance": None}, {"provenance": {"model": "a"}}) == [
        "provenance: saved null, now (absent)", 'provenance.model: saved (absent), now "a"']


def test_complete_records_keeps_whole_batches_of_this_evaluation():
    entries = [{"question": f"q{i}"} for i in range(5)]
    lines = [record_line({"index": i, "question": f"q{i}", "prediction": "é"}).encode() for i in range(5)]
    data = b"".join(lines)
    assert complete_records(b"", entries, 2, EVAL_FILES) == ([], 0)
    # A short last batch is kept; a torn last line takes its batch with it.
    assert complete_records(data, entries, 2, EVAL_FILES) == ([json.loads(ln) for ln in lines], len(data))
    assert complete_records(data[:-1], entries, 2, EVAL_FILES)[1] == len(b"".join(lines[:4]))
    for n in range(5):
        records, size = complete_records(b"".join(lines[:n]) + lines[n][:5], entries, 2, EVAL_FILES)
        assert len(records) == n - n % 2 and size == len(b"".join(lines[:n - n % 2]))
    with pytest.raises(UsageError, match="line 2 of predictions.jsonl is not the record of question 1"):
        complete_records(lines[0] + lines[2], entries, 2, EVAL_FILES)
    with pytest.raises(UsageError, match="line 1 .* cannot be resumed; run without --resume"):
        complete_records(b"not json\n", entries, 2, EVAL_FILES)
    with pytest.raises(UsageError, match="line 1"):
        complete_records(data, [{"question": "other"}] + entries[1:], 2, EVAL_FILES)


def test_fold_parts_keeps_only_whole_batches_in_order_and_refuses_foreign_lines():
    lines = [record_line({"index": i, "question": e["question"]}) for i, e in enumerate(ENTRIES)]
    part0, part1 = "".join(lines[0:2] + lines[4:6]).encode(), "".join(lines[2:4]).encode()
    assert part_batches(part1, ENTRIES, BATCH, EVAL_FILES) == {2: lines[2] + lines[3]}
    assert fold_parts(0, [part0, part1], ENTRIES, BATCH, EVAL_FILES) == [lines[0] + lines[1], lines[2] + lines[3],
                                                                          lines[4] + lines[5]]
    assert fold_parts(2, [part1], ENTRIES, BATCH, EVAL_FILES) == [lines[2] + lines[3]]
    assert fold_parts(0, [part1], ENTRIES, BATCH, EVAL_FILES) == []  # batch [0, 1] is missing
    # A short last batch is whole when it holds the questions left.
    assert part_batches("".join(lines[4:5]).encode(), ENTRIES[:5], BATCH, EVAL_FILES) == {4: lines[4]}
    assert part_batches("".join(lines[4:5]).encode(), ENTRIES, BATCH, EVAL_FILES) == {}
    foreign = record_line({"index": 1, "question": "another question"}).encode()
    with pytest.raises(UsageError, match="not a record of this evaluation"):
        part_batches(foreign, ENTRIES, BATCH, EVAL_FILES)


@pytest.mark.parametrize("planted", ["records", "config", "part"])
def test_a_resume_refuses_a_record_file_that_is_a_link_and_leaves_its_target_whole(tmp_path, planted):
    """A resumed output may hold what a stranger put there: a link at predictions.jsonl (or its config or a rank's
    part file) would have its target read and then cut to the complete batches; it is refused instead."""
    from gptqlora.eval.records import resume_from, start_fresh

    out = tmp_path / "out"
    run_config = {"settings": {"n": len(ENTRIES)}, "provenance": {"model": "m"}}
    start_fresh(out, EVAL_FILES, run_config)
    (out / EVAL_FILES.records).write_text(record_line({"index": 0, "question": ENTRIES[0]["question"]}) + "torn")
    target = tmp_path / "precious.txt"
    target.write_bytes(b"the user's own bytes, not a record\n")
    name = {"records": EVAL_FILES.records, "config": EVAL_FILES.config, "part": EVAL_FILES.part(out, 1).name}[planted]
    (out / name).unlink(missing_ok=True)
    (out / name).symlink_to(target)
    with pytest.raises(UsageError, match="symbolic link"):
        resume_from(out, EVAL_FILES, run_config, ENTRIES, BATCH)
    assert target.read_bytes() == b"the user's own bytes, not a record\n" and (out / name).is_symlink()
