"""worker/inflight.py: partition watermarks, the in-flight window, per-document ordering."""

from __future__ import annotations

import pytest
from aiokafka import TopicPartition
from hypothesis import given
from hypothesis import strategies as st

from worker.decode import DocumentEvent
from worker.inflight import InFlight, Job, PartitionOffsets
from worker.types import Record

TOPIC = "docs"
P0, P1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)


def record(offset: int, partition: int = 0, size: int = 10) -> Record:
    return Record(TOPIC, partition, offset, b"k", b"v", (), size)


def event(doc_id: str, version: int | None = None) -> DocumentEvent:
    return DocumentEvent(doc_id, "upsert", f"text of {doc_id}", version, None, None)


# -- PartitionOffsets ----------------------------------------------------------------------------


def test_no_watermark_before_any_record() -> None:
    offsets = PartitionOffsets()
    assert offsets.watermark() is None
    assert len(offsets) == 0


def test_watermark_waits_for_the_lowest_unfinished_offset() -> None:
    offsets = PartitionOffsets()
    for o in (5, 6, 7):
        offsets.add(o)
    assert offsets.watermark() == 5
    offsets.finish(7)
    offsets.finish(6)
    assert offsets.watermark() == 5, "6 and 7 are done but 5 is not"
    assert len(offsets) == 3
    offsets.finish(5)
    assert offsets.watermark() == 8
    assert len(offsets) == 0


def test_watermark_skips_gaps_in_the_offsets() -> None:
    offsets = PartitionOffsets()  # a compacted topic: offsets 10, 13, 20
    for o in (10, 13, 20):
        offsets.add(o)
    offsets.finish(10)
    assert offsets.watermark() == 13
    offsets.finish(20)
    assert offsets.watermark() == 13
    offsets.finish(13)
    assert offsets.watermark() == 21


@st.composite
def fetches_and_finishes(draw: st.DrawFn) -> tuple[list[int], list[tuple[str, int]]]:
    """Increasing offsets (with gaps), and an interleaving of their adds (in order) and finishes
    (in any order, each after its add)."""
    start = draw(st.integers(0, 1000))
    gaps = draw(st.lists(st.integers(1, 3), min_size=1, max_size=40))
    offsets = [start + sum(gaps[:i]) for i in range(len(gaps))]
    added: list[int] = []
    unfinished: list[int] = []
    steps: list[tuple[str, int]] = []
    while len(added) < len(offsets) or unfinished:
        can_add = len(added) < len(offsets)
        if can_add and (not unfinished or draw(st.booleans())):
            offset = offsets[len(added)]
            added.append(offset)
            unfinished.append(offset)
            steps.append(("add", offset))
        else:
            offset = unfinished.pop(draw(st.integers(0, len(unfinished) - 1)))
            steps.append(("finish", offset))
    return offsets, steps


@given(fetches_and_finishes())
def test_watermark_is_the_smallest_unfinished_offset_or_one_past_the_last(
    case: tuple[list[int], list[tuple[str, int]]],
) -> None:
    _, steps = case
    offsets = PartitionOffsets()
    added: list[int] = []
    finished: set[int] = set()
    for kind, offset in steps:
        if kind == "add":
            offsets.add(offset)
            added.append(offset)
        else:
            offsets.finish(offset)
            finished.add(offset)
        unfinished = [o for o in added if o not in finished]
        expected = min(unfinished) if unfinished else added[-1] + 1
        assert offsets.watermark() == expected
        # Everything below the watermark is finished: committing it never skips a record.
        assert all(o in finished for o in added if o < expected)
    assert offsets.watermark() == added[-1] + 1
    assert len(offsets) == 0


# -- the window --------------------------------------------------------------------------------


def test_window_is_full_at_its_record_limit_and_drained_below_half() -> None:
    window = InFlight(max_records=4, max_bytes=10_000)
    records = [record(o) for o in range(4)]
    assert window.empty and not window.full and window.drained_enough
    for r in records[:3]:
        window.track(r)
    assert (window.records, window.full) == (3, False)
    window.track(records[3])
    assert (window.records, window.full, window.drained_enough) == (4, True, False)
    window.finish(records[0])
    assert (window.full, window.drained_enough) == (False, False)
    window.finish(records[1])
    assert window.drained_enough is False, "2 of 4 is not below half"
    window.finish(records[2])
    assert window.drained_enough is True
    window.finish(records[3])
    assert window.empty and window.records == 0 and window.bytes == 0


def test_window_is_full_at_its_byte_limit_and_drained_below_half() -> None:
    window = InFlight(max_records=1000, max_bytes=1024)
    big = [record(o, size=300) for o in range(4)]
    for r in big[:3]:
        window.track(r)
    assert (window.bytes, window.full) == (900, False)
    window.track(big[3])
    assert (window.bytes, window.full) == (1200, True)
    window.finish(big[0])
    window.finish(big[1])
    assert (window.bytes, window.full, window.drained_enough) == (600, False, False)
    window.finish(big[2])
    assert (window.bytes, window.drained_enough) == (300, True)


def test_a_record_larger_than_the_byte_window_fills_it_alone_and_drains() -> None:
    window = InFlight(max_records=1000, max_bytes=1024)
    huge = record(0, size=5000)
    window.track(huge)
    assert window.full
    window.finish(huge)
    assert window.drained_enough and window.empty


