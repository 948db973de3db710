"""The Worker end to end through small fakes of its own Protocols: no Kafka, no Postgres, no HTTP."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson
import pytest
from aiokafka import TopicPartition

from worker.chunk import chunk_text
from worker.consume import PartitionsCallback, Record
from worker.dlq import DeadLetter
from worker.embed import Vector
from worker.errors import BrokerUnavailable, EmbeddingUnavailable, InputRejected, StaleRead
from worker.plan import DocState
from worker.settings import Settings
from worker.store import DocumentWrite
from worker.worker import Worker

TOPIC = "docs"
DIMS = 8
SIZE, OVERLAP = 40, 8
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


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the real retry logic but make its jittered waits short, so the suite stays fast."""
    monkeypatch.setattr("worker.retry.backoff", lambda attempt, **_: 0.001)
    monkeypatch.setattr("worker.worker.backoff", lambda attempt, **_: 0.001, raising=False)


def make_settings(**overrides: str) -> Settings:
    return Settings.load(
        {
            "KAFKA_TOPIC": TOPIC,
            "CHUNK_SIZE": str(SIZE),
            "CHUNK_OVERLAP": str(OVERLAP),
            "EMBEDDING_DIMENSIONS": str(DIMS),
            "EMBEDDING_BATCH_SIZE": "4",
            "SHUTDOWN_GRACE_SECONDS": "0.3",
            **overrides,
        }
    )


def vector_for(text: str) -> Vector:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return (np.frombuffer(digest[:DIMS], dtype=np.uint8) / np.float32(255)).astype(np.float32)


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
            records.append(Record(TOPIC, partition, BASE_OFFSET[partition] + position, key, value, extra))
    return records


# -- fakes of the Protocols -----------------------------------------------------------------


class FakeSource:
    """RecordSource over fixed partition logs: fetch hands out records, rewind seeks back."""

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
        self.rewinds: list[dict[TopicPartition, int]] = []
        self.on_rewind: Callable[[], None] | None = None
        self.started = self.stopped = False
        self.callbacks: tuple[PartitionsCallback, PartitionsCallback] | None = None

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
        batch: list[Record] = []
        for tp in sorted(self.logs):
            ready = [r for r in self.logs[tp] if r.offset >= self.position[tp]][: self.max_records]
            if ready:
                self.position[tp] = ready[-1].offset + 1
                batch.extend(ready)
        if not batch:
            await asyncio.sleep(min(max_wait, 0.005))
            return []
        self.delivered.extend(batch)
        self.journal.append(("fetch", [(r.partition, r.offset) for r in batch]))
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

    def rewind(self, offsets: dict[TopicPartition, int]) -> None:
        self.rewinds.append(dict(offsets))
        self.journal.append(("rewind", {tp.partition: o for tp, o in offsets.items()}))
        if self.on_rewind is not None:
            self.on_rewind()
        for tp, offset in offsets.items():
            self.position[tp] = offset

    def assignment(self) -> set[TopicPartition]:
        return set(self.logs)

    def caught_up(self) -> bool:
        return all(self.committed.get(tp, -1) >= self.end(tp) for tp in self.logs)

    def lag(self) -> int | None:
        return sum(self.end(tp) - self.committed.get(tp, self.logs[tp][0].offset) for tp in self.logs)


