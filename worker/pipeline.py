"""The stages between fetching and committing, for one assignment of partitions.

    admit (decode, order by document) -> prepare (plan, chunk, reuse known embeddings)
      -> embed (requests filled across documents) -> store (one transaction per batch)
    and, beside them, dead letters.

Stages are joined by asyncio queues; the in-flight window (records and bytes) bounds what the
queues can hold, because the Worker pauses fetching while it is full. A dependency outage
holds work in place (retried with backoff, never dead-lettered, never committed); a record
that can never succeed goes to the dead-letter topic and its partition goes on. Embeddings are
bought through the process's purchases (worker.purchases), which outlive the pipeline.

On a revoke it stores what is ready and holds the rest (``settle``); given partitions again, it
drops the documents of those it lost and goes on with the rest (``keep_only``, ``resume``),
without waiting on the embedding API at any point. On a stop it is closed after ``settle``:
what it had paid for is kept in the ledger.
"""

from __future__ import annotations

import asyncio
import functools
import time
import weakref
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

import structlog

from worker import metrics
from worker.chunk import Chunk, chunk_document
from worker.decode import decode_event
from worker.dependency import Dependencies
from worker.dlq import DeadLetter, DeadLetterSink, log_sent
from worker.errors import (
    ChunkError,
    RecordError,
    StoreRejected,
)
from worker.inflight import InFlight, Job
from worker.plan import Change, plan
from worker.purchases import Purchase, Purchases, vectors_of
from worker.retry import ShuttingDown, wait_within
from worker.settings import Settings
from worker.stages import gather, stage_loop
from worker.store import DocumentStore
from worker.tokens import TokenCounter
from worker.types import Record, TopicPartition, Vector
from worker.writer import Writer

log = structlog.get_logger()
T = TypeVar("T")

# The fewest documents a writer takes while more are ready (see Pipeline._write_share): a write
# transaction's fixed cost (lock, documents, trim, offsets, commit) stays small beside its rows.
MIN_WRITE_SHARE = 32
WRITE_LINGER = 0.005  # seconds a writer waits for more documents to fill its share


@dataclass(eq=False)
class Prepared:
    """A job whose winning change is planned and chunked, waiting for (or holding) its vectors."""

    job: Job
    change: Change
    record: Record  # the record of the winning event
    chunks: list[Chunk]
    vectors: list[Vector] = field(default_factory=list)
    held: dict[bytes, Purchase] = field(default_factory=dict)  # purchases it waits for, by digest
    prepared: float = field(default_factory=time.time)  # wall clock: planned and chunked
    embedded: float = field(init=False)  # wall clock: its vectors all there (till then: prepared)

    def __post_init__(self) -> None:
        self.embedded = self.prepared

    @property
    def tenant(self) -> str | None:
        return self.change.event.tenant


@dataclass(eq=False)
class Dead:
    """A dead letter and the records it finishes (a job's, or one undecodable record)."""

    letter: DeadLetter
    job: Job | None  # None: one record that never became a job (it could not be decoded)


