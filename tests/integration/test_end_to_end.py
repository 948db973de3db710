"""The worker end to end on a real broker and real PostgreSQL with pgvector (issue: end-to-end)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.helpers import (
    Env,
    Event,
    assert_stored_state,
    committed_offsets,
    connect,
    expected_state,
    produce,
    run_worker,
    snapshot,
    spawn_worker,
)

pytestmark = pytest.mark.integration

LOREM = (
    "Kafka keeps every event of a document in one partition. The worker chunks the text, "
    "embeds each chunk and stores the vectors.\n\nA second paragraph follows here, with more "
    "sentences! Does it split? It should prefer sentence ends. "
)
NON_ASCII = "Größenordnung über naïve Café — 日本語の文章です。句読点で区切ります。emoji 🚀🧪 and Ελληνικά. "


def mixed_stream() -> list[Event]:
    """Inserts, newer versions, stale versions, deletes by tombstone and by op, non-ASCII, multi-chunk."""
    events: list[Event] = []
    for i in range(24):
        text = (LOREM * (1 + i % 5)) + f" document number {i}."
        events.append(
            (
                f"doc-{i}",
                {"id": f"doc-{i}", "text": text, "version": 1, "metadata": {"n": i}, "tenant": f"t{i % 3}"},
            )
        )
    for i in range(6):
        events.append((f"intl-{i}", {"id": f"intl-{i}", "text": NON_ASCII * (1 + i), "version": 3}))
    for i in range(0, 24, 3):  # newer, shorter versions: leftover chunks must go
        events.append(
            (f"doc-{i}", {"id": f"doc-{i}", "text": f"Version two of {i}. Short now.", "version": 2})
        )
    for i in range(0, 24, 3):  # stale: lower version than stored
        events.append((f"doc-{i}", {"id": f"doc-{i}", "text": "STALE " * 50, "version": 1}))
    for i in (1, 4):  # delete by tombstone
        events.append((f"doc-{i}", None))
    for i in (2, 5):  # delete by op, with a version
        events.append((f"doc-{i}", {"id": f"doc-{i}", "op": "delete", "version": 7}))
    events.append(("doc-5", {"id": "doc-5", "text": "late and older: must not come back", "version": 6}))
    events.append(
        ("doc-2", {"id": "doc-2", "text": "same version as the delete: stays deleted", "version": 7})
    )
    events.append(("doc-7", {"id": "doc-7", "text": "newer than the delete-less history", "version": 9}))
    for round_ in range(3):  # documents without versions: the last in partition order wins
        events.append(("plain", {"id": "plain", "text": f"unversioned round {round_}. " * (4 - round_)}))
    events.append(("ghost", None))  # a tombstone for a document never seen
    return events


@pytest.mark.smoke
async def test_mixed_stream_ends_in_contract_state_and_commits_to_the_end(env: Env) -> None:
    events = mixed_stream()
    ends = await produce(env, events)
    await run_worker(env)
    await assert_stored_state(env, expected_state(events))
    assert await committed_offsets(env, list(ends)) == ends


async def test_redelivering_the_whole_stream_changes_nothing(env: Env) -> None:
    events = mixed_stream()
    await produce(env, events)
    await run_worker(env)
    before = await snapshot(env)
    # A new consumer group reads the same records again from the start: a full redelivery.
    again = env.with_(KAFKA_GROUP_ID=env.values["KAFKA_GROUP_ID"] + "-again")
    await run_worker(again)
    assert await snapshot(env) == before
    await assert_stored_state(env, expected_state(events))


@pytest.mark.smoke
async def test_sigkill_mid_stream_then_restart_ends_in_the_same_state(
    env: Env, faults: object, tmp_path: Path
) -> None:
    events: list[Event] = []
    for i in range(150):
        events.append(
            (f"k-{i % 60}", {"id": f"k-{i % 60}", "text": LOREM * (1 + i % 3) + str(i), "version": i})
        )
        if i % 17 == 0:
            events.append((f"k-{(i * 7) % 60}", None))
    ends = await produce(env, events)
    slow = env.with_(KAFKA_MAX_POLL_RECORDS="8", EMBEDDING_BATCH_SIZE="4")
    faults(latency_ms=40)  # type: ignore[operator]
    log = tmp_path / "worker.log"
    worker = spawn_worker(slow, log)
    try:
        conn = await connect(env)
        try:
            for _ in range(600):
                await asyncio.sleep(0.1)
                assert worker.poll() is None, log.read_text()[-3000:]
                exists = await conn.fetchval("SELECT to_regclass($1)", f"{env.schema}.documents")
                if exists and await conn.fetchval(f"SELECT count(*) FROM {env.schema}.documents") >= 10:
                    break
            else:
                pytest.fail("the worker stored nothing within 60 s")
        finally:
            await conn.close()
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
    finally:
        if worker.poll() is None:
            worker.kill()
    stored_before_restart = await committed_offsets(env, list(ends))
    assert stored_before_restart != ends, "the kill came too late to test anything"
    faults(latency_ms=0)  # type: ignore[operator]
    await run_worker(slow, within=180)
    await assert_stored_state(env, expected_state(events))
    assert await committed_offsets(env, list(ends)) == ends


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("KAFKA_TOPIC", ""),
        ("EMBEDDING_DIMENSIONS", "many"),
        ("DATABASE_URL", "mysql://localhost/x"),
        ("DATABASE_SCHEMA", "drop table;"),
        ("KAFKA_SECURITY_PROTOCOL", "CARRIER_PIGEON"),
        ("CHUNK_OVERLAP", "900"),
        ("EMBEDDING_API_KEY_FILE", "/nonexistent/key"),
    ],
)
def test_bad_settings_exit_2_with_one_line_naming_the_setting(env: Env, variable: str, value: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker", "run", "--stop-when-idle", "1"],
        env={**os.environ, **env.values, variable: value},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert result.stdout == ""


def test_bad_flag_value_exits_2_naming_the_setting(env: Env) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker", "run", "--embedding-batch-size", "0"],
        env={**os.environ, **env.values},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "EMBEDDING_BATCH_SIZE" in result.stderr
