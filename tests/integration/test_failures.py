"""Failures: poison records, flaky and failing dependencies, tenants, replay, secrets."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import REGISTRY

from tests.contract import DLQ_HEADERS
from tests.integration.helpers import (
    CHUNK_OVERLAP,
    CHUNK_SIZE,
    Env,
    Event,
    assert_stored_state,
    cli,
    committed_offsets,
    connect,
    embedding_stats,
    encode,
    end_offsets,
    expected_state,
    produce,
    produce_raw,
    run_worker,
    spawn_worker,
)
from tests.integration.test_operations import read_dead_letters
from worker.app import serve
from worker.chunk import chunk_text
from worker.store import Store

pytestmark = pytest.mark.integration


def good_events(prefix: str, n: int, *, tenant: str | None = None, repeat: int = 8) -> list[Event]:
    return [
        (
            f"{prefix}-{i}",
            {
                "id": f"{prefix}-{i}",
                "text": f"{prefix} document {i} says hello. " * repeat,
                **({"tenant": tenant} if tenant else {}),
            },
        )
        for i in range(n)
    ]


async def test_poison_of_every_kind_is_dead_lettered_while_good_records_flow(env: Env, faults: Any) -> None:
    faults(reject_marker="REJECT-ME")
    poison: list[tuple[bytes | None, bytes | None, str]] = [
        (b"bad-utf8", b'{"id": "bad-utf8", "text": "\xff\xfe"}', "decode"),
        (b"not-json", b"this is not json", "decode"),
        (b"not-object", b'["a", "list"]', "validate"),
        (b"no-id", b'{"text": "no id here"}', "validate"),
        (b"x" * 600, json.dumps({"id": "x" * 600, "text": "long id"}).encode(), "validate"),
        (b"wrong-types", b'{"id": "wrong-types", "text": 12}', "validate"),
        (b"version-type", b'{"id": "version-type", "text": "t", "version": "7"}', "validate"),
        (b"negative", b'{"id": "negative", "text": "t", "version": -1}', "validate"),
        (b"bad-op", b'{"id": "bad-op", "op": "merge", "text": "t"}', "validate"),
        # PostgreSQL refuses NUL in jsonb and text: refused before any embedding is bought.
        (
            b"nul-meta",
            json.dumps({"id": "nul-meta", "text": "ok", "metadata": {"k": "a\x00b"}}).encode(),
            "validate",
        ),
        (
            b"nul-tenant",
            json.dumps({"id": "nul-tenant", "text": "ok", "tenant": "t\x00"}).encode(),
            "validate",
        ),
        (
            b"rejected",
            json.dumps({"id": "rejected", "text": "fine text. " * 30 + "REJECT-ME"}).encode(),
            "embed",
        ),
    ]
    good = good_events("g", 30)
    ends = await produce_raw(
        env, encode(good[:15]) + [(key, value) for key, value, _ in poison] + encode(good[15:])
    )
    await run_worker(env)
    await assert_stored_state(env, expected_state(good))
    letters = await read_dead_letters(env, expected=len(poison))
    assert len(letters) == len(poison)
    by_key = {m.key: m for m in letters}  # type: ignore[attr-defined]
    for key, value, stage in poison:
        headers = {k: v.decode() for k, v in by_key[key].headers}
        assert set(headers) >= DLQ_HEADERS, key
        assert headers["dlq.error.stage"] == stage, (key, headers["dlq.error.message"])
        assert by_key[key].value == value
        assert headers["dlq.error.message"]
    assert await committed_offsets(env, list(ends)) == ends


async def test_flaky_embedding_api_loses_nothing_and_dead_letters_nothing(env: Env, faults: Any) -> None:
    faults(rate_429=0.15, retry_after=0.1, rate_500=0.10, slow_rate=0.05, slow_ms=300, seed=7)
    events = good_events("f", 120, repeat=20)
    ends = await produce(env, events)
    await run_worker(env.with_(EMBEDDING_BATCH_SIZE="8"), within=180)
    await assert_stored_state(env, expected_state(events))
    assert await read_dead_letters(env, expected=1, within=2) == []
    assert await committed_offsets(env, list(ends)) == ends


async def _outage_during_ingestion(
    env: Env, start: Callable[[], Awaitable[None]], end: Callable[[], Awaitable[None]], seconds: float = 4.0
) -> None:
    events: list[Event] = []
    for i in range(240):
        doc = f"o-{i % 80}"
        events.append((doc, {"id": doc, "text": f"outage round {i}. " * (5 + i % 7), "version": i}))
    ends = await produce(env, events)
    paced = env.with_(KAFKA_MAX_POLL_RECORDS="10", MAX_IN_FLIGHT_RECORDS="20", EMBEDDING_BATCH_SIZE="4")
    run = asyncio.create_task(serve(paced.settings, stop=asyncio.Event(), stop_when_idle=2.0))
    conn = await connect(env)
    try:
        for _ in range(400):
            await asyncio.sleep(0.05)
            if (
                await conn.fetchval("SELECT to_regclass($1)", f"{env.schema}.documents")
                and await conn.fetchval(f"SELECT count(*) FROM {env.schema}.documents") > 0
            ):
                break
    finally:
        await conn.close()
    assert not run.done(), "the worker finished before the outage began"
    await start()
    await asyncio.sleep(seconds)
    await end()
    await asyncio.wait_for(run, 180)
    await assert_stored_state(env, expected_state(events))
    assert await read_dead_letters(env, expected=1, within=2) == []
    assert await committed_offsets(env, list(ends)) == ends


async def test_embedding_outage_pauses_and_resumes(env: Env, faults: Any) -> None:
    async def start() -> None:
        faults(outage=True)

    async def end() -> None:
        faults(outage=False)

    await _outage_during_ingestion(env, start, end)


async def test_database_stopped_for_seconds(env: Env) -> None:
    postgres = env.stack.postgres
    if postgres is None:
        pytest.skip("only the embedded PostgreSQL can be stopped by the tests")

    async def start() -> None:
        await asyncio.to_thread(postgres.pg_ctl, "-w", "-m", "fast", "stop")

    async def end() -> None:
        await asyncio.to_thread(postgres.restart)

    await _outage_during_ingestion(env, start, end)


async def test_broker_frozen_for_seconds(env: Env) -> None:
    broker = env.stack.broker
    if broker is None:
        pytest.skip("only the embedded broker can be frozen by the tests")

    async def start() -> None:
        broker.freeze()

    async def end() -> None:
        broker.thaw()

    await _outage_during_ingestion(env, start, end)


async def test_a_flooding_tenant_does_not_stall_another(env: Env, faults: Any) -> None:
    faults(latency_ms=40)
    flood = good_events("flood", 400, tenant="noisy", repeat=12)
    quiet = good_events("quiet", 8, tenant="calm", repeat=12)
    await produce(env, flood + quiet)
    await run_worker(env.with_(EMBEDDING_CONCURRENCY="2", EMBEDDING_BATCH_SIZE="8"), within=240)
    conn = await connect(env)
    try:
        rows = await conn.fetch(
            f"SELECT tenant, max(updated_at) AS last FROM {env.schema}.documents GROUP BY tenant"
        )
    finally:
        await conn.close()
    last = {r["tenant"]: r["last"] for r in rows}
    flood_span = await _span(env, "noisy")
    # The quiet tenant's documents, published after the whole flood, are done long before it.
    assert last["calm"] < last["noisy"] - 0.5 * flood_span
    await assert_stored_state(env, expected_state(flood + quiet))


async def _span(env: Env, tenant: str) -> Any:
    conn = await connect(env)
    try:
        return await conn.fetchval(
            f"SELECT max(updated_at) - min(updated_at) FROM {env.schema}.documents WHERE tenant = $1", tenant
        )
    finally:
        await conn.close()


async def test_replay_round_trip_and_a_second_replay_moves_nothing(env: Env, faults: Any) -> None:
    faults(reject_marker="TEMPORARILY-BAD")
    events = good_events("r", 10)
    bad: list[Event] = [
        (f"bad-{i}", {"id": f"bad-{i}", "text": f"TEMPORARILY-BAD input {i}."}) for i in range(4)
    ]
    await produce(env, events + bad)
    await run_worker(env)
    assert len(await read_dead_letters(env, expected=4)) == 4

    listed = await asyncio.to_thread(cli, env, "replay", "--dry-run", "--stage", "embed")
    assert listed.returncode == 0, listed.stderr
    assert sum("bad-" in line for line in listed.stdout.splitlines()) == 4

    faults(reject_marker=None)  # the cause is fixed
    first = await asyncio.to_thread(cli, env, "replay", "--stage", "embed", "--max-replays", "3")
    assert first.returncode == 0, first.stderr
    assert "moved 4" in first.stdout
    await run_worker(env)
    await assert_stored_state(env, expected_state(events + bad))

    second = await asyncio.to_thread(cli, env, "replay")
    assert second.returncode == 0, second.stderr
    assert "moved 0" in second.stdout


async def test_a_filtered_replay_leaves_what_it_skipped_for_the_next_run_of_its_group(
    env: Env, faults: Any
) -> None:
    faults(reject_marker="LATER")
    rejected: list[Event] = [(f"emb-{i}", {"id": f"emb-{i}", "text": f"LATER text {i}."}) for i in range(4)]
    garbage = [(f"garbage-{i}".encode(), b"not json at all") for i in range(3)]
    for i in range(4):  # interleaved, so that skipped letters sit between moved ones
        await produce(env, rejected[i : i + 1])
        if i < len(garbage):
            await produce_raw(env, garbage[i : i + 1])
    await run_worker(env)
    assert len(await read_dead_letters(env, expected=7)) == 7
    faults(reject_marker=None)
    before = sum((await end_offsets(env)).values())

    runs = [
        await asyncio.to_thread(cli, env, "replay", *args)
        for args in (("--stage", "embed"), ("--stage", "decode"), ())
    ]
    assert [r.returncode for r in runs] == [0, 0, 0], [r.stderr for r in runs]
    summaries = [r.stdout for r in runs]
    moved = [int(re.search(r"moved (\d+),", text).group(1)) for text in summaries]  # type: ignore[union-attr]
    assert sum(moved) == 7, summaries
    assert f"group {env.settings.kafka_group_id}.replay reads them again" in summaries[0]
    if env.stack.kind == "tansu":  # it drops commit metadata: a run stops at what it must not pass
        assert "keeps no commit metadata" in summaries[0]
        return  # (and its ListOffsets answers lag: the topic's growth is checked on Kafka)
    assert sum((await end_offsets(env)).values()) - before == 7, "each letter went back once"
    assert moved == [4, 3, 0], summaries
    assert "passed over 4 moved by an earlier run" in summaries[1]
    assert "scanned 0 dead letters" in summaries[2]


async def test_dead_letters_a_crash_duplicated_replay_to_the_same_state_at_no_extra_cost(
    env: Env, faults: Any
) -> None:
    faults(reject_marker="TEMPORARILY-BAD")
    events = good_events("c", 6)
    bad: list[Event] = [
        (f"dup-{i}", {"id": f"dup-{i}", "text": f"TEMPORARILY-BAD {i}. " * 30}) for i in range(3)
    ]
    await produce(env, events + bad)
    await run_worker(env)
    letters = await read_dead_letters(env, expected=len(bad))
    assert len(letters) == len(bad)
    # A worker killed after sending its dead letters but before committing sends them again on
    # restart (at-least-once): play that by publishing every letter a second time.
    producer = AIOKafkaProducer(bootstrap_servers=env.stack.bootstrap, enable_idempotence=False)
    await producer.start()
    try:
        for m in letters:
            await producer.send_and_wait(
                env.settings.dlq_topic, key=m.key, value=m.value, headers=list(m.headers)
            )
    finally:
        await producer.stop()

    faults(reject_marker=None)  # the cause is fixed
    before = embedding_stats(env)["inputs"]
    moved = await asyncio.to_thread(cli, env, "replay")
    assert moved.returncode == 0, moved.stderr
    assert f"moved {2 * len(bad)}" in moved.stdout  # each copy goes back
    await run_worker(env)
    await assert_stored_state(env, expected_state(events + bad))
    # The second copy of each document changes nothing and buys nothing: its chunks are stored.
    texts = [value["text"] for _, value in bad if value]
    distinct = {c.content for text in texts for c in chunk_text(text, size=CHUNK_SIZE, overlap=CHUNK_OVERLAP)}
    assert embedding_stats(env)["inputs"] - before == len(distinct)


async def test_no_secret_reaches_logs_or_dead_letters(env: Env, faults: Any, tmp_path: Path) -> None:
    api_key = "sk-live-TOPSECRET-1234567890"
    password = "pg-PASSWORD-hunter2"
    database_url = env.stack.database_url
    if "@" in database_url and "://" in database_url:
        scheme, rest = database_url.split("://", 1)
        user, host = rest.split("@", 1)
        database_url = f"{scheme}://{user.split(':')[0]}:{password}@{host}"
    faults(reject_marker="POISON", echo_key=True)
    await produce(env, [*good_events("s", 5), ("s-bad", {"id": "s-bad", "text": "POISON here"})])
    extra = {"EMBEDDING_API_KEY": api_key, "DATABASE_URL": database_url, "LOG_LEVEL": "debug"}
    result = await asyncio.to_thread(cli, env, "run", "--stop-when-idle", "1.5", extra=extra)
    assert result.returncode == 0, result.stderr[-2000:]
    letters = await read_dead_letters(env, expected=1)
    assert len(letters) == 1
    headers = b" ".join(v for _, v in letters[0].headers).decode()  # type: ignore[attr-defined]
    assert "Request credentials" in headers, "the fault did not echo the key: the test proves nothing"
    for secret in (api_key, password):
        assert secret not in result.stdout and secret not in result.stderr
        assert secret not in headers


async def wait_until_down(dependency: str, run: asyncio.Task[None], within: float = 60) -> None:
    """Until the worker's circuit breaker for ``dependency`` is open (its /metrics say so)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while REGISTRY.get_sample_value("ingest_dependency_up", {"dependency": dependency}) != 0:
        assert not run.done(), "the worker finished while it should have been waiting"
        assert loop.time() < deadline, f"{dependency} was never taken for down"
        await asyncio.sleep(0.2)


