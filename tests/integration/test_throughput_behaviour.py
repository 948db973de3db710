"""Pipeline behaviour on the real broker and Postgres: dedup, backpressure, backfill.

Speed itself is judged by `make bench`; these tests check behaviour only.
"""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import (
    CHUNK_OVERLAP,
    CHUNK_SIZE,
    Env,
    Event,
    assert_stored_state,
    committed_offsets,
    connect,
    embedding_admin,
    expected_state,
    produce,
    run_worker,
    spawn_worker,
    stored_documents,
)
from worker.app import serve
from worker.chunk import chunk_text
from worker.dev.embedserver import text_hash

pytestmark = pytest.mark.integration

TEXT = (
    "Chunk-level deduplication keys each chunk by model and content hash. A redelivered document "
    "costs no embedding; an edited one costs only its changed chunks.\n\n"
)


def stats(env: Env) -> dict[str, Any]:
    return embedding_admin(env).stats()


def inputs_by_text(env: Env) -> Counter[str]:
    """Inputs the embedding server has answered, by text hash, since it started."""
    found = embedding_admin(env).stats(texts=True)["inputs_by_text_hash"]
    return Counter(found)


async def test_redelivered_and_lightly_edited_documents_cost_only_changed_chunks(env: Env) -> None:
    events: list[Event] = [(f"d-{i}", {"id": f"d-{i}", "text": TEXT * 6 + f"Tail {i}."}) for i in range(20)]
    await produce(env, events)
    before = stats(env)["inputs"]
    await run_worker(env)
    first = stats(env)["inputs"] - before
    conn = await connect(env)
    try:
        chunks = await conn.fetchval(f"SELECT count(*) FROM {env.schema}.chunks")
        distinct = await conn.fetchval(f"SELECT count(DISTINCT content_sha256) FROM {env.schema}.chunks")
    finally:
        await conn.close()
    assert first == distinct < chunks  # identical chunks across documents were embedded once

    again = env.with_(KAFKA_GROUP_ID=env.values["KAFKA_GROUP_ID"] + "-again")
    mark = stats(env)["inputs"]
    await run_worker(again)
    assert stats(env)["inputs"] - mark == 0, "a redelivered, unchanged stream bought embeddings"

    edited: list[Event] = [("d-3", {"id": "d-3", "text": TEXT * 6 + "A new ending, never seen before."})]
    await produce(env, edited)
    mark = stats(env)["inputs"]
    await run_worker(again)
    assert 1 <= stats(env)["inputs"] - mark <= 2, "an edit of the last chunk re-embedded more than it changed"
    await assert_stored_state(env, expected_state(events + edited))


def notices(count: int, tag: str) -> list[str]:
    """Notices that each quote a run of clauses from one shared pool, between an opening and a
    signature of their own: neighbouring notices share most of their chunks. ``tag`` keeps the
    texts apart from other tests' (the embedding server counts inputs for the whole session)."""
    words = ["ledger", "quorum", "replica", "offset", "partition", "broker", "vector", "index", "shard"]
    clauses = [
        f"Clause {k} of {tag}: "
        + " ".join(words[(k * 7 + j * 5) % len(words)] for j in range(16))
        + f". It applies to every account in region {k % 5}."
        for k in range(24)
    ]
    return [
        "\n\n".join(
            [
                f"Notice {i} of {tag} for customer {i * 37 % 1000}.",
                *(clauses[(i + j) % len(clauses)] for j in range(6)),
                f"Signed: clerk {i}.",
            ]
        )
        for i in range(count)
    ]


async def test_identical_chunks_in_flight_at_once_are_bought_once(env: Env, faults: Any) -> None:
    """Issue 8, item 7: a chunk being embedded for one document is not bought again for another
    document (of a later prepare batch, of another partition) before the first one is stored."""
    texts = notices(90, uuid.uuid4().hex[:10])
    chunks = [c.content for t in texts for c in chunk_text(t, size=CHUNK_SIZE, overlap=CHUNK_OVERLAP)]
    distinct = set(chunks)
    assert len(chunks) >= 2 * len(distinct), "the corpus shares too few chunks to test anything"
    events: list[Event] = [(f"notice-{i}", {"id": f"notice-{i}", "text": t}) for i, t in enumerate(texts)]
    await produce(env, events)
    # Slow answers and small fetches: many prepare batches run while the first requests are out,
    # so the same clauses are wanted by several documents at once.
    faults(latency_ms=150)
    before, by_text_before = stats(env)["inputs"], inputs_by_text(env)
    await run_worker(env.with_(KAFKA_MAX_POLL_RECORDS="5"))
    bought = stats(env)["inputs"] - before
    again = inputs_by_text(env) - by_text_before
    twice = sum(1 for c in distinct if again[text_hash(c)] > 1)
    assert (bought, twice) == (len(distinct), 0), (
        f"{bought} inputs for {len(distinct)} distinct chunks; {twice} bought more than once"
    )
    await assert_stored_state(env, expected_state(events))


async def test_a_small_window_pauses_fetching_and_still_ends_exact(env: Env, faults: Any) -> None:
    events: list[Event] = []
    for i in range(200):
        doc = f"p-{i % 50}"
        events.append((doc, {"id": doc, "text": f"version {i} of {doc}. " * (2 + i % 9), "version": i}))
    ends = await produce(env, events)
    faults(latency_ms=20)
    tight = env.with_(MAX_IN_FLIGHT_RECORDS="16", KAFKA_MAX_POLL_RECORDS="8", EMBEDDING_BATCH_SIZE="4")
    paused: list[float] = []

    async def watch() -> None:
        from worker import metrics

        while True:
            paused.append(metrics.PAUSED._value.get())
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.wait_for(serve(tight.settings, stop=asyncio.Event(), stop_when_idle=1.5), 120)
    finally:
        watcher.cancel()
    assert 1.0 in paused, "the window never filled: fetching was never paused"
    assert paused[-1] == 0.0 or paused.count(0.0) > 0
    await assert_stored_state(env, expected_state(events))
    assert await committed_offsets(env, list(ends)) == ends


