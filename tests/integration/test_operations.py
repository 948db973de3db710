"""Dead letters, two workers in one group, halfvec storage, the produce and search commands."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from tests.contract import DLQ_HEADERS
from tests.integration.helpers import (
    Env,
    Event,
    assert_stored_state,
    cli,
    committed_offsets,
    connect,
    expected_state,
    produce,
    produce_raw,
    run_worker,
    spawn_worker,
)
from worker import health
from worker.app import serve
from worker.dev.processes import free_port
from worker.store import Store

pytestmark = pytest.mark.integration


async def read_dead_letters(env: Env, expected: int, within: float = 20) -> list[object]:
    consumer = AIOKafkaConsumer(
        env.settings.dlq_topic,
        bootstrap_servers=env.stack.bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    letters: list[object] = []
    try:
        deadline = asyncio.get_running_loop().time() + within
        while len(letters) < expected and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for messages in batch.values():
                letters.extend(messages)
    finally:
        await consumer.stop()
    return letters


async def test_bad_records_are_dead_lettered_with_headers_and_the_partition_goes_on(env: Env) -> None:
    good: list[Event] = [(f"g-{i}", {"id": f"g-{i}", "text": f"good document {i}. " * 10}) for i in range(12)]
    await produce(env, good[:6])
    poison = [
        (b"p-json", b"{not json"),
        (b"p-type", json.dumps({"id": "p-type", "text": 42}).encode()),
        (b"p-key", json.dumps({"id": "another-id", "text": "key and id differ"}).encode()),
    ]
    ends = await produce_raw(env, poison)
    ends.update(await produce(env, good[6:]))
    await run_worker(env)
    await assert_stored_state(env, expected_state(good))
    letters = await read_dead_letters(env, expected=len(poison))
    assert len(letters) == len(poison)
    by_key = {m.key: m for m in letters}  # type: ignore[attr-defined]
    assert set(by_key) == {key for key, _ in poison}
    for key, value in poison:
        headers = {k: v.decode() for k, v in by_key[key].headers}
        assert set(headers) >= DLQ_HEADERS
        assert by_key[key].value == value
        assert headers["dlq.original.topic"] == env.topic
        assert headers["dlq.error.stage"] == ("decode" if key == b"p-json" else "validate")
    committed = await committed_offsets(env, list(ends))
    assert all(committed[tp] is not None and committed[tp] >= end for tp, end in ends.items())


async def test_two_workers_in_one_group_split_the_partitions_and_end_exact(env: Env) -> None:
    events: list[Event] = []
    for i in range(120):
        events.append(
            (f"w-{i % 40}", {"id": f"w-{i % 40}", "text": f"round {i} text. " * (3 + i % 7), "version": i})
        )
    ends = await produce(env, events)
    slower = env.with_(KAFKA_MAX_POLL_RECORDS="5")
    runs = [serve(slower.settings, stop=asyncio.Event(), stop_when_idle=3) for _ in range(2)]
    await asyncio.wait_for(asyncio.gather(*runs), 180)
    await assert_stored_state(env, expected_state(events))
    assert await committed_offsets(env, list(ends)) == ends


async def test_halfvec_storage(env: Env) -> None:
    half = env.with_(VECTOR_TYPE="halfvec")
    events: list[Event] = [
        (f"h-{i}", {"id": f"h-{i}", "text": f"half precision {i}. " * 20}) for i in range(5)
    ]
    await produce(half, events)
    await run_worker(half)
    await assert_stored_state(half, expected_state(events), tolerance=2e-3)


def test_produce_run_and_search_commands(env: Env, tmp_path: Path) -> None:
    lines = [
        {
            "id": "recipe",
            "text": "Whisk eggs with sugar, fold in flour and bake the sponge cake for 25 minutes.",
        },
        {
            "id": "kafka",
            "text": "Consumer groups assign each partition to one member; offsets are committed.",
        },
        {"id": "garden", "text": "Water tomatoes in the morning and mulch the beds against weeds."},
    ]
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    environ = {**os.environ, **env.values}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "worker", *args],
            env=environ,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )

    assert "published 3 events" in cli("produce", str(events)).stdout
    cli("run", "--stop-when-idle", "1")
    hits = cli("search", "which partition does a consumer group member own", "-k", "2").stdout
    assert hits.splitlines()[0].split()[2] == "kafka"


def test_migrate_refuses_a_schema_built_for_other_dimensions(env: Env) -> None:
    environ = {**os.environ, **env.values}
    first = subprocess.run(
        [sys.executable, "-m", "worker", "migrate"], env=environ, capture_output=True, text=True, timeout=60
    )
    assert first.returncode == 0, first.stderr
    again = subprocess.run(
        [sys.executable, "-m", "worker", "migrate"], env=environ, capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 0, again.stderr
    other = subprocess.run(
        [sys.executable, "-m", "worker", "migrate"],
        env={**environ, "EMBEDDING_DIMENSIONS": "128"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert other.returncode == 2
    assert "EMBEDDING_DIMENSIONS" in other.stderr and "vector(384)" in other.stderr
    # `run --no-migrate` checks the column too, instead of dead-lettering every record at `store`.
    unmigrated = subprocess.run(
        [sys.executable, "-m", "worker", "run", "--no-migrate", "--stop-when-idle", "1"],
        env={**environ, "EMBEDDING_DIMENSIONS": "128"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unmigrated.returncode == 2, unmigrated.stderr
    assert "EMBEDDING_DIMENSIONS" in unmigrated.stderr.strip().splitlines()[-1]


async def test_vectors_of_the_wrong_dimension_stop_the_worker_with_one_clear_line(env: Env) -> None:
    events: list[Event] = [("dim", {"id": "dim", "text": "dimension check"})]
    ends = await produce(env, events)
    wrong = {**os.environ, **env.values, "EMBEDDING_DIMENSIONS": "128", "EMBEDDING_SEND_DIMENSIONS": "false"}
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "worker", "run", "--stop-when-idle", "2"],
        env=wrong,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "EMBEDDING_DIMENSIONS is 128" in result.stderr.strip().splitlines()[-1]
    committed = await committed_offsets(env, list(ends))
    assert all(offset is None or offset < ends[tp] for tp, offset in committed.items()), "committed past it"


def as_role(database_url: str, role: str, password: str) -> str:
    """The same database, logged in as ``role``."""
    parts = urlsplit(database_url)
    host = parts.hostname or ""
    netloc = f"{role}:{password}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


async def test_a_least_privilege_role_runs_against_a_schema_someone_else_migrated(env: Env) -> None:
    await Store(env.settings).migrate()  # as the owner, the way the README says
    role, password = f"ingest_rw_{env.schema}", "rw-secret"
    conn = await connect(env)
    try:
        await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        # The README's grants, nothing more: no CREATE on the database or the schema, owns nothing.
        await conn.execute(f"GRANT USAGE ON SCHEMA {env.schema} TO {role}")
        await conn.execute(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {env.schema} TO {role}"
        )
        await conn.execute(f"GRANT USAGE ON SEQUENCE {env.schema}.owner_epochs TO {role}")
        assert not await conn.fetchval(
            "SELECT has_database_privilege($1, current_database(), 'CREATE')", role
        )
        assert not await conn.fetchval("SELECT has_schema_privilege($1, $2, 'CREATE')", role, env.schema)
        events: list[Event] = [
            (f"lp-{i}", {"id": f"lp-{i}", "text": f"least privilege {i}. " * 30}) for i in range(20)
        ]
        events.append(("lp-3", None))
        ends = await produce(env, events)
        limited = env.with_(DATABASE_URL=as_role(env.stack.database_url, role, password))
        await run_worker(limited)  # with its start-up migration, as `run` does by default
        await assert_stored_state(env, expected_state(events))
        assert await committed_offsets(env, list(ends)) == ends
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE IF EXISTS {role}")
        await conn.close()


async def test_a_worker_with_another_model_refuses_to_start_instead_of_mixing_the_index(
    env: Env, tmp_path: Path
) -> None:
    events: list[Event] = [(f"m-{i}", {"id": f"m-{i}", "text": f"model check {i}. " * 40}) for i in range(40)]
    ends = await produce(env, events)
    models = {"a": "local-hash-ngram", "b": "another-model"}  # same dimensions: the column cannot tell
    logs = {name: tmp_path / f"{name}.log" for name in models}
    # Both start at once on a fresh schema, as two deployments that disagree would.
    workers = {
        name: spawn_worker(
            env.with_(EMBEDDING_MODEL=model, LOG_LEVEL="info"), logs[name], "--stop-when-idle", "2"
        )
        for name, model in models.items()
    }
    codes = {name: await asyncio.to_thread(worker.wait, 120) for name, worker in workers.items()}
    assert sorted(codes.values()) == [0, 2], codes
    loser = next(name for name, code in codes.items() if code == 2)
    winner = next(name for name in models if name != loser)
    refusal = [line for line in logs[loser].read_text().splitlines() if line.startswith("ingest-worker:")]
    assert len(refusal) == 1, logs[loser].read_text()[-2000:]
    assert "EMBEDDING_MODEL" in refusal[0] and models[winner] in refusal[0] and models[loser] in refusal[0]
    conn = await connect(env)
    try:
        stored = {r["model"] for r in await conn.fetch(f"SELECT DISTINCT model FROM {env.schema}.chunks")}
    finally:
        await conn.close()
    assert stored == {models[winner]}
    await assert_stored_state(env, expected_state(events))
    assert await committed_offsets(env, list(ends)) == ends
    # A restart of the loser, with or without its start-up migration, is refused the same way.
    for args in ((), ("--no-migrate",)):
        again = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "worker", "run", "--stop-when-idle", "1", *args],
            env={**os.environ, **env.values, "EMBEDDING_MODEL": models[loser]},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert again.returncode == 2, again.stderr
        assert "EMBEDDING_MODEL" in again.stderr.strip().splitlines()[-1]


async def hnsw_index_valid(env: Env) -> bool | None:
    """None when the index does not exist, else whether it is valid."""
    conn = await connect(env)
    try:
        name = f"{env.schema}.chunks_g1_embedding_hnsw_idx"
        return await conn.fetchval(  # type: ignore[no-any-return]
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)", name
        )
    finally:
        await conn.close()


async def test_run_leaves_a_missing_ann_index_over_stored_rows_to_build_index(env: Env) -> None:
    first: list[Event] = [(f"ix-{i}", {"id": f"ix-{i}", "text": f"index me {i}. " * 30}) for i in range(20)]
    await produce(env, first)
    await run_worker(env)
    assert await hnsw_index_valid(env) is True  # a fresh schema gets it at once (no rows yet)
    conn = await connect(env)
    try:
        await conn.execute(f"DROP INDEX {env.schema}.chunks_g1_embedding_hnsw_idx")
    finally:
        await conn.close()
    later: list[Event] = [(f"iy-{i}", {"id": f"iy-{i}", "text": f"and me {i}. " * 30}) for i in range(20)]
    await produce(env, later)
    # A restart must not build it inside its start-up migration (blocking every writer meanwhile):
    # it ingests, and says the index is missing (metric; /readyz's body reads the same state).
    await run_worker(env)
    await assert_stored_state(env, expected_state(first + later))
    assert await hnsw_index_valid(env) is None
    assert REGISTRY.get_sample_value("ingest_ann_index_ready") == 0
    built = await asyncio.to_thread(cli, env, "build-index")
    assert built.returncode == 0, built.stderr
    assert "built" in built.stdout
    assert await hnsw_index_valid(env) is True
    # A concurrent build interrupted half-way leaves an invalid index: build-index replaces it.
    conn = await connect(env)
    try:
        name = f"{env.schema}.chunks_g1_embedding_hnsw_idx"
        await conn.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = to_regclass($1)", name)
    finally:
        await conn.close()
    assert await hnsw_index_valid(env) is False
    again = await asyncio.to_thread(cli, env, "build-index")
    assert again.returncode == 0, again.stderr
    assert await hnsw_index_valid(env) is True


async def test_healthz_says_starting_while_start_up_waits_for_the_database(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(health, "LOOP_STALL_SECONDS", 0.5)  # a stall would show at once
    port = free_port()
    nowhere = env.with_(
        DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/postgres",
        HEALTH_PORT=str(port),
        STARTUP_TIMEOUT_SECONDS="0",
    )
    stop = asyncio.Event()
    task = asyncio.create_task(serve(nowhere.settings, stop=stop))
    try:
        await asyncio.sleep(2)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200
                assert (await response.json())["status"] == "starting"
            async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                assert response.status == 503
                failing = (await response.json())["failing"]
                assert "waiting for the database" in failing["database"], failing
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_writes_over_a_roles_statement_timeout_are_split_until_they_fit(env: Env) -> None:
    await Store(env.settings).migrate()  # as the owner; the worker's role only writes
    role, password = f"ingest_st_{env.schema}", "st-secret"
    conn = await connect(env)
    try:
        await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        await conn.execute(f"GRANT USAGE ON SCHEMA {env.schema} TO {role}")
        dml = "SELECT, INSERT, UPDATE, DELETE"
        await conn.execute(f"GRANT {dml} ON ALL TABLES IN SCHEMA {env.schema} TO {role}")
        # A write of more chunks than one document has takes 2 s (a trigger sleeps), one document's
        # write takes no time: the role's statement_timeout of 1 s cancels every batch of two or
        # more documents, however often it is retried as it is, and no single document.
        await conn.execute(f"ALTER ROLE {role} SET statement_timeout = '1s'")
        await conn.execute(
            f"""CREATE FUNCTION {env.schema}.slow_big_writes() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF (SELECT count(*) FROM written) > 20 THEN PERFORM pg_sleep(2); END IF;
                RETURN NULL;
            END $$"""
        )
        await conn.execute(
            f"CREATE TRIGGER slow_big_writes AFTER INSERT ON {env.schema}.chunks_g1 REFERENCING NEW TABLE "
            f"AS written FOR EACH STATEMENT EXECUTE FUNCTION {env.schema}.slow_big_writes()"
        )
        events: list[Event] = [  # 17 chunks each
            (f"st-{i}", {"id": f"st-{i}", "text": f"statement timeout {i}. " * 120}) for i in range(40)
        ]
        ends = await produce(env, events)
        limited = env.with_(DATABASE_URL=as_role(env.stack.database_url, role, password))
        with capture_logs() as logs:
            await run_worker(limited, within=150)
        await assert_stored_state(env, expected_state(events))
        assert await committed_offsets(env, list(ends)) == ends
        timed_out = [e for e in logs if e["event"] == "write_timed_out"]
        assert timed_out, "no write was over the timeout: the test tested nothing"
        assert max(e["documents"] for e in timed_out) > 1
        assert not [e for e in logs if e["event"] == "record_dead_lettered"]
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE IF EXISTS {role}")
        await conn.close()


async def test_the_progress_bar_holds_its_total_and_says_when_it_is_joining(env: Env, faults: Any) -> None:
    faults(latency_ms=20)  # a few seconds of work, so that the bar is drawn many times
    events: list[Event] = [
        (f"p-{i}", {"id": f"p-{i}", "text": f"progress document {i}."}) for i in range(300)
    ]
    await produce(env, events)
    result = await asyncio.to_thread(cli, env, "run", "--progress", "--stop-when-idle", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    frames = [f.strip() for f in re.split(r"[\r\n]", result.stderr) if "%|" in f]
    assert frames and frames[0].startswith("joining group:"), frames[:3]
    counts = [tuple(map(int, m.groups())) for f in frames if (m := re.search(r"\| (\d+)/(\d+) \[", f))]
    assert counts, frames[-5:]
    assert {total for _, total in counts} == {300}, "the total is every record, counted once"
    assert counts[-1] == (300, 300)
    assert [n for n, _ in counts] == sorted(n for n, _ in counts)
    assert "rec/s working" in frames[-1]


async def test_the_log_shows_the_settings_at_start_and_where_each_stored_batch_came_from(env: Env) -> None:
    events: list[Event] = [(f"l-{i}", {"id": f"l-{i}", "text": f"log document {i}."}) for i in range(12)]
    ends = await produce(env, events)
    result = await asyncio.to_thread(cli, env, "run", "--stop-when-idle", "1", extra={"LOG_LEVEL": "info"})
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    (shown,) = [line["settings"] for line in lines if line["event"] == "settings"]
    assert shown["KAFKA_TOPIC"] == env.topic
    assert shown["EMBEDDING_MODEL"] == env.settings.embedding_model
    assert not [line for line in lines if line["event"] == "partitions_revoked" and not line["partitions"]]
    covered: dict[str, set[int]] = {}
    for line in lines:
        if line["event"] == "batch_stored":
            for where, span in line["offsets"].items():
                low, high = map(int, span.split("-"))
                covered.setdefault(where, set()).update(range(low, high + 1))
    assert covered == {f"{tp.topic}/{tp.partition}": set(range(end)) for tp, end in ends.items()}