def dead_lettered(env: Env) -> float:
    return (
        REGISTRY.get_sample_value("ingest_records_total", {"topic": env.topic, "outcome": "dead_lettered"})
        or 0
    )


async def test_a_role_that_may_not_write_pauses_the_worker_instead_of_dead_lettering(env: Env) -> None:
    await Store(env.settings).migrate()
    role, password = f"ingest_ro_{env.schema}", "ro-secret"
    conn = await connect(env)
    try:
        await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        await conn.execute(f"GRANT USAGE ON SCHEMA {env.schema} TO {role}")
        await conn.execute(f"GRANT SELECT ON ALL TABLES IN SCHEMA {env.schema} TO {role}")  # no writes
        events = good_events("ro", 20)
        ends = await produce(env, events)
        url = env.stack.database_url.replace("postgres:@", f"{role}:{password}@", 1)
        assert url != env.stack.database_url, "the test expects the embedded server's URL form"
        run = asyncio.create_task(run_worker(env.with_(DATABASE_URL=url), within=180))
        try:
            # Every write is refused: that is the database refusing this role, not 20 bad records.
            await wait_until_down("database", run)
            assert dead_lettered(env) == 0
            await conn.execute(f"GRANT INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {env.schema} TO {role}")
            await run  # the grant is all it takes: the worker resumes on its own
        finally:
            if not run.done():
                run.cancel()
    finally:
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE IF EXISTS {role}")
        await conn.close()
    await assert_stored_state(env, expected_state(events))
    assert await committed_offsets(env, list(ends)) == ends
    assert dead_lettered(env) == 0


