"""Rebalances and restarts cost nothing (issue 11): no embedding is bought twice, and a member
that leaves does not wait on the embedding API.

- Worker A works through a backlog on a slow embedding API; worker B joins (a rebalance), then A
  leaves by SIGTERM (another). A is gone within seconds, B finishes, and the embedding inputs
  bought are (nearly) the distinct chunks stored: what A paid for is not bought again by B.
- A worker's writes are held (a lock on the documents table) while it buys every embedding; it is
  killed (-9) after that and before storing anything. A new worker buys nothing.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import (
    CHUNK_OVERLAP,
    CHUNK_SIZE,
    PARTITIONS,
    Env,
    Event,
    assert_stored_state,
    cli,
    connect,
    embedding_stats,
    expected_state,
    fresh_env,
    produce,
    run_worker,
    spawn_worker,
    stored_documents,
    writes_held,
)
from tests.integration.services import Services
from worker.chunk import chunk_text
from worker.kafka import ensure_topic

pytestmark = pytest.mark.integration

SLOW_MS = 1500  # each embedding request is answered after this long
JOIN_WITHIN = 10.0  # seconds from a new member's first log line to its first partitions
LEAVE_WITHIN = 5.0  # seconds from SIGTERM to exit
OVER_DISTINCT = 0.02  # inputs bought may exceed the distinct chunks stored by this share


def documents(count: int, tag: str) -> list[Event]:
    """Documents of 1 to 3 chunks each (of CHUNK_SIZE), no two chunks alike, every chunk holding
    ``tag``, none seen before in this session (the embedding server counts inputs across tests)."""
    events: list[Event] = []
    for i in range(count):
        paragraphs = [
            f"Paragraph {j} of document {i} in run {tag}: the ledger of shard {i * 7 + j} keeps "
            f"replica {j} in sync with offset {i * 13 + j} across the quorum."
            for j in range(1 + i % 3)
        ]
        events.append((f"doc-{i}", {"id": f"doc-{i}", "text": "\n\n".join(paragraphs)}))
    return events


def distinct_chunks(events: list[Event]) -> set[str]:
    return {
        c.content
        for _, value in events
        if value is not None
        for c in chunk_text(value["text"], size=CHUNK_SIZE, overlap=CHUNK_OVERLAP)
    }


async def until(condition: Any, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


def events_in(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


async def distinct_stored(env: Env) -> int:
    conn = await connect(env)
    try:
        return int(await conn.fetchval(f"SELECT count(DISTINCT content_sha256) FROM {env.schema}.chunks"))
    finally:
        await conn.close()


async def seconds_until(condition: Any, within: float, what: str) -> float:
    """Seconds from now until ``condition`` holds, at most ``within``."""
    started = time.monotonic()
    await until(condition, within, what)
    return time.monotonic() - started


def kill(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.kill()
        process.wait()


async def test_a_member_joining_then_one_leaving_mid_stream_buys_nothing_twice(
    stack: Services, faults: Any, tmp_path: Path
) -> None:
    # Small requests on a slow API (about 40 chunks a second a worker): the backlog lasts far past
    # both rebalances. A grace three times the time allowed to leave: being quick must not come
    # from cutting the grace short.
    env = fresh_env(
        stack,
        EMBEDDING_BATCH_SIZE="16",
        EMBEDDING_CONCURRENCY="4",
        SHUTDOWN_GRACE_SECONDS=str(3 * LEAVE_WITHIN),
        LOG_LEVEL="info",
    )
    await ensure_topic(env.settings, env.topic, 6)
    tag = uuid.uuid4().hex[:10]
    events = documents(700, tag)
    assert all(tag in chunk for chunk in distinct_chunks(events))
    await produce(env, events)
    # Every request is slow. The delay of a marked request comes after the server has read it, so
    # a request the worker hangs up on is still answered and counted: paid, as with a real API.
    # (latency_ms delays before reading: a request given up on would cost nothing.)
    faults(slow_marker=tag, slow_ms=SLOW_MS)
    before = embedding_stats(env)["inputs"]
    a_log, b_log = tmp_path / "a.log", tmp_path / "b.log"
    a = spawn_worker(env, a_log)
    b: subprocess.Popen[bytes] | None = None
    try:

        async def a_stored_some() -> bool:
            assert a.poll() is None, a_log.read_text()[-3000:]
            return await stored_documents(env) > 0

        await until(a_stored_some, 90, "A stored nothing")
        # B's own partitions may be done before A is gone: it stays until A's are handed over too.
        joiner = b = spawn_worker(env, b_log, "--stop-when-idle", "15")

        async def b_has_partitions() -> bool:
            assert joiner.poll() is None, b_log.read_text()[-3000:]
            return any(e["event"] == "partitions_assigned" for e in events_in(b_log))

        await until(b_has_partitions, 120, "B never got partitions")
        b_joined = joined(events_in(b_log))
        await asyncio.sleep(3)  # both work for a while
        left_to_do = len(events) - await stored_documents(env)
        a.send_signal(signal.SIGTERM)
        a_left = await seconds_until(lambda: exited(a), 120, "A did not leave")
        await until(lambda: exited(joiner), 180, "B did not finish")
    finally:
        kill(a)
        kill(b)
    assert a.returncode == 0, a_log.read_text()[-3000:]
    assert joiner.returncode == 0, b_log.read_text()[-3000:]
    bought = embedding_stats(env)["inputs"] - before
    distinct = await distinct_stored(env)
    numbers = (
        f"B had partitions {b_joined:.1f} s after it started; A left {a_left:.1f} s after SIGTERM "
        f"({left_to_do} documents not stored yet); {bought} inputs bought for {distinct} distinct "
        f"chunks stored ({100 * (bought - distinct) / max(distinct, 1):+.1f} %)"
    )
    assert b_joined <= JOIN_WITHIN, numbers  # A's revocation did not wait on the embedding API
    assert a_left <= LEAVE_WITHIN, numbers  # nor did its SIGTERM
    await assert_stored_state(env, expected_state(events))
    assert distinct == len(distinct_chunks(events))
    assert bought <= distinct * (1 + OVER_DISTINCT), numbers  # what A paid for, B did not buy again
    assert left_to_do > len(events) // 4, f"A left too late to test anything: {numbers}"


def joined(log: list[dict[str, Any]]) -> float:
    """Seconds from a worker's first log line to its first partitions (not counting Python's start)."""
    at = [datetime.fromisoformat(e["timestamp"]) for e in log]
    first = next(i for i, e in enumerate(log) if e["event"] == "partitions_assigned")
    return (at[first] - at[0]).total_seconds()


async def exited(process: subprocess.Popen[bytes]) -> bool:
    return process.poll() is not None


async def migrated_env(stack: Services) -> Env:
    """A fresh topic and a schema migrated beforehand (a worker then runs with ``--no-migrate``:
    no DDL while its writes are held)."""
    env = fresh_env(stack, LOG_LEVEL="info")
    await ensure_topic(env.settings, env.topic, PARTITIONS)
    migrated = cli(env, "migrate")
    assert migrated.returncode == 0, migrated.stderr
    return env


async def killed_once(env: Env, log: Path, done: Callable[[], Awaitable[bool]], what: str) -> None:
    """A worker whose writes are held buys embeddings until ``done()``, then is killed (-9) having
    stored nothing."""
    async with writes_held(env):
        worker = spawn_worker(env, log, "--no-migrate")
        try:

            async def alive_and_done() -> bool:
                assert worker.poll() is None, log.read_text()[-3000:]  # noqa: ASYNC240 - once, on failure
                return await done()

            await until(alive_and_done, 90, what)
            worker.send_signal(signal.SIGKILL)
            worker.wait(10)
        finally:
            kill(worker)
        assert await stored_documents(env) == 0, "a document was stored through the lock"


async def test_embeddings_bought_before_a_kill_are_not_bought_again_after_the_restart(
    stack: Services, tmp_path: Path
) -> None:
    env = await migrated_env(stack)
    events = documents(60, uuid.uuid4().hex[:10])
    distinct = len(distinct_chunks(events))
    await produce(env, events)
    before = embedding_stats(env)["inputs"]

    async def all_bought_and_kept() -> bool:
        if embedding_stats(env)["inputs"] - before < distinct:
            return False
        await asyncio.sleep(1)  # time to keep what it paid for, where it can
        return True

    await killed_once(
        env, tmp_path / "worker.log", all_bought_and_kept, "the worker never bought every chunk"
    )
    first = embedding_stats(env)["inputs"] - before
    await run_worker(env, within=120)
    await assert_stored_state(env, expected_state(events))
    second = embedding_stats(env)["inputs"] - before - first
    assert (first, second) == (distinct, 0), (
        f"{distinct} distinct chunks: {first} inputs bought before the kill, {second} after the restart"
    )
