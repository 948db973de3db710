"""PostgreSQL with pgvector: schema, the batch write, search (statements: worker.sql; the search
itself: worker.search).

A batch is written in one transaction: lock the batch's document rows in key order, check
that nothing changed since the batch was planned, upsert the documents, then write their chunks:
a binary COPY straight into the table for documents it had no row of, a COPY into a temporary
table and a merge for the others (unchanged chunks untouched), and trim the surplus. Rows are
always touched in key order so concurrent workers cannot deadlock.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import struct
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, Protocol

import asyncpg
import numpy as np
import orjson
import structlog
from pgvector import HalfVector
from pgvector import Vector as PgVector

from worker import generations, metrics
from worker.chunk import Chunk
from worker.errors import (
    ConfigError,
    DatabaseRefused,
    DatabaseUnavailable,
    Fenced,
    Indexing,
    StaleRead,
    StoreRejected,
    WriteTimedOut,
    describe,
)
from worker.generations import Generation
from worker.ledger import LedgerTable, PaidEmbeddings, ledger_key
from worker.plan import Change, DocState
from worker.schema import LOGIN_ERRORS, OUTAGE_ERRORS, Schema, connect, login_refused, unavailable
from worker.search import EXACT_SEARCH_MAX_ROWS, Hit, nearest
from worker.settings import Settings
from worker.sql import (
    ANN_INDEX_STATE_SQL,
    CHUNK_COLUMNS,
    EXISTS_SQL,
    EXTENSION_SCHEMA_SQL,
    WRITE_PRIVILEGES_SQL,
    Statements,
    quoted,
)
from worker.types import Record, TopicPartition, Vector
from worker.usage import UsageRows, UsageTable

log = structlog.get_logger()


@dataclass(frozen=True, slots=True)
class DocumentWrite:
    """One document's change with its chunks and their embeddings, ready to store."""

    change: Change
    record: Record  # the event's, for the row's source columns
    chunks: Sequence[Chunk]
    embeddings: Sequence[Vector]


@dataclass(frozen=True, slots=True)
class GenerationFill:
    """One document's chunks and embeddings for a generation, made from what it held when read."""

    doc_id: str
    content_sha256: bytes | None
    deleted: bool
    chunks: Sequence[Chunk]
    embeddings: Sequence[Vector]


@dataclass(frozen=True, slots=True)
class Progress:
    """Each partition's next offset below which every record is finished: ``before`` a batch,
    and ``after`` it (its records stored too). A write records the one that its transaction makes
    true, so that the database alone says how far it got."""

    before: Mapping[TopicPartition, int]
    after: Mapping[TopicPartition, int]
    epoch: int | None = None  # this assignment's claim on its partitions (None: none taken)


class DocumentStore(Protocol):
    """What the Worker needs of the database (a fake implements it in unit tests)."""

    @property
    def ledger(self) -> PaidEmbeddings:
        """The embedding ledger's table (worker.ledger)."""
        ...

    @property
    def usage(self) -> UsageTable:
        """What the embeddings cost (worker.usage)."""
        ...

    async def probe(self) -> None:
        """Raise DatabaseUnavailable unless the database answers and lets this role write."""
        ...

    async def read_states(self, doc_ids: Sequence[str]) -> dict[str, DocState]: ...
    async def write(self, writes: Sequence[DocumentWrite], progress: Progress | None = None) -> set[str]: ...
    async def stored_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]: ...
    async def record_progress(self, watermarks: Mapping[TopicPartition, int], epoch: int | None) -> None: ...
    async def claim(self, starts: Mapping[TopicPartition, int]) -> int | None: ...
    async def known_embeddings(self, hashes: Sequence[bytes]) -> dict[bytes, Vector]: ...


class _Found(NamedTuple):
    """What a schema holds: one migrated before a table or column was added lacks it."""

    vector_schema: str  # where pgvector's types are (for its codec)
    offsets: bool  # source_offsets
    ledger: bool  # embedding_ledger
    usage: bool  # embedding_usage
    text: bool  # documents.text


def sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


