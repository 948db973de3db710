"""worker.replay without Kafka: which dead letters the filters pick, time parsing, the summary."""

from __future__ import annotations

import datetime as dt
import io
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition

from worker.dlq import DeadLetter, Fit, dead_letter_headers, outgoing
from worker.errors import AttemptsExhausted, DecodeError, EmbeddingUnavailable, StoreRejected
from worker.replay import Choices, Filters, Summary, _Run, parse_time
from worker.replay_ledger import LEDGER_BUDGET, Ledger, Ranges
from worker.types import Record

UTC = dt.UTC
NOON = dt.datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


def headers(
    *,
    stage: str = "embed",
    error_class: str = "AttemptsExhausted",
    topic: str = "docs",
    failed_at: str | None = "2024-05-01T12:00:00.000Z",
) -> dict[str, str]:
    found = {
        "dlq.error.stage": stage,
        "dlq.error.class": error_class,
        "dlq.original.topic": topic,
        "dlq.error.message": "5 attempts failed",
    }
    if failed_at is not None:
        found["dlq.failed.at"] = failed_at
    return found


# -- one field at a time ----------------------------------------------------------------------


def test_no_filters_match_everything() -> None:
    assert Filters().match(headers(), b"doc-1")
    assert Filters().match({}, None)


def test_stage() -> None:
    only_store = Filters(stage="store")
    assert only_store.match(headers(stage="store"), b"k")
    assert not only_store.match(headers(stage="embed"), b"k")
    assert not only_store.match({}, b"k")


def test_error_class() -> None:
    rejected = Filters(error_class="StoreRejected")
    assert rejected.match(headers(error_class="StoreRejected"), b"k")
    assert not rejected.match(headers(error_class="storerejected"), b"k"), "exact, case-sensitive"
    assert not rejected.match(headers(error_class="AttemptsExhausted"), b"k")


def test_original_topic() -> None:
    docs = Filters(original_topic="docs")
    assert docs.match(headers(topic="docs"), b"k")
    assert not docs.match(headers(topic="docs-v2"), b"k")
    assert not docs.match({"dlq.error.stage": "embed"}, b"k")


def test_key() -> None:
    one = Filters(key="doc-42")
    assert one.match(headers(), b"doc-42")
    assert not one.match(headers(), b"doc-4")
    assert not one.match(headers(), None)
    assert Filters(key="").match(headers(), None), "a missing key reads as the empty key"
    assert Filters(key="caf\u00e9").match(headers(), "caf\u00e9".encode())
    assert Filters(key="\ufffd").match(headers(), b"\xff"), "undecodable bytes are replaced, not fatal"


def test_every_filter_must_match() -> None:
    both = Filters(stage="embed", error_class="AttemptsExhausted", original_topic="docs", key="a")
    assert both.match(headers(), b"a")
    assert not both.match(headers(stage="store"), b"a")
    assert not both.match(headers(error_class="InputRejected"), b"a")
    assert not both.match(headers(topic="other"), b"a")
    assert not both.match(headers(), b"b")


# -- time ---------------------------------------------------------------------------------------


def at(moment: dt.datetime) -> dict[str, str]:
    """Headers stamped the way worker.dlq stamps dlq.failed.at."""
    letter = DeadLetter(
        Record("docs", 0, 7, b"k", b"{}", ()), AttemptsExhausted(EmbeddingUnavailable("503"), 5)
    )
    return {k: v.decode() for k, v in dead_letter_headers(letter, failed_at=moment)}


MS = dt.timedelta(milliseconds=1)


def test_since_is_inclusive() -> None:
    since = Filters(since=NOON)
    assert since.match(at(NOON), None)
    assert since.match(at(NOON + MS), None)
    assert not since.match(at(NOON - MS), None)


def test_until_is_exclusive() -> None:
    until = Filters(until=NOON)
    assert not until.match(at(NOON), None)
    assert not until.match(at(NOON + MS), None)
    assert until.match(at(NOON - MS), None)


def test_since_and_until_make_a_half_open_window() -> None:
    window = Filters(since=NOON, until=NOON + dt.timedelta(hours=1))
    assert [window.match(at(NOON + dt.timedelta(minutes=m)), None) for m in (-1, 0, 30, 59, 60, 61)] == [
        False,
        True,
        True,
        True,
        False,
        False,
    ]


def test_time_filters_compare_instants_across_offsets() -> None:
    since = Filters(since=parse_time("2024-05-01T14:00:00+02:00"))  # = NOON UTC
    assert since.match(headers(failed_at="2024-05-01T12:00:00.000Z"), None)
    assert not since.match(headers(failed_at="2024-05-01T11:59:59.999Z"), None)
    assert since.match(headers(failed_at="2024-05-01T08:00:00-04:00"), None)


