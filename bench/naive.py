"""The baseline: a worker written the way such workers often are, one record at a time.

For each record: decode it, chunk it, send one embedding request with that document's chunks,
write the document and its chunks (``executemany`` of INSERTs) in a transaction, commit the
offset, next record. Same chunking, same tables (a schema made by ``ingest-worker migrate``), same
embedding server. It stops after ``limit`` records; its rate is extrapolated to the whole topic.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from dataclasses import dataclass

import aiohttp
import asyncpg
import numpy as np
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from pgvector.asyncpg import register_vector

from worker.chunk import chunk_text

UPSERT_DOCUMENT = """
INSERT INTO {schema}.documents (id, version, metadata, tenant, chunk_count, content_sha256, updated_at)
VALUES ($1, $2, $3::jsonb, $4, $5, $6, now())
ON CONFLICT (id) DO UPDATE SET version = EXCLUDED.version, metadata = EXCLUDED.metadata,
    tenant = EXCLUDED.tenant, chunk_count = EXCLUDED.chunk_count,
    content_sha256 = EXCLUDED.content_sha256, updated_at = now()
"""
DELETE_CHUNKS = "DELETE FROM {schema}.chunks WHERE doc_id = $1"
INSERT_CHUNK = """
INSERT INTO {schema}.chunks (doc_id, chunk_index, content, embedding, char_start, char_end, model,
                             content_sha256)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
"""


@dataclass(frozen=True, slots=True)
class NaiveRun:
    records: int
    chunks: int
    seconds: float  # first record received to the last offset committed

    @property
    def docs_per_s(self) -> float:
        return self.records / self.seconds

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.seconds


@dataclass(frozen=True, slots=True)
class NaiveConfig:
    bootstrap: str
    topic: str
    group: str
    database_url: str
    schema: str
    embedding_url: str
    model: str
    dimensions: int
    chunk_size: int
    chunk_overlap: int


async def run_naive(config: NaiveConfig, *, limit: int, within: float = 120.0) -> NaiveRun:
    """Ingest the first ``limit`` records one at a time (at most ``within`` seconds)."""
    consumer = AIOKafkaConsumer(
        config.topic,
        bootstrap_servers=config.bootstrap,
        group_id=config.group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=6000,
        heartbeat_interval_ms=1000,
    )
    conn = await asyncpg.connect(config.database_url, timeout=10)
    await register_vector(conn)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
    await consumer.start()
    records = chunks = 0
    started: float | None = None
    deadline = time.monotonic() + within
    try:
        while records < limit:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the naive worker did {records} of {limit} records in {within:.0f}s")
            message = await asyncio.wait_for(consumer.getone(), max(0.1, deadline - time.monotonic()))
            if started is None:
                started = time.perf_counter()
            chunks += await _ingest_one(config, session, conn, message.key, message.value)
            tp = TopicPartition(message.topic, message.partition)
            await consumer.commit({tp: message.offset + 1})
            records += 1
    finally:
        await consumer.stop()
        await session.close()
        await conn.close()
    assert started is not None
    return NaiveRun(records, chunks, time.perf_counter() - started)


async def _ingest_one(
    config: NaiveConfig,
    session: aiohttp.ClientSession,
    conn: asyncpg.Connection,
    key: bytes | None,
    value: bytes,
) -> int:
    event = orjson.loads(value)
    doc_id = key.decode() if key is not None else event["id"]
    chunks = chunk_text(event["text"], size=config.chunk_size, overlap=config.chunk_overlap)
    body = {
        "model": config.model,
        "input": [c.content for c in chunks],
        "dimensions": config.dimensions,
        "encoding_format": "base64",
    }
    async with session.post(config.embedding_url.rstrip("/") + "/embeddings", json=body) as response:
        response.raise_for_status()
        data = sorted((await response.json())["data"], key=lambda item: item["index"])
    vectors = [np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in data]
    schema = config.schema
    async with conn.transaction():
        await conn.execute(
            UPSERT_DOCUMENT.format(schema=schema),
            doc_id,
            event.get("version"),
            orjson.dumps(event.get("metadata")).decode(),
            event.get("tenant"),
            len(chunks),
            hashlib.sha256(event["text"].encode()).digest(),
        )
        await conn.execute(DELETE_CHUNKS.format(schema=schema), doc_id)
        await conn.executemany(
            INSERT_CHUNK.format(schema=schema),
            [
                (
                    doc_id,
                    c.index,
                    c.content,
                    v,
                    c.char_start,
                    c.char_end,
                    config.model,
                    hashlib.sha256(c.content.encode()).digest(),
                )
                for c, v in zip(chunks, vectors, strict=True)
            ],
        )
    return len(chunks)