# A filler's sessions (its claims, fills, kept answers) do not wait for their commits' WAL to
# reach the disk: a fill is a batch of 64 documents, and those waits were a tenth of a reindex's
# fill. A database crash may lose what they committed in its last 3 x wal_writer_delay (0.6 s by
# default): those documents are pending again and are filled, their embeddings bought, again.
# Nothing is lost or inconsistent (the WAL is written in order) and ingestion's commits wait as
# ever.
FILLING_SESSION: Final = {"synchronous_commit": "off"}


class Store:
    """The database of one DATABASE_SCHEMA, writing one generation of the index (``use``): the
    served one, as ``migrate`` and ``check`` find it, unless told another."""

    def __init__(
        self, settings: Settings, generation: Generation | None = None, *, filling: bool = False
    ) -> None:
        self._base_settings = settings
        self._filling = filling  # a filler's store (worker.fill): commits need not wait for the disk
        self._settings = settings
        self._schema = quoted(settings.database_schema)
        self._sql = Statements.of(self._schema, settings.vector_type)  # the view, until use()
        self.schema = Schema(settings, self._schema, self._sql)
        self.generation: Generation | None = None
        self._fixed = generation is not None  # told which generation: migrate/check keep it
        self._pool: asyncpg.Pool | None = None
        self._vector_schema = "public"
        self._records_offsets = False  # the schema has source_offsets (one migrated before it has not)
        self._stores_text = False  # documents has its text column (likewise)
        self._usage, self._ledger = self._tables()
        self._retired_ledgers: list[LedgerTable] = []
        self._siblings: list[Statements] = []  # see reuse_from()
        if generation is not None:
            self.use(generation)

    def use(self, generation: Generation) -> None:
        """Write (and read, and search) ``generation`` from now on: its table, model, dimensions,
        vector type and chunking. Called between pipelines, never while one writes."""
        if generation == self.generation:
            return
        self.generation = generation
        self._settings = generation.settings(self._base_settings)
        self._sql = generation.statements(self._schema)
        self.schema = Schema(self._settings, self._schema, self._sql)
        exists = self._ledger.exists, self._usage.exists
        self._retired_ledgers.append(self._ledger)  # its presence connection closes with the store
        self._usage, self._ledger = self._tables()
        self._ledger.exists, self._usage.exists = exists

    def _tables(self) -> tuple[UsageRows, LedgerTable]:
        """``embedding_usage`` and ``embedding_ledger`` as the generation's statements name them."""
        usage = UsageRows(self._sql, pool=lambda: self._pool)
        ledger = LedgerTable(
            self._settings, self._sql, fetch=self._fetch, pool=lambda: self._pool, usage=usage
        )
        return usage, ledger

    @property
    def settings(self) -> Settings:
        """The settings with the generation's model, dimensions, vector type and chunking."""
        return self._settings

    async def __aenter__(self) -> Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Create the pool; again after success is a no-op (start-up retries call it repeatedly)."""
        if self._pool is not None:
            return
        try:
            found = await self._inspect()
            self._vector_schema = found.vector_schema
            self._records_offsets = found.offsets
            self._stores_text = found.text
            self._ledger.exists, self._usage.exists = found.ledger, found.usage
            self._pool = await asyncpg.create_pool(
                self._settings.database_url.reveal(),
                min_size=1,
                max_size=self._settings.database_pool_size,
                statement_cache_size=self._settings.database_statement_cache_size,
                init=self._init_connection,
                reset=_reset_connection,
                command_timeout=120,
                server_settings=FILLING_SESSION if self._filling else None,
            )
        except (*OUTAGE_ERRORS, *LOGIN_ERRORS) as exc:
            raise login_refused(exc, self._settings) or unavailable(exc) from exc

    def connections(self) -> dict[str, int]:
        """The pool's connections in use and idle (none before it is open)."""
        if self._pool is None:
            return {"in_use": 0, "idle": 0}
        idle = self._pool.get_idle_size()
        return {"in_use": self._pool.get_size() - idle, "idle": idle}

    @property
    def ledger(self) -> LedgerTable:
        return self._ledger

    @property
    def usage(self) -> UsageRows:
        return self._usage

    async def close(self) -> None:
        for ledger in (*self._retired_ledgers, self._ledger):
            await ledger.close()
        self._retired_ledgers.clear()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _init_connection(self, conn: asyncpg.Connection) -> None:
        # pgvector's codecs (its register_vector's), with numpy arrays written without its objects;
        # not sparsevec, which the worker never reads or writes (each type costs a round trip to
        # introspect, on every new connection)
        for type_name, encode, decode in _VECTOR_CODECS:
            try:
                await conn.set_type_codec(
                    type_name, schema=self._vector_schema, encoder=encode, decoder=decode, format="binary"
                )
            except ValueError as exc:
                if type_name != "halfvec" or not str(exc).startswith("unknown type:"):
                    raise  # (pgvector before 0.7 has no halfvec)

    async def _inspect(self) -> _Found:
        """pgvector's schema (for its codec), and whether ``source_offsets``, ``embedding_ledger``,
        ``embedding_usage`` and ``documents.text`` exist (a schema migrated before them has none)."""
        conn = await connect(self._settings)
        try:
            schema = await conn.fetchval(EXTENSION_SCHEMA_SQL)
            offsets = await conn.fetchval("SELECT to_regclass($1)", f"{self._schema}.source_offsets")
            ledger = await conn.fetchval("SELECT to_regclass($1)", f"{self._schema}.embedding_ledger")
            usage = await conn.fetchval("SELECT to_regclass($1)", f"{self._schema}.embedding_usage")
            text = await conn.fetchval(EXISTS_SQL["column"], f"{self._schema}.documents text")
        finally:
            await conn.close()
        if schema is None:
            raise ConfigError("DATABASE_URL", "the pgvector extension is not installed there; run `migrate`")
        return _Found(
            str(schema), offsets is not None, ledger is not None, usage is not None, text is not None
        )

    # -- schema ---------------------------------------------------------------------------

    async def migrate(self, *, ann_index: bool = True, only_if_empty: bool = False) -> list[Generation]:
        """See :meth:`worker.schema.Schema.migrate`; uses the served generation from then on."""
        found = await self.schema.migrate(ann_index=ann_index, only_if_empty=only_if_empty)
        self._use_served(found)
        return found

    async def check(self, *, chunking: bool = True) -> list[Generation]:
        """See :meth:`worker.schema.Schema.check`; uses the served generation from then on."""
        found = await self.schema.check(chunking=chunking)
        self._use_served(found)
        return found

    def _use_served(self, found: list[Generation]) -> None:
        if not self._fixed:
            self.use(generations.served(found))
        self.reuse_from(found)

    async def generations(self) -> list[Generation]:
        """The registry as it is now (DatabaseUnavailable in an outage, as every other read)."""
        return [Generation.of_row(row) for row in await self._fetch(self._sql.generations)]

    async def build_ann_index(self) -> bool:
        """The HNSW index of this store's generation (worker.schema): CONCURRENTLY while served."""
        served = self.generation is None or self.generation.state == "served"
        return await self.schema.build_ann_index(served=served)

    # -- the write path -------------------------------------------------------------------

    async def read_states(self, doc_ids: Sequence[str]) -> dict[str, DocState]:
        """What is stored for these documents (no lock): used to plan a batch before embedding."""
        rows = await self._fetch(self._sql.read_states, list(doc_ids))
        return {row["id"]: _state(row) for row in rows}

    async def write(self, writes: Sequence[DocumentWrite], progress: Progress | None = None) -> set[str]:
        """Apply a planned batch in one transaction, recording in the same one how far each
        partition got (``progress``: with this batch, or before it when part of it moved).

        Returns the ids of documents that changed since they were planned (a rebalance race):
        those are not written, and must be planned again.
        """
        if not writes:
            return set()
        writes = sorted(writes, key=lambda w: w.change.event.doc_id)
        ids = [w.change.event.doc_id for w in writes]
        model = self._settings.embedding_model
        chunk_rows = [
            (w.change.event.doc_id, c.index, c.content, e, c.char_start, c.char_end, model, c.digest)
            for w in writes
            if not w.change.after.deleted
            for c, e in zip(w.chunks, w.embeddings, strict=True)
        ]
        assert self._pool is not None
        try:
            clock = metrics.WriteLaps()
            async with self._pool.acquire() as conn, self._usage.carried() as carry:
                clock.lap("acquire")
                async with conn.transaction():
                    others = await self._lock_generations(conn)
                    clock.lap("generations")
                    locked = await conn.fetch(self._sql.lock_states, ids)
                    clock.lap("lock")
                    now = {row["id"]: _state(row) for row in locked}
                    moved = {
                        w.change.event.doc_id
                        for w in writes
                        if now.get(w.change.event.doc_id) != w.change.before
                    }
                    if moved:
                        writes = [w for w in writes if w.change.event.doc_id not in moved]
                        chunk_rows = [row for row in chunk_rows if row[0] not in moved]
                    if self._stores_text:
                        await conn.execute(
                            self._sql.upsert_documents, *_document_columns(writes), _texts(writes)
                        )
                    else:
                        await conn.execute(
                            self._sql.upsert_documents_without_text, *_document_columns(writes)
                        )
                    clock.lap("upsert_documents")
                    # A document without a row has no chunks (they reference it): its chunks are
                    # copied straight into the table. The others' go through the merge, which
                    # leaves unchanged chunks untouched and updates changed ones.
                    new = [row for row in chunk_rows if row[0] not in now]
                    if new:
                        await self._copy_chunks(conn, new)
                        clock.lap("copy_new")
                    if len(new) < len(chunk_rows):
                        await conn.execute(self._sql.incoming_table)
                        await conn.copy_records_to_table(
                            self._sql.incoming.strip('"'),
                            columns=CHUNK_COLUMNS,
                            records=[r for r in chunk_rows if r[0] in now],
                        )
                        clock.lap("stage")
                        await conn.execute(self._sql.merge_chunks)
                        clock.lap("merge")
                    stored = [w for w in writes if w.change.event.doc_id in now]
                    if stored:
                        counts = [0 if w.change.after.deleted else len(w.chunks) for w in stored]
                        await conn.execute(
                            self._sql.trim_chunks, [w.change.event.doc_id for w in stored], counts
                        )
                        clock.lap("trim")
                    if others and writes:  # behind on these documents now: filled (worker.fill)
                        await conn.execute(
                            self._sql.mark_pending, others, [w.change.event.doc_id for w in writes]
                        )
                        clock.lap("pending")
                    if progress is not None and self._records_offsets:
                        record = progress.before if moved else progress.after
                        await self._record(conn, record, progress.epoch)
                        clock.lap("offsets")
                    await carry(conn)  # no vector stored without its count (worker.usage)
                    clock.lap("usage")
                clock.lap("commit")
        except asyncpg.UniqueViolationError as exc:
            # Another worker inserted one of these documents' chunks after our lock read found no
            # row (the straight COPY collided with them): re-plan, against what it stored.
            raise StaleRead(describe(exc)) from exc
        except asyncpg.exceptions.QueryCanceledError as exc:  # statement_timeout, before OUTAGE_ERRORS
            raise WriteTimedOut(
                f"a write of {len(writes)} documents ({len(chunk_rows)} chunks) was cancelled: "
                f"{describe(exc)} (statement_timeout?)"
            ) from exc
        except OUTAGE_ERRORS as exc:
            raise DatabaseUnavailable(f"database write failed: {describe(exc)}") from exc
        except asyncpg.PostgresError as exc:
            if _refuses_every_write(exc):
                raise DatabaseRefused(f"database refuses writes: {describe(exc)}") from exc
            raise StoreRejected(f"database refused the batch: {describe(exc)}") from exc
        return moved

    async def _copy_chunks(self, conn: asyncpg.Connection, rows: list[tuple[Any, ...]]) -> None:
        """Binary COPY of chunk rows (CHUNK_COLUMNS) straight into the generation's table."""
        await conn.copy_records_to_table(
            self._sql.table, schema_name=self._settings.database_schema, columns=CHUNK_COLUMNS, records=rows
        )

    async def _lock_generations(self, conn: asyncpg.Connection) -> list[int]:
        """Key-share lock the registry's rows (a registration, a drop wait for this write) and
        return the other live generations, which this write's documents become pending in.
        Raises StaleRead when this store's generation was dropped meanwhile (the worker then
        writes the served one)."""
        if self.generation is None:
            return []
        live = [row["id"] for row in await conn.fetch(self._sql.live_generations)]
        if self.generation.id not in live:
            raise StaleRead(f"generation {self.generation.describe()} was dropped")
        return [g for g in live if g != self.generation.id]

    async def record_progress(self, watermarks: Mapping[TopicPartition, int], epoch: int | None) -> None:
        """Record how far each partition got where no write did (what is committed next)."""
        if not watermarks or not self._records_offsets:
            return
        assert self._pool is not None
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                await self._record(conn, watermarks, epoch)
        except OUTAGE_ERRORS as exc:
            raise DatabaseUnavailable(f"database write failed: {describe(exc)}") from exc
        except asyncpg.PostgresError as exc:
            raise DatabaseRefused(f"database refuses the progress record: {describe(exc)}") from exc

    async def claim(self, starts: Mapping[TopicPartition, int]) -> int | None:
        """Take ``starts``' partitions for this assignment: a new owner epoch, which every later
        write checks. A partition the database has no row for starts at its given offset."""
        if not starts or not self._records_offsets:
            return None
        tps = sorted(starts)
        rows = await self._fetch(self._sql.claim, *_columns(tps), [starts[tp] for tp in tps])
        return int(rows[0]["owner_epoch"])

    async def _record(
        self, conn: asyncpg.Connection, watermarks: Mapping[TopicPartition, int], epoch: int | None
    ) -> None:
        """Lock the partitions' rows in key order, refuse (Fenced) if another assignment has
        claimed any of them since ``epoch``, then record how far each got."""
        if not watermarks:
            return
        tps = sorted(watermarks)
        topics, partitions = _columns(tps)
        owned = await conn.fetch(self._sql.lock_owned, topics, partitions)
        if epoch is not None:
            taken = [f"{r['topic']}/{r['partition']}" for r in owned if r["owner_epoch"] != epoch]
            if taken:
                raise Fenced(
                    f"partitions {', '.join(taken)} were claimed by another member since epoch {epoch}"
                )
        await conn.execute(self._sql.record_offsets, topics, partitions, [watermarks[tp] for tp in tps])

    async def stored_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """How far the database got on each of ``partitions`` (those it has a record of)."""
        wanted = sorted(partitions)
        if not wanted or not self._records_offsets:
            return {}
        rows = await self._fetch(self._sql.read_offsets, *_columns(wanted))
        return {TopicPartition(r["topic"], r["partition"]): int(r["next_offset"]) for r in rows}

    async def known_embeddings(self, hashes: Sequence[bytes]) -> dict[bytes, Vector]:
        """Embeddings of these content hashes (same model), stored or in the ledger: what need not
        be embedded again."""
        if not hashes:
            return {}
        sql = self._sql.known_embeddings_with_ledger if self._ledger.enabled else self._sql.known_embeddings
        model = self._settings.embedding_model
        if self._ledger.enabled:
            rows = await self._fetch(sql, list(hashes), model, ledger_key(self._settings))
        else:
            rows = await self._fetch(sql, list(hashes), model)
        known = {bytes(r["content_sha256"]): r["embedding"].to_numpy() for r in rows}
        for sibling in self._siblings:  # another generation of this model and dimensions
            if not (rest := [h for h in hashes if h not in known]):
                break
            rows = await self._fetch(sibling.known_embeddings, rest, model)
            known |= {bytes(r["content_sha256"]): r["embedding"].to_numpy() for r in rows}
        return known

    def reuse_from(self, found: Sequence[Generation]) -> None:
        """Look for known embeddings in the other live generations of this one's model and
        dimensions too (a chunking change: chunks that come out the same are not bought again)."""
        mine = self.generation
        self._siblings = [
            g.statements(self._schema)
            for g in found
            if mine is not None
            and g.id != mine.id
            and (g.model, g.dimensions) == (mine.model, mine.dimensions)
        ]

    # -- filling a generation (worker.fill) ------------------------------------------------------

    async def claim_pending(self, count: int, lease: float, after: str = "") -> list[asyncpg.Record]:
        """Up to ``count`` documents pending in this store's generation after ``after``, in key
        order (the database's), claimed by this process (its ledger buyer number, present while it
        lives), with what they hold now: doc_id; id (None: no such document), text (None where not
        kept), content_sha256, deleted, tenant."""
        assert self.generation is not None
        await self._ledger.present()
        return await self._fetch(
            self._sql.claim_pending,
            self.generation.id,
            self._ledger.buyer,
            count,
            lease,
            after,
            self._stores_text,
        )

    async def release_pending(self, doc_ids: Sequence[str], problem: str | None = None) -> None:
        """Let others fill these again (``problem``: none will, until a write changes them)."""
        assert self.generation is not None
        if doc_ids:
            await self._fetch(
                self._sql.release_pending, self.generation.id, list(doc_ids), self._ledger.buyer, problem
            )

    async def chunk_layout(self, source: Generation, doc_ids: Sequence[str]) -> dict[str, list[Chunk]]:
        """The chunks ``source`` holds for these documents, where it is current for them."""
        sql = source.statements(self._schema).chunk_layout
        rows = await self._fetch(sql, list(doc_ids), source.id)
        layout: dict[str, list[Chunk]] = {}
        for r in rows:
            chunk = Chunk(r["chunk_index"], r["content"], r["char_start"], r["char_end"])
            layout.setdefault(r["doc_id"], []).append(chunk)
        return layout

    async def fill(self, fills: Sequence[GenerationFill]) -> list[str]:
        """Write the documents' chunks into this store's generation in one transaction, for those
        still as they were read (share-locked: no write changes them meanwhile), and take them off
        its pending list. Returns the ids of those that changed since: still pending, to fill again."""
        assert self.generation is not None and self._pool is not None
        fills = sorted(fills, key=lambda f: f.doc_id)
        ids = [f.doc_id for f in fills]
        model = self._settings.embedding_model
        try:
            async with self._pool.acquire() as conn, self._usage.carried() as carry, conn.transaction():
                if await conn.fetchval(self._sql.lock_generation, self.generation.id) is None:
                    raise StaleRead(f"generation {self.generation.describe()} was dropped")
                try:
                    await conn.execute(self._sql.fill_lock)
                except asyncpg.LockNotAvailableError as exc:
                    raise Indexing(f"generation {self.generation.describe()} is being indexed") from exc
                now = {
                    r["id"]: (r["content_sha256"], r["deleted"])
                    for r in await conn.fetch(self._sql.lock_filled, ids)
                }
                kept = {f.doc_id for f in fills if now.get(f.doc_id) == (f.content_sha256, f.deleted)}
                await conn.execute(self._sql.settle_fill, self.generation.id, sorted(kept))
                rows = [
                    (f.doc_id, c.index, c.content, e, c.char_start, c.char_end, model, c.digest)
                    for f in fills
                    if f.doc_id in kept
                    for c, e in zip(f.chunks, f.embeddings, strict=True)
                ]
                if rows:
                    await self._copy_chunks(conn, rows)
                changed = sorted(set(ids) - kept)
                if changed:
                    await conn.execute(
                        self._sql.release_pending, self.generation.id, changed, self._ledger.buyer, None
                    )
                await carry(conn)
        except OUTAGE_ERRORS as exc:
            raise DatabaseUnavailable(f"generation fill failed: {describe(exc)}") from exc
        except asyncpg.PostgresError as exc:
            raise DatabaseRefused(f"database refuses the generation fill: {describe(exc)}") from exc
        return changed

    async def indexing(self) -> bool:
        """This generation's HNSW index is being built: a fill would fail (Indexing)."""
        return bool(await self._fetchval(self._sql.indexing))

    async def pending_counts(self) -> dict[int, asyncpg.Record]:
        rows = await self._fetch(self._sql.pending_counts)
        return {r["generation"]: r for r in rows}

    # -- the registry (worker.reindex) -------------------------------------------------------------

    async def register_generation(self, wanted: Generation) -> Generation:
        """Register ``wanted`` as a new generation being built, make its table, and list every live
        document as pending in it: in one transaction that locks the registry exclusively, so that
        the writes in flight finish first and every later write sees the generation."""
        async with self._pool_or_raise().acquire() as conn, conn.transaction():
            await conn.execute(self._sql.register_lock)
            for other in await generations.read(conn, self._sql):  # another start got here first
                if other.state != "served":
                    raise ConfigError(
                        "--model",
                        f"generation {other.describe()} was registered meanwhile: one generation "
                        "beside the served one at a time",
                    )
            generation = await generations.register(
                conn, self._sql, dataclasses.replace(wanted, state="building")
            )
            for statement in generation.statements(self._schema).generation_table:
                await conn.execute(statement)
            await conn.execute(self._sql.seed_pending, generation.id)
        return generation

    async def serve(self, target: Generation) -> tuple[int, int] | None:
        """Serve ``target`` (the others kept) if nothing is pending in it: the registry's rows locked
        (writes in flight finish first, later ones wait for this), the states set and the `chunks`
        view replaced, in one transaction. None when served; else (pending, problems)."""
        async with self._pool_or_raise().acquire() as conn, conn.transaction():
            registry = [Generation.of_row(row) for row in await conn.fetch(self._sql.lock_registry)]
            behind = {r["generation"]: r for r in await conn.fetch(self._sql.pending_counts)}.get(target.id)
            if behind is not None:
                return int(behind["pending"]), int(behind["problems"])
            await conn.execute(self._sql.set_state, generations.served(registry).id, "kept")
            await conn.execute(self._sql.set_state, target.id, "served")
            for statement in target.statements(self._schema).chunks_view:
                await conn.execute(statement)
        return None

    async def drop_generation(self, target: Generation) -> None:
        """Remove a generation not served: its registry row (once the writes holding it finish),
        its pending rows and its table."""
        async with self._pool_or_raise().acquire() as conn, conn.transaction():
            states = {row["id"]: row["state"] for row in await conn.fetch(self._sql.lock_registry)}
            state = states.get(target.id)
            if state is None or state == "served":
                raise ConfigError("reindex", f"generation {target.describe()} is {state or 'gone'}")
            await conn.execute(self._sql.drop_generation, target.id)
            await conn.execute(f"DROP TABLE IF EXISTS {target.statements(self._schema).chunks}")

    async def live_documents(self) -> int:
        return int(await self._fetchval(self._sql.live_documents))

    async def count_chunks(self, generation: Generation) -> int:
        return int(await self._fetchval(f"SELECT count(*) FROM {generation.statements(self._schema).chunks}"))

    async def ann_index_state_of(self, generation: Generation) -> str:
        return str(await self._fetchval(ANN_INDEX_STATE_SQL, generation.statements(self._schema).ann_index))

    async def ann_index_state(self) -> str:
        """ "ready", "missing" or "invalid": searches without a ready index scan every chunk."""
        return str(await self._fetchval(ANN_INDEX_STATE_SQL, self.schema.ann_index_name))

    async def search(
        self,
        embedding: Vector,
        k: int,
        *,
        tenant: str | None = None,
        exact_up_to: int = EXACT_SEARCH_MAX_ROWS,
    ) -> list[Hit]:
        """See :func:`worker.search.nearest`."""
        if self._pool is None:
            raise DatabaseUnavailable("not connected yet")
        model = self._settings.embedding_model
        try:
            async with self._pool.acquire() as conn:
                return await nearest(conn, self._sql, model, embedding, k, tenant, exact_up_to)
        except OUTAGE_ERRORS as exc:
            raise DatabaseUnavailable(f"search failed: {describe(exc)}") from exc

    async def search_served(
        self,
        embed: Callable[[Generation], Awaitable[Vector]],
        k: int,
        *,
        tenant: str | None = None,
    ) -> tuple[Generation, list[Hit]]:
        """Search the generation served now: the query embedded (``embed``) with its model and
        dimensions, its own table searched. A switch meanwhile leaves the generation read intact
        (kept); one dropped meanwhile is searched again in the one served then."""
        for attempt in (1, 2):
            serving = generations.served(await generations.read(self._pool_or_raise(), self._sql))
            vector = await embed(serving)
            sql = self._statements_of(serving)
            try:
                async with self._pool_or_raise().acquire() as conn:
                    return serving, await nearest(conn, sql, serving.model, vector, k, tenant)
            except asyncpg.UndefinedTableError:
                if attempt == 2:
                    raise
            except OUTAGE_ERRORS as exc:
                raise DatabaseUnavailable(f"search failed: {describe(exc)}") from exc
        raise AssertionError("unreachable")

    def _statements_of(self, generation: Generation) -> Statements:
        if generation == self.generation:
            return self._sql
        return generation.statements(self._schema)

    async def usage_rows(self, since: dt.date, tenant: str | None) -> list[asyncpg.Record] | None:
        """``embedding_usage``'s rows from ``since`` on (None: the schema has no such table)."""
        if not self._usage.exists:
            return None
        return await self._fetch(self._sql.usage, since, tenant)

    async def ping(self) -> None:
        await self._fetch("SELECT 1")

    async def probe(self) -> None:
        """The database answers and this role may still write both tables (and stage its COPY)."""
        missing = await self._fetchval(
            WRITE_PRIVILEGES_SQL,
            f"{self._schema}.documents",
            self._sql.chunks,
            f"{self._schema}.embedding_ledger" if self._ledger.enabled else None,  # off: not needed
        )
        if missing:
            raise DatabaseRefused(f"this role may not write: it lacks {missing}")

    def _pool_or_raise(self) -> asyncpg.Pool:
        if self._pool is None:
            raise DatabaseUnavailable("not connected yet: start-up is waiting for the database")
        return self._pool

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        rows = await self._fetch(sql, *args)
        return rows[0][0] if rows else None

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        if self._pool is None:  # /readyz asks before start-up has connected
            raise DatabaseUnavailable("not connected yet: start-up is waiting for the database")
        try:
            return list(await self._pool.fetch(sql, *args))
        except OUTAGE_ERRORS as exc:
            raise DatabaseUnavailable(f"database query failed: {describe(exc)}") from exc
        except asyncpg.PostgresError as exc:
            if _refuses_every_write(exc):  # a privilege or an object missing: no retry changes it
                raise DatabaseRefused(f"database refuses the query: {describe(exc)}") from exc
            raise


