"""The ceilings: what plain Kafka consumption and a plain binary COPY manage on this machine.

Neither does any of the worker's work but its own part: the consume ceiling fetches the
benchmark topic (manually assigned, no group) and ``orjson.loads`` each value; the COPY
ceiling writes the same chunk rows with their embeddings (the local server's hash vectors,
computed in process) in one ``copy_records_to_table`` into a copy of the worker's own chunks
table (``CREATE TABLE ... (LIKE chunks INCLUDING ALL)`` of a schema made by ``ingest-worker
migrate``: same primary key, same HNSW index), and again without the approximate index, as a
backfill that builds it afterwards would.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg
import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from pgvector.asyncpg import register_vector

from bench.corpus import Published
from bench.cpu import machine_busy
from worker.chunk import chunk_text
from worker.dev.embedserver import embed_texts

APPROXIMATE_INDEXES = ("hnsw", "ivfflat")


@dataclass(frozen=True, slots=True)
class Ceiling:
    name: str
    items: int  # records or rows
    docs: int
    seconds: float
    build_seconds: float = 0.0  # building the HNSW index after a COPY without it
    busy_seconds: float = 0.0  # CPU the whole machine spent meanwhile (every core's busy time)

    def with_build(self) -> Ceiling:
        """This COPY and the index build after it, as one ceiling (what a backfill has to do)."""
        return Ceiling(f"{self.name} + HNSW build", self.items, self.docs, self.seconds + self.build_seconds)

    @property
    def cores(self) -> float:
        """How many cores' worth of CPU the machine spent busy while it ran."""
        return self.busy_seconds / self.seconds

    @property
    def per_s(self) -> float:
        return self.items / self.seconds

    @property
    def docs_per_s(self) -> float:
        return self.docs / self.seconds


@dataclass(frozen=True, slots=True)
class ChunkRows:
    """Every chunk of the corpus as the worker would store it (columns by name)."""

    docs: int
    rows: list[dict[str, Any]]


async def consume_ceiling(
    bootstrap: str, published: Published, *, max_poll_records: int, passes: int = 3, within: float = 60.0
) -> Ceiling:
    """Best of ``passes`` full reads of the topic from offset 0, decoding every value."""
    best = float("inf")
    for _ in range(passes):
        best = min(best, await _consume_once(bootstrap, published, max_poll_records, within))
    return Ceiling("consume+decode", published.records, published.records, best)


async def _consume_once(bootstrap: str, published: Published, max_poll_records: int, within: float) -> float:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        max_partition_fetch_bytes=1_048_576,
        fetch_max_bytes=16 * 1_048_576,
    )
    await consumer.start()
    try:
        partitions = sorted(published.ends, key=lambda tp: tp.partition)
        consumer.assign(partitions)
        for tp in partitions:
            consumer.seek(tp, 0)
        position: dict[TopicPartition, int] = dict.fromkeys(partitions, 0)
        decoded = 0
        started = time.perf_counter()
        deadline = started + within
        while any(position[tp] < end for tp, end in published.ends.items()):
            if time.perf_counter() > deadline:
                raise TimeoutError(f"consumed {decoded} of {published.records} records in {within:.0f}s")
            batches = await consumer.getmany(timeout_ms=500, max_records=max_poll_records)
            for tp, messages in batches.items():
                for message in messages:
                    orjson.loads(message.value)
                decoded += len(messages)
                if messages:
                    position[tp] = messages[-1].offset + 1
        return time.perf_counter() - started
    finally:
        await consumer.stop()


def chunk_rows(
    events: Sequence[dict[str, Any]], *, chunk_size: int, chunk_overlap: int, model: str, dimensions: int
) -> ChunkRows:
    """The rows the worker writes for these upserts: chunked the same way, hash-embedded."""
    rows: list[dict[str, Any]] = []
    for event in events:
        chunks = chunk_text(event["text"], size=chunk_size, overlap=chunk_overlap)
        vectors = embed_texts([c.content for c in chunks], dimensions)
        for chunk, vector in zip(chunks, vectors, strict=True):
            rows.append(
                {
                    "doc_id": event["id"],
                    "chunk_index": chunk.index,
                    "content": chunk.content,
                    "embedding": np.ascontiguousarray(vector, dtype=np.float32),
                    "char_start": chunk.char_start,
                    "char_end": chunk.char_end,
                    "model": model,
                    "content_sha256": hashlib.sha256(chunk.content.encode()).digest(),
                }
            )
    return ChunkRows(len(events), rows)


