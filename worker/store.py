"""PostgreSQL with pgvector: schema, the batch write, search. All SQL lives here.

A batch is written in one transaction: lock the batch's document rows in key order, check
that nothing changed since the batch was planned, upsert the documents, replace their chunks
(binary COPY). Rows are always touched in key order so concurrent workers cannot deadlock.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

import asyncpg
import orjson
import structlog
from pgvector.asyncpg import register_vector

from worker.chunk import Chunk
from worker.errors import (
    ConfigError,
    DatabaseRefused,
    DatabaseUnavailable,
    StaleRead,
    StoreRejected,
    WriteTimedOut,
    describe,
)
from worker.plan import Change, DocState
from worker.settings import Settings
from worker.types import Record, Vector

log = structlog.get_logger()

MIGRATION_LOCK: Final = 0x656D6265  # pg_advisory_xact_lock key: concurrent `migrate`s queue up
# One HNSW build at a time. Taken with pg_try_advisory_lock and polled from outside any
# transaction: a session blocked on a lock inside a statement holds a snapshot, which a
# CREATE INDEX CONCURRENTLY waits for, and the two would wait for each other.
ANN_BUILD_LOCK: Final = 0x656D6269

# What the schema needs, each created only when it is missing: `CREATE ... IF NOT EXISTS` still
# asks for CREATE on the database or schema (or table ownership), so a least-privilege role
# (USAGE and DML on tables someone else migrated) could not even start `run` otherwise.
# Each step: what kind of object, its name (for the existence check), how to create it.
MIGRATION_STEPS: Final = (
    ("extension", "vector", "CREATE EXTENSION IF NOT EXISTS vector"),
    ("schema", "{schema}", "CREATE SCHEMA IF NOT EXISTS {schema}"),
    (
        "relation",
        "{schema}.documents",
        """CREATE TABLE IF NOT EXISTS {schema}.documents (
    id              text PRIMARY KEY,
    version         bigint,
    deleted         boolean NOT NULL DEFAULT false,
    metadata        jsonb,
    tenant          text,
    chunk_count     integer NOT NULL DEFAULT 0,
    content_sha256  bytea,
    source_topic    text,
    source_partition integer,
    source_offset   bigint,
    updated_at      timestamptz NOT NULL DEFAULT now()
)""",
    ),
    (
        "relation",
        "{schema}.chunks",
        """CREATE TABLE IF NOT EXISTS {schema}.chunks (
    doc_id          text NOT NULL REFERENCES {schema}.documents (id) ON DELETE CASCADE,
    chunk_index     integer NOT NULL,
    content         text NOT NULL,
    embedding       {vector_type}({dimensions}) NOT NULL,
    char_start      integer NOT NULL,
    char_end        integer NOT NULL,
    model           text NOT NULL,
    content_sha256  bytea NOT NULL,
    PRIMARY KEY (doc_id, chunk_index)
)""",
    ),
    (
        "relation",
        "{schema}.documents_tenant_idx",
        "CREATE INDEX IF NOT EXISTS documents_tenant_idx ON {schema}.documents (tenant) WHERE NOT deleted",
    ),
    (
        "relation",
        "{schema}.chunks_content_sha256_idx",
        "CREATE INDEX IF NOT EXISTS chunks_content_sha256_idx ON {schema}.chunks (content_sha256)",
    ),
)
# The model whose embeddings the index holds: two models in one index make a search compare
# vectors of different spaces, so a worker embedding with another model is refused at start.
INDEX_SETTINGS_STEP: Final = (
    "relation",
    "{schema}.index_settings",
    """CREATE TABLE IF NOT EXISTS {schema}.index_settings (
    singleton        boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    embedding_model  text NOT NULL,
    recorded_at      timestamptz NOT NULL DEFAULT now()
)""",
)
# Recorded once: the model of the chunks already stored (a schema older than the record), else ours.
RECORD_MODEL_SQL: Final = """
INSERT INTO {schema}.index_settings (embedding_model)
SELECT coalesce((SELECT model FROM {schema}.chunks LIMIT 1), $1)
ON CONFLICT (singleton) DO NOTHING
"""
STORED_MODEL_SQL: Final = "SELECT embedding_model FROM {schema}.index_settings"
# What a write needs, as a list of what is missing ('' when nothing is): what the database
# dependency's probe checks, so a revoked grant keeps the breaker open instead of flapping.
# (has_table_privilege with several privileges is true when any one is held: one call each.)
_WRITE_NEEDS: Final = (
    ("$1", "documents", ("SELECT", "INSERT", "UPDATE")),
    ("$2", "chunks", ("SELECT", "INSERT", "UPDATE", "DELETE")),
)
WRITE_PRIVILEGES_SQL: Final = "SELECT concat_ws(', ', {})".format(
    ", ".join(
        [f"CASE WHEN to_regclass({p}) IS NULL THEN 'the {t} table' END" for p, t, _ in _WRITE_NEEDS]
        + [
            f"CASE WHEN NOT has_table_privilege(to_regclass({p}), '{priv}') THEN '{priv} on {t}' END"
            for p, t, privileges in _WRITE_NEEDS
            for priv in privileges
        ]
        + ["CASE WHEN NOT has_database_privilege(current_database(), 'TEMPORARY') THEN 'TEMPORARY' END"]
    )
)
EXISTS_SQL: Final = {
    "extension": "SELECT 1 FROM pg_extension WHERE extname = $1",
    "schema": "SELECT to_regnamespace($1)",
    "relation": "SELECT to_regclass($1)",
}
# CONCURRENTLY: writers go on while it builds (a plain CREATE INDEX blocks every write for as long
# as the build takes, minutes on a large table). It cannot run inside a transaction block.
HNSW_INDEX_SQL: Final = """
CREATE INDEX CONCURRENTLY IF NOT EXISTS chunks_embedding_hnsw_idx
    ON {schema}.chunks USING hnsw (embedding {vector_type}_cosine_ops)