@pytest.mark.parametrize("max_records", [2, 3, 5])
def test_an_emptied_window_is_always_drained_enough(max_records: int) -> None:
    window = InFlight(max_records=max_records, max_bytes=1024)
    records = [record(o) for o in range(max_records)]
    for r in records:
        window.track(r)
    assert window.full
    for r in records:
        window.finish(r)
    assert window.empty
    assert window.drained_enough, "paused partitions must resume once nothing is in flight"


def test_an_emptied_window_of_one_record_is_drained_enough() -> None:
    window = InFlight(max_records=1, max_bytes=1024)
    r = record(0)
    window.track(r)
    assert window.full
    window.finish(r)
    assert window.empty
    assert window.drained_enough


def test_watermarks_per_partition() -> None:
    window = InFlight(max_records=100, max_bytes=10_000)
    assert window.watermarks() == {}
    a, b, c = record(0), record(1), record(100, partition=1)
    for r in (a, b, c):
        window.track(r)
    assert window.watermarks() == {P0: 0, P1: 100}
    window.finish(b)
    window.finish(c)
    assert window.watermarks() == {P0: 0, P1: 101}
    window.finish(a)
    assert window.watermarks() == {P0: 2, P1: 101}


# -- per-document ordering ----------------------------------------------------------------------


def test_a_document_without_a_running_job_starts_one_at_once() -> None:
    window = InFlight(max_records=100, max_bytes=10_000)
    r = record(0)
    window.track(r)
    job = window.route(r, event("a"))
    assert job is not None
    assert (job.doc_id, job.records) == ("a", [r])


def test_events_behind_a_running_job_wait_and_fold_into_the_next_job() -> None:
    window = InFlight(max_records=100, max_bytes=10_000)
    records = [record(o) for o in range(5)]
    for r in records:
        window.track(r)
    first = window.route(records[0], event("a", 1))
    assert first is not None
    assert window.route(records[1], event("a", 2)) is None
    other = window.route(records[2], event("b", 1))
    assert other is not None, "another document is not held back"
    assert window.route(records[3], event("a", 3)) is None
    assert window.route(records[4], event("b", 2)) is None

    following = window.complete(first)
    assert following is not None
    assert following.doc_id == "a"
    assert following.records == [records[1], records[3]], "waiting events fold, in order"
    assert [e.version for _, e in following.events] == [2, 3]
    assert window.watermarks() == {P0: 1}
    assert window.records == 4

    # The folded job is now the running one: a new event of `a` waits behind it.
    late = record(5)
    window.track(late)
    assert window.route(late, event("a", 4)) is None
    then = window.complete(following)
    assert then is not None and then.records == [late]
    assert window.complete(then) is None
    assert window.watermarks() == {P0: 2}, "b's records (2 and 4) are still in flight"

    b_next = window.complete(other)
    assert b_next is not None and b_next.records == [records[4]]
    assert window.complete(b_next) is None
    assert window.empty
    assert window.watermarks() == {P0: 6}


def test_a_document_can_start_again_after_its_last_job_completes() -> None:
    window = InFlight(max_records=100, max_bytes=10_000)
    r0, r1 = record(0), record(1)
    window.track(r0)
    job = window.route(r0, event("a"))
    assert job is not None
    assert window.complete(job) is None
    window.track(r1)
    again = window.route(r1, event("a"))
    assert again is not None and again.records == [r1]


@st.composite
def routing_runs(draw: st.DrawFn) -> list[tuple[str, int]]:
    """Steps: ("event", doc index) admits an event; ("complete", n) completes the n-th running job."""
    steps: list[tuple[str, int]] = []
    for _ in range(draw(st.integers(1, 60))):
        if draw(st.booleans()):
            steps.append(("event", draw(st.integers(0, 3))))
        else:
            steps.append(("complete", draw(st.integers(0, 10))))
    return steps


@given(routing_runs())
def test_routing_keeps_each_document_in_order_with_one_job_at_a_time(steps: list[tuple[str, int]]) -> None:
    window = InFlight(max_records=10_000, max_bytes=10**9)
    running: list[Job] = []  # jobs handed out and not yet completed
    admitted: dict[str, list[int]] = {}
    processed: dict[str, list[int]] = {}
    offset = 0

    def start(job: Job | None) -> None:
        if job is None:
            return
        assert all(j.doc_id != job.doc_id for j in running), "two jobs of one document at once"
        running.append(job)

    def complete(job: Job) -> None:
        running.remove(job)
        processed.setdefault(job.doc_id, []).extend(r.offset for r in job.records)
        start(window.complete(job))

    for kind, n in steps:
        if kind == "event":
            doc_id = "abcd"[n]
            r = record(offset)
            offset += 1
            window.track(r)
            admitted.setdefault(doc_id, []).append(r.offset)
            start(window.route(r, event(doc_id)))
        elif running:
            complete(running[n % len(running)])
    while running:
        complete(running[0])

    assert window.empty
    assert processed == admitted, "every event processed once, each document's in admission order"
    assert window.watermarks() == ({P0: offset} if offset else {})


def test_a_document_whose_events_span_two_partitions_cannot_be_kept_apart() -> None:
    window = InFlight(max_records=10, max_bytes=1000)
    running = window.route(record(0, partition=0), event("d"))
    assert running is not None
    assert window.route(record(100, partition=1), event("d")) is None  # waits behind the running job
    window.track(record(0, partition=0))
    window.track(record(100, partition=1))
    assert window.spans({P0}) and window.spans({P1}), "its running and waiting jobs are one document"
    assert not window.spans({P0, P1})
