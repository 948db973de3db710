"""The store stage: a batch of prepared documents written in one transaction, with how far each
partition got and this assignment's claim on it (worker.store does the SQL).

A document PostgreSQL refuses, or a write it keeps cancelling, is isolated by halving so that the
rest of the batch is stored. A write refused because another member claimed the partitions
(``Fenced``) stops all writing: the pipeline is a zombie's, and its new owner stores the rest.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

import structlog

from worker import metrics, tracing
from worker.dependency import Dependency
from worker.errors import Fenced, StaleRead, StoreRejected, WriteTimedOut
from worker.retry import ShuttingDown, isolate, sleep_unless
from worker.store import DocumentStore, DocumentWrite, Progress
from worker.tracing import DocumentTimes
from worker.types import Record, TopicPartition

if TYPE_CHECKING:
    from worker.inflight import Job
    from worker.pipeline import Prepared

log = structlog.get_logger()

TRACE_IDS_SHOWN = 20  # trace ids a batch_stored line lists at most

Watermarks = Callable[[Iterable[Record]], Mapping[TopicPartition, int]]


class Writer:
    def __init__(
        self,
        store: DocumentStore,
        database: Dependency,
        stop: asyncio.Event,
        *,
        watermarks: Watermarks,
        stored: Callable[[Prepared], None],
        moved: Callable[[Prepared], None],
        refused: Callable[[Prepared, StoreRejected], None],
        in_flight: Callable[[], int],
    ) -> None:
        self._store = store
        self._database = database
        self._stop = stop
        self._watermarks = watermarks  # each partition's, as it will be once these records finish
        self._stored, self._moved, self._refused = stored, moved, refused
        self._in_flight = in_flight
        self.epoch: int | None = None  # this assignment's claim on its partitions (set by the Worker)
        self.fenced = False  # another member claimed them: nothing more is written
        self.failure: str | None = None  # a one-document write the database keeps cancelling
        self._timeouts = 0

    async def write(self, batch: list[Prepared]) -> None:
        if batch:
            await isolate(batch, self._once, faults=(StoreRejected, WriteTimedOut), alone=self._alone)

    async def _once(self, batch: list[Prepared]) -> list[None]:
        """One write of ``batch``; every line logged meanwhile (a retry, a timeout, a fence) carries
        its documents' trace ids."""
        with structlog.contextvars.bound_contextvars(trace_ids=_trace_ids(batch)):
            return await self._write(batch)

    async def _write(self, batch: list[Prepared]) -> list[None]:
        if self.fenced:
            return [None] * len(batch)  # abandoned: the partitions' new owner stores them
        writes = [DocumentWrite(p.change, p.record, p.chunks, p.vectors) for p in batch]
        records = [r for p in batch for r in p.job.records]
        touched = {r.tp for r in records}  # only these partitions' rows: writers lock no more
        progress = Progress(  # the database records how far it got, in the write's own transaction
            before={tp: m for tp, m in self._watermarks(()).items() if tp in touched},
            after={tp: m for tp, m in self._watermarks(records).items() if tp in touched},
            epoch=self.epoch,
        )
        started, began = time.perf_counter(), time.time()
        try:
            moved = await self._database.call(lambda: self._store.write(writes, progress))
        except Fenced as exc:
            self.fenced = True
            log.warning("write_fenced", documents=len(batch), error=str(exc)[:300])
            return [None] * len(batch)
        except StaleRead:
            moved = {p.job.doc_id for p in batch}
        except WriteTimedOut as exc:
            log.warning("write_timed_out", documents=len(batch), error=str(exc)[:300])
            raise
        stored = [p for p in batch if p.job.doc_id not in moved]
        for p in batch:
            (self._moved if p.job.doc_id in moved else self._stored)(p)
        self._timeouts, self.failure = 0, None
        seconds = time.perf_counter() - started
        metrics.BATCH_SECONDS.observe(seconds)
        chunks = sum(len(p.chunks) for p in stored)
        log.info(
            "batch_stored",
            documents=len(stored),
            chunks=chunks,
            bytes=sum(r.size for p in stored for r in p.job.records),
            offsets=_offset_ranges([p.job for p in stored]),
            replanned=len(moved),
            in_flight=self._in_flight(),
            seconds=round(seconds, 4),
            stage_seconds=_stage_seconds(stored, began),
            trace_ids=_trace_ids(stored),
        )
        if tracing.enabled():
            times = [
                DocumentTimes(
                    p.job.doc_id,
                    p.job.trace_id,
                    p.job.parent_span_id,
                    p.record,
                    len(p.chunks),
                    p.job.admitted,
                    p.prepared,
                    p.embedded,
                )
                for p in stored
            ]
            tracing.batch_stored(times, began, began + seconds, chunks=chunks)
        return [None] * len(batch)

    async def _alone(self, p: Prepared, exc: Exception) -> None:
        """One document at fault: refused, it is dead-lettered. Cancelled by the database
        (statement_timeout), it is retried until it fits while /readyz says writes are failing:
        the limit is the database's, not the record's fault."""
        if isinstance(exc, StoreRejected):
            self._refused(p, exc)
            return
        self._timeouts += 1
        self.failure = str(exc)[:300]
        try:
            await sleep_unless(self._stop, self._database.backoff(self._timeouts, initial=1.0, cap=30.0))
        except ShuttingDown:
            return
        await self.write([p])


def _offset_ranges(jobs: Sequence[Job]) -> dict[str, str]:
    """``{"topic/partition": "first-last"}`` over the records of ``jobs``, for a log line."""
    spans: dict[str, tuple[int, int]] = {}
    for job in jobs:
        for record, _ in job.events:
            where = f"{record.topic}/{record.partition}"
            low, high = spans.get(where, (record.offset, record.offset))
            spans[where] = (min(low, record.offset), max(high, record.offset))
    return {where: f"{low}-{high}" for where, (low, high) in sorted(spans.items())}


def _stage_seconds(batch: list[Prepared], began: float) -> dict[str, float]:
    """The longest time a document of ``batch`` spent in each stage before its write: waiting and
    being prepared (planned, chunked), being embedded, and waiting for a writer."""
    if not batch:
        return {}
    return {
        "prepare": round(max(p.prepared - p.job.admitted for p in batch), 4),
        "embed": round(max(p.embedded - p.prepared for p in batch), 4),
        "write_wait": round(max(began - p.embedded for p in batch), 4),
    }


def _trace_ids(batch: list[Prepared]) -> list[str]:
    return sorted({p.job.trace_id for p in batch})[:TRACE_IDS_SHOWN]