@pytest.mark.parametrize("failed_at", [None, "", "yesterday", "2024-13-01T00:00:00Z", "?"])
@pytest.mark.parametrize(
    "filters", [Filters(since=NOON), Filters(until=NOON), Filters(since=NOON, until=NOON + MS)]
)
def test_a_time_filter_excludes_letters_without_a_readable_time(
    filters: Filters, failed_at: str | None
) -> None:
    assert not filters.match(headers(failed_at=failed_at), None)


@pytest.mark.parametrize("failed_at", [None, "garbage"])
def test_without_a_time_filter_the_time_header_is_not_read(failed_at: str | None) -> None:
    assert Filters(stage="embed").match(headers(failed_at=failed_at), None)


# -- parse_time -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-05-01T12:00:00Z", NOON),
        ("2024-05-01T12:00:00.250Z", NOON + 250 * MS),
        ("2024-05-01T12:00:00+00:00", NOON),
        ("2024-05-01T14:00:00+02:00", NOON),
        ("2024-05-01T07:30:00-04:30", NOON),
        ("2024-05-01T12:00:00", NOON),  # naive: taken as UTC
        ("2024-05-01 12:00", NOON),
        ("2024-05-01", NOON.replace(hour=0)),
    ],
)
def test_parse_time(text: str, expected: dt.datetime) -> None:
    parsed = parse_time(text)
    assert parsed == expected
    assert parsed is not None
    assert parsed.utcoffset() is not None, "always timezone-aware"


def test_parse_time_keeps_the_given_offset_and_takes_naive_as_utc() -> None:
    with_offset = parse_time("2024-05-01T14:00:00+02:00")
    naive = parse_time("2024-05-01T12:00:00")
    assert with_offset is not None
    assert naive is not None
    assert with_offset.utcoffset() == dt.timedelta(hours=2)
    assert naive.tzinfo is UTC


@pytest.mark.parametrize(
    "text", ["", "garbage", "Z", "2024-13-01", "2024-05-01T25:00:00Z", "12:00", "2024-05-01T12:00:00+25:00"]
)
def test_parse_time_garbage_is_none(text: str) -> None:
    assert parse_time(text) is None


def test_parse_time_reads_what_the_dead_letter_topic_writes() -> None:
    moment = dt.datetime(2024, 5, 1, 12, 0, 0, 123000, tzinfo=UTC)
    assert parse_time(at(moment)["dlq.failed.at"]) == moment


# -- the summary ----------------------------------------------------------------------------------


def test_summary_lines_when_empty() -> None:
    assert Summary().lines() == [
        "scanned 0 dead letters: moved 0, listed 0, filtered out 0, refused (max replays) 0, "
        "no destination 0",
        "by stage: none",
    ]


def test_summary_lines_report_every_count_and_stages_sorted() -> None:
    summary = Summary(
        scanned=20,
        moved=9,
        listed=0,
        filtered_out=6,
        refused=3,
        unroutable=2,
        by_stage=Counter({"store": 4, "embed": 5, "chunk": 1}),
        group="docs.replay",
    )
    assert summary.lines() == [
        "scanned 20 dead letters: moved 9, listed 0, filtered out 6, refused (max replays) 3, "
        "no destination 2",
        "by stage: chunk 1, embed 5, store 4",
        "left 11 in place: group docs.replay reads them again on its next run "
        "(give other filters, or none, to move them)",
    ]


def test_dead_letter_headers_carry_what_the_filters_read() -> None:
    letter = DeadLetter(Record("docs", 3, 99, b"doc-9", b"{}", ()), StoreRejected("value too long"))
    found = {k: v.decode() for k, v in dead_letter_headers(letter, failed_at=NOON)}
    assert Filters(
        stage="store", error_class="StoreRejected", original_topic="docs", key="doc-9", since=NOON
    ).match(found, letter.record.key)


# -- letters sent without their value ---------------------------------------------------------------