class Pipeline:
    def __init__(
        self,
        *,
        store: DocumentStore,
        purchases: Purchases,
        dead_letters: DeadLetterSink,
        settings: Settings,
        stop: asyncio.Event,
        dependencies: Dependencies,
    ) -> None:
        self._deps = dependencies
        self._store = store
        self._dead_letters = dead_letters
        self._settings = settings
        self._tokens = TokenCounter(settings.embedding_tokenizer)
        self._stop = stop
        self._inflight = InFlight(
            max_records=settings.max_in_flight_records, max_bytes=settings.max_in_flight_bytes
        )
        self._ready: asyncio.Queue[Job] = asyncio.Queue()
        self._embedded: asyncio.Queue[Prepared] = asyncio.Queue()
        self._dead: asyncio.Queue[Dead] = asyncio.Queue()
        self.purchases = purchases
        self._holding: set[Prepared] = set()  # documents holding purchases, let go of on close
        self._carried: dict[Job, list[Purchase]] = {}  # a re-planned job's, until it is prepared again
        self._intake = asyncio.Event()  # cleared by settle(): nothing more moves towards storing
        self._intake.set()
        self._output = asyncio.Event()  # cleared once settled: nothing is stored or dead-lettered
        self._output.set()
        self._settled = True
        # Jobs of partitions given up in flight: they finish nowhere (gone once nothing holds them).
        self._dropped: weakref.WeakSet[Job] = weakref.WeakSet()
        self._waits: set[asyncio.Task[None]] = set()
        self.failure: BaseException | None = None
        self.finished_records = 0
        self._claimed = 0  # documents writers have claimed (gathering) or hold (writing)
        self._writer = Writer(
            store,
            dependencies.database,
            stop,
            watermarks=lambda also: self._inflight.watermarks(also=also),
            stored=self._stored,
            moved=self._moved,
            refused=self._refused,
            in_flight=lambda: self._inflight.records,
        )
        most = settings.write_batch_documents
        stages = [
            ("prepare", stage_loop(self._ready, most, 0.002, self._prepare)),
            ("dead-letters", stage_loop(self._dead, 500, 0.002, self._send_dead_letters)),
        ]
        stages += [(f"store-{n}", self._write_loop()) for n in range(settings.database_writers)]
        self._stages = [asyncio.create_task(self._supervised(name, c), name=name) for name, c in stages]

    # -- the Worker's view: how full, how far, how it ends -----------------------------------

    @property
    def in_flight(self) -> int:
        """Records admitted and not finished."""
        return self._inflight.records

    @property
    def in_flight_bytes(self) -> int:
        """Bytes of the records admitted and not finished."""
        return self._inflight.bytes

    def queue_depths(self) -> dict[str, int]:
        """What waits in each queue between the stages (the embedding stage's inputs aside)."""
        return {
            "decoded": self._ready.qsize(),
            "embedded": self._embedded.qsize(),
            "dead_letters": self._dead.qsize(),
        }

    @property
    def full(self) -> bool:
        """The in-flight window is full: fetching should pause."""
        return self._inflight.full

    @property
    def can_resume(self) -> bool:
        """Drained far enough below the window for fetching to resume without flapping."""
        return self._inflight.drained_enough

    @property
    def idle(self) -> bool:
        return self._inflight.empty

    def watermarks(self) -> dict[TopicPartition, int]:
        """Each partition's next offset below which every record is finished (committable)."""
        return self._inflight.watermarks()

    # -- intake (called by the Worker's fetch loop) ------------------------------------------

    def admit(self, record: Record) -> None:
        if self._inflight.admitted(record):
            return  # handed out twice by a fetch that raced a rebalance: in flight already
        self._inflight.track(record)
        try:
            event = decode_event(record.key, record.value, max_text_bytes=self._settings.max_text_bytes)
        except RecordError as exc:
            self._dead.put_nowait(Dead(DeadLetter(record, exc), None))
            return
        job = self._inflight.route(record, event)
        if job is not None:
            self._ready.put_nowait(job)

    @property
    def epoch(self) -> int | None:
        """This assignment's claim on its partitions (set by the Worker), checked by every write."""
        return self._writer.epoch

    @epoch.setter
    def epoch(self, epoch: int | None) -> None:
        self._writer.epoch = epoch

    @property
    def fenced(self) -> bool:
        """Another member claimed the partitions: nothing more is written."""
        return self._writer.fenced

    @property
    def write_failure(self) -> str | None:
        """A one-document write the database keeps cancelling."""
        return self._writer.failure

    @property
    def suspended(self) -> bool:
        return not self._output.is_set()

    def partitions(self) -> dict[TopicPartition, int]:
        """The partitions it took records from, each with the next offset after the last one."""
        return self._inflight.partitions()

    async def settle(self, within: float) -> bool:
        """Store what is ready (documents with every vector, and dead letters), then hold the rest:
        nothing moves until ``resume`` (or ``close``), and nothing waits on the embedding API.
        False when ``within`` seconds ran out first."""
        if self.suspended:
            return self._settled  # settled on the revoke already: what came since waits
        self._intake.clear()
        ready = asyncio.gather(self._embedded.join(), self._dead.join())
        try:
            await wait_within(ready, within)
        except TimeoutError:
            self._settled = False
        else:
            self._settled = True
        self._output.clear()
        return self._settled

    def keep_only(self, partitions: set[TopicPartition]) -> int | None:
        """After ``settle``: drop the documents of every other partition (another member owns them
        now; what was paid for them stays bought), keep the rest in flight. Returns how many
        records were dropped; None when the rest cannot be kept apart (the pipeline must close)."""
        lost = set(self._inflight.partitions()) - partitions
        if self.fenced or not self._settled or self._inflight.spans(lost):
            return None
        before = self._inflight.records
        self._dropped.update(self._inflight.forget(lost))
        for job in [j for j in self._carried if j in self._dropped]:
            self.purchases.release(self._carried.pop(job), stored=False)
        return before - self._inflight.records

    def resume(self) -> None:
        """Go on after ``settle`` (and ``keep_only``), with ``epoch`` set to the new assignment's."""
        self._output.set()
        self._intake.set()

    async def close(self) -> None:
        """Abandon what is left (its offsets stay uncommitted), stop the stages, and let go of
        the purchases its documents held (what was sent stays bought: see worker.purchases)."""
        tasks = [*self._stages, *self._waits]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for p in list(self._holding):
            self._let_go(p, stored=False)
        for held in self._carried.values():
            self.purchases.release(held, stored=False)
        self._carried.clear()

    # -- stages --------------------------------------------------------------------------------

    async def _supervised(self, name: str, stage: Awaitable[None]) -> None:
        try:
            await stage
        except ShuttingDown:
            return
        except Exception as exc:  # noqa: BLE001 - supervision: any crash stops the worker, logged
            self._fail(name, exc)

    def _fail(self, stage: str, exc: Exception) -> None:
        """A bug or a misconfiguration, not an outage (those are waited out): stop, don't limp on."""
        log.error(
            "pipeline_stage_died",
            stage=stage,
            error_class=type(exc).__name__,
            error=str(exc)[:500],
            exc_info=exc,
        )
        if self.failure is None:
            self.failure = exc
        self._stop.set()

    async def _prepare(self, jobs: list[Job]) -> None:
        await self._intake.wait()
        jobs = [j for j in jobs if j not in self._dropped]  # (keep_only let go of what they carried)
        if not jobs:
            return
        prepared = await self._plan(jobs)
        await self._submit(prepared)
        for job in jobs:  # prepared again: what it held before is held anew, or not needed
            self.purchases.release(self._carried.pop(job, ()), stored=False)

    def _let_go(self, p: Prepared, *, stored: bool) -> None:
        self.purchases.release(p.held.values(), stored=stored)
        p.held = {}
        self._holding.discard(p)

    async def _plan(self, jobs: list[Job]) -> list[Prepared]:
        """Each job's winning change against the stored state, chunked; jobs that change nothing
        finish here, and a document that cannot be chunked is dead-lettered."""
        ids = sorted({job.doc_id for job in jobs})
        stored = await self._deps.database.call(lambda: self._store.read_states(ids))
        prepared: list[Prepared] = []
        for job in jobs:
            changes = plan(job.events, stored)
            if not changes:
                self._finish(job, outcome=None)
                continue
            [change] = changes
            record = next(r for r, e in job.events if e is change.event)
            try:
                chunks = (
                    []
                    if change.after.deleted
                    else chunk_document(change.event.text, self._settings, self._tokens)
                )
            except ChunkError as exc:
                self._dead.put_nowait(Dead(DeadLetter(record, exc), job))
                continue
            prepared.append(Prepared(job, change, record, chunks))
        return prepared

    async def _submit(self, prepared: list[Prepared]) -> None:
        """Ask for each chunk's vector (see Purchases.supply), and wait for them apart."""
        self._holding.update(prepared)
        lookup = self._store.known_embeddings
        wants = await self.purchases.supply(prepared, lambda h: self._deps.database.call(lambda: lookup(h)))
        for p, futures in zip(prepared, wants, strict=True):
            task = asyncio.create_task(self._await_vectors(p, futures), name="await-vectors")
            self._waits.add(task)
            task.add_done_callback(self._waits.discard)

    async def _await_vectors(self, p: Prepared, futures: list[asyncio.Future[Vector]]) -> None:
        try:
            p.vectors = await vectors_of(futures)
            p.embedded = time.time()
            await self._intake.wait()
        except RecordError as exc:  # rejected, or failed every attempt while the API was up
            await self._intake.wait()
            if p.job not in self._dropped:
                self._dead.put_nowait(Dead(DeadLetter(p.record, exc), p.job))
        except ShuttingDown:
            pass
        except Exception as exc:  # noqa: BLE001 - e.g. vectors of the wrong dimension: misconfiguration
            self._fail("embed", exc)
        else:
            if p.job not in self._dropped:
                self._embedded.put_nowait(p)
                return
        self._let_go(p, stored=False)

    async def _write_loop(self) -> None:
        """A writer: wait for a document, claim this writer's share of the unwritten ones, gather
        up to it within WRITE_LINGER, write them."""
        queue = self._embedded
        while True:
            batch = [await queue.get()]
            share = self._write_share()
            self._claimed += share
            try:
                await gather(queue, batch, share, linger=WRITE_LINGER)
            finally:
                self._claimed += len(batch) - share
            try:
                await self._write(batch)
            finally:
                self._claimed -= len(batch)
                for _ in batch:
                    queue.task_done()

    def _write_share(self) -> int:
        """How many documents a writer takes: its share of those in flight that no writer has
        claimed (guided self-scheduling), at least MIN_WRITE_SHARE, at most WRITE_BATCH_DOCUMENTS.
        A deep queue gives full batches; as a backlog drains, batches shrink so that the writers
        finish together, not one storing the last full batch alone while the others have nothing."""
        unclaimed = self._inflight.jobs - self._claimed
        share = -(-unclaimed // self._settings.database_writers)
        return min(self._settings.write_batch_documents, max(MIN_WRITE_SHARE, share))

    async def _write(self, batch: list[Prepared]) -> None:
        await self._output.wait()
        for p in [p for p in batch if p.job in self._dropped]:
            self._let_go(p, stored=False)
        await self._writer.write([p for p in batch if p.job not in self._dropped])

    def _stored(self, p: Prepared) -> None:
        self._let_go(p, stored=True)  # the store has them from now on
        metrics.DOCUMENTS_WRITTEN.labels(op="delete" if p.change.after.deleted else "upsert").inc()
        metrics.CHUNKS_WRITTEN.inc(len(p.chunks))
        self._finish(p.job, outcome="stored")

    def _moved(self, p: Prepared) -> None:
        """Changed under us since planning: plan again; its vectors stay for the next plan."""
        self._carried[p.job] = list(p.held.values())
        p.held = {}
        self._holding.discard(p)
        self._ready.put_nowait(p.job)

    def _refused(self, p: Prepared, exc: StoreRejected) -> None:
        self._let_go(p, stored=False)
        self._dead.put_nowait(Dead(DeadLetter(p.record, exc), p.job))

    async def _send_dead_letters(self, batch: list[Dead]) -> None:
        await self._output.wait()
        # not for a partition given up (forgotten), nor for a job dropped with one
        batch = [
            d
            for d in batch
            if self._inflight.tracks(d.letter.record.tp) and (d.job is None or d.job not in self._dropped)
        ]
        if not batch:
            return
        letters = [d.letter for d in batch]
        await self._deps.dead_letters.call(functools.partial(self._dead_letters.send, letters))
        log_sent(letters)
        for dead in batch:
            record = dead.letter.record
            if dead.job is None:
                metrics.RECORDS.labels(topic=record.topic, outcome="dead_lettered").inc()
                self._finish_record(record)
            else:
                self._finish(dead.job, outcome="dead_lettered")

    # -- helpers ---------------------------------------------------------------------------

    def _finish(self, job: Job, *, outcome: str | None) -> None:
        """Finish a job's records: the winner's ``outcome`` (stored, or dead-lettered: counted there);
        every other event of the job changed nothing (stale or superseded)."""
        if job in self._dropped:
            return  # its partition went to another member while it was in flight
        following = self._inflight.complete(job)
        self.finished_records += len(job.events)
        topic = job.events[0][0].topic
        if outcome is not None:
            metrics.RECORDS.labels(topic=topic, outcome=outcome).inc()
        metrics.RECORDS.labels(topic=topic, outcome="stale").inc(len(job.events) - (outcome is not None))
        if following is not None:
            self._ready.put_nowait(following)

    def _finish_record(self, record: Record) -> None:
        self._inflight.finish(record)
        self.finished_records += 1