def _document_columns(writes: Sequence[DocumentWrite]) -> tuple[list[Any], ...]:
    columns: tuple[list[Any], ...] = tuple([] for _ in range(10))
    for w in writes:
        event, after = w.change.event, w.change.after
        live = not after.deleted
        row = (
            event.doc_id,
            after.version,
            after.deleted,
            orjson.dumps(event.metadata).decode() if event.metadata is not None and live else None,
            event.tenant,
            len(w.chunks) if live else 0,
            sha256(event.text) if live else None,
            w.record.topic,
            w.record.partition,
            w.record.offset,
        )
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    return columns


def _state(row: asyncpg.Record) -> DocState:
    topic, partition, offset = row["source_topic"], row["source_partition"], row["source_offset"]
    source = None if topic is None or partition is None or offset is None else (topic, partition, offset)
    return DocState(row["version"], row["deleted"], source)


def _texts(writes: Sequence[DocumentWrite]) -> list[str | None]:
    return [None if w.change.after.deleted else w.change.event.text for w in writes]


def _columns(partitions: Sequence[TopicPartition]) -> tuple[list[str], list[int]]:
    """Topics and partition numbers as two arrays, the form the offsets statements unnest."""
    return [tp.topic for tp in partitions], [tp.partition for tp in partitions]


