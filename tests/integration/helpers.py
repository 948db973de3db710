"""What integration tests share: a test's own settings (Env), publishing, running the worker and
the CLI, and reading back what was stored, checked against an oracle."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests.integration.services import Services
from worker.app import serve
from worker.chunk import chunk_text
from worker.dev.embedserver import EmbeddingAdmin, hash_embedding
from worker.settings import Settings

PARTITIONS = 3
CHUNK_SIZE = 200
CHUNK_OVERLAP = 40


@dataclass
class Env:
    """One test's own topic, group, schema: the settings a worker needs, as environment variables."""

    stack: Services
    topic: str
    values: dict[str, str] = field(default_factory=dict)

    @property
    def settings(self) -> Settings:
        return Settings.load(self.values)

    @property
    def schema(self) -> str:
        return self.values["DATABASE_SCHEMA"]

    def with_(self, **overrides: str) -> Env:
        return Env(self.stack, self.topic, {**self.values, **overrides})


def fresh_env(stack: Services, prefix: str = "docs", **overrides: str) -> Env:
    """A topic, group and schema of random names on ``stack`` (the topic is not created yet)."""
    suffix = uuid.uuid4().hex[:10]
    topic = f"{prefix}-{suffix}"
    values = {
        **stack.env(),
        "KAFKA_TOPIC": topic,
        "KAFKA_GROUP_ID": f"group-{suffix}",
        "DATABASE_SCHEMA": f"t_{suffix}",
        "CHUNK_SIZE": str(CHUNK_SIZE),
        "CHUNK_OVERLAP": str(CHUNK_OVERLAP),
        "HEALTH_PORT": "0",
        "SHUTDOWN_GRACE_SECONDS": "5",
        "LOG_LEVEL": "warning",
        **overrides,
    }
    return Env(stack, topic, values)


def embedding_admin(env: Env) -> EmbeddingAdmin:
    """The local embedding server's admin API (faults, counters)."""
    return EmbeddingAdmin(env.stack.embeddings.url)


def embedding_stats(env: Env) -> dict[str, Any]:
    """The local embedding server's counters (``inputs``: texts embedded since it started or reset)."""
    return embedding_admin(env).stats()


# -- producing and the oracle ------------------------------------------------------------------

Event = tuple[str, dict[str, Any] | None]  # (key, value); None is a tombstone


def encode(events: list[Event]) -> list[tuple[bytes | None, bytes | None]]:
    return [
        (key.encode(), None if value is None else json.dumps(value, ensure_ascii=False).encode())
        for key, value in events
    ]


async def produce(env: Env, events: list[Event]) -> dict[TopicPartition, int]:
    """Publish events in order; each partition's end offset (next offset) as the broker acknowledged."""
    return await produce_raw(env, encode(events))


async def produce_raw(
    env: Env, records: list[tuple[bytes | None, bytes | None]]
) -> dict[TopicPartition, int]:
    """Publish raw key/value pairs in order (one at a time, so partition order is publication order)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=env.stack.bootstrap, acks="all", enable_idempotence=env.stack.producer_idempotence
    )
    await producer.start()
    ends: dict[TopicPartition, int] = {}
    try:
        for key, value in records:
            meta = await producer.send_and_wait(env.topic, key=key, value=value)
            tp = TopicPartition(env.topic, meta.partition)
            ends[tp] = max(ends.get(tp, 0), meta.offset + 1)
    finally:
        await producer.stop()
    return ends


@dataclass(frozen=True)
class Expected:
    version: int | None
    deleted: bool
    text: str


def expected_state(events: list[Event]) -> dict[str, Expected]:
    """CONTRACT's Stored state, computed independently of the worker: apply events one by one."""
    state: dict[str, Expected] = {}
    for key, value in events:
        doc_id = key if value is None else value["id"]
        op = "delete" if value is None else value.get("op", "upsert")
        version = None if value is None else value.get("version")
        current = state.get(doc_id)
        comparable = current is not None and current.version is not None and version is not None
        if comparable and (version < current.version or (version == current.version and current.deleted)):  # type: ignore[operator, union-attr]
            continue
        kept_version = version if version is not None else (current.version if current else None)
        text = "" if op == "delete" else value["text"]  # type: ignore[index]
        state[doc_id] = Expected(kept_version, op == "delete", text)
    return state


# -- running workers ---------------------------------------------------------------------------


async def run_worker(env: Env, *, idle: float = 1.5, within: float = 120) -> None:
    """Run a worker in this process until it is caught up, committed and idle."""
    await asyncio.wait_for(serve(env.settings, stop=asyncio.Event(), stop_when_idle=idle), within)


