"""``ingest-worker verify``: check the stored state, and with ``--topic`` compare it with the topic.

The stored checks are set-based statements (worker.sql's ``VERIFY_*``): one pass over every
chunk, joined with its document, and two over the documents, all in one REPEATABLE READ snapshot,
so that a database of millions of rows is read once and seen in one state while workers write.
Vectors are read for their dimensions only, and only where the column does not declare them.

With ``--topic`` the stored documents are streamed past each document's winning event in the
topic (worker.topic_fold) and compared one by one; the winners are all that is held in memory.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

import asyncpg

from worker import generations
from worker.errors import DatabaseRefused, DatabaseUnavailable, WorkerError, describe
from worker.generations import Generation
from worker.schema import OUTAGE_ERRORS, connect
from worker.settings import Settings
from worker.sql import EMBEDDING_TYPE_SQL, EXISTS_SQL, VERIFY_NOT_BLANK, Statements, quoted
from worker.topic_fold import TopicFold, Winner, read_topics
from worker.types import TopicPartition

EXAMPLES: Final = 5  # document ids shown per check

# Every check, in the order printed, with what a problem of it means.
STORED_CHECKS: Final = {
    "chunks_contiguous": "chunk_index is not 0..n-1, or they stop short of the text's end (of "
    "documents.chunk_count where the text is not kept)",
    "chunk_hashes": "content_sha256 is not the sha256 of content",
    "chunk_offsets": "content is not text[char_start:char_end], or not char_end - char_start long",
    "document_hashes": "documents.content_sha256 is not the sha256 of its text",
    "embedding_dimensions": "an embedding has other dimensions than EMBEDDING_DIMENSIONS",
    "embedding_model": "a chunk's model is not the served generation's and the one EMBEDDING_MODEL names",
    "deleted_documents": "chunks of a deleted document",
    "unknown_documents": "chunks of a document with no row",
    "unchunked_documents": "a live document with text (or a chunk_count) but no chunks",
    "generation_coverage": "a generation beside the served one lacks a live document it is not "
    "behind on, or holds chunks of a deleted one",
}
TOPIC_CHECKS: Final = {
    "topic_missing": "the topic's document has no row",
    "topic_version": "the stored version is older than the topic's newest",
    "topic_deleted": "deleted in one and live in the other",
    "topic_text": "the stored text is not the topic's newest",
    "topic_behind": "the newest event is past where the database stored its partition (workers behind)",
}


class NotMigrated(WorkerError):
    """DATABASE_SCHEMA lacks the tables: nothing to verify."""


@dataclass(frozen=True, slots=True)
class Check:
    problems: int = 0
    examples: tuple[str, ...] = ()
    detail: str | None = None


@dataclass
class Report:
    checks: dict[str, Check]
    documents: int = 0
    chunks: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def clean(self) -> bool:
        return all(check.problems == 0 for check in self.checks.values())

    def lines(self) -> list[str]:
        """One line per check (``ok`` or its problems), the notes, then the summary."""
        width = max(map(len, self.checks))
        lines = []
        for name, check in self.checks.items():
            if not check.problems:
                lines.append(f"{name:<{width}}  ok")
                continue
            noun = "problem" if check.problems == 1 else "problems"
            what = (STORED_CHECKS | TOPIC_CHECKS)[name] + (f"; {check.detail}" if check.detail else "")
            lines.append(
                f"{name:<{width}}  {check.problems:,} {noun} (e.g. {', '.join(check.examples)}): {what}"
            )
        lines.extend(self.notes)
        scope = f"{self.documents:,} documents, {self.chunks:,} chunks, {self.seconds:.1f}s"
        failed = sum(1 for check in self.checks.values() if check.problems)
        if failed:
            lines.append(f"not clean: {failed} of {len(self.checks)} checks found problems ({scope})")
        else:
            lines.append(f"clean: {len(self.checks)} checks passed ({scope})")
        return lines

    def as_json(self) -> dict[str, Any]:
        checks: dict[str, Any] = {}
        for name, check in self.checks.items():
            checks[name] = {"problems": check.problems, "examples": list(check.examples)}
            if check.detail and check.problems:
                checks[name]["detail"] = check.detail
        return {
            "clean": self.clean,
            "checks": checks,
            "documents": self.documents,
            "chunks": self.chunks,
            "notes": self.notes,
            "seconds": round(self.seconds, 3),
        }


# -- the comparison with the topic (pure) ---------------------------------------------------------


class Stored(NamedTuple):
    """A documents row, as the comparison needs it."""

    doc_id: str
    version: int | None
    deleted: bool
    text_sha256: bytes | None
    source_topic: str | None
    source_partition: int | None
    source_offset: int | None


@dataclass
class Tally:
    """A count, and the first ``keep`` ids in order."""

    keep: int = EXAMPLES
    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, doc_id: str) -> None:
        self.count += 1
        if len(self.examples) < self.keep or doc_id < self.examples[-1]:
            bisect.insort(self.examples, doc_id)
            del self.examples[self.keep :]

    def check(self) -> Check:
        return Check(self.count, tuple(self.examples))


@dataclass
class Comparison:
    """The stored documents against a fold of the topic, one row at a time. Consumes the fold's
    winners: those no row was seen for are missing. ``stored_up_to`` is how far the database
    stored each partition (source_offsets; None where the schema has no such table)."""

    fold: TopicFold
    stored_up_to: Mapping[TopicPartition, int] | None = None
    tallies: dict[str, Tally] = field(default_factory=lambda: {name: Tally() for name in TOPIC_CHECKS})
    newer: int = 0  # rows written from records past the end offsets read: not compared
    split: int = 0

    def row(self, stored: Stored) -> None:
        winner = self.fold.winners.pop(stored.doc_id, None)
        if winner is None:
            return  # compacted away, or from a topic not read: nothing to compare with
        source = TopicPartition(stored.source_topic, stored.source_partition)
        if stored.source_offset is not None and stored.source_offset >= self.fold.ends.get(source, 1 << 63):
            self.newer += 1
        else:
            self._compare(stored.doc_id, winner, stored)

    def finish(self) -> dict[str, Check]:
        for doc_id, winner in self.fold.winners.items():
            self._compare(doc_id, winner, None)
        self.fold.winners.clear()
        return {name: tally.check() for name, tally in self.tallies.items()}

    def _compare(self, doc_id: str, winner: Winner, stored: Stored | None) -> None:
        if doc_id in self.fold.split:
            self.split += 1
            return
        problem = differs(winner, stored)
        if problem is None:
            return
        if self.stored_up_to is not None:
            up_to = self.stored_up_to.get(TopicPartition(winner.topic, winner.partition), 0)
            if winner.offset >= up_to:
                problem = "topic_behind"
        self.tallies[problem].add(doc_id)


def differs(winner: Winner, stored: Stored | None) -> str | None:
    """Which topic check a stored row fails against the topic's winner; None when it agrees.

    A stored version higher than the winner's agrees: a compacted topic may keep only a late
    event of a lower version, which the worker rightly ignored.
    """
    if stored is None:
        return "topic_missing"
    if winner.version is not None:
        if stored.version is None or stored.version < winner.version:
            return "topic_version"
        if stored.version > winner.version:
            return None
    if stored.deleted != winner.deleted:
        return "topic_deleted"
    if not winner.deleted and stored.text_sha256 != winner.text_sha256:
        return "topic_text"
    return None


# -- the database side ---------------------------------------------------------------------------


class _Schema(NamedTuple):
    column: str  # the embedding column's type, as format_type gives it: vector(384), vector, ...
    model: str | None  # the served generation's (None: a schema from before generations)
    text: bool  # documents.text exists
    offsets: bool  # source_offsets exists
    served: Generation | None


async def verify(settings: Settings, topics: tuple[str, ...] | None = None) -> Report:
    """Check the stored state; with ``topics``, compare it with what they hold."""
    started = time.perf_counter()
    sql = Statements.of(quoted(settings.database_schema), settings.vector_type)
    conn = await connect(settings, statement_cache_size=settings.database_statement_cache_size)
    try:
        schema = await _inspect(conn, settings, sql)
        if schema.served is not None:  # its model and dimensions are what the chunks must have
            sql = schema.served.statements(sql.schema)
            settings = schema.served.settings(settings)
        fold = None if topics is None else await read_topics(settings, topics)
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            report = await _stored(conn, settings, sql, schema)
            await _coverage(conn, sql, schema, report)
            if fold is not None:
                await _compare(conn, sql, schema, fold, report)
    except OUTAGE_ERRORS as exc:
        raise DatabaseUnavailable(f"verify's query failed: {describe(exc)}") from exc
    except asyncpg.PostgresError as exc:  # a privilege missing, say: one line, not a traceback
        raise DatabaseRefused(f"verify's query was refused: {describe(exc)}") from exc
    finally:
        await conn.close()
    report.seconds = time.perf_counter() - started
    return report


async def _inspect(conn: asyncpg.Connection, settings: Settings, sql: Statements) -> _Schema:
    schema = sql.schema
    for table in ("documents", "chunks"):
        if await conn.fetchval(EXISTS_SQL["relation"], f"{schema}.{table}") is None:
            raise NotMigrated(f"no {settings.database_schema}.{table} table: run `ingest-worker migrate`")
    serving = None
    if await conn.fetchval(EXISTS_SQL["relation"], f"{schema}.generations") is not None:
        found = await generations.read(conn, sql)
        serving = generations.served(found) if found else None
    table = f"{schema}.chunks" if serving is None else serving.statements(schema).chunks
    return _Schema(
        column=str(await conn.fetchval(EMBEDDING_TYPE_SQL, table)),
        model=None if serving is None else serving.model,
        served=serving,
        text=await conn.fetchval(EXISTS_SQL["column"], f"{schema}.documents text") is not None,
        offsets=await conn.fetchval(EXISTS_SQL["relation"], f"{schema}.source_offsets") is not None,
    )


async def _stored(conn: asyncpg.Connection, settings: Settings, sql: Statements, schema: _Schema) -> Report:
    wanted_column = f"{settings.vector_type}({settings.embedding_dimensions})"
    declared = _declared_dimensions(schema.column)
    model = schema.model or settings.embedding_model
    rows = await conn.fetch(
        sql.verify_stored if schema.text else sql.verify_stored_without_text,
        declared,
        settings.embedding_dimensions,
        model,
        settings.embedding_model,
        EXAMPLES,
        VERIFY_NOT_BLANK,
    )
    found = {row["name"]: Check(row["problems"], tuple(row["examples"] or ())) for row in rows}
    details = {
        "embedding_dimensions": None
        if schema.column == wanted_column
        else f"the column is {schema.column}, not {wanted_column} (VECTOR_TYPE, EMBEDDING_DIMENSIONS)",
        "embedding_model": None
        if model == settings.embedding_model
        else f"the served generation's model is {model!r}, EMBEDDING_MODEL is {settings.embedding_model!r}",
    }
    checks = {}
    for name in STORED_CHECKS:
        check = found.get(name, Check())
        checks[name] = Check(check.problems, check.examples, details.get(name))
    counts = await conn.fetchrow(sql.verify_counts)
    report = Report(checks, documents=counts["documents"], chunks=counts["chunks"])
    if not schema.text:
        report.notes.append(
            "note: documents has no text column (a schema migrated before it): chunks were not "
            "compared with their document's text; `migrate` adds it"
        )
    return report


async def _coverage(conn: asyncpg.Connection, sql: Statements, schema: _Schema, report: Report) -> None:
    """Each generation beside the served one: complete but for what it is behind on (a note says
    how far behind)."""
    problems, examples, details = 0, [], []
    if schema.served is not None:
        behind = {r["generation"]: r["pending"] + r["problems"] for r in await conn.fetch(sql.pending_counts)}
        for g in await generations.read(conn, sql):
            if g.id == schema.served.id:
                continue
            other = g.statements(sql.schema)
            pending = behind.get(g.id, 0)
            report.notes.append(f"note: generation {g.describe()} is {g.state}, {pending:,} documents behind")
            row = await conn.fetchrow(
                other.verify_coverage if schema.text else other.verify_coverage_without_text,
                g.id,
                VERIFY_NOT_BLANK,
                EXAMPLES,
            )
            if row["problems"]:
                problems += row["problems"]
                examples += list(row["examples"])
                details.append(f"generation #{g.id}")
    report.checks["generation_coverage"] = Check(
        problems, tuple(examples[:EXAMPLES]), ", ".join(details) or None
    )


def _declared_dimensions(column: str) -> int | None:
    """``vector(384)`` -> 384; None for a column that declares none (each row then says its own)."""
    _, _, rest = column.partition("(")
    return int(rest.rstrip(")")) if rest.rstrip(")").isdigit() else None


async def _compare(
    conn: asyncpg.Connection, sql: Statements, schema: _Schema, fold: TopicFold, report: Report
) -> None:
    stored_up_to = None
    if schema.offsets:
        tps = sorted(fold.ends)
        rows = await conn.fetch(sql.read_offsets, [tp.topic for tp in tps], [tp.partition for tp in tps])
        stored_up_to = {TopicPartition(r["topic"], r["partition"]): int(r["next_offset"]) for r in rows}
    documents = len(fold.winners)
    comparison = Comparison(fold, stored_up_to)
    statement = sql.verify_documents if schema.text else sql.verify_documents_without_text
    async for row in conn.cursor(statement, prefetch=10_000):
        comparison.row(Stored(*row))
    report.checks.update(comparison.finish())
    topics = ", ".join(sorted({tp.topic for tp in fold.ends}))
    note = (
        f"topic {topics}: {len(fold.ends)} partitions read to their end offsets, {fold.records:,} records "
        f"({fold.undecodable:,} undecodable: the dead-letter topic's), {documents:,} documents"
    )
    if comparison.newer:
        note += f"; {comparison.newer:,} stored from records past those offsets, not compared"
    if comparison.split:
        note += f"; {comparison.split:,} with events in more than one partition (order unknown), not compared"
    report.notes.append(note)
