"""What is in flight: per-partition watermarks, per-document ordering, the window's size, and the
embeddings being bought.

Records of one partition finish out of order; the partition's commit watermark is the lowest
offset not yet finished (stored or dead-lettered), so committing it never skips a record.
Events of one document never run together: a document's later events wait until its running
job finishes, then run as one job (folded, so only the winner is embedded).
(Embeddings being bought are shared through worker.purchases.)
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from aiokafka import TopicPartition

from worker.decode import DocumentEvent
from worker.tracing import trace_of
from worker.types import Record


class PartitionOffsets:
    """Offsets handed out in fetch order, finished in any order; the watermark is contiguous."""

    __slots__ = ("_done", "_next", "_order")

    def __init__(self) -> None:
        self._order: deque[int] = deque()
        self._done: set[int] = set()
        self._next: int | None = None

    def add(self, offset: int) -> None:
        self._order.append(offset)
        self._next = offset + 1

    def finish(self, offset: int) -> None:
        self._done.add(offset)
        while self._order and self._order[0] in self._done:
            self._done.discard(self._order.popleft())

    def watermark(self, also: frozenset[int] = frozenset()) -> int | None:
        """The next offset to commit: everything below it is finished (or in ``also``, offsets
        about to finish). None before any record."""
        for offset in self._order:
            if offset not in self._done and offset not in also:
                return offset
        return self._next

    @property
    def next_offset(self) -> int | None:
        """One past the last offset handed out (None before any)."""
        return self._next

    def __len__(self) -> int:
        return len(self._order)


@dataclass(eq=False)
class Job:
    """One document's pending events (partition order), processed and finished together."""

    doc_id: str
    events: list[tuple[Record, DocumentEvent]] = field(default_factory=list)
    admitted: float = field(default_factory=time.time)  # wall clock: its first record's admission
    trace_id: str = ""  # its first record's (worker.tracing)
    parent_span_id: str | None = None

    def __post_init__(self) -> None:
        if not self.trace_id and self.events:
            self.trace_id, self.parent_span_id = trace_of(self.events[0][0])

    @property
    def records(self) -> list[Record]:
        return [r for r, _ in self.events]


class InFlight:
    def __init__(self, *, max_records: int, max_bytes: int) -> None:
        self.max_records = max_records
        self.max_bytes = max_bytes
        self.records = 0
        self.bytes = 0
        self._offsets: dict[TopicPartition, PartitionOffsets] = {}
        self._running: dict[str, Job] = {}
        self._waiting: dict[str, Job] = {}

    # -- the window -------------------------------------------------------------------------

    def admitted(self, record: Record) -> bool:
        """This record (or a later one of its partition) was admitted already: a fetch that raced
        a rebalance handed it out twice."""
        offsets = self._offsets.get(record.tp)
        return offsets is not None and offsets.next_offset is not None and record.offset < offsets.next_offset

    def track(self, record: Record) -> None:
        self._offsets.setdefault(record.tp, PartitionOffsets()).add(record.offset)
        self.records += 1
        self.bytes += record.size

    def finish(self, record: Record) -> None:
        self._offsets[record.tp].finish(record.offset)
        self.records -= 1
        self.bytes -= record.size

    @property
    def full(self) -> bool:
        return self.records >= self.max_records or self.bytes >= self.max_bytes

    @property
    def drained_enough(self) -> bool:
        """Below half the window: paused partitions may resume."""
        return self.records < max(1, self.max_records // 2) and self.bytes < max(1, self.max_bytes // 2)

    @property
    def empty(self) -> bool:
        return self.records == 0

    @property
    def jobs(self) -> int:
        """Documents in flight: each one's running job, and the one waiting behind it."""
        return len(self._running) + len(self._waiting)

    def watermarks(self, also: Iterable[Record] = ()) -> dict[TopicPartition, int]:
        """Each partition's watermark; with ``also``, as it will be once those records finish."""
        finishing: dict[TopicPartition, set[int]] = {}
        for record in also:
            finishing.setdefault(record.tp, set()).add(record.offset)
        marks = {
            tp: offsets.watermark(frozenset(finishing.get(tp, ()))) for tp, offsets in self._offsets.items()
        }
        return {tp: mark for tp, mark in marks.items() if mark is not None}

    def partitions(self) -> dict[TopicPartition, int]:
        """Each partition records were admitted from, with the next offset after the last one."""
        return {tp: o.next_offset for tp, o in self._offsets.items() if o.next_offset is not None}

    def spans(self, partitions: set[TopicPartition]) -> bool:
        """A document's pending events (its running and its waiting job together) come from some
        of ``partitions`` and from others too."""
        for doc_id, running in self._running.items():
            waiting = self._waiting.get(doc_id)
            records = running.records + (waiting.records if waiting is not None else [])
            if len({r.tp in partitions for r in records}) > 1:
                return True
        return False

    def tracks(self, tp: TopicPartition) -> bool:
        return tp in self._offsets

    def forget(self, partitions: set[TopicPartition]) -> set[Job]:
        """Give up ``partitions`` (another member owns them now): their records leave the window
        unfinished, and their watermarks go. Returns their jobs, which must finish nowhere."""
        gone: set[Job] = set()
        for table in (self._running, self._waiting):
            for doc_id, job in list(table.items()):
                if job.records[0].tp in partitions:
                    gone.add(job)
                    del table[doc_id]
                    self.records -= len(job.records)
                    self.bytes -= sum(r.size for r in job.records)
        for tp in partitions:
            self._offsets.pop(tp, None)
        return gone

    # -- per-document ordering ---------------------------------------------------------------

    def route(self, record: Record, event: DocumentEvent) -> Job | None:
        """Queue the event behind its document's running job, or return a new job to start now."""
        if event.doc_id in self._running:
            if (waiting := self._waiting.get(event.doc_id)) is not None:
                waiting.events.append((record, event))
            else:
                self._waiting[event.doc_id] = Job(event.doc_id, [(record, event)])
            return None
        job = Job(event.doc_id, [(record, event)])
        self._running[event.doc_id] = job
        return job

    def complete(self, job: Job) -> Job | None:
        """Finish ``job``'s records; return the document's next job (its waiting events), if any."""
        for record in job.records:
            self.finish(record)
        del self._running[job.doc_id]
        following = self._waiting.pop(job.doc_id, None)
        if following is not None:
            self._running[job.doc_id] = following
        return following