def _refuses_every_write(exc: asyncpg.PostgresError) -> bool:
    """SQLSTATE classes that no document's data causes: access rules and missing objects (42),
    invalid schema (3F) or authorization (28), unsupported features (0A)."""
    return str(getattr(exc, "sqlstate", "") or "")[:2] in {"42", "3F", "28", "0A"}


async def _reset_connection(conn: asyncpg.Connection) -> None:
    """Nothing beyond what asyncpg's pool always does (an open transaction rolled back): no
    pooled connection carries session state (settings are set per transaction, advisory locks
    are held on connections of their own), so its reset query, one more round trip for every
    release, is not sent."""


_VECTOR_HEADER = struct.Struct(">HH")  # pgvector's binary vector and halfvec: dimensions, unused


def _binary(big_endian: str, fallback: type[PgVector] | type[HalfVector]) -> Callable[[Any], bytes]:
    """pgvector's binary encoder for a vector type, with a one-dimensional numpy array (what the
    worker holds) written straight from its buffer: pgvector's own builds an object of it first
    (3.5 times the time: 2.5 against 0.7 us a 384-dimension vector here). Other values go
    through pgvector's."""

    def encode(value: Any) -> bytes:
        if isinstance(value, np.ndarray) and value.ndim == 1:
            return _VECTOR_HEADER.pack(len(value), 0) + value.astype(big_endian, copy=False).tobytes()
        return bytes((value if isinstance(value, fallback) else fallback(value)).to_binary())

    return encode


_VECTOR_CODECS: Final = (
    ("vector", _binary(">f4", PgVector), PgVector.from_binary),
    ("halfvec", _binary(">f2", HalfVector), HalfVector.from_binary),
)
