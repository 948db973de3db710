"""Filling a generation of the index: the documents pending in it, re-chunked from their stored
text with its chunking, embedded with its model, written by binary COPY into its own table.

    claim pending documents (key order, SKIP LOCKED) -> read their text -> chunk
      -> purchases (content this model embedded before, stored or in the ledger, is not bought
         again; the rest through the same batching, pacing and limits as ingestion)
      -> one transaction: share-lock the documents, write those unchanged since they were read,
         take them off the pending list (the changed ones stay pending)

``reindex start`` runs it until nothing is pending; a running worker runs it beside ingestion for
every live generation it does not write, which keeps that generation current (and resumes a build
whose ``reindex start`` was stopped). Claims name the process's ledger buyer number, whose advisory
lock dies with it: after a ``kill -9`` the next filler takes its documents over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import asyncpg
import structlog

from worker import generations, metrics
from worker.chunk import Chunk, chunk_document
from worker.dependency import Dependencies
from worker.embed import Embedder, OpenAIEmbedder
from worker.embed import probe as probe_embedding
from worker.errors import DependencyError, Indexing, RecordError, describe
from worker.generations import Generation
from worker.purchases import Buying, Purchase, settled_vectors
from worker.retry import ShuttingDown, sleep_unless, unless_stopped
from worker.settings import Settings
from worker.store import GenerationFill, Store
from worker.tokens import TokenCounter
from worker.types import Vector

log = structlog.get_logger()

FILL_BATCH = 64  # documents claimed at a time
FILL_TASKS = 4  # batches in progress at once: embedding one while another is written
CLAIM_LEASE = 600.0  # seconds after which a live process's claim is taken over (it froze)
IDLE_POLL = 1.0  # seconds between looks for pending documents while there are none
GENERATION_POLL = 2.0  # seconds between a worker's looks at the registry
# A worker's filler beside ingestion: enough to keep up with what ingestion changes (a batch of
# FILL_BATCH documents per round trip), not so much that a build takes over the worker.
WORKER_FILL_TASKS = 2
NO_TEXT = (
    "stored before documents kept their text, and no generation of the same chunking holds its "
    "chunks: publish the document again (any event of it stores its text)"
)


@dataclass(eq=False)
class _Wanting:
    """One document wanting its chunks' vectors (purchases.Wanting)."""

    doc_id: str
    content_sha256: bytes | None
    deleted: bool
    chunks: list[Chunk]
    tenant: str | None
    held: dict[bytes, Purchase] = field(default_factory=dict)