async def test_an_embedding_api_refusing_every_request_pauses_instead_of_dead_lettering(
    env: Env, faults: Any
) -> None:
    faults(refuse_dimensions=True)  # a model without `dimensions` answers 400 to every request
    events = good_events("rd", 30)
    ends = await produce(env, events)
    before = embedding_stats(env)["requests"]
    run = asyncio.create_task(run_worker(env, within=180))
    try:
        await wait_until_down("embedding", run)
        assert dead_lettered(env) == 0
        paused_after = embedding_stats(env)["requests"] - before
        await asyncio.sleep(3)  # while it is down, only the breaker's probe asks, with backoff
        assert embedding_stats(env)["requests"] - before - paused_after <= 5
        faults(refuse_dimensions=False)  # e.g. the model was changed, or EMBEDDING_SEND_DIMENSIONS=false
        await run
    finally:
        if not run.done():
            run.cancel()
    await assert_stored_state(env, expected_state(events))
    assert await committed_offsets(env, list(ends)) == ends
    assert dead_lettered(env) == 0


def consumer_lag(env: Env) -> float:
    """The worker's ingest_consumer_lag summed over this test's partitions (its /metrics)."""
    return sum(
        REGISTRY.get_sample_value("ingest_consumer_lag", {"topic": env.topic, "partition": str(p)}) or 0
        for p in range(3)
    )