"""
# "missing", "invalid" (a concurrent build that failed half-way leaves one) or "ready".
ANN_INDEX_STATE_SQL: Final = """
SELECT CASE WHEN to_regclass($1) IS NULL THEN 'missing'
            WHEN (SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)) THEN 'ready'
            ELSE 'invalid' END
"""
DROP_INVALID_ANN_INDEX_SQL: Final = "DROP INDEX CONCURRENTLY IF EXISTS {schema}.chunks_embedding_hnsw_idx"
CHUNKS_EMPTY_SQL: Final = "SELECT NOT EXISTS (SELECT 1 FROM {schema}.chunks)"
EMBEDDING_TYPE_SQL: Final = """
SELECT format_type(a.atttypid, a.atttypmod)
FROM pg_attribute a
WHERE a.attrelid = to_regclass($1) AND a.attname = 'embedding' AND NOT a.attisdropped
"""
EXTENSION_SCHEMA_SQL: Final = """
SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace WHERE e.extname = 'vector'
"""
READ_STATES_SQL: Final = "SELECT id, version, deleted FROM {schema}.documents WHERE id = ANY($1::text[])"
LOCK_STATES_SQL: Final = READ_STATES_SQL + " ORDER BY id FOR UPDATE"
UPSERT_DOCUMENTS_SQL: Final = """
INSERT INTO {schema}.documents AS d (id, version, deleted, metadata, tenant, chunk_count, content_sha256,
                                     source_topic, source_partition, source_offset, updated_at)
SELECT u.id, u.version, u.deleted, u.metadata::jsonb, u.tenant, u.chunk_count, u.content_sha256,
       u.source_topic, u.source_partition, u.source_offset, now()
FROM unnest($1::text[], $2::bigint[], $3::boolean[], $4::text[], $5::text[], $6::integer[], $7::bytea[],
            $8::text[], $9::integer[], $10::bigint[])
     AS u (id, version, deleted, metadata, tenant, chunk_count, content_sha256,
           source_topic, source_partition, source_offset)
ON CONFLICT (id) DO UPDATE SET
    version = EXCLUDED.version, deleted = EXCLUDED.deleted, metadata = EXCLUDED.metadata,
    tenant = EXCLUDED.tenant, chunk_count = EXCLUDED.chunk_count, content_sha256 = EXCLUDED.content_sha256,
    source_topic = EXCLUDED.source_topic, source_partition = EXCLUDED.source_partition,
    source_offset = EXCLUDED.source_offset, updated_at = now()