@dataclass
class FakeStore:
    """DocumentStore in dicts, applying a batch like store.Store.write: all or nothing, StaleRead if moved."""

    dimensions: int = DIMS
    documents: dict[str, DocState] = field(default_factory=dict)
    chunks: dict[str, list[StoredChunk]] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    tenants: dict[str, str | None] = field(default_factory=dict)
    journal: Journal = field(default_factory=list)
    # Runs at the start of the next write, once: another worker committing in between plan and write.
    interfere: Callable[[FakeStore], None] | None = None
    writes: int = 0
    stale_reads: int = 0

    async def read_states(self, doc_ids: Sequence[str]) -> dict[str, DocState]:
        return {i: self.documents[i] for i in doc_ids if i in self.documents}

    async def write(self, writes: Sequence[DocumentWrite]) -> None:
        if not writes:
            return
        if self.interfere is not None:
            interfere, self.interfere = self.interfere, None
            interfere(self)
        self.writes += 1
        moved = [
            w.change.event.doc_id
            for w in writes
            if self.documents.get(w.change.event.doc_id) != w.change.before
        ]
        if moved:
            self.stale_reads += 1
            self.journal.append(("stale", moved))
            raise StaleRead(f"{len(moved)} document(s) changed since the batch was planned")
        ids = [w.change.event.doc_id for w in writes]
        assert len(ids) == len(set(ids)), "a document twice in one batch"
        for w in writes:
            doc_id, after = w.change.event.doc_id, w.change.after
            self.documents[doc_id] = DocState(after.version, after.deleted)
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
            self.metadata[doc_id] = w.change.event.metadata
        self.journal.append(("write", sorted(ids)))

    def put(self, doc_id: str, text: str, version: int | None) -> None:
        """Store a live document directly (as another worker would have)."""
        self.documents[doc_id] = DocState(version, False)
        self.chunks[doc_id] = expected_chunks(text)


class FakeEmbedder:
    """Deterministic vectors per text; rejects any request containing MARKER; can be down or slow."""

    def __init__(
        self, *, failures: int = 0, delay: float = 0.0, hang: bool = False, journal: Journal | None = None
    ) -> None:
        self.failures = failures
        self.delay = delay
        self.hang = hang
        self.calls: list[list[str]] = []
        self.entered = asyncio.Event()
        self.journal: Journal = journal if journal is not None else []

    async def embed(self, texts: Sequence[str]) -> list[Vector]:
        self.calls.append(list(texts))
        self.entered.set()
        if self.hang:
            await asyncio.Event().wait()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.failures > 0:
            self.failures -= 1
            self.journal.append(("embed_failed", len(texts)))
            raise EmbeddingUnavailable("embedding API answered 503: overloaded")
        if any(MARKER in t for t in texts):
            raise InputRejected(f"embedding API answered 400 for {len(texts)} input(s): bad input")
        return [vector_for(t) for t in texts]

    def embedded(self) -> set[str]:
        return {t for call in self.calls for t in call}


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
            raise BrokerUnavailable("dead-letter topic not writable")
        self.letters.extend(letters)
        self.journal.append(("dlq", [(d.partition, d.offset) for d in letters]))


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

    def assert_all_committed(self) -> None:
        assert self.source.stored == self.source.ends()
        assert self.source.committed == self.source.ends()


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
    )
    return Rig(source, store, embedder, dead, worker, journal)


# -- the happy path -------------------------------------------------------------------------


async def test_ingests_every_partition_and_commits_every_offset() -> None:
    r = rig(
        log_of(
            {
                0: [
                    upsert("a", TEXT_A1, 1),
                    upsert("b", TEXT_B),
                    upsert("a", TEXT_A2, 2),
                    upsert("c", TEXT_C, 1),
                    upsert("a", "a late, stale redelivery of version one", 1),
                ],
                1: [
                    delete("d", 5),  # never seen: kept as a tombstone
                    upsert("e", "Echo lives briefly."),
                    upsert("d", "an older upsert must not bring d back", 3),
                    tombstone("e"),
                    upsert("f", TEXT_F, 0, metadata={"lang": "en"}, tenant="acme"),
                ],
            }
        ),
        max_records=2,  # several batches, each mixing both partitions
    )
    await r.run()

    assert r.store.documents == {
        "a": DocState(2, False),
        "b": DocState(None, False),
        "c": DocState(1, False),
        "d": DocState(5, True),
        "e": DocState(None, True),
        "f": DocState(0, False),
    }
    assert r.store.chunks == {
        "a": expected_chunks(TEXT_A2),
        "b": expected_chunks(TEXT_B),
        "c": expected_chunks(TEXT_C),
        "f": expected_chunks(TEXT_F),
    }
    assert len(r.store.chunks["a"]) > 1
    assert (r.store.metadata["f"], r.store.tenants["f"]) == ({"lang": "en"}, "acme")
    assert r.dead.letters == []
    r.assert_all_committed()
    assert r.source.started and r.source.stopped
    assert r.source.rewinds == []
    assert r.worker.records_done == 10


