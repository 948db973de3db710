"""Small fakes of the Worker's own Protocols (RecordSource, DocumentStore, Embedder,
DeadLetterSink), the record builders, and ``rig()``, which wires them to a real Worker."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
from aiokafka import TopicPartition

from worker.chunk import chunk_text
from worker.consume import PartitionsCallback
from worker.dependency import Dependencies
from worker.dlq import DeadLetter
from worker.embedding import EmbeddingStage
from worker.errors import (
    BrokerUnavailable,
    DatabaseUnavailable,
    EmbeddingUnavailable,
    Fenced,
    InputRejected,
    StaleRead,
)
from worker.ledger import Ledger
from worker.pipeline import Pipeline
from worker.plan import DocState
from worker.purchases import Purchases
from worker.settings import Settings
from worker.store import DocumentWrite, Progress, sha256
from worker.types import Record, Vector
from worker.usage import Key, Tally, Usage
from worker.worker import Worker

TOPIC = "docs"
DIMS = 8
SIZE, OVERLAP = 40, 8
MODEL = "text-embedding-3-small"  # the settings' default
MARKER = "POISON"
P0, P1 = TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)
BASE_OFFSET = {0: 0, 1: 100}  # a partition whose offsets do not start at 0

Journal = list[tuple[str, Any]]
StoredChunk = tuple[int, str, int, int, tuple[float, ...]]

# Texts long enough for several chunks of SIZE characters.
TEXT_A1 = "Alpha was first. It had a short life before being replaced by the second."
TEXT_A2 = "Alpha two is the current text. It is split into chunks. Each one is embedded alone."
TEXT_B = "Bravo has no version at all. Later events without versions simply win in order."
TEXT_C = "Charlie is short."
TEXT_F = "Foxtrot carries metadata and a tenant, and version zero is a valid version."


def fast_backoff(attempt: int, *, initial: float = 0.0, cap: float = 0.0) -> float:
    """The real retry logic with waits short enough for a fast suite."""
    return 0.001


def make_settings(**overrides: str) -> Settings:
    return Settings.load(
        {
            "KAFKA_TOPIC": TOPIC,
            "CHUNK_SIZE": str(SIZE),
            "CHUNK_OVERLAP": str(OVERLAP),
            "EMBEDDING_DIMENSIONS": str(DIMS),
            "EMBEDDING_BATCH_SIZE": "4",
            "EMBEDDING_LINGER_MS": "5",
            "COMMIT_INTERVAL_MS": "10",
            "SHUTDOWN_GRACE_SECONDS": "0.3",
            **overrides,
        }
    )


def vector_for(text: str) -> Vector:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return (np.frombuffer(digest[:DIMS], dtype=np.uint8) / np.float32(255)).astype(np.float32)


def chunk_contents(text: str) -> list[str]:
    return [c.content for c in chunk_text(text, size=SIZE, overlap=OVERLAP)]


def expected_chunks(text: str) -> list[StoredChunk]:
    return [
        (c.index, c.content, c.char_start, c.char_end, tuple(vector_for(c.content).tolist()))
        for c in chunk_text(text, size=SIZE, overlap=OVERLAP)
    ]


# -- record building ------------------------------------------------------------------------


def upsert(doc_id: str, text: str, version: int | None = None, **extra: Any) -> tuple[bytes, bytes]:
    payload: dict[str, Any] = {"id": doc_id, "text": text, **extra}
    if version is not None:
        payload["version"] = version
    return doc_id.encode(), orjson.dumps(payload)


def delete(doc_id: str, version: int | None = None) -> tuple[bytes, bytes]:
    payload: dict[str, Any] = {"id": doc_id, "op": "delete"}
    if version is not None:
        payload["version"] = version
    return doc_id.encode(), orjson.dumps(payload)


def tombstone(doc_id: str) -> tuple[bytes, None]:
    return doc_id.encode(), None


def log_of(
    partitions: dict[int, Sequence[tuple[bytes | None, bytes | None]]],
    headers: dict[tuple[int, int], list[tuple[str, bytes]]] | None = None,
) -> list[Record]:
    """Records with consecutive offsets per partition; ``headers`` keyed by (partition, position)."""
    records = []
    for partition, entries in partitions.items():
        for position, (key, value) in enumerate(entries):
            extra = tuple((headers or {}).get((partition, position), ()))
            size = len(key or b"") + len(value or b"")
            records.append(
                Record(TOPIC, partition, BASE_OFFSET[partition] + position, key, value, extra, size)
            )
    return records


def versioned(doc_id: str, version: int) -> str:
    """A one-chunk text that names its document and version (see ``doc_of``)."""
    return f"doc {doc_id} version {version}"


def doc_of(text: str) -> str | None:
    words = text.split()
    return words[1] if len(words) == 4 and words[0] == "doc" and words[2] == "version" else None


# -- fakes of the Protocols -----------------------------------------------------------------


class FakeSource:
    """RecordSource over fixed partition logs.

    ``ready(record)`` (default: always) says whether a record may be handed out yet; records
    behind a held one in its partition wait too. While paused, fetch hands out nothing.
    ``probe()`` is sampled after every delivery and at every pause() and resume().
    """

    def __init__(
        self, records: Iterable[Record], *, max_records: int = 100, journal: Journal | None = None
    ) -> None:
        self.logs: dict[TopicPartition, list[Record]] = {}
        for r in records:
            self.logs.setdefault(r.tp, []).append(r)
        self.position = {tp: log[0].offset for tp, log in self.logs.items()}
        self.max_records = max_records
        self.journal: Journal = journal if journal is not None else []
        self.stored: dict[TopicPartition, int] = {}
        self.committed: dict[TopicPartition, int] = {}
        self.delivered: list[Record] = []
        self.fetch_started: list[float] = []
        self.ready: Callable[[Record], bool] = lambda record: True
        self.paused = False
        self.pauses: list[int | None] = []  # probe() at each pause()
        self.resumes: list[int | None] = []  # probe() at each resume()
        self.fetched_while_paused = 0
        self.probe: Callable[[], int] | None = None
        self.in_flight_after_fetch: list[int] = []
        self.exhausted = asyncio.Event()  # every record handed out
        self.started = self.stopped = False
        self.callbacks: tuple[PartitionsCallback, PartitionsCallback] | None = None
        self.assigned: set[TopicPartition] | None = None  # None: every partition of the logs

    def end(self, tp: TopicPartition) -> int:
        return self.logs[tp][-1].offset + 1

    def ends(self) -> dict[TopicPartition, int]:
        return {tp: self.end(tp) for tp in self.logs}

    def on_rebalance(self, *, revoked: PartitionsCallback, assigned: PartitionsCallback) -> None:
        self.callbacks = (revoked, assigned)

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def fetch(self, max_wait: float) -> list[Record]:
        self.fetch_started.append(time.monotonic())
        batch: list[Record] = []
        if not self.paused:
            for tp in sorted(self.assignment()):
                ready = []
                for r in self.logs[tp]:
                    if r.offset < self.position[tp]:
                        continue
                    if len(ready) == self.max_records or not self.ready(r):
                        break
                    ready.append(r)
                if ready:
                    self.position[tp] = ready[-1].offset + 1
                    batch.extend(ready)
        else:
            self.fetched_while_paused += 1
        if self.rebalancing:  # handed out by the consumer and held back, as KafkaSource does
            batch = []
        if not batch:
            await asyncio.sleep(min(max_wait, 0.002))
            return []
        self.delivered.extend(batch)
        self.journal.append(("fetch", [(r.partition, r.offset) for r in batch]))
        if all(self.position[tp] >= self.end(tp) for tp in self.logs):
            self.exhausted.set()
        if self.probe is not None:
            # Counts this batch too: it is admitted as soon as fetch returns.
            self.in_flight_after_fetch.append(self.probe())
        return batch

    def mark_stored(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            assert offset <= self.position[tp], "marked an offset that was never handed out"
            self.stored[tp] = max(self.stored.get(tp, -1), offset)
        self.journal.append(("mark", {tp.partition: o for tp, o in offsets.items()}))

    async def commit(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        wanted = self.assignment() if partitions is None else set(partitions) & self.assignment()
        for tp in wanted:
            if tp in self.stored:
                self.committed[tp] = self.stored[tp]

    def pause(self) -> None:
        assert not self.paused, "paused twice"
        self.paused = True
        self.pauses.append(self.probe() if self.probe else None)
        self.journal.append(("pause", None))

    def resume(self) -> None:
        assert self.paused, "resumed without a pause"
        self.paused = False
        self.resumes.append(self.probe() if self.probe else None)
        self.journal.append(("resume", None))

    def assignment(self) -> set[TopicPartition]:
        return set(self.logs) if self.assigned is None else self.assigned & set(self.logs)

    def caught_up(self) -> bool:
        return all(self.committed.get(tp, -1) >= self.end(tp) for tp in self.assignment())

    def lag(self) -> int | None:
        return sum(self.end(tp) - self.committed.get(tp, self.logs[tp][0].offset) for tp in self.assignment())

    def unfetched(self) -> int | None:
        return sum(self.end(tp) - self.position[tp] for tp in self.assignment())

    def committed_offset(self, tp: TopicPartition) -> int | None:
        return self.committed.get(tp)

    async def rewind(self, tp: TopicPartition, offset: int) -> int:
        resume = max(offset, self.logs[tp][0].offset)  # the log starts at its first record
        self.journal.append(("rewind", {tp.partition: resume}))
        return resume

    def resume_from(self, tp: TopicPartition, offset: int) -> None:
        self.position[tp] = offset
        self.journal.append(("resume_from", {tp.partition: offset}))

    async def start_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.committed.get(tp, self.logs[tp][0].offset) for tp in partitions}

    rebalancing = False  # set by a test around the callbacks it calls itself


class FakeUsageTable:
    """UsageTable (embedding_usage) as a dict of tallies added up."""

    def __init__(self) -> None:
        self.enabled = True
        self.rows: dict[Key, Tally] = {}
        self.failures = 0  # the next writes fail as in an outage

    def attach(self, usage: Usage) -> None:  # the fake store's writes carry no counts
        pass

    async def add(self, tallies: dict[Key, Tally]) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise DatabaseUnavailable("usage write failed: connection refused")
        for key, tally in tallies.items():
            self.rows.setdefault(key, Tally()).add(tally)

    def total(self) -> Tally:
        whole = Tally()
        for tally in self.rows.values():
            whole.add(tally)
        return whole


@dataclass
class FakeLedgerTable:
    """PaidEmbeddings (the embedding ledger's table) in dicts. Another process's table shares
    ``vectors``, ``intents`` and ``live`` and has its own ``buyer``."""

    vectors: dict[bytes, Vector] = field(default_factory=dict)
    intents: dict[bytes, int] = field(default_factory=dict)  # content -> the buyer announcing it
    live: set[int] = field(default_factory=lambda: {1})  # buyers whose process still runs
    buyer: int = 1
    enabled: bool = True
    journal: Journal = field(default_factory=list)
    sole: bool = False  # buying alone: claims are not announced
    wanting: bool = False  # (while sole) another process waits to buy beside it

    async def present(self) -> None:
        pass

    async def wanted(self) -> bool:
        return self.sole and self.wanting

    async def share(self, hashes: Sequence[bytes]) -> None:
        self.sole = False
        for digest in hashes:
            if digest not in self.vectors:
                self.intents.setdefault(digest, self.buyer)
        self.journal.append(("ledger_share", len(hashes)))

    async def claim(self, hashes: Sequence[bytes]) -> set[bytes]:
        mine = set()
        for digest in hashes:
            owner = self.intents.get(digest)
            if digest not in self.vectors and (
                owner is None or owner == self.buyer or owner not in self.live
            ):
                self.intents[digest] = self.buyer
                mine.add(digest)
        self.journal.append(("ledger_claim", len(mine)))
        return mine

    async def keep(self, vectors: Mapping[bytes, Vector]) -> None:
        for digest, vector in vectors.items():
            self.vectors[digest] = vector
            self.intents.pop(digest, None)
        self.journal.append(("ledger_keep", len(vectors)))

    async def drop(self, hashes: Sequence[bytes]) -> None:
        for digest in hashes:
            if self.intents.get(digest) == self.buyer:
                del self.intents[digest]

    async def renew(self, hashes: Sequence[bytes]) -> None:
        self.journal.append(("ledger_renew", len(hashes)))

    async def watch(self, hashes: Sequence[bytes]) -> dict[bytes, Vector | bool]:
        return {h: self.vectors[h] if h in self.vectors else self.intents.get(h) in self.live for h in hashes}

    async def prune(self) -> int:
        return 0

    def elsewhere(self, buyer: int) -> FakeLedgerTable:
        """The same table as another process (``buyer``, alive) sees it."""
        self.live.add(buyer)
        return FakeLedgerTable(self.vectors, self.intents, self.live, buyer, self.enabled, self.journal)


@dataclass
class FakeStore:
    """DocumentStore in dicts, applying a batch like store.Store.write: documents that moved since
    they were planned are left alone and returned; the rest are written."""

    dimensions: int = DIMS
    model: str = MODEL
    documents: dict[str, DocState] = field(default_factory=dict)
    chunks: dict[str, list[StoredChunk]] = field(default_factory=dict)
    chunk_model: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    tenants: dict[str, str | None] = field(default_factory=dict)
    offsets: dict[TopicPartition, int] = field(default_factory=dict)  # how far it got (source_offsets)
    owners: dict[TopicPartition, int] = field(default_factory=dict)  # owner epoch per partition
    epoch: int = 0  # the last epoch drawn
    journal: Journal = field(default_factory=list)
    # Runs at the start of the next write, once: another worker committing in between plan and write.
    interfere: Callable[[FakeStore], None] | None = None
    stale_once: bool = False  # the next write raises StaleRead (Store.write on a unique violation)
    failures: int = 0  # calls (of any kind) that fail with DatabaseUnavailable first: an outage
    crash_on: str | None = None  # "read_states" or "write": a bug when the call involves doc "boom"
    write_delay: float = 0.0
    write_gate: asyncio.Event | None = None  # writes wait for it (as ``writing``) while it is unset
    reads: list[list[str]] = field(default_factory=list)
    lookups: list[list[bytes]] = field(default_factory=list)
    writes: int = 0
    writing: set[str] = field(default_factory=set)
    overlaps: list[str] = field(default_factory=list)  # documents in two writes at once
    ledger: FakeLedgerTable = field(default_factory=FakeLedgerTable)
    usage: FakeUsageTable = field(default_factory=lambda: FakeUsageTable())

    def _outage(self, call: str) -> None:
        if self.failures > 0:
            self.failures -= 1
            self.journal.append(("db_failed", call))
            raise DatabaseUnavailable(f"database {call} failed: connection refused")

    async def probe(self) -> None:
        await self.read_states(["health-check"])

    async def read_states(self, doc_ids: Sequence[str]) -> dict[str, DocState]:
        self._outage("read_states")
        self.reads.append(list(doc_ids))
        if self.crash_on == "read_states" and "boom" in doc_ids:
            raise RuntimeError("a bug in read_states")
        return {i: self.documents[i] for i in doc_ids if i in self.documents}

    async def record_progress(self, watermarks: Mapping[TopicPartition, int], epoch: int | None) -> None:
        self._check_owner(watermarks, epoch)
        for tp, mark in watermarks.items():
            self.offsets[tp] = max(self.offsets.get(tp, mark), mark)

    async def claim(self, starts: Mapping[TopicPartition, int]) -> int | None:
        self.epoch += 1
        for tp, start in starts.items():
            self.owners[tp] = self.epoch
            self.offsets.setdefault(tp, start)
        return self.epoch

    def _check_owner(self, watermarks: Mapping[TopicPartition, int], epoch: int | None) -> None:
        taken = [tp for tp in watermarks if epoch is not None and self.owners.get(tp, epoch) != epoch]
        if taken:
            raise Fenced(f"{taken} claimed since epoch {epoch}")

    async def stored_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.offsets[tp] for tp in partitions if tp in self.offsets}

    async def known_embeddings(self, hashes: Sequence[bytes]) -> dict[bytes, Vector]:
        self._outage("known_embeddings")
        self.lookups.append(list(hashes))
        wanted = set(hashes)
        known: dict[bytes, Vector] = {}
        for doc_id, rows in self.chunks.items():
            if self.chunk_model.get(doc_id) != self.model:
                continue
            for _, content, _, _, vector in rows:
                digest = sha256(content)
                if digest in wanted:
                    known[digest] = np.asarray(vector, dtype=np.float32)
        if self.ledger.enabled:
            known |= {
                digest: self.ledger.vectors[digest] for digest in wanted if digest in self.ledger.vectors
            }
        return known

    async def write(self, writes: Sequence[DocumentWrite], progress: Progress | None = None) -> set[str]:
        if not writes:
            return set()
        ids = [w.change.event.doc_id for w in writes]
        assert len(ids) == len(set(ids)), "a document twice in one batch"
        if self.crash_on == "write" and "boom" in ids:
            raise RuntimeError("a bug in write")
        self._outage("write")
        if self.stale_once:
            self.stale_once = False
            self.journal.append(("stale", sorted(ids)))
            raise StaleRead("duplicate key value violates unique constraint")
        self.overlaps += sorted(self.writing & set(ids))
        self.writing |= set(ids)
        try:
            if self.write_delay:
                await asyncio.sleep(self.write_delay)
            if self.write_gate is not None:
                await self.write_gate.wait()
        finally:
            self.writing -= set(ids)
        if self.interfere is not None:
            interfere, self.interfere = self.interfere, None
            interfere(self)
        self.writes += 1
        moved = {
            w.change.event.doc_id
            for w in writes
            if self.documents.get(w.change.event.doc_id) != w.change.before
        }
        if progress is not None:
            self._check_owner(progress.after, progress.epoch)
            for tp, mark in (progress.before if moved else progress.after).items():
                self.offsets[tp] = max(self.offsets.get(tp, mark), mark)
        if moved:
            self.journal.append(("moved", sorted(moved)))
        for w in writes:
            doc_id, after = w.change.event.doc_id, w.change.after
            if doc_id in moved:
                continue
            source = (w.record.topic, w.record.partition, w.record.offset)
            self.documents[doc_id] = DocState(after.version, after.deleted, source)
            self.tenants[doc_id] = w.change.event.tenant
            if after.deleted:
                self.chunks.pop(doc_id, None)
                self.metadata.pop(doc_id, None)
                continue
            assert len(w.chunks) == len(w.embeddings)
            rows = []
            for c, e in zip(w.chunks, w.embeddings, strict=True):
                assert e.shape == (self.dimensions,)
                assert w.change.event.text[c.char_start : c.char_end] == c.content
                rows.append((c.index, c.content, c.char_start, c.char_end, tuple(np.asarray(e).tolist())))
            self.chunks[doc_id] = rows
            self.chunk_model[doc_id] = self.model
            self.metadata[doc_id] = w.change.event.metadata
        written = sorted((w for w in writes if w.change.event.doc_id not in moved), key=_doc_id)
        if written:
            self.journal.append(("write", [(w.record.partition, w.record.offset) for w in written]))
        return moved

    def put(self, doc_id: str, text: str, version: int | None) -> None:
        """Store a live document directly (as another worker would have)."""
        self.documents[doc_id] = DocState(version, False)
        self.chunks[doc_id] = expected_chunks(text)
        self.chunk_model[doc_id] = self.model


def _doc_id(w: DocumentWrite) -> str:
    return w.change.event.doc_id


class FakeEmbedder:
    """Deterministic vectors per text; rejects any request containing MARKER; can be down, slow,
    hung, or hold the requests carrying certain texts until an event is set.

    Records every request (``calls``), every answered one (``answered``), and, for texts made by
    ``versioned``, any moment two different texts of one document were being embedded at once
    (``overlaps``).
    """

    def __init__(
        self,
        *,
        failures: int = 0,
        delay: float = 0.0,
        hang: bool = False,
        error: Exception | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.failures = failures
        self.delay = delay
        self.hang = hang
        self.error = error
        self.hold: dict[str, asyncio.Event] = {}
        self.calls: list[list[str]] = []
        self.answered: list[list[str]] = []
        self.on_call: Callable[[], None] | None = None
        self.entered = asyncio.Event()
        self.active: list[str] = []
        self.overlaps: list[tuple[str, str]] = []
        self.journal: Journal = journal if journal is not None else []

    async def embed(self, texts: Sequence[str]) -> list[Vector]:
        self.calls.append(list(texts))
        self.entered.set()
        if self.on_call is not None:
            self.on_call()
        for text in texts:
            doc = doc_of(text)
            for other in self.active:
                if doc is not None and doc_of(other) == doc and other != text:
                    self.overlaps.append((other, text))
            self.active.append(text)
        try:
            for key, event in self.hold.items():
                if any(key in t for t in texts):
                    await event.wait()
            if self.hang:
                await asyncio.Event().wait()
            if self.delay:
                await asyncio.sleep(self.delay)
        finally:
            for text in texts:
                self.active.remove(text)
        if self.failures > 0:
            self.failures -= 1
            self.journal.append(("embed_failed", len(texts)))
            raise EmbeddingUnavailable("embedding API answered 503: overloaded")
        if self.error is not None:
            raise self.error
        if any(MARKER in t for t in texts):
            raise InputRejected(f"embedding API answered 400 for {len(texts)} input(s): bad input")
        self.answered.append(list(texts))
        return [vector_for(t) for t in texts]

    def inputs(self) -> Counter[str]:
        return Counter(t for call in self.calls for t in call)

    def bought(self) -> Counter[str]:
        """Inputs answered with a vector: what was paid for."""
        return Counter(t for call in self.answered for t in call)

    def embedded(self) -> set[str]:
        return set(self.inputs())


class FakeDeadLetters:
    def __init__(self, *, failures: int = 0, journal: Journal | None = None) -> None:
        self.letters: list[DeadLetter] = []
        self.failures = failures
        self.journal: Journal = journal if journal is not None else []

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        if self.failures > 0:
            self.failures -= 1
            self.journal.append(("dlq_failed", len(letters)))
            raise BrokerUnavailable("dead-letter topic not writable")
        self.letters.extend(letters)
        self.journal.append(("dlq", [(d.record.partition, d.record.offset) for d in letters]))

    async def ping(self) -> None:
        if self.failures > 0:
            self.failures -= 1
            self.journal.append(("dlq_failed", 0))
            raise BrokerUnavailable("dead-letter topic unreachable")


@dataclass
class Rig:
    source: FakeSource
    store: FakeStore
    embedder: FakeEmbedder
    dead: FakeDeadLetters
    worker: Worker
    journal: Journal

    async def run(self, limit: float = 5.0) -> float:
        started = time.monotonic()
        await asyncio.wait_for(self.worker.run(), limit)
        return time.monotonic() - started

    def in_flight(self) -> int:
        return len(self.source.delivered) - self.worker.records_done

    def assert_all_committed(self) -> None:
        assert self.source.stored == self.source.ends()
        assert self.source.committed == self.source.ends()

    def assert_marks_never_passed_unfinished(self) -> None:
        """Every mark_stored only covers records already written or dead-lettered (for runs in
        which every record is written or dead-lettered under its own offset)."""
        finished: set[tuple[int, int]] = set()
        for kind, detail in self.journal:
            if kind in ("write", "dlq"):
                finished.update(detail)
            elif kind == "mark":
                for partition, mark in detail.items():
                    below = range(BASE_OFFSET[partition], mark)
                    missing = [o for o in below if (partition, o) not in finished]
                    assert not missing, f"mark {partition}:{mark} passed unfinished offsets {missing}"


def rig(
    records: Iterable[Record],
    *,
    max_records: int = 100,
    store: FakeStore | None = None,
    embedder: FakeEmbedder | None = None,
    dead: FakeDeadLetters | None = None,
    settings: Settings | None = None,
    stop_when_idle: float | None = 0.05,
) -> Rig:
    journal: Journal = []
    source = FakeSource(records, max_records=max_records, journal=journal)
    store = store or FakeStore()
    store.journal = journal
    embedder = embedder or FakeEmbedder()
    embedder.journal = journal
    dead = dead or FakeDeadLetters()
    dead.journal = journal
    worker = Worker(
        source=source,
        store=store,
        embedder=embedder,
        dead_letters=dead,
        settings=settings or make_settings(),
        stop_when_idle=stop_when_idle,
        backoff=fast_backoff,
    )
    r = Rig(source, store, embedder, dead, worker, journal)
    source.probe = r.in_flight
    return r


@contextlib.asynccontextmanager
async def pipeline_of(
    store: FakeStore, embedder: FakeEmbedder, dead: FakeDeadLetters, *, stop: asyncio.Event, **overrides: str
) -> AsyncIterator[Pipeline]:
    """A Pipeline alone, with dependencies built as the Worker builds them; closed at the end."""
    settings = make_settings(**{"EMBEDDING_MAX_ATTEMPTS": "2", **overrides})
    dependencies = Dependencies.of(
        embedding=lambda: embedder.embed(["health check"]),
        database=lambda: store.read_states(["health-check"]),
        dead_letters=dead.ping,
        stop=stop,
        threshold=settings.embedding_max_attempts,
        backoff=fast_backoff,
    )
    stage = EmbeddingStage(embedder, dependencies.embedding, settings)
    ledger = Ledger(store.ledger, dependencies.database)
    pipeline = Pipeline(
        store=store,
        purchases=Purchases(stage, ledger),
        dead_letters=dead,
        settings=settings,
        stop=stop,
        dependencies=dependencies,
    )
    try:
        yield pipeline
    finally:
        await pipeline.close()
        await stage.finish(within=0)
        await ledger.close(within=1)
        for dependency in dependencies.all():
            await dependency.close()


async def run_or_stop(r: Rig, limit: float) -> None:
    """Run the worker; if run() has not ended within ``limit`` seconds, stop it and fail."""
    running = asyncio.create_task(r.worker.run())
    done, _ = await asyncio.wait({running}, timeout=limit)
    if not done:
        r.worker.stop()
        await asyncio.wait_for(asyncio.gather(running, return_exceptions=True), 5)
        raise AssertionError(f"run() did not end within {limit} s")
    await running


async def until(condition: Callable[[], bool], limit: float = 2.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)
