"""`verify`'s pure parts: the topic's winners by the worker's rule (worker.topic_fold), the
comparison with stored rows, the blank-text pattern, and the printed and JSON reports."""

from __future__ import annotations

import hashlib
import json
import re
import sys
import zlib

import pytest

from tests.integration.helpers import Event, encode, expected_state
from worker.sql import VERIFY_BLANK, VERIFY_NOT_BLANK
from worker.topic_fold import TopicFold, Winner
from worker.types import Record, TopicPartition
from worker.verify import (
    STORED_CHECKS,
    TOPIC_CHECKS,
    Check,
    Comparison,
    Report,
    Stored,
    Tally,
    _declared_dimensions,
    differs,
)

TOPIC = "docs"


def sha(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def records(events: list[Event], partitions: int = 3) -> list[Record]:
    """Events as a topic holds them: keyed, each key in one partition, offsets in order."""
    offsets = [0] * partitions
    out = []
    for key, value in encode(events):
        partition = zlib.crc32(key or b"") % partitions
        out.append(Record(TOPIC, partition, offsets[partition], key, value))
        offsets[partition] += 1
    return out


def fold(events: list[Event]) -> TopicFold:
    taken = TopicFold(max_text_bytes=1 << 20)
    for record in records(events):
        taken.take(record)
    return taken


STREAM: list[Event] = [
    ("a", {"id": "a", "text": "first", "version": 1}),
    ("a", {"id": "a", "text": "second", "version": 2}),
    ("a", {"id": "a", "text": "stale", "version": 1}),  # lower: changes nothing
    ("b", {"id": "b", "text": "to delete", "version": 4}),
    ("b", None),  # tombstone: deleted, version kept
    ("b", {"id": "b", "text": "equal over deleted", "version": 4}),  # changes nothing
    ("c", {"id": "c", "op": "delete", "version": 7}),
    ("c", {"id": "c", "text": "late and older", "version": 6}),
    ("d", {"id": "d", "text": "unversioned one"}),
    ("d", {"id": "d", "text": "unversioned two"}),  # the last in partition order wins
    ("e", {"id": "e", "text": "versioned", "version": 5}),
    ("e", {"id": "e", "text": "then without"}),  # applies, keeps version 5
    ("ghost", None),  # a tombstone of a document never seen: a deleted row
    ("f", {"id": "f", "text": "deleted then newer", "version": 1}),
    ("f", None),
    ("f", {"id": "f", "text": "back at version 2", "version": 2}),
]


def test_the_fold_gives_each_document_the_state_the_independent_oracle_gives() -> None:
    taken = fold(STREAM)
    oracle = expected_state(STREAM)
    assert set(taken.winners) == set(oracle)
    for doc_id, want in oracle.items():
        winner = taken.winners[doc_id]
        assert (winner.version, winner.deleted) == (want.version, want.deleted), doc_id
        assert winner.text_sha256 == (None if want.deleted else sha(want.text)), doc_id
    assert (taken.records, taken.undecodable, taken.split) == (len(STREAM), 0, set())


def test_a_winner_is_where_its_event_is_not_where_a_later_ignored_one_is() -> None:
    taken = fold(STREAM)
    [second] = [r for r in records(STREAM) if r.value is not None and b'"second"' in r.value]
    assert (taken.winners["a"].partition, taken.winners["a"].offset) == (second.partition, second.offset)


def test_records_the_worker_would_dead_letter_at_decode_are_counted_and_change_nothing() -> None:
    taken = TopicFold(max_text_bytes=100)
    bad = [
        Record(TOPIC, 0, 0, b"x", b"{not json"),
        Record(TOPIC, 0, 1, b"x", b'{"id": "other", "text": "key and id differ"}'),
        Record(TOPIC, 0, 2, None, None),  # a tombstone without a key
        Record(TOPIC, 0, 3, b"x", json.dumps({"id": "x", "text": "y" * 101}).encode()),  # too large
        Record(TOPIC, 0, 4, b"x", b'{"id": "x", "text": "fine"}'),
    ]
    for record in bad:
        taken.take(record)
    assert (taken.records, taken.undecodable) == (5, 4)
    assert taken.winners["x"] == Winner(None, False, sha("fine"), TOPIC, 0, 4)


def test_a_document_with_events_in_two_partitions_is_marked_split() -> None:
    taken = TopicFold(max_text_bytes=100)
    taken.take(Record(TOPIC, 0, 0, None, b'{"id": "k", "text": "one"}'))  # no key: any partition
    taken.take(Record(TOPIC, 1, 0, None, b'{"id": "k", "text": "two"}'))
    assert taken.split == {"k"}


def row(doc_id: str, version: int | None, deleted: bool, text: str | None, offset: int = 0) -> Stored:
    return Stored(doc_id, version, deleted, None if text is None else sha(text), TOPIC, 0, offset)


LIVE_V2 = Winner(2, False, sha("v2"), TOPIC, 0, 5)


@pytest.mark.parametrize(
    ("winner", "stored", "problem"),
    [
        (LIVE_V2, row("a", 2, False, "v2"), None),
        (LIVE_V2, None, "topic_missing"),
        (LIVE_V2, row("a", 1, False, "v1"), "topic_version"),
        (LIVE_V2, row("a", None, False, "v2"), "topic_version"),
        (LIVE_V2, row("a", 3, False, "v3"), None),  # ahead: a compacted topic kept a late lower one
        (LIVE_V2, row("a", 2, True, None), "topic_deleted"),
        (LIVE_V2, row("a", 2, False, "other"), "topic_text"),
        (Winner(2, True, None, TOPIC, 0, 5), row("a", 2, False, "v2"), "topic_deleted"),
        (Winner(2, True, None, TOPIC, 0, 5), row("a", 2, True, None), None),
        (Winner(None, False, sha("plain"), TOPIC, 0, 5), row("a", 7, False, "plain"), None),
        (Winner(None, False, sha("plain"), TOPIC, 0, 5), row("a", 7, False, "older"), "topic_text"),
    ],
)
def test_which_check_a_stored_row_fails_against_the_topics_winner(
    winner: Winner, stored: Stored | None, problem: str | None
) -> None:
    assert differs(winner, stored) == problem


def comparison(winners: dict[str, Winner], up_to: dict[tuple[str, int], int] | None = None) -> Comparison:
    taken = TopicFold(max_text_bytes=100, ends={TopicPartition(TOPIC, 0): 10})
    taken.winners.update(winners)
    stored = None if up_to is None else {TopicPartition(*tp): n for tp, n in up_to.items()}
    return Comparison(taken, stored)


def test_the_comparison_finds_missing_rows_and_leaves_rows_the_topic_does_not_hold() -> None:
    compared = comparison({"a": LIVE_V2, "b": LIVE_V2})
    compared.row(row("a", 2, False, "v2"))
    compared.row(row("not-in-topic", 1, False, "x"))
    checks = compared.finish()
    assert checks["topic_missing"] == Check(1, ("b",))
    assert sum(check.problems for check in checks.values()) == 1


def test_rows_stored_from_records_past_the_end_offsets_read_are_not_compared() -> None:
    compared = comparison({"a": LIVE_V2})
    compared.row(row("a", 9, True, None, offset=10))  # written after verify read the topic
    assert sum(check.problems for check in compared.finish().values()) == 0
    assert compared.newer == 1


def test_a_difference_past_where_the_database_stored_the_partition_is_behind() -> None:
    compared = comparison({"a": LIVE_V2, "b": Winner(1, False, sha("b"), TOPIC, 0, 2)}, up_to={(TOPIC, 0): 5})
    compared.row(row("a", 1, False, "v1"))  # the winner at offset 5: not stored yet
    compared.row(row("b", 0, False, "old"))  # at offset 2, which the database got past: stale
    checks = compared.finish()
    assert checks["topic_behind"] == Check(1, ("a",))
    assert checks["topic_version"] == Check(1, ("b",))


def test_split_documents_are_not_compared() -> None:
    compared = comparison({"a": LIVE_V2})
    compared.fold.split.add("a")
    compared.row(row("a", 1, False, "v1"))
    assert sum(check.problems for check in compared.finish().values()) == 0
    assert compared.split == 1


def test_a_tally_counts_everything_and_keeps_the_first_ids_in_order() -> None:
    tally = Tally(keep=3)
    for doc_id in ("m", "c", "x", "a", "b", "z"):
        tally.add(doc_id)
    assert tally.check() == Check(6, ("a", "b", "c"))


def test_the_blank_set_is_exactly_what_python_calls_space() -> None:
    spaces = {chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()}
    assert set(VERIFY_BLANK) == spaces
    assert len(VERIFY_BLANK) == len(spaces)
    for text in ("", " \t\n", "\u3000\xa0", " x ", "\u200b", "日本"):
        assert (re.search(VERIFY_NOT_BLANK, text) is not None) == bool(text.strip()), repr(text)


@pytest.mark.parametrize(
    ("column", "dimensions"),
    [("vector(384)", 384), ("halfvec(1536)", 1536), ("vector", None), ("halfvec", None)],
)
def test_declared_dimensions(column: str, dimensions: int | None) -> None:
    assert _declared_dimensions(column) == dimensions


def test_the_report_prints_one_line_per_check_and_a_summary() -> None:
    checks = {name: Check() for name in STORED_CHECKS}
    checks["chunk_hashes"] = Check(12, ("doc-1", "doc-7"))
    checks["embedding_dimensions"] = Check(1, ("doc-3",), "the column is vector, not vector(384)")
    report = Report(checks, documents=1200, chunks=34_000, seconds=1.25)
    lines = report.lines()
    assert len(lines) == len(STORED_CHECKS) + 1
    assert lines[0] == "chunks_contiguous     ok"
    assert lines[1].startswith("chunk_hashes          12 problems (e.g. doc-1, doc-7): ")
    assert lines[4].startswith("embedding_dimensions  1 problem (e.g. doc-3): ")
    assert lines[4].endswith("; the column is vector, not vector(384)")
    assert lines[-1] == "not clean: 2 of 10 checks found problems (1,200 documents, 34,000 chunks, 1.2s)"
    assert not report.clean


def test_a_clean_report_in_json() -> None:
    names = {**STORED_CHECKS, **TOPIC_CHECKS}
    report = Report({name: Check() for name in names}, documents=3, chunks=5, notes=["topic docs: ..."])
    assert report.clean
    assert report.lines()[-1] == "clean: 15 checks passed (3 documents, 5 chunks, 0.0s)"
    shown = report.as_json()
    assert shown["clean"] is True
    assert shown["checks"]["topic_behind"] == {"problems": 0, "examples": []}
    assert list(shown["checks"]) == list(names)
    assert json.loads(json.dumps(shown)) == shown