async def copy_ceiling(
    database_url: str,
    template_schema: str,
    rows: ChunkRows,
    *,
    approximate_index: bool,
    connections: int = 1,
    index_build_memory: str = "512MB",
    within: float = 300.0,
) -> Ceiling:
    """Binary COPY of all rows into a fresh ``LIKE <template>.chunks INCLUDING ALL`` table.

    With ``connections`` > 1 the rows are split by document into that many contiguous parts,
    each copied in its own transaction on its own connection at the same time. Without the
    approximate index, the index is built again after the timed COPY, and that is timed too.
    """
    target = "chunks_ann" if approximate_index else "chunks_backfill"
    schema = "bench_ceiling"
    conns = [await asyncpg.connect(database_url, timeout=10) for _ in range(connections)]
    conn = conns[0]
    try:
        for c in conns:
            await register_vector(c)
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
        await conn.execute(f"DROP TABLE IF EXISTS {schema}.{target}")
        await conn.execute(f"CREATE TABLE {schema}.{target} (LIKE {template_schema}.chunks_g1 INCLUDING ALL)")
        dropped = [] if approximate_index else await _approximate_indexes(conn, f"{schema}.{target}")
        for name, _ in dropped:
            await conn.execute(f"DROP INDEX {name}")
        columns = await _insertable_columns(conn, schema, target, set(rows.rows[0]))
        records = [tuple(row[c] for c in columns) for row in rows.rows]
        parts = _split_by_document(records, connections, key=columns.index("doc_id"))

        async def copy(c: asyncpg.Connection, records: list[tuple[Any, ...]]) -> None:
            async with c.transaction():
                await c.copy_records_to_table(
                    target, schema_name=schema, columns=columns, records=records, timeout=within
                )

        await conn.execute("CHECKPOINT")  # start every variant from the same quiet state
        busy = machine_busy()
        started = time.perf_counter()
        await asyncio.gather(*(copy(c, part) for c, part in zip(conns, parts, strict=True)))
        seconds = time.perf_counter() - started
        busy = machine_busy() - busy
        build_started = time.perf_counter()
        for _, definition in dropped:
            await conn.execute(f"SET maintenance_work_mem = '{index_build_memory}'")
            await conn.execute(definition, timeout=within)
        build_seconds = time.perf_counter() - build_started if dropped else 0.0
        await conn.execute(f"DROP TABLE {schema}.{target}")
    finally:
        for c in conns:
            await c.close()
    name = "COPY, PK + HNSW" if approximate_index else "COPY, PK only (backfill)"
    if connections > 1:
        name += f", {connections} connections"
    return Ceiling(name, len(rows.rows), rows.docs, seconds, build_seconds, busy)


def _split_by_document(
    records: list[tuple[Any, ...]], parts: int, *, key: int
) -> list[list[tuple[Any, ...]]]:
    """``parts`` contiguous slices of about equal size, never splitting one document's rows."""
    out: list[list[tuple[Any, ...]]] = [[] for _ in range(parts)]
    size = -(-len(records) // parts)
    part = 0
    for i, record in enumerate(records):
        starts_document = i == 0 or record[key] != records[i - 1][key]
        if starts_document and len(out[part]) >= size and part < parts - 1:
            part += 1
        out[part].append(record)
    return out


async def _approximate_indexes(conn: asyncpg.Connection, table: str) -> list[tuple[str, str]]:
    """(name, CREATE INDEX statement) of the table's HNSW/IVFFlat indexes."""
    found = await conn.fetch(
        """
        SELECT i.indexrelid::regclass::text AS name, pg_get_indexdef(i.indexrelid) AS definition
        FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam
        WHERE i.indrelid = $1::regclass AND am.amname = ANY($2::text[])
        """,
        table,
        list(APPROXIMATE_INDEXES),
    )
    return [(r["name"], r["definition"]) for r in found]


async def _insertable_columns(
    conn: asyncpg.Connection, schema: str, table: str, known: set[str]
) -> list[str]:
    """The table's columns we have values for; fail on a required column we cannot fill."""
    found = await conn.fetch(
        """
        SELECT column_name, is_nullable = 'NO' AND column_default IS NULL AS required
        FROM information_schema.columns WHERE table_schema = $1 AND table_name = $2
        ORDER BY ordinal_position
        """,
        schema,
        table,
    )
    missing = [r["column_name"] for r in found if r["required"] and r["column_name"] not in known]
    if missing:
        raise RuntimeError(f"the chunks table has required columns the benchmark cannot fill: {missing}")
    return [r["column_name"] for r in found if r["column_name"] in known]