class Filler:
    """Fills ``store``'s generation (see the module); ``source`` is the served one, whose chunks
    stand in for the text of documents stored before it was kept, where the chunking is the same."""

    def __init__(
        self,
        store: Store,
        embedder: Embedder,
        *,
        source: Callable[[], Generation | None],
        stop: asyncio.Event,
        tasks: int = FILL_TASKS,
        batch: int = FILL_BATCH,
        idle_poll: float = IDLE_POLL,
    ) -> None:
        assert store.generation is not None
        self.generation = store.generation
        self._store = store
        self._source = source
        self._stop = stop
        self._tasks = tasks
        self._batch = batch
        self._idle_poll = idle_poll
        settings = store.settings
        self._settings = settings
        self._tokens = TokenCounter(settings.embedding_tokenizer)

        async def nothing() -> None:
            return None

        self.dependencies = Dependencies.of(
            embedding=lambda: probe_embedding(embedder),
            database=store.probe,
            dead_letters=nothing,
            stop=stop,
            threshold=settings.embedding_max_attempts,
        )
        self._buying = Buying.of(embedder, store.ledger, store.usage, self.dependencies, settings)
        self._purchases = self._buying.purchases
        self._after = ""
        self.documents = 0  # documents filled (written, or found deleted)
        self.chunks = 0  # chunks written

    async def run(self, *, until_done: bool) -> None:
        """Fill until nothing is pending (``until_done``) or until stopped."""
        with contextlib.suppress(ShuttingDown):
            await asyncio.gather(*(self._loop(until_done) for _ in range(self._tasks)))

    async def close(self, within: float = 5.0) -> None:
        await self._buying.close(time.monotonic() + within)
        for dependency in self.dependencies.all():
            await dependency.close()

    async def _loop(self, until_done: bool) -> None:
        database = self.dependencies.database
        while not self._stop.is_set():
            after = self._after
            rows = await database.call(
                functools.partial(self._store.claim_pending, self._batch, CLAIM_LEASE, after)
            )
            if rows:
                self._after = rows[-1]["doc_id"]
            elif after:  # the end of the keys: from the first again (released, or pending again)
                self._after = ""
                continue
            elif until_done:
                return
            else:
                await sleep_unless(self._stop, self._idle_poll)
                continue
            try:
                await self._fill(rows)
            except BaseException as exc:
                await asyncio.shield(self._release([r["doc_id"] for r in rows]))
                if not isinstance(exc, Indexing):
                    raise
                log.info("fill_waits_for_index", generation=self.generation.id)  # holding nothing
                while await database.call(self._store.indexing):
                    await sleep_unless(self._stop, self._idle_poll)

    async def _release(self, ids: list[str]) -> None:
        try:
            await self._store.release_pending(ids)
        except (DependencyError, OSError) as exc:  # the claim lapses with the process, or after CLAIM_LEASE
            log.warning("fill_release_failed", error=describe(exc))

    async def _fill(self, claimed: list[asyncpg.Record]) -> None:
        """Fill the claimed documents (Store.claim_pending's rows)."""
        # A pending document with no row cannot be (rows stay, deleted or not).
        problems = {r["doc_id"]: "no such document" for r in claimed if r["id"] is None}
        rows = [r for r in claimed if r["id"] is not None]
        layout = await self._layout([r["id"] for r in rows if not r["deleted"] and r["text"] is None])
        wanting: list[_Wanting] = []
        for r in rows:
            doc_id, deleted = r["id"], r["deleted"]
            chunks: list[Chunk] | None = []
            if not deleted:
                try:
                    chunks = (
                        chunk_document(r["text"], self._settings, self._tokens)
                        if r["text"] is not None
                        else layout.get(doc_id)
                    )
                except RecordError as exc:
                    problems[doc_id] = describe(exc)
                    continue
            if chunks is None:
                problems[doc_id] = NO_TEXT
                continue
            wanting.append(_Wanting(doc_id, r["content_sha256"], deleted, chunks, r["tenant"]))
        fills = await self._embed(wanting, problems)
        still: set[str] | None = None  # written but these, which changed since they were read
        try:
            still = set(await self.dependencies.database.call(lambda: self._store.fill(fills)))
        finally:
            # the documents not written (the fill failed, or they changed): the ledger keeps their vectors
            written = {f.doc_id for f in fills} - still if still is not None else set()
            for w in wanting:
                self._purchases.release(w.held.values(), stored=w.doc_id in written)
        done = [f for f in fills if f.doc_id in written]
        self.documents += len(done)
        self.chunks += sum(len(f.chunks) for f in done)
        metrics.GENERATION_FILLED.labels(generation=str(self.generation.id)).inc(len(done))
        if problems:
            for doc_id, problem in sorted(problems.items()):
                log.warning("fill_problem", generation=self.generation.id, doc_id=doc_id, problem=problem)
            await self.dependencies.database.call(lambda: self._release_with_problems(problems))

    async def _release_with_problems(self, problems: dict[str, str]) -> None:
        by_problem: dict[str, list[str]] = {}
        for doc_id, problem in problems.items():
            by_problem.setdefault(problem[:500], []).append(doc_id)
        for problem, doc_ids in by_problem.items():
            await self._store.release_pending(sorted(doc_ids), problem)

    async def _layout(self, doc_ids: list[str]) -> dict[str, list[Chunk]]:
        """Chunks of documents without text, from the served generation if it chunks the same."""
        source = self._source()
        if (
            not doc_ids
            or source is None
            or source.id == self.generation.id
            or source.chunking != self.generation.chunking
        ):
            return {}
        return await self.dependencies.database.call(lambda: self._store.chunk_layout(source, doc_ids))

    async def _embed(self, wanting: list[_Wanting], problems: dict[str, str]) -> list[GenerationFill]:
        supplied = await self._purchases.supply(wanting, known=self._store.known_embeddings)
        # A stop does not wait for the answers: what was sent is paid for and kept in the ledger
        # as it arrives (close() lets it), and the claims are given back.
        results = await unless_stopped(self._stop, _all_vectors(supplied))
        fills = []
        for w, result in zip(wanting, results, strict=True):
            if isinstance(result, RecordError):
                problems[w.doc_id] = describe(result)
                continue
            if isinstance(result, BaseException):
                raise result
            fills.append(GenerationFill(w.doc_id, w.content_sha256, w.deleted, w.chunks, result))
        return fills


