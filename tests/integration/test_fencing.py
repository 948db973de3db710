"""A member that lost its partitions writes nothing more (issue 11).

Worker A is frozen (SIGSTOP) past its session with documents in flight; the group gives its
partitions to worker B, which stores newer text for the same documents (events without
`version`, so no version guard helps). When A resumes, its writes are refused by the owner epoch
B claimed in the database, and the newer text stays.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.integration.helpers import Env, Event, connect, embedding_stats, fresh_env, produce, spawn_worker
from tests.integration.services import Services
from worker.kafka import ensure_topic

pytestmark = pytest.mark.integration

DOCS = 50
SESSION_MS = 6000  # the broker's smallest (group.min.session.timeout.ms)


def texts(env: Env) -> Any:
    async def read() -> dict[str, str]:
        conn = await connect(env)
        try:
            if not await conn.fetchval("SELECT to_regclass($1)", f"{env.schema}.chunks"):
                return {}
            rows = await conn.fetch(
                f"SELECT doc_id, string_agg(content, '') AS text FROM {env.schema}.chunks GROUP BY doc_id"
            )
        finally:
            await conn.close()
        return {r["doc_id"]: r["text"] for r in rows}

    return read()


async def until(condition: Any, within: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, what
        await asyncio.sleep(0.3)


def stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGCONT)
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=40)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


async def test_a_member_frozen_past_its_session_does_not_overwrite_what_the_new_owner_stored(
    stack: Services, faults: Any, tmp_path: Path
) -> None:
    env = fresh_env(stack, KAFKA_SESSION_TIMEOUT_MS=str(SESSION_MS), LOG_LEVEL="info")
    await ensure_topic(env.settings, env.topic, 3)
    old: list[Event] = [(f"d{i}", {"id": f"d{i}", "text": f"OLD text of document {i}."}) for i in range(DOCS)]
    new: list[Event] = [(f"d{i}", {"id": f"d{i}", "text": f"NEW text of document {i}."}) for i in range(DOCS)]
    faults(slow_marker="OLD", slow_ms=4000)  # A's requests for the old text are in flight when it freezes
    await produce(env, old)
    before = embedding_stats(env)["requests"]
    a = spawn_worker(env, tmp_path / "a.log")
    b: subprocess.Popen[bytes] | None = None
    try:
        await until(
            lambda: _true(embedding_stats(env)["requests"] > before), 60, "A never asked for embeddings"
        )
        a.send_signal(signal.SIGSTOP)
        faults(slow_marker=None)  # once resumed, A re-plans and re-embeds at once
        await produce(env, new)
        b = spawn_worker(env, tmp_path / "b.log")

        async def b_stored_the_new_text() -> bool:
            stored = await texts(env)
            return len(stored) == DOCS and all(t.startswith("NEW") for t in stored.values())

        await until(b_stored_the_new_text, 90, "B never stored the new text")
        a.send_signal(signal.SIGCONT)
        await asyncio.sleep(12)  # A's old requests answer, and it tries to write them
        stored = await texts(env)
        assert sorted(stored) == sorted(f"d{i}" for i in range(DOCS))
        overwritten = [d for d, t in stored.items() if not t.startswith("NEW")]
        assert overwritten == [], f"A wrote old text over what B stored: {overwritten[:5]}"
    finally:
        codes = [stop(p) for p in (a, b) if p is not None]
    assert codes == [0] * len(codes), (tmp_path / "a.log").read_text()[-3000:]
    a_log = [
        json.loads(line) for line in (tmp_path / "a.log").read_text().splitlines() if line.startswith("{")
    ]
    written = sum(e["documents"] for e in a_log if e["event"] == "batch_stored")
    assert written == 0, "A wrote, even if B's text won in the end (A's writes were not refused)"
    assert any(e["event"] == "write_fenced" for e in a_log), "A was told why its writes were refused"


async def _true(value: bool) -> bool:
    return value