"""
# Chunks arrive by binary COPY into a per-session temporary table, then merge: unchanged chunks
# are left alone (no new tuple, no HNSW insert), changed ones updated, surplus ones deleted.
INCOMING_TABLE_SQL: Final = """
CREATE TEMP TABLE IF NOT EXISTS incoming_chunks (LIKE {schema}.chunks INCLUDING DEFAULTS)
    ON COMMIT DELETE ROWS
"""
MERGE_CHUNKS_SQL: Final = """
INSERT INTO {schema}.chunks AS c (doc_id, chunk_index, content, embedding, char_start, char_end, model,
                                  content_sha256)
SELECT doc_id, chunk_index, content, embedding, char_start, char_end, model, content_sha256
FROM incoming_chunks ORDER BY doc_id, chunk_index
ON CONFLICT (doc_id, chunk_index) DO UPDATE SET
    content = EXCLUDED.content, embedding = EXCLUDED.embedding, char_start = EXCLUDED.char_start,
    char_end = EXCLUDED.char_end, model = EXCLUDED.model, content_sha256 = EXCLUDED.content_sha256
WHERE (c.content_sha256, c.char_start, c.char_end, c.model)
      IS DISTINCT FROM (EXCLUDED.content_sha256, EXCLUDED.char_start, EXCLUDED.char_end, EXCLUDED.model)
"""
TRIM_CHUNKS_SQL: Final = """
DELETE FROM {schema}.chunks c
USING unnest($1::text[], $2::integer[]) AS keep (doc_id, count)
WHERE c.doc_id = keep.doc_id AND c.chunk_index >= keep.count
"""
CHUNK_COLUMNS: Final = (
    "doc_id",
    "chunk_index",
    "content",
    "embedding",
    "char_start",
    "char_end",
    "model",
    "content_sha256",
)
# Embeddings already paid for: the same content embedded by the same model (the table fixes dimensions).
KNOWN_EMBEDDINGS_SQL: Final = """
SELECT DISTINCT ON (content_sha256) content_sha256, embedding
FROM {schema}.chunks WHERE content_sha256 = ANY($1::bytea[]) AND model = $2
"""
# A search's candidates: chunks embedded by the configured model ($1) only. index_settings records
# the schema's model, but each row says its own: a schema older than that record may hold rows of
# two models (and `run --no-migrate` there wrote whatever model it was given), and a query vector
# compared with another model's vectors gives meaningless scores. With a tenant ($2), only chunks
# of that tenant's live documents (documents_tenant_idx). The queries below take {candidates} and
# number their own arguments ({limit}, {query}, {k}) after these.
SEARCH_CANDIDATES_SQL: Final = "{schema}.chunks c WHERE c.model = $1"
SEARCH_TENANT_CANDIDATES_SQL: Final = """{schema}.chunks c JOIN {schema}.documents d ON d.id = c.doc_id
WHERE c.model = $1 AND d.tenant = $2 AND NOT d.deleted"""
# How many candidates there are, counting no further than {limit}: what chooses exact or HNSW.
COUNT_CANDIDATES_SQL: Final = "SELECT count(*) FROM (SELECT 1 FROM {candidates} LIMIT {limit}) AS s"
# Exact: every candidate's distance, the nearest k kept (a top-k sort holds only k rows). OFFSET 0
# keeps the subquery from being flattened, so the ORDER BY cannot be served by the HNSW index.
EXACT_SEARCH_SQL: Final = """
SELECT doc_id, chunk_index, content, 1 - distance AS score
FROM (SELECT c.doc_id, c.chunk_index, c.content, c.embedding <=> {query} AS distance
      FROM {candidates} OFFSET 0) AS scored
ORDER BY distance, doc_id, chunk_index
LIMIT {k}
"""
# Through the HNSW index, with ANN_SEARCH_SETTINGS_SQL: an iterative scan (relaxed order) goes on
# past rows the filters drop until k are found, and the outer query puts them in exact order.
ANN_SEARCH_SQL: Final = """
SELECT doc_id, chunk_index, content, 1 - distance AS score
FROM (SELECT c.doc_id, c.chunk_index, c.content, c.embedding <=> {query} AS distance
      FROM {candidates} ORDER BY c.embedding <=> {query} LIMIT {k}) AS nearest
