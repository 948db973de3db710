"""The Worker owns the lifecycle: fetch a batch, decode, plan, chunk, embed, store, commit.

Nothing else starts tasks behind its back. ``stop()`` only sets an event; every wait races it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from aiokafka import TopicPartition

from worker import metrics
from worker.chunk import Chunk, chunk_text
from worker.consume import Record, RecordSource
from worker.decode import DocumentEvent, decode_event
from worker.dlq import DeadLetter, DeadLetterSink
from worker.embed import Embedder, Vector
from worker.errors import ChunkError, InputRejected, RecordError
from worker.logs import trace_id_from
from worker.plan import plan
from worker.retry import ShuttingDown, backoff, call_with_retry, is_retriable, sleep_unless
from worker.settings import Settings
from worker.store import DocumentStore, DocumentWrite, Source

log = structlog.get_logger()

MAX_CHUNKS_PER_DOCUMENT = 10_000


@dataclass(frozen=True, slots=True)
class BatchResult:
    records: int
    written: int
    stale: int
    dead: int
    chunks: int


class Worker:
    def __init__(
        self,
        *,
        source: RecordSource,
        store: DocumentStore,
        embedder: Embedder,
        dead_letters: DeadLetterSink,
        settings: Settings,
        stop_when_idle: float | None = None,
    ) -> None:
        self._source = source
        self._store = store
        self._embedder = embedder
        self._dead_letters = dead_letters
        self._settings = settings
        self._stop_when_idle = stop_when_idle
        self._stop = asyncio.Event()
        self._batch: asyncio.Task[BatchResult] | None = None
        self._failures = 0
        self.records_done = 0
        self.heartbeat = time.monotonic()
        self.last_error: str | None = None

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def assignment(self) -> set[TopicPartition]:
        return self._source.assignment()

    def lag(self) -> int | None:
        return self._source.lag()

    async def run(self) -> None:
        self._source.on_rebalance(revoked=self._on_revoked, assigned=self._on_assigned)
        await self._source.start()
        log.info(
            "worker_started", topics=list(self._settings.kafka_topic), group=self._settings.kafka_group_id
        )
        last_arrival = time.monotonic()
        try:
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                records = await self._fetch()
                if records:
                    last_arrival = time.monotonic()
                    await self._run_batch(records)
                elif self._idle_for(last_arrival):
                    log.info("worker_idle", seconds=self._stop_when_idle)
                    break
        finally:
            await self._finish_in_flight()
            await self._source.commit()
            await self._source.stop()
            log.info("worker_stopped", records=self.records_done)

    async def _fetch(self) -> list[Record]:
        fetch = asyncio.ensure_future(self._source.fetch(max_wait=0.5))
        stop = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({fetch, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not fetch.done():
            fetch.cancel()
            await asyncio.gather(fetch, return_exceptions=True)
            return []
        return fetch.result()

    def _idle_for(self, last_arrival: float) -> bool:
        if self._stop_when_idle is None:
            return False
        return time.monotonic() - last_arrival >= self._stop_when_idle and self._source.caught_up()

    async def _run_batch(self, records: list[Record]) -> None:
        self._batch = asyncio.create_task(self._process(records), name="batch")
        stopping = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait({self._batch, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        await self._finish_in_flight()  # returns at once unless stopping: then grace, then abandon
        batch, self._batch = self._batch, None
        if batch.cancelled():
            return  # abandoned by a revoke: the partitions' new owner re-processes
        exc = batch.exception()
        if exc is None:
            self._failures = 0
            self.last_error = None
            await self._source.commit()
            return
        if isinstance(exc, ShuttingDown):
            self._rewind(records)
            return
        self._failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        event = "batch_retry" if is_retriable(exc) else "batch_failed"
        log.warning(
            event,
            error_class=type(exc).__name__,
            error=str(exc)[:500],
            attempt=self._failures,
            exc_info=not isinstance(exc, RecordError) and not is_retriable(exc),
        )
        self._rewind(records)
        with contextlib.suppress(ShuttingDown):
            await sleep_unless(self._stop, backoff(self._failures, initial=0.5, cap=30.0))

    def _rewind(self, records: Sequence[Record]) -> None:
        first: dict[TopicPartition, int] = {}
        for r in records:
            first.setdefault(r.tp, r.offset)
        self._source.rewind(first)

    async def _finish_in_flight(self) -> None:
        """Let the in-flight batch finish within the grace period; past it, abandon (cancel) it."""
        batch = self._batch
        if batch is None or batch.done():
            return
        await asyncio.wait({batch}, timeout=self._settings.shutdown_grace_seconds)
        if not batch.done():
            batch.cancel()
            await asyncio.wait({batch})
            log.warning(
                "batch_abandoned", reason="grace period over", seconds=self._settings.shutdown_grace_seconds
            )

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        # Finish (or, past the grace period, abandon) the in-flight batch before the group moves on;
        # the source then commits what is stored for the revoked partitions.
        await self._finish_in_flight()

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        return None

    # -- one batch ------------------------------------------------------------------------

    async def _process(self, records: list[Record]) -> BatchResult:
        started = time.perf_counter()
        dead: list[DeadLetter] = []
        decoded: list[tuple[Record, DocumentEvent]] = []
        for record in records:
            try:
                event = decode_event(record.key, record.value, max_text_bytes=self._settings.max_text_bytes)
            except RecordError as exc:
                dead.append(_letter(record, exc))
            else:
                decoded.append((record, event))

        stored = await call_with_retry(
            lambda: self._store.read_states(sorted({e.doc_id for _, e in decoded})),
            stop=self._stop,
            attempts=3,
        )
        changes = plan((e for _, e in decoded), stored)
        record_of = {id(e): r for r, e in decoded}

        chunked: list[tuple[DocumentWrite, list[Chunk]]] = []
        texts: list[str] = []
        for change in changes:
            record = record_of[id(change.event)]
            chunks: list[Chunk] = []
            if not change.after.deleted:
                try:
                    chunks = self._chunk(change.event)
                except ChunkError as exc:
                    dead.append(_letter(record, exc))
                    continue
            texts.extend(c.content for c in chunks)
            source = Source(record.topic, record.partition, record.offset)
            chunked.append((DocumentWrite(change, source, chunks, ()), chunks))

        vectors = await self._embed(texts)
        writes: list[DocumentWrite] = []
        position = 0
        for draft, chunks in chunked:
            mine = vectors[position : position + len(chunks)]
            position += len(chunks)
            rejected = next((v for v in mine if isinstance(v, InputRejected)), None)
            if rejected is not None:
                dead.append(_letter(record_of[id(draft.change.event)], rejected))
                continue
            embeddings = [v for v in mine if not isinstance(v, InputRejected)]
            writes.append(DocumentWrite(draft.change, draft.source, chunks, embeddings))

        await call_with_retry(lambda: self._store.write(writes), stop=self._stop, attempts=3)
        await call_with_retry(lambda: self._dead_letters.send(dead), stop=self._stop, attempts=3)

        next_offsets: dict[TopicPartition, int] = {}
        for record in records:
            next_offsets[record.tp] = max(next_offsets.get(record.tp, 0), record.offset + 1)
        self._source.mark_stored(next_offsets)

        result = BatchResult(
            records=len(records),
            written=len(writes),
            stale=len(decoded) - len(changes),
            dead=len(dead),
            chunks=sum(len(w.chunks) for w in writes),
        )
        self._count(records, result, writes)
        seconds = time.perf_counter() - started
        metrics.BATCH_SECONDS.observe(seconds)
        log.info(
            "batch_stored",
            records=result.records,
            documents=result.written,
            chunks=result.chunks,
            stale=result.stale,
            dead_lettered=result.dead,
            partitions=len(next_offsets),
            seconds=round(seconds, 4),
        )
        for letter in dead:
            log.warning(
                "record_dead_lettered",
                topic=letter.topic,
                partition=letter.partition,
                offset=letter.offset,
                stage=letter.error.stage,
                error_class=type(letter.error).__name__,
                error=str(letter.error)[:300],
                trace_id=trace_id_from(letter.headers),
            )
        return result

    def _chunk(self, event: DocumentEvent) -> list[Chunk]:
        chunks = chunk_text(event.text, size=self._settings.chunk_size, overlap=self._settings.chunk_overlap)
        if len(chunks) > MAX_CHUNKS_PER_DOCUMENT:
            raise ChunkError(f"document yields {len(chunks)} chunks, more than {MAX_CHUNKS_PER_DOCUMENT}")
        return chunks

    async def _embed(self, texts: list[str]) -> list[Vector | InputRejected]:
        """Embed all texts in requests of EMBEDDING_BATCH_SIZE, concurrently; isolate rejected inputs."""
        size = self._settings.embedding_batch_size
        slices = [(i, texts[i : i + size]) for i in range(0, len(texts), size)]
        results: list[Vector | InputRejected] = [InputRejected("not embedded")] * len(texts)
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [(start, group.create_task(self._embed_isolating(part))) for start, part in slices]
        except ExceptionGroup as failed:  # report the cause itself (an outage), not the group
            raise failed.exceptions[0] from None
        for start, task in tasks:
            results[start : start + len(task.result())] = task.result()
        return results

    async def _embed_isolating(self, texts: list[str]) -> list[Vector | InputRejected]:
        try:
            vectors = await call_with_retry(lambda: self._embedder.embed(texts), stop=self._stop, attempts=5)
        except InputRejected as exc:
            if len(texts) == 1:
                return [exc]
            half = len(texts) // 2
            left = await self._embed_isolating(texts[:half])
            right = await self._embed_isolating(texts[half:])
            return left + right
        return list(vectors)

    def _count(self, records: list[Record], result: BatchResult, writes: list[DocumentWrite]) -> None:
        self.records_done += result.records
        by_topic: dict[str, int] = defaultdict(int)
        for record in records:
            by_topic[record.topic] += 1
        for w in writes:
            metrics.DOCUMENTS_WRITTEN.labels(op="delete" if w.change.after.deleted else "upsert").inc()
        metrics.CHUNKS_WRITTEN.inc(result.chunks)
        for topic, count in by_topic.items():
            metrics.RECORDS.labels(topic=topic, outcome="seen").inc(count)
        metrics.RECORDS.labels(topic=records[0].topic, outcome="dead_lettered").inc(result.dead)


def _letter(record: Record, error: RecordError) -> DeadLetter:
    return DeadLetter(
        record.topic, record.partition, record.offset, record.key, record.value, record.headers, error
    )