async def test_backfill_loads_without_the_ann_index_then_builds_it(env: Env) -> None:
    events: list[Event] = [
        (f"b-{i}", {"id": f"b-{i}", "text": f"backfill document {i}. " * 12}) for i in range(30)
    ]
    await produce(env, events)
    await asyncio.wait_for(serve(env.settings, stop=asyncio.Event(), stop_when_idle=1.5, backfill=True), 120)
    conn = await connect(env)
    try:
        index = await conn.fetchval("SELECT to_regclass($1)", f"{env.schema}.chunks_g1_embedding_hnsw_idx")
        method = await conn.fetchval(
            "SELECT am.amname FROM pg_class c JOIN pg_am am ON am.oid = c.relam WHERE c.oid = $1::regclass",
            f"{env.schema}.chunks_g1_embedding_hnsw_idx",
        )
    finally:
        await conn.close()
    assert index is not None and method == "hnsw"
    await assert_stored_state(env, expected_state(events))


async def eventually(check: Callable[[], Awaitable[bool]], what: str, within: float = 120) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        assert loop.time() < deadline, f"not within {within}s: {what}"
        await asyncio.sleep(0.5)


async def test_a_backfill_without_an_end_builds_the_ann_index_once_caught_up_and_goes_on(
    env: Env, tmp_path: Path
) -> None:
    first: list[Event] = [(f"bf-{i}", {"id": f"bf-{i}", "text": f"backfill {i}. " * 40}) for i in range(30)]
    await produce(env, first)
    log = tmp_path / "worker.log"
    worker = spawn_worker(env.with_(LOG_LEVEL="info"), log, "--backfill")
    try:
        await eventually(lambda: has_documents(env, len(first)), "the backlog stored")
        await eventually(lambda: hnsw_index_is_valid(env), "a valid HNSW index")
        later: list[Event] = [
            (f"bg-{i}", {"id": f"bg-{i}", "text": f"and after {i}. " * 40}) for i in range(10)
        ]
        await produce(env, later)  # the worker goes on consuming, now writing through the index
        await eventually(lambda: has_documents(env, len(first) + len(later)), "later events stored")
        assert worker.poll() is None, log.read_text()[-3000:]
    finally:
        worker.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(worker.wait, 60)
    assert code == 0, log.read_text()[-3000:]
    await assert_stored_state(env, expected_state(first + later))
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    built = [line for line in lines if line["event"] == "ann_index_built"]
    assert len(built) == 1, built
    assert built[0]["after"] == "backfill_caught_up" and built[0]["records"] >= len(first), built


async def has_documents(env: Env, count: int) -> bool:
    return await stored_documents(env) >= count


async def hnsw_index_is_valid(env: Env) -> bool:
    conn = await connect(env)
    try:
        valid = await conn.fetchval(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)",
            f"{env.schema}.chunks_g1_embedding_hnsw_idx",
        )
    finally:
        await conn.close()
    return valid is True


async def test_commits_stop_below_a_slow_record_while_later_ones_are_stored(env: Env, faults: Any) -> None:
    """Out-of-order completion: the partition's watermark waits for its slowest record."""
    import json

    from aiokafka import AIOKafkaProducer, TopicPartition

    producer = AIOKafkaProducer(bootstrap_servers=env.stack.bootstrap, enable_idempotence=False, acks="all")
    await producer.start()
    try:
        slow = await producer.send_and_wait(
            env.topic,
            partition=0,
            key=b"slow",
            value=json.dumps({"id": "slow", "text": "SLOWPOKE here."}).encode(),
        )
        for i in range(30):
            body = {"id": f"fast-{i}", "text": f"fast document {i}."}
            last = await producer.send_and_wait(
                env.topic, partition=0, key=body["id"].encode(), value=json.dumps(body).encode()
            )
    finally:
        await producer.stop()
    faults(slow_marker="SLOWPOKE", slow_ms=4000)
    eager = env.with_(EMBEDDING_BATCH_SIZE="1", EMBEDDING_CONCURRENCY="4", COMMIT_INTERVAL_MS="50")
    tp = TopicPartition(env.topic, 0)
    run = asyncio.create_task(serve(eager.settings, stop=asyncio.Event(), stop_when_idle=1.0))
    conn = await connect(env)
    try:
        for _ in range(300):
            await asyncio.sleep(0.05)
            exists = await conn.fetchval("SELECT to_regclass($1)", f"{env.schema}.documents")
            stored = await conn.fetchval(f"SELECT count(*) FROM {env.schema}.documents") if exists else 0
            if stored >= 30:
                break
        assert stored == 30, "the fast documents behind the slow one were not stored while it waited"
        assert await conn.fetchval(f"SELECT count(*) FROM {env.schema}.documents WHERE id = 'slow'") == 0
        await asyncio.sleep(0.3)  # several commit intervals
        committed = (await committed_offsets(env, [tp]))[tp]
        assert committed is None or committed <= slow.offset, "committed past a record that is not stored"
        await asyncio.wait_for(run, 60)
    finally:
        await conn.close()
        if not run.done():
            run.cancel()
    assert (await committed_offsets(env, [tp]))[tp] == last.offset + 1