class NoProducer:
    async def send(self, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("a letter without its value was published")


async def letter(message: Any, choices: Choices, summary: Summary, out: io.StringIO) -> Any:
    run = _Run(choices, summary, {}, None, NoProducer(), None, out, settings=None, budget=LEDGER_BUDGET)  # type: ignore[arg-type]
    return await run._letter(TopicPartition("docs.dlq", 0), message)


def message(fit: Fit, *, offset: int = 5) -> SimpleNamespace:
    letter = DeadLetter(Record("docs", 2, 41, b"doc-9", b"<" * 60_000, ()), DecodeError("value is not JSON"))
    record = outgoing(letter, fit)
    return SimpleNamespace(
        partition=0, offset=offset, key=record.key, value=record.value, headers=record.headers
    )


@pytest.mark.parametrize("fit", [Fit.WITHOUT_VALUE, Fit.HEADERS_ONLY])
@pytest.mark.parametrize("dry_run", [False, True])
async def test_a_letter_without_its_value_is_passed_over_with_where_the_original_is(
    fit: Fit, dry_run: bool
) -> None:
    summary, out = Summary(), io.StringIO()
    moved = await letter(message(fit), Choices(dry_run=dry_run), summary, out)
    assert moved is None
    assert (summary.value_omitted, summary.moved, summary.listed) == (1, 0, 0)
    assert "0:5" in out.getvalue()
    assert "value left out (60000 bytes), the original is docs/2/41" in out.getvalue()
    assert summary.lines()[-1].startswith("passed over 1 dead letter whose value was left out")


async def test_filters_come_first_and_a_whole_letter_still_moves() -> None:
    summary, out = Summary(), io.StringIO()
    await letter(message(Fit.WITHOUT_VALUE), Choices(Filters(stage="embed"), dry_run=True), summary, out)
    assert (summary.filtered_out, summary.value_omitted) == (1, 0)
    await letter(message(Fit.WHOLE), Choices(dry_run=True), summary, out)
    assert (summary.listed, summary.value_omitted) == (1, 0)


def test_the_summary_counts_letters_passed_over_for_their_value_on_a_line_of_their_own() -> None:
    assert Summary(scanned=3, moved=1, value_omitted=2).lines()[2] == (
        "passed over 2 dead letters whose value was left out (too large for the dead-letter topic): "
        "republish each original from the topic, partition and offset listed"
    )


# -- what a run commits: letters left in place stay reachable ----------------------------------------


@pytest.mark.parametrize(
    "offsets",
    [[], [7], [7, 8, 9], [3, 5, 6, 7, 20, 1_000_000], list(range(10, 5_000, 2))],
)
def test_ranges_encode_and_decode_round_trip(offsets: list[int]) -> None:
    ranges = Ranges()
    for offset in offsets:
        ranges.add(offset)
    decoded = Ranges.decode(ranges.encode(3), 3)
    assert decoded.runs == ranges.runs
    assert all(o in decoded for o in offsets)
    assert not any(o in decoded for o in set(range(0, 12)) - set(offsets))


@pytest.mark.parametrize("metadata", ["", "something else", "replay-done-v1:x:1", "replay-done-v1:1"])
def test_metadata_that_is_not_a_ledger_reads_as_nothing_done(metadata: str) -> None:
    assert Ranges.decode(metadata, 0).runs == []


def test_a_run_that_leaves_nothing_commits_past_everything_with_no_metadata() -> None:
    ledger = Ledger(10, Ranges())
    for offset in range(10, 15):
        ledger.mark(offset, handled=True)
    assert ledger.commit() == (15, "")


def test_a_run_commits_no_further_than_the_first_letter_it_leaves() -> None:
    ledger = Ledger(10, Ranges())
    for offset, handled in [(10, True), (11, True), (12, False), (13, True), (14, False), (15, True)]:
        ledger.mark(offset, handled)
    offset, metadata = ledger.commit() or (-1, "")
    assert offset == 12
    assert Ranges.decode(metadata, 12).runs == [(13, 14), (15, 16)]


def test_the_next_run_passes_over_what_the_last_one_handled() -> None:
    first = Ledger(0, Ranges())
    for offset, handled in [(0, False), (1, True), (2, True), (3, False)]:
        first.mark(offset, handled)
    start, metadata = first.commit() or (0, "")
    before = Ranges.decode(metadata, start)
    assert (start, [o for o in range(6) if o in before]) == (0, [1, 2])


def test_a_ledger_that_would_overflow_the_metadata_limit_does_not_fit() -> None:
    ledger = Ledger(0, Ranges())
    ledger.mark(0, handled=False)
    offset = 1
    while ledger.fits(offset):  # every other letter handled: one run each
        ledger.mark(offset, handled=True)
        ledger.mark(offset + 1, handled=False)
        offset += 2
    assert len(ledger.commit()[1]) <= LEDGER_BUDGET  # type: ignore[index]
    assert offset > 500, "hundreds of scattered letters fit before it stops"


def test_nothing_left_in_place_always_fits() -> None:
    ledger = Ledger(0, Ranges())
    assert all(ledger.fits(o) for o in range(0, 100_000, 7))


def test_the_summary_says_what_was_left_and_how_to_reach_it() -> None:
    lines = Summary(scanned=5, moved=2, filtered_out=2, refused=1, group="g.replay").lines()
    assert "left 3 in place: group g.replay reads them again on its next run" in lines[-1]
    assert not any("left" in line for line in Summary(scanned=2, filtered_out=2, dry_run=True).lines()[2:])


def test_on_a_broker_that_keeps_no_commit_metadata_nothing_is_handled_past_a_letter_left() -> None:
    ledger = Ledger(0, Ranges(), budget=0)
    ledger.mark(0, handled=True)
    assert ledger.fits(1), "nothing left yet: the commit moves past it"
    ledger.mark(1, handled=False)
    assert not ledger.fits(2)
    lines = Summary(stopped={0: 2}, metadata_kept=False).lines()
    assert "partition 0: stopped at offset 2, as this broker keeps no commit metadata" in lines[-1]