async def _all_vectors(supplied: list[list[asyncio.Future[Vector]]]) -> list[list[Vector] | BaseException]:
    """Each document's vectors, or what failed it (its first failed chunk's error), once every
    one is answered (a coroutine: a stop cancels it as a task). One wait for the batch: a wait
    per document (vectors_of) cost the filler a tenth of its CPU. Never cancels the futures
    (other documents may hold the same purchases)."""
    if pending := {f for futures in supplied for f in futures if not f.done()}:
        await asyncio.wait(pending)
    outcomes: list[list[Vector] | BaseException] = []
    for futures in supplied:
        try:
            outcomes.append(settled_vectors(futures))
        except BaseException as exc:  # noqa: BLE001 - the document's failure, handed back as vectors_of's
            outcomes.append(exc)
    return outcomes


class Fillers:
    """A process's part in the generations: it ingests into the served one, and fills every
    other live one beside ingestion (keeping it current). Polls the registry every ``poll``
    seconds: a switch or rollback changes what the worker ingests into (``ingest``), a
    registration starts a filler, a drop stops one."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        ingest: Callable[[Generation], None],
        *,
        stop: asyncio.Event,
        poll: float = GENERATION_POLL,
    ) -> None:
        self._settings = settings
        self._store = store
        self._ingest = ingest
        self._stop = stop
        self._poll = poll
        self._served: Generation | None = None
        self._running: dict[int, _Running] = {}
        self._closing = asyncio.Lock()

    async def watch(self) -> None:
        """Until the stop: a stop ends it quietly (ShuttingDown is how waits say so)."""
        try:
            while not self._stop.is_set():
                try:
                    await self._look()
                except DependencyError as exc:
                    log.warning("generations_unread", error=describe(exc))
                await sleep_unless(self._stop, self._poll)
        except ShuttingDown:
            pass
        finally:
            await asyncio.shield(self.close())

    async def _look(self) -> None:
        found = await self._store.generations()
        self._served = served = generations.served(found)
        metrics.GENERATION_SERVED.set(served.id)
        if self._store.generation is not None and served.id != self._store.generation.id:
            self._ingest(served)
        self._store.reuse_from(found)
        writing = self._store.generation.id if self._store.generation is not None else served.id
        wanted = {g.id: g for g in found if g.id != writing}
        for gid in sorted(set(self._running) - set(wanted)):
            await self._running.pop(gid).close()
        for gid, generation in sorted(wanted.items()):
            if gid not in self._running:
                self._running[gid] = await self._start(generation)
            self._running[gid].store.reuse_from(found)

    async def _start(self, generation: Generation) -> _Running:
        settings = dataclasses.replace(self._settings, database_pool_size=2)
        store = Store(settings, generation, filling=True)
        embedder = OpenAIEmbedder(store.settings)
        await embedder.__aenter__()
        try:
            await store.open()
        except BaseException:
            await embedder.__aexit__(None, None, None)
            raise
        filler = Filler(
            store, embedder, source=lambda: self._served, stop=self._stop, tasks=WORKER_FILL_TASKS
        )
        task = asyncio.create_task(filler.run(until_done=False), name=f"fill-{generation.id}")
        log.info("generation_filling", generation=generation.describe(), state=generation.state)
        return _Running(filler, task, store, embedder)

    async def drain(self) -> None:
        """Fill every live generation until nothing is pending in it (``run --stop-when-idle``)."""
        for running in list(self._running.values()):
            running.task.cancel()
            await asyncio.gather(running.task, return_exceptions=True)
            await running.filler.run(until_done=True)

    async def close(self) -> None:
        """Close every filler, once: the cancelled watch's close and the app's may overlap, and
        the second returns when the first is done."""
        async with self._closing:
            while self._running:
                await self._running.popitem()[1].close()


@dataclass(eq=False)
class _Running:
    filler: Filler
    task: asyncio.Task[None]
    store: Store
    embedder: OpenAIEmbedder

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.filler.close()
        await self.store.close()
        await self.embedder.__aexit__(None, None, None)