async def test_only_the_winning_version_of_a_batch_is_embedded() -> None:
    r = rig(log_of({0: [upsert("a", TEXT_A1, 1), upsert("a", TEXT_A2, 2), upsert("a", "stale", 1)]}))
    await r.run()
    assert r.store.documents == {"a": DocState(2, False)}
    assert r.store.chunks == {"a": expected_chunks(TEXT_A2)}
    assert r.embedder.embedded() == {c[1] for c in expected_chunks(TEXT_A2)}
    r.assert_all_committed()


async def test_redelivery_of_everything_changes_nothing() -> None:
    records = log_of({0: [upsert("a", TEXT_A1, 1), upsert("b", TEXT_B), delete("c", 2)]})
    first = rig(records)
    await first.run()
    again = rig(records, store=first.store)
    await again.run()
    assert first.store.documents == {
        "a": DocState(1, False),
        "b": DocState(None, False),
        "c": DocState(2, True),
    }
    assert first.store.chunks == {"a": expected_chunks(TEXT_A1), "b": expected_chunks(TEXT_B)}
    again.assert_all_committed()


# -- records that can never succeed ---------------------------------------------------------


async def test_bad_records_are_dead_lettered_with_their_stage_and_the_rest_stored() -> None:
    traceparent = [("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]
    records = log_of(
        {
            1: [
                upsert("g1", TEXT_C),
                (b"\xff\xfe", b'{"id": "x", "text": "t"}'),  # key not UTF-8
                (b"j", b"{not json"),
                (b"m", orjson.dumps({"id": "m"})),  # upsert without text
                (b"k", orjson.dumps({"id": "other", "text": "t"})),  # id != key
                upsert("g2", TEXT_B),
                (None, None),  # tombstone without a key
            ]
        },
        headers={(1, 2): traceparent},
    )
    r = rig(records)
    await r.run()

    assert set(r.store.documents) == {"g1", "g2"}
    assert r.store.chunks == {"g1": expected_chunks(TEXT_C), "g2": expected_chunks(TEXT_B)}
    by_offset = {d.offset: d for d in r.dead.letters}
    assert {o - 100: (d.error.stage, type(d.error).__name__) for o, d in by_offset.items()} == {
        1: ("decode", "DecodeError"),
        2: ("decode", "DecodeError"),
        3: ("validate", "ValidationError"),
        4: ("validate", "ValidationError"),
        6: ("validate", "ValidationError"),
    }
    for d in r.dead.letters:
        original = next(rec for rec in records if rec.offset == d.offset)
        assert (d.topic, d.partition, d.key, d.value, tuple(d.headers)) == (
            TOPIC,
            1,
            original.key,
            original.value,
            original.headers,
        )
    assert tuple(by_offset[102].headers) == tuple(traceparent)
    r.assert_all_committed()
    # The dead letters were acknowledged before their offsets were marked stored.
    kinds = [kind for kind, _ in r.journal]
    assert kinds.index("dlq") < kinds.index("mark")


async def test_rejected_document_is_isolated_from_its_batch_by_bisection() -> None:
    poisoned = f"Papa version two is fine here. But this part says {MARKER} so the API refuses it. The end."
    store = FakeStore()
    store.put("p", "Papa version one, stored earlier.", 1)
    r = rig(
        log_of(
            {0: [upsert("a", TEXT_A2, 1), upsert("p", poisoned, 2), upsert("b", TEXT_B), upsert("c", TEXT_F)]}
        ),
        store=store,
    )
    await r.run()

    [letter] = r.dead.letters
    assert (letter.offset, letter.error.stage, type(letter.error).__name__) == (1, "embed", "InputRejected")
    assert letter.value == upsert("p", poisoned, 2)[1]
    assert r.store.documents["p"] == DocState(1, False), "the stored version is left as it was"
    assert r.store.chunks["p"] == expected_chunks("Papa version one, stored earlier.")
    for doc_id, text in [("a", TEXT_A2), ("b", TEXT_B), ("c", TEXT_F)]:
        assert r.store.chunks[doc_id] == expected_chunks(text)
    # Bisection narrowed the refusal down to a request of the offending chunk alone.
    [poison_chunk] = [c[1] for c in expected_chunks(poisoned) if MARKER in c[1]]
    assert [poison_chunk] in r.embedder.calls
    assert len(r.source.delivered) == 4, "handled within the batch: no redelivery"
    r.assert_all_committed()


# -- outages --------------------------------------------------------------------------------


async def test_transient_embedding_outage_is_retried_without_dead_letters() -> None:
    r = rig(log_of({0: [upsert("a", TEXT_A2, 1), upsert("b", TEXT_B)]}), embedder=FakeEmbedder(failures=2))
    await r.run()
    assert r.dead.letters == []
    assert r.store.chunks == {"a": expected_chunks(TEXT_A2), "b": expected_chunks(TEXT_B)}
    assert r.embedder.failures == 0
    r.assert_all_committed()


async def test_outage_beyond_the_retry_budget_rewinds_and_commits_nothing_until_stored() -> None:
    r = rig(
        log_of({0: [upsert("a", TEXT_C, 1)], 1: [upsert("b", TEXT_B)]}), embedder=FakeEmbedder(failures=12)
    )
    await r.run()
    assert r.dead.letters == []
    assert r.store.chunks == {"a": expected_chunks(TEXT_C), "b": expected_chunks(TEXT_B)}
    assert r.source.rewinds, "the batch was given back to the source"
    assert all(offsets == {P0: 0, P1: 100} for offsets in r.source.rewinds)
    kinds = [kind for kind, _ in r.journal]
    assert kinds.count("embed_failed") == 12
    assert max(i for i, k in enumerate(kinds) if k == "embed_failed") < kinds.index("mark")
    r.assert_all_committed()


async def test_outage_beyond_the_retry_budget_is_reported_as_that_outage() -> None:
    r = rig(log_of({0: [upsert("a", TEXT_C, 1)]}), embedder=FakeEmbedder(failures=6))
    seen: list[str | None] = []
    r.source.on_rewind = lambda: seen.append(r.worker.last_error)
    await r.run()
    assert seen
    assert all(e is not None and e.startswith("EmbeddingUnavailable") for e in seen), seen


async def test_dead_letter_topic_outage_holds_the_commit_until_the_letters_are_acknowledged() -> None:
    r = rig(
        log_of({0: [upsert("a", TEXT_C, 1), (b"x", b"garbage"), upsert("b", TEXT_B)]}),
        dead=FakeDeadLetters(failures=4),  # more than the 3 attempts within one batch
    )
    await r.run()
    assert [(d.offset, d.error.stage) for d in r.dead.letters] == [(1, "decode")]
    assert r.store.chunks == {"a": expected_chunks(TEXT_C), "b": expected_chunks(TEXT_B)}
    kinds = [kind for kind, _ in r.journal]
    assert "rewind" in kinds
    assert kinds.index("dlq") < kinds.index("mark")
    r.assert_all_committed()


@pytest.mark.parametrize(
    ("moved_to", "expected"),
    [
        pytest.param(DocState(3, False), DocState(3, False), id="newer-version-wins"),
        pytest.param(DocState(1, True), DocState(2, False), id="older-delete-is-overtaken"),
    ],
)
async def test_stale_read_rewinds_and_replans(moved_to: DocState, expected: DocState) -> None:
    interloper_text = "Another worker wrote this version of a."

    def other_worker(store: FakeStore) -> None:
        store.documents["a"] = moved_to
        store.chunks.pop("a", None)
        if not moved_to.deleted:
            store.chunks["a"] = expected_chunks(interloper_text)

    store = FakeStore(interfere=other_worker)
    store.put("a", TEXT_A1, 1)
    r = rig(log_of({0: [upsert("a", TEXT_A2, 2), upsert("b", TEXT_B, 1)]}), store=store)
    await r.run()

    assert r.store.stale_reads == 1
    assert r.source.rewinds == [{P0: 0}]
    assert [rec.offset for rec in r.source.delivered] == [0, 1, 0, 1], "the batch was delivered again"
    assert r.store.documents == {"a": expected, "b": DocState(1, False)}
    text = interloper_text if expected == moved_to else TEXT_A2
    assert r.store.chunks == {"a": expected_chunks(text), "b": expected_chunks(TEXT_B)}
    assert r.dead.letters == []
    kinds = [kind for kind, _ in r.journal]
    assert kinds.index("stale") < kinds.index("rewind") < kinds.index("mark")
    r.assert_all_committed()


# -- stopping -------------------------------------------------------------------------------


async def test_stop_during_an_outage_ends_run_promptly_and_commits_nothing() -> None:
    r = rig(
        log_of({0: [upsert("a", TEXT_C, 1), upsert("b", TEXT_B)]}),
        embedder=FakeEmbedder(failures=10**6),
        stop_when_idle=None,
    )
    running = asyncio.create_task(r.worker.run())
    await asyncio.wait_for(r.embedder.entered.wait(), 2)
    stopped_at = time.monotonic()
    r.worker.stop()
    await asyncio.wait_for(running, 2)
    assert time.monotonic() - stopped_at < 0.5
    assert r.source.committed == {}
    assert r.source.stored == {}
    assert r.store.documents == {}
    assert r.dead.letters == []
    assert r.source.stopped


async def test_stop_lets_the_batch_in_flight_finish_and_commits_only_it() -> None:
    r = rig(
        log_of({0: [upsert(f"d{i}", TEXT_C, 1) for i in range(6)]}),
        max_records=2,
        embedder=FakeEmbedder(delay=0.1),
        stop_when_idle=None,  # only stop() ends these runs
    )
    running = asyncio.create_task(r.worker.run())
    await asyncio.wait_for(r.embedder.entered.wait(), 2)
    r.worker.stop()
    await asyncio.wait_for(running, 2)
    assert set(r.store.documents) == {"d0", "d1"}
    assert r.source.committed == {P0: 2}
    assert len(r.source.delivered) == 2, "nothing fetched after stop()"
    assert r.source.stopped


async def test_stop_abandons_a_hung_batch_after_the_grace_period() -> None:
    grace = 0.3
    r = rig(
        log_of({0: [upsert("a", TEXT_C, 1)]}),
        embedder=FakeEmbedder(hang=True),
        settings=make_settings(SHUTDOWN_GRACE_SECONDS=str(grace)),
        stop_when_idle=None,
    )
    running = asyncio.create_task(r.worker.run())
    await asyncio.wait_for(r.embedder.entered.wait(), 2)
    stopped_at = time.monotonic()
    r.worker.stop()
    await asyncio.wait_for(running, grace + 0.7)
    assert time.monotonic() - stopped_at >= grace - 0.05, "the batch was given its grace period"
    assert r.source.committed == {}, "nothing stored, nothing committed"
    assert r.source.stored == {}
    assert r.store.documents == {}
    assert r.source.stopped