def cli(env: Env, *args: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``ingest-worker ARGS`` with this test's settings (and ``extra``), to its end."""
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env={**os.environ, **env.values, **(extra or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The process ended in one `ingest-worker...` line on stderr, with no traceback and no
    unclosed client anywhere in its output; that line."""
    everything = result.stdout + result.stderr
    assert "Traceback" not in everything, everything[-3000:]
    assert "Unclosed" not in everything, everything[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ingest-worker"), lines[0]
    return lines[0]


def spawn_worker(env: Env, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """A worker in its own process (to be killed), its output in ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "worker", "run", *args],
            env={**os.environ, **env.values},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


# -- checking ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def writes_held(env: Env) -> AsyncIterator[None]:
    """Every write transaction of a worker waits (it locks its documents' rows first); reads pass."""
    blocker = await connect(env)
    held = blocker.transaction()
    await held.start()
    try:
        await blocker.execute(f"LOCK TABLE {env.schema}.documents IN EXCLUSIVE MODE")
        yield
    finally:
        await held.rollback()
        await blocker.close()


async def connect(env: Env) -> asyncpg.Connection:
    return await asyncpg.connect(env.values["DATABASE_URL"])


async def end_offsets(env: Env, topic: str | None = None) -> dict[TopicPartition, int]:
    """Each partition's end offset (the next offset) of ``topic``, the source topic by default."""
    topic = topic or env.topic
    consumer = AIOKafkaConsumer(
        bootstrap_servers=env.stack.bootstrap, group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    try:
        return dict(await consumer.end_offsets([TopicPartition(topic, p) for p in range(PARTITIONS)]))
    finally:
        await consumer.stop()


async def committed_offsets(env: Env, partitions: list[TopicPartition]) -> dict[TopicPartition, int | None]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=env.stack.bootstrap, group_id=env.settings.kafka_group_id, enable_auto_commit=False
    )
    await consumer.start()
    try:
        return {tp: await consumer.committed(tp) for tp in partitions}
    finally:
        await consumer.stop()


async def assert_stored_state(
    env: Env,
    expected: dict[str, Expected],
    *,
    tolerance: float = 1e-6,
    table: str = "chunks",
    chunking: tuple[int, int] = (CHUNK_SIZE, CHUNK_OVERLAP),
    dimensions: int = 384,
) -> None:
    """The tables hold exactly CONTRACT's Stored state for ``expected``: in ``chunks`` (the served
    generation), or in a generation's ``table`` of that ``chunking`` and ``dimensions``."""
    conn = await connect(env)
    try:
        schema = env.schema
        docs = {
            r["id"]: r for r in await conn.fetch(f"SELECT id, version, deleted, text FROM {schema}.documents")
        }
        rows = await conn.fetch(
            f"SELECT doc_id, chunk_index, content, embedding::text AS embedding, char_start, char_end "
            f"FROM {schema}.{table} ORDER BY doc_id, chunk_index"
        )
    finally:
        await conn.close()
    assert set(docs) == set(expected), "documents table rows differ from the documents seen"
    chunks: dict[str, list[Any]] = {}
    for row in rows:
        chunks.setdefault(row["doc_id"], []).append(row)
    for doc_id, want in expected.items():
        assert docs[doc_id]["deleted"] == want.deleted, doc_id
        assert docs[doc_id]["version"] == want.version, doc_id
        assert docs[doc_id]["text"] == (None if want.deleted else want.text), f"{doc_id}'s text"
        mine = chunks.pop(doc_id, [])
        if want.deleted:
            assert mine == [], f"{doc_id} is deleted but has chunks"
            continue
        planned = chunk_text(want.text, size=chunking[0], overlap=chunking[1])
        assert [r["chunk_index"] for r in mine] == list(range(len(planned))), doc_id
        covered = set()
        for row, chunk in zip(mine, planned, strict=True):
            assert row["content"] == want.text[row["char_start"] : row["char_end"]], doc_id
            assert (row["content"], row["char_start"], row["char_end"]) == (
                chunk.content,
                chunk.char_start,
                chunk.char_end,
            ), doc_id
            covered.update(range(row["char_start"], row["char_end"]))
            stored = np.array(json.loads(row["embedding"]), dtype=np.float32)
            np.testing.assert_allclose(stored, hash_embedding(row["content"], dimensions), atol=tolerance)
        assert all(i in covered for i, ch in enumerate(want.text) if not ch.isspace()), doc_id
    assert chunks == {}, f"chunks of unknown documents: {sorted(chunks)}"


async def snapshot(env: Env) -> tuple[list[Any], list[Any]]:
    conn = await connect(env)
    try:
        docs = await conn.fetch(
            f"SELECT id, version, deleted, metadata, tenant, chunk_count, content_sha256 "
            f"FROM {env.schema}.documents ORDER BY id"
        )
        chunks = await conn.fetch(f"SELECT * FROM {env.schema}.chunks ORDER BY doc_id, chunk_index")
    finally:
        await conn.close()
    return [tuple(r) for r in docs], [tuple(str(v) for v in r) for r in chunks]


async def stored_documents(env: Env) -> int:
    """Rows in the documents table (0 before the worker created it)."""
    conn = await connect(env)
    try:
        if not await conn.fetchval("SELECT to_regclass($1)", f"{env.schema}.documents"):
            return 0
        return int(await conn.fetchval(f"SELECT count(*) FROM {env.schema}.documents"))
    finally:
        await conn.close()