async def test_consumer_lag_keeps_growing_while_an_outage_holds_the_worker(env: Env, faults: Any) -> None:
    faults(outage=True)
    first = good_events("lag", 20)
    await produce(env, first)
    run = asyncio.create_task(run_worker(env.with_(MAX_IN_FLIGHT_RECORDS="10"), within=180))
    try:
        await wait_until_down("embedding", run)  # paused: nothing is fetched any more
        more = good_events("lag-more", 60)
        await produce(env, more)
        # An autoscaler or the lag alert must see the backlog grow, not the figure of the last commit.
        deadline = asyncio.get_running_loop().time() + 30
        while consumer_lag(env) < len(first) + len(more):
            assert asyncio.get_running_loop().time() < deadline, f"lag stuck at {consumer_lag(env)}"
            await asyncio.sleep(0.5)
        faults(outage=False)
        await run
    finally:
        if not run.done():
            run.cancel()
    await assert_stored_state(env, expected_state(first + more))
    assert consumer_lag(env) == 0


async def test_a_stop_waiting_on_paid_answers_is_acknowledged_at_once_and_a_second_one_exits_at_once(
    env: Env, faults: Any, tmp_path: Path
) -> None:
    # After leaving the group a stopping worker waits (within the grace period) for the answers
    # of requests it sent, since they are paid for; a second signal does not wait for them.
    faults(latency_ms=120_000)
    events = good_events("sig", 20)
    ends = await produce(env, events)
    log = tmp_path / "worker.log"
    sent = embedding_stats(env)["requests"]
    worker = spawn_worker(env.with_(LOG_LEVEL="info", SHUTDOWN_GRACE_SECONDS="60"), log)
    try:
        loop = asyncio.get_running_loop()
        deadline0 = loop.time() + 60

        async def logged(event: str, within: float) -> None:
            deadline = loop.time() + within
            while f'"event":"{event}"' not in log.read_text():
                assert worker.poll() is None, log.read_text()[-2000:]
                assert loop.time() < deadline, f"no {event} within {within:.0f}s: {log.read_text()[-2000:]}"
                await asyncio.sleep(0.1)

        while embedding_stats(env)["requests"] == sent:  # a request in flight
            assert worker.poll() is None and loop.time() < deadline0, log.read_text()[-2000:]
            await asyncio.sleep(0.1)
        worker.send_signal(signal.SIGTERM)
        await logged("stop_requested", within=3)  # said at once, not after the 60 s grace
        worker.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(worker.wait, 10) == 130
        assert '"event":"stop_forced"' in log.read_text()
    finally:
        if worker.poll() is None:
            worker.kill()
    faults(latency_ms=0)
    await run_worker(env)  # what the forced stop left uncommitted is delivered again: nothing lost
    await assert_stored_state(env, expected_state(events))
    assert await committed_offsets(env, list(ends)) == ends
