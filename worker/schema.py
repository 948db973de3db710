"""The schema of one DATABASE_SCHEMA: creating what is missing, checking what is there, and
the HNSW index (built CONCURRENTLY, one session at a time). worker.store reads and writes it."""

from __future__ import annotations

import asyncio
from typing import Final

import asyncpg

from worker.errors import ConfigError, DatabaseUnavailable, StoreRejected, describe
from worker.settings import Settings
from worker.sql import (
    ANN_BUILD_LOCK,
    ANN_INDEX_STATE_SQL,
    EMBEDDING_TYPE_SQL,
    EXISTS_SQL,
    INDEX_SETTINGS_STEP,
    MIGRATION_LOCK,
    MIGRATION_STEPS,
    Statements,
)

# Errors that say "the database is not there right now", as opposed to "it refuses this data".
OUTAGE_ERRORS: Final = (
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


class Schema:
    def __init__(self, settings: Settings, schema: str, sql: Statements) -> None:
        self._settings = settings
        self._schema = schema  # quoted
        self._sql = sql

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
        except OUTAGE_ERRORS as exc:
            raise DatabaseUnavailable(f"cannot connect to the database: {describe(exc)}") from exc
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
                for kind, name, sql in (*MIGRATION_STEPS, INDEX_SETTINGS_STEP):
                    if await conn.fetchval(EXISTS_SQL[kind], name.format(**names)) is None:
                        await conn.execute(sql.format(**names))
                if await conn.fetchval(self._sql.stored_model) is None:
                    await conn.execute(self._sql.record_model, s.embedding_model)
                await self._check_index(conn)
            if ann_index and (not only_if_empty or await conn.fetchval(self._sql.chunks_empty)):
                await self._build_ann_index(conn, wait=not only_if_empty)
        except asyncpg.PostgresError as exc:
            raise StoreRejected(f"migration failed: {describe(exc)}") from exc
        finally:
            await conn.close()

    async def check(self) -> None:
        """What `migrate` checks, for `run --no-migrate`: the schema is there, its column and model ours."""
        try:
            conn = await asyncpg.connect(self._settings.database_url.reveal(), timeout=10)
        except OUTAGE_ERRORS as exc:
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
            stored = await conn.fetchval(self._sql.stored_model)
        if stored is not None and stored != s.embedding_model:
            raise ConfigError(
                "EMBEDDING_MODEL",
                f"the index in {s.database_schema} holds embeddings of {stored!r}, not "
                f"{s.embedding_model!r}: two models in one index mix vector spaces; use another "
                "DATABASE_SCHEMA for the new model",
            )

    async def build_ann_index(self) -> bool:
        """Build the HNSW index if it is missing (after a backfill), CONCURRENTLY. True if built now.

        Raises DatabaseUnavailable when the database cannot be reached or goes away meanwhile (an
        interrupted build leaves an invalid index, which the next build replaces).
        """
        try:
            conn = await asyncpg.connect(self._settings.database_url.reveal(), timeout=10)
        except OUTAGE_ERRORS as exc:
            raise DatabaseUnavailable(f"cannot connect to the database: {describe(exc)}") from exc
        try:
            built = await self._build_ann_index(conn, wait=True)
        except BaseException as exc:
            # Ending the session ends a build still running in it (a stop cancels the task mid-
            # statement, where nothing else could be sent) and releases its advisory lock.
            conn.terminate()
            if isinstance(exc, OUTAGE_ERRORS) and not isinstance(exc, asyncpg.QueryCanceledError):
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
        state = str(await conn.fetchval(ANN_INDEX_STATE_SQL, self.ann_index_name))
        if state != "ready":
            if state == "invalid":  # an earlier build was interrupted: start it again
                await conn.execute(self._sql.drop_invalid_ann_index)
            await conn.execute(f"SET maintenance_work_mem = '{s.index_build_memory}'")
            await conn.execute("SET max_parallel_maintenance_workers = 7")
            await conn.execute(self._sql.hnsw_index)
        await conn.execute("SELECT pg_advisory_unlock($1)", ANN_BUILD_LOCK)
        return state != "ready"

    @property
    def ann_index_name(self) -> str:
        return f"{self._schema}.chunks_embedding_hnsw_idx"