ORDER BY distance, doc_id, chunk_index
"""
ANN_SEARCH_SETTINGS_SQL: Final = """
SELECT set_config('hnsw.ef_search', $1, true), set_config('hnsw.iterative_scan', 'relaxed_order', true),
       set_config('hnsw.max_scan_tuples', $2, true)
"""
# Up to this many candidates a search is exact: HNSW is approximate and misses true neighbours
# even on small tables (see README, Searching). `python -m bench.search` on 2 cores (PostgreSQL
# 18.4, pgvector 0.8.5, warm cache): an exact search over 10,000 rows takes about 6 ms at 384
# dimensions and 40 ms at 1536 (20,000 rows: 13 and 125 ms; 50,000: 35 and 350 ms).
EXACT_SEARCH_MAX_ROWS: Final = 10_000
# Above it, through the index with a beam (ef_search) of max(200, 4k), capped at pgvector's 1000
# (the iterative scan returns more rows than the beam when k asks for it). On 10,000 chunks of the
# sample corpus (13 near-copies of each), recall@10 was 0.74 at pgvector's default of 40, 0.87 at
# 100 and 200, 1.0 at 400, at 0.9, 1.3, 1.7 and 2.7 ms a query. The iterative scan reads at most
# ANN_MAX_SCAN_TUPLES index tuples for k rows that pass the filters (a selective tenant); a
# search that still comes back short is done exactly.
ANN_MIN_EF_SEARCH: Final = 200
ANN_EF_SEARCH_PER_HIT: Final = 4
ANN_MAX_EF_SEARCH: Final = 1000
ANN_MAX_SCAN_TUPLES: Final = 20_000

# Errors that say "the database is not there right now", as opposed to "it refuses this data".
_OUTAGE_ERRORS: Final = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.QueryCanceledError,
    # A connection left mid-operation by a server that went away: seen when PostgreSQL stops
    # during a write and the pool's reset of the connection on release fails.
    asyncpg.InternalClientError,
)


@dataclass(frozen=True, slots=True)
class DocumentWrite:
    """One document's change with its chunks and their embeddings, ready to store."""

    change: Change
    record: Record  # the event's, for the row's source columns
    chunks: Sequence[Chunk]
    embeddings: Sequence[Vector]


@dataclass(frozen=True, slots=True)
class Hit:
    doc_id: str
    chunk_index: int
    content: str
    score: float


class DocumentStore(Protocol):
    """What the Worker needs of the database (a fake implements it in unit tests)."""

    async def probe(self) -> None:
        """Raise DatabaseUnavailable unless the database answers and lets this role write."""
        ...

    async def read_states(self, doc_ids: Sequence[str]) -> dict[str, DocState]: ...
    async def write(self, writes: Sequence[DocumentWrite]) -> set[str]: ...
    async def known_embeddings(self, hashes: Sequence[bytes]) -> dict[bytes, Vector]: ...


