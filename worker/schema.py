"""The schema of one DATABASE_SCHEMA: creating what is missing (the first generation of the index
included), checking that the settings name a generation, and a generation's HNSW index (built
CONCURRENTLY, one session at a time). worker.store reads and writes it."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from typing import Any, Final

import asyncpg

from worker import generations
from worker.errors import ConfigError, DatabaseUnavailable, StoreRejected, describe
from worker.generations import Generation
from worker.settings import Settings
from worker.sql import (
    ANN_BUILD_LOCK,
    ANN_INDEX_STATE_SQL,
    EMBEDDING_TYPE_SQL,
    EXISTS_SQL,
    MIGRATION_LOCK,
    MIGRATION_STEPS,
    RELKIND_SQL,
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
        self._sql = sql  # the generation's (worker.generations), or the view's before one is known

    async def migrate(self, *, ann_index: bool = True, only_if_empty: bool = False) -> list[Generation]:
        """Create the extension, schema, tables and indexes, and the first generation of the index
        with the `chunks` view of it. Idempotent; safe to run concurrently. Returns the generations,
        having checked that the settings name one of them (ConfigError otherwise).

        The served generation's HNSW index is built after the rest, CONCURRENTLY; with
        ``only_if_empty`` (``run``'s start-up) only on an empty table, where that takes no time: a
        worker never spends its start-up building an index over rows others keep writing
        (``build-index`` does that).
        """
        s = self._settings
        names = {"schema": self._schema}
        conn = await connect(s)
        try:
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
                for kind, name, step in MIGRATION_STEPS:
                    if await conn.fetchval(EXISTS_SQL[kind], name.format(**names)) is None:
                        await conn.execute(step.format(**names))
                if not await generations.read(conn, self._sql):
                    await self._first_generation(conn)
                found = await generations.read(conn, self._sql)
                generations.check_settings(s, found)
            served = generations.served(found).statements(self._schema)
            if ann_index and (not only_if_empty or await conn.fetchval(served.chunks_empty)):
                await self._build_ann_index(conn, served, wait=not only_if_empty)
        except asyncpg.PostgresError as exc:
            raise StoreRejected(f"migration failed: {describe(exc)}") from exc
        finally:
            await conn.close()
        return found

    async def _first_generation(self, conn: asyncpg.Connection) -> None:
        """Generation 1: the settings', in a new table; or, in a schema from before generations,
        its `chunks` table's (the model it records, the column's type), the table renamed to it."""
        s = self._settings
        first = generations.of_settings(s, id=1, state="served")
        kind = await conn.fetchval(RELKIND_SQL, f"{self._schema}.chunks")
        if kind == "r":
            declared = await conn.fetchval(EMBEDDING_TYPE_SQL, f"{self._schema}.chunks")
            model = None
            if await conn.fetchval(EXISTS_SQL["relation"], f"{self._schema}.index_settings") is not None:
                model = await conn.fetchval(self._sql.legacy_model)
            model = model or await conn.fetchval(f"SELECT model FROM {self._schema}.chunks LIMIT 1")
            vector_type, _, dims = str(declared).partition("(")
            first = dataclasses.replace(
                first,
                model=model or first.model,
                vector_type=vector_type if vector_type in ("vector", "halfvec") else first.vector_type,
                dimensions=int(dims.rstrip(")")) if dims else first.dimensions,
            )
        first = await generations.register(conn, self._sql, first)
        sql = first.statements(self._schema)
        for statement in sql.adopt_chunks_table if kind == "r" else sql.generation_table:
            await conn.execute(statement)
        for statement in sql.chunks_view:
            await conn.execute(statement)

    async def check(self, *, chunking: bool = True) -> list[Generation]:
        """What `migrate` checks, for `run --no-migrate`: the schema is there, and the settings
        name one of its generations (``chunking``: with its chunking). Returns them."""
        conn = await connect(self._settings)
        try:
            if await conn.fetchval(EXISTS_SQL["relation"], f"{self._schema}.generations") is None:
                raise ConfigError(
                    "DATABASE_SCHEMA",
                    f"{self._settings.database_schema}.generations does not exist: run `ingest-worker "
                    "migrate`",
                )
            found = await generations.read(conn, self._sql)
            if not found:
                raise ConfigError(
                    "DATABASE_SCHEMA",
                    f"{self._settings.database_schema} has no generation yet; run `ingest-worker migrate`",
                )
        finally:
            await conn.close()
        generations.check_settings(self._settings, found, chunking=chunking)
        return found

    async def build_ann_index(self, *, served: bool = True) -> bool:
        """Build the HNSW index if it is missing (after a backfill), CONCURRENTLY where ``served``
        (ingestion writes that table), else plainly (worker.sql.HNSW_INDEX_UNSERVED_SQL). True if
        built now.

        Raises DatabaseUnavailable when the database cannot be reached or goes away meanwhile (an
        interrupted concurrent build leaves an invalid index, which the next build replaces).
        """
        conn = await connect(self._settings)
        try:
            built = await self._build_ann_index(conn, self._sql, wait=True, served=served)
        except BaseException as exc:
            # Ending the session ends a build still running in it (a stop cancels the task mid-
            # statement, where nothing else could be sent) and releases its advisory lock.
            conn.terminate()
            if isinstance(exc, OUTAGE_ERRORS) and not isinstance(exc, asyncpg.QueryCanceledError):
                raise DatabaseUnavailable(f"the HNSW index build failed: {describe(exc)}") from exc
            raise
        await conn.close()
        return built

    async def _build_ann_index(
        self, conn: asyncpg.Connection, sql: Statements, *, wait: bool, served: bool = True
    ) -> bool:
        """Build the index unless it is ready; if another session is building it, wait or leave it.

        On an error the lock is left to the session, which the caller ends: after a cancelled
        statement the unlock could not be sent, and its error would hide the cancellation.
        """
        s = self._settings
        while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", ANN_BUILD_LOCK):
            if not wait:
                return False
            await asyncio.sleep(1.0)
        state = str(await conn.fetchval(ANN_INDEX_STATE_SQL, sql.ann_index))
        if state != "ready":
            if state == "invalid":  # an earlier build was interrupted: start it again
                await conn.execute(sql.drop_invalid_ann_index)
            await conn.execute(f"SET maintenance_work_mem = '{s.index_build_memory}'")
            await conn.execute("SET max_parallel_maintenance_workers = 7")
            await conn.execute(sql.hnsw_index if served else sql.hnsw_index_unserved)
        await conn.execute("SELECT pg_advisory_unlock($1)", ANN_BUILD_LOCK)
        return state != "ready"

    @property
    def ann_index_name(self) -> str:
        return self._sql.ann_index


async def connect(settings: Settings, **options: Any) -> asyncpg.Connection:
    """A connection of its own: DatabaseUnavailable when there is none to be had, ConfigError
    when the server refuses us in a way no retry changes (see :func:`login_refused`)."""
    try:
        return await asyncpg.connect(settings.database_url.reveal(), timeout=10, **options)
    except (*OUTAGE_ERRORS, *LOGIN_ERRORS) as exc:
        raise login_refused(exc, settings) or unavailable(exc) from exc


def unavailable(exc: BaseException) -> DatabaseUnavailable:
    return DatabaseUnavailable(f"cannot connect to the database: {describe(exc)}")


# The server's answers to a login that no retry changes (besides TLS failures, which are OSErrors).
LOGIN_ERRORS: Final = (
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,  # password, pg_hba.conf, no such role
    asyncpg.exceptions.InvalidCatalogNameError,  # no such database
)


def login_refused(exc: BaseException, settings: Settings) -> ConfigError | None:
    """A refused login or an untrusted certificate as a ConfigError naming what to fix (one line,
    exit 2), instead of an outage waited out until STARTUP_TIMEOUT_SECONDS; None for an outage."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return ConfigError(
            "DATABASE_URL",
            f"the database server's certificate was refused ({exc.verify_message}): check the host "
            "name the URL connects to and its sslrootcert",
        )
    if isinstance(exc, ssl.SSLError):
        return ConfigError("DATABASE_URL", f"TLS with the database server failed ({exc.reason or exc})")
    if isinstance(exc, ConnectionError) and "rejected SSL upgrade" in str(exc):
        return ConfigError("DATABASE_URL", "the database server takes no TLS, which its sslmode requires")
    if isinstance(exc, asyncpg.exceptions.InvalidCatalogNameError):
        return ConfigError("DATABASE_URL", f"the database server refused the login: {exc}")
    if isinstance(exc, asyncpg.exceptions.InvalidPasswordError) and settings.database_password_file:
        return ConfigError("DATABASE_PASSWORD_FILE", f"the database server refused the login: {exc}")
    if isinstance(exc, asyncpg.exceptions.InvalidAuthorizationSpecificationError):  # pg_hba.conf, role
        return ConfigError("DATABASE_URL", f"the database server refused the login: {exc}")
    return None