def sha256(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


class Store:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._schema = _quote(settings.database_schema)
        self._pool: asyncpg.Pool | None = None
        self._vector_schema = "public"

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
            self._vector_schema = await self._extension_schema()
            self._pool = await asyncpg.create_pool(
                self._settings.database_url.reveal(),
                min_size=1,
                max_size=self._settings.database_pool_size,
                statement_cache_size=self._settings.database_statement_cache_size,
                init=self._init_connection,
                command_timeout=120,
            )
        except _OUTAGE_ERRORS as exc:
            raise DatabaseUnavailable(f"cannot connect to the database: {describe(exc)}") from exc

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _init_connection(self, conn: asyncpg.Connection) -> None:
        await register_vector(conn, schema=self._vector_schema)

    async def _extension_schema(self) -> str:
        conn = await asyncpg.connect(self._settings.database_url.reveal(), timeout=10)
        try:
            schema = await conn.fetchval(EXTENSION_SCHEMA_SQL)
        finally:
            await conn.close()
        if schema is None:
            raise ConfigError("DATABASE_URL", "the pgvector extension is not installed there; run `migrate`")
        return str(schema)

    # -- schema ---------------------------------------------------------------------------

    async def migrate(self, *, ann_index: bool = True, only_if_empty: bool = False) -> None:
        """Create the extension, schema, tables and indexes. Idempotent; safe to run concurrently.

        The HNSW index is built after the rest, CONCURRENTLY; with ``only_if_empty`` (``run``'s
        start-up) only on an empty table, where that takes no time: a worker never spends its
        start-up building an index over rows others keep writing (``build-index`` does that).
        """
        s = self._settings
        names = {"schema": self._schema, "vector_type": s.vector_type, "dimensions": s.embedding_dimensions}
        try:
            conn = await asyncpg.connect(s.database_url.reveal(), timeout=10)
        except _OUTAGE_ERRORS as exc:
            raise DatabaseUnavailable(f"cannot connect to the database: {describe(exc)}") from exc
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
                for kind, name, sql in (*MIGRATION_STEPS, INDEX_SETTINGS_STEP):
                    if await conn.fetchval(EXISTS_SQL[kind], name.format(**names)) is None:
                        await conn.execute(sql.format(**names))
                if await conn.fetchval(STORED_MODEL_SQL.format(schema=self._schema)) is None:
                    await conn.execute(RECORD_MODEL_SQL.format(schema=self._schema), s.embedding_model)
                await self._check_index(conn)
            if ann_index and (
                not only_if_empty or await conn.fetchval(CHUNKS_EMPTY_SQL.format(schema=self._schema))
            ):
                await self._build_ann_index(conn, wait=not only_if_empty)
        except asyncpg.PostgresError as exc:
            raise StoreRejected(f"migration failed: {describe(exc)}") from exc
        finally:
            await conn.close()

    async def check(self) -> None:
        """What `migrate` checks, for `run --no-migrate`: the schema is there, its column and model ours."""
        try:
            conn = await asyncpg.connect(self._settings.database_url.reveal(), timeout=10)
        except _OUTAGE_ERRORS as exc:
            raise DatabaseUnavailable(f"cannot connect to the database: {describe(exc)}") from exc
        try:
            await self._check_index(conn)
        finally:
            await conn.close()

    async def _check_index(self, conn: asyncpg.Connection) -> None:
        s = self._settings
        existing = await conn.fetchval(EMBEDDING_TYPE_SQL, f"{self._schema}.chunks")
        if existing is None:
            raise ConfigError(
                "DATABASE_SCHEMA", f"{s.database_schema}.chunks does not exist; run `ingest-worker migrate`"
            )
        wanted = f"{s.vector_type}({s.embedding_dimensions})"
        if existing != wanted:
            raise ConfigError(
                "EMBEDDING_DIMENSIONS",
                f"the existing {s.database_schema}.chunks.embedding column is {existing}, "
                f"not {wanted} (VECTOR_TYPE, EMBEDDING_DIMENSIONS); use another DATABASE_SCHEMA",
            )
        stored = None
        if await conn.fetchval(EXISTS_SQL["relation"], f"{self._schema}.index_settings") is not None:
            stored = await conn.fetchval(STORED_MODEL_SQL.format(schema=self._schema))
        if stored is not None and stored != s.embedding_model:
            raise ConfigError(
                "EMBEDDING_MODEL",
                f"the index in {s.database_schema} holds embeddings of {stored!r}, not "
                f"{s.embedding_model!r}: two models in one index mix vector spaces; use another "
                "DATABASE_SCHEMA for the new model",
            )

    # -- the write path -------------------------------------------------------------------

    async def read_states(self, doc_ids: Sequence[str]) -> dict[str, DocState]:
        """What is stored for these documents (no lock): used to plan a batch before embedding."""
        rows = await self._fetch(READ_STATES_SQL.format(schema=self._schema), list(doc_ids))
        return {row["id"]: DocState(row["version"], row["deleted"]) for row in rows}

    async def write(self, writes: Sequence[DocumentWrite]) -> set[str]:
        """Apply a planned batch in one transaction.

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
            async with self._pool.acquire() as conn, conn.transaction():
                locked = await conn.fetch(LOCK_STATES_SQL.format(schema=self._schema), ids)
                now = {row["id"]: DocState(row["version"], row["deleted"]) for row in locked}
                moved = {
                    w.change.event.doc_id for w in writes if now.get(w.change.event.doc_id) != w.change.before
                }
                if moved:
                    writes = [w for w in writes if w.change.event.doc_id not in moved]
                    ids = [w.change.event.doc_id for w in writes]
                    chunk_rows = [row for row in chunk_rows if row[0] not in moved]
                await conn.execute(
                    UPSERT_DOCUMENTS_SQL.format(schema=self._schema), *_document_columns(writes)
                )
                if chunk_rows:
                    await conn.execute(INCOMING_TABLE_SQL.format(schema=self._schema))
                    await conn.copy_records_to_table(
                        "incoming_chunks", columns=CHUNK_COLUMNS, records=chunk_rows
                    )
                    await conn.execute(MERGE_CHUNKS_SQL.format(schema=self._schema))
                counts = [0 if w.change.after.deleted else len(w.chunks) for w in writes]
                await conn.execute(TRIM_CHUNKS_SQL.format(schema=self._schema), ids, counts)
        except asyncpg.UniqueViolationError as exc:
            # Another worker inserted one of these documents after our lock read: re-plan.
            raise StaleRead(describe(exc)) from exc
        except asyncpg.exceptions.QueryCanceledError as exc:  # statement_timeout, before _OUTAGE_ERRORS
            raise WriteTimedOut(
                f"a write of {len(writes)} documents ({len(chunk_rows)} chunks) was cancelled: "
                f"{describe(exc)} (statement_timeout?)"
            ) from exc
        except _OUTAGE_ERRORS as exc:
            raise DatabaseUnavailable(f"database write failed: {describe(exc)}") from exc
        except asyncpg.PostgresError as exc:
            if _refuses_every_write(exc):
                raise DatabaseRefused(f"database refuses writes: {describe(exc)}") from exc
            raise StoreRejected(f"database refused the batch: {describe(exc)}") from exc
        return moved

    async def known_embeddings(self, hashes: Sequence[bytes]) -> dict[bytes, Vector]:
        """Stored embeddings of these content hashes (same model): what need not be embedded again."""
        if not hashes:
            return {}
        sql = KNOWN_EMBEDDINGS_SQL.format(schema=self._schema)
        rows = await self._fetch(sql, list(hashes), self._settings.embedding_model)
        return {bytes(r["content_sha256"]): r["embedding"].to_numpy() for r in rows}

    async def build_ann_index(self) -> bool:
        """Build the HNSW index if it is missing (after a backfill), CONCURRENTLY. True if built now.

        Raises DatabaseUnavailable when the database cannot be reached or goes away meanwhile (an
        interrupted build leaves an invalid index, which the next build replaces).
        """
        try:
            conn = await asyncpg.connect(self._settings.database_url.reveal(), timeout=10)
        except _OUTAGE_ERRORS as exc:
            raise DatabaseUnavailable(f"cannot connect to the database: {describe(exc)}") from exc
        try:
            built = await self._build_ann_index(conn, wait=True)
        except BaseException as exc:
            # Ending the session ends a build still running in it (a stop cancels the task mid-
            # statement, where nothing else could be sent) and releases its advisory lock.
            conn.terminate()
            if isinstance(exc, _OUTAGE_ERRORS) and not isinstance(exc, asyncpg.QueryCanceledError):
                raise DatabaseUnavailable(f"the HNSW index build failed: {describe(exc)}") from exc
            raise
        await conn.close()
        return built

    async def _build_ann_index(self, conn: asyncpg.Connection, *, wait: bool) -> bool:
        """Build the index unless it is ready; if another session is building it, wait or leave it.

        On an error the lock is left to the session, which the caller ends: after a cancelled
        statement the unlock could not be sent, and its error would hide the cancellation.
        """
        s = self._settings
        while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", ANN_BUILD_LOCK):
            if not wait:
                return False
            await asyncio.sleep(1.0)
        state = str(await conn.fetchval(ANN_INDEX_STATE_SQL, self._ann_index_name))
        if state != "ready":
            if state == "invalid":  # an earlier build was interrupted: start it again
                await conn.execute(DROP_INVALID_ANN_INDEX_SQL.format(schema=self._schema))
            await conn.execute(f"SET maintenance_work_mem = '{s.index_build_memory}'")
            await conn.execute("SET max_parallel_maintenance_workers = 7")
            await conn.execute(HNSW_INDEX_SQL.format(schema=self._schema, vector_type=s.vector_type))
        await conn.execute("SELECT pg_advisory_unlock($1)", ANN_BUILD_LOCK)
        return state != "ready"

    async def ann_index_state(self) -> str:
        """ "ready", "missing" or "invalid": searches without a ready index scan every chunk."""
        return str(await self._fetchval(ANN_INDEX_STATE_SQL, self._ann_index_name))

    @property
    def _ann_index_name(self) -> str:
        return f"{self._schema}.chunks_embedding_hnsw_idx"

    async def search(
        self,
        embedding: Vector,
        k: int,
        *,
        tenant: str | None = None,
        exact_up_to: int = EXACT_SEARCH_MAX_ROWS,
    ) -> list[Hit]:
        """The ``k`` chunks of this model (and of ``tenant``, if given) nearest ``embedding``, nearest
        first (ties by document id and chunk index).

        Exact while there are at most ``exact_up_to`` candidates; else through the HNSW index with a
        wider beam and an iterative scan, and exactly after all if that finds fewer than ``k``.
        """
        if tenant is None:
            candidates, args = SEARCH_CANDIDATES_SQL, [self._settings.embedding_model]
        else:
            candidates, args = SEARCH_TENANT_CANDIDATES_SQL, [self._settings.embedding_model, tenant]
        names = {
            "candidates": candidates.format(schema=self._schema),
            "limit": f"${len(args) + 1}",
            "query": f"${len(args) + 1}",
            "k": f"${len(args) + 2}",
        }
        if self._pool is None:
            raise DatabaseUnavailable("not connected yet")
        try:
            async with self._pool.acquire() as conn, conn.transaction(readonly=True):
                count = await conn.fetchval(COUNT_CANDIDATES_SQL.format(**names), *args, exact_up_to + 1)
                method = "exact"
                if count > exact_up_to:
                    beam = min(ANN_MAX_EF_SEARCH, max(ANN_MIN_EF_SEARCH, ANN_EF_SEARCH_PER_HIT * k))
                    await conn.execute(ANN_SEARCH_SETTINGS_SQL, str(beam), str(ANN_MAX_SCAN_TUPLES))
                    rows = await conn.fetch(ANN_SEARCH_SQL.format(**names), *args, embedding, k)
                    method = "hnsw" if len(rows) >= k else "hnsw_then_exact"
                if method != "hnsw":
                    rows = await conn.fetch(EXACT_SEARCH_SQL.format(**names), *args, embedding, k)
        except _OUTAGE_ERRORS as exc:
            raise DatabaseUnavailable(f"search failed: {describe(exc)}") from exc
        log.debug("search_done", method=method, candidates=count, hits=len(rows), tenant=tenant)
        return [Hit(r["doc_id"], r["chunk_index"], r["content"], float(r["score"])) for r in rows]

    async def ping(self) -> None:
        await self._fetch("SELECT 1")

    async def probe(self) -> None:
        """The database answers and this role may still write both tables (and stage its COPY)."""
        missing = await self._fetchval(
            WRITE_PRIVILEGES_SQL, f"{self._schema}.documents", f"{self._schema}.chunks"
        )
        if missing:
            raise DatabaseRefused(f"this role may not write: it lacks {missing}")

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        rows = await self._fetch(sql, *args)
        return rows[0][0] if rows else None

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        if self._pool is None:  # /readyz asks before start-up has connected
            raise DatabaseUnavailable("not connected yet: start-up is waiting for the database")
        try:
            return list(await self._pool.fetch(sql, *args))
        except _OUTAGE_ERRORS as exc:
            raise DatabaseUnavailable(f"database query failed: {describe(exc)}") from exc


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


def _refuses_every_write(exc: asyncpg.PostgresError) -> bool:
    """SQLSTATE classes that no document's data causes: access rules and missing objects (42),
    invalid schema (3F) or authorization (28), unsupported features (0A)."""
    return str(getattr(exc, "sqlstate", "") or "")[:2] in {"42", "3F", "28", "0A"}


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
