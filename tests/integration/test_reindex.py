"""Generations of the index (issue 14), on the real broker and PostgreSQL: a switch of model and
dimensions under live ingestion with searches running all the while, then a rollback; a `reindex
start` killed (-9) halfway and started again; a chunking change through the same path."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import numpy as np

from tests.integration.helpers import (
    Env,
    Event,
    assert_stored_state,
    cli,
    connect,
    embedding_stats,
    expected_state,
    fresh_env,
    one_line_error,
    produce,
    run_worker,
)
from tests.integration.services import Services
from worker import generations
from worker.app import serve
from worker.chunk import Chunk
from worker.dev.embedserver.hashing import hash_embedding
from worker.generations import Generation
from worker.store import GenerationFill, Store
from worker.types import Vector

NEW = ("--model", "local-hash-ngram-v2", "--dimensions", "256")
WORDS = ["tomato", "basil", "kafka", "offset", "vector", "chunk", "garden", "partition", "cake", "index"]


def text(doc: int, version: int, words: int = 120, tag: str = "") -> str:
    rng = np.random.default_rng(doc * 1000 + version)
    body = " ".join(rng.choice(WORDS, size=words))
    return f"{tag} document {doc} version {version}. {body}."


def upserts(docs: range, version: int, words: int = 120, tag: str = "") -> list[Event]:
    return [
        (f"d{n}", {"id": f"d{n}", "version": version, "text": text(n, version, words, tag)}) for n in docs
    ]


def deletes(docs: range) -> list[Event]:
    return [(f"d{n}", None) for n in docs]


def fillers_of(schema: str) -> list[int]:
    """The pids of `reindex fill` processes working on ``schema`` (named in their environment)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                command = f.read().split(b"\0")
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if b"reindex" in command and b"fill" in command and f"DATABASE_SCHEMA={schema}".encode() in environ:
            found.append(int(entry.name))
    return found


async def eventually(check: Callable[[], Awaitable[None]], within: float) -> None:
    """``check`` passes within ``within`` seconds (its last failure raised otherwise)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            await check()
        except (AssertionError, asyncpg.UndefinedTableError):  # not there yet (migrate runs first)
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.5)
        else:
            return


async def scalar(env: Env, sql: str) -> Any:
    conn = await connect(env)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def with_new_generation(
    stack: Services, docs: int, **changes: Any
) -> tuple[Env, Generation, Generation]:
    """A fresh schema holding ``docs`` documents (upserts(range(docs), 1)) ingested by a worker, and
    a generation registered beside the served one (``changes``: how it differs from it)."""
    env = fresh_env(stack)
    await produce(env, upserts(range(docs), 1))
    await run_worker(env)
    async with Store(env.settings) as base:
        served = generations.served(await base.generations())
        generation = await base.register_generation(dataclasses.replace(served, id=0, **changes))
    return env, served, generation


async def test_switch_model_and_dimensions_under_live_ingestion_then_roll_back(stack: Services) -> None:
    env = fresh_env(stack)
    events = upserts(range(60), 1)
    await produce(env, events)
    stop = asyncio.Event()
    worker = asyncio.create_task(serve(env.settings, stop=stop))  # runs throughout, never restarted
    searches: list[tuple[int, int]] = []  # (generation searched, hits)
    failures: list[BaseException] = []
    searching = asyncio.Event()
    searching.set()

    async def search_all_the_while() -> None:
        async with Store(env.settings) as store:
            await store.check()

            async def embed(served: Generation) -> Vector:
                return hash_embedding("kafka offset partition", served.dimensions)

            while searching.is_set():
                try:
                    served, hits = await store.search_served(embed, 5)
                    searches.append((served.id, len(hits)))
                except Exception as exc:  # noqa: BLE001 - every search must answer: any failure counts
                    failures.append(exc)
                await asyncio.sleep(0.05)

    try:
        await eventually(lambda: assert_stored_state(env, expected_state(events)), 90)
        searcher = asyncio.create_task(search_all_the_while())
        # Before the build: updates, deletes, inserts.
        batch = upserts(range(20), 2) + deletes(range(20, 25)) + upserts(range(60, 80), 1)
        events += batch
        await produce(env, batch)
        building = asyncio.create_task(asyncio.to_thread(cli, env, "reindex", "start", *NEW))
        # During it: documents grow, others shrink to one chunk, some go, new ones come.
        await asyncio.sleep(1.0)
        batch = (
            upserts(range(30, 40), 2, words=300)
            + upserts(range(45, 50), 2, words=5)
            + deletes(range(40, 45))
            + upserts(range(80, 100), 1)
        )
        events += batch
        await produce(env, batch)
        started = await building
        assert started.returncode == 0, started.stderr[-3000:]
        assert "is complete" in started.stdout, started.stdout
        # After it, before the switch.
        batch = upserts(range(10), 3) + upserts(range(100, 110), 1) + deletes(range(70, 72))
        events += batch
        await produce(env, batch)
        switched = await asyncio.to_thread(cli, env, "reindex", "switch", "--wait")
        assert switched.returncode == 0, switched.stderr[-3000:]
        # After the switch: the running worker ingests into the new generation, and keeps the old one
        # current (a rollback would serve it).
        batch = upserts(range(50, 60), 2, words=5) + deletes(range(60, 65)) + upserts(range(110, 120), 1)
        events += batch
        await produce(env, batch)
        expected = expected_state(events)
        await eventually(lambda: assert_stored_state(env, expected, dimensions=256), 90)
        await eventually(lambda: assert_stored_state(env, expected, table="chunks_g1", dimensions=384), 60)
        assert await scalar(env, f"SELECT count(*) FROM {env.schema}.generation_pending") == 0
        status = await asyncio.to_thread(cli, env, "reindex", "status")
        assert status.returncode == 0, status.stderr
        assert "#1 kept" in status.stdout and "#2 served" in status.stdout, status.stdout
        rolled = await asyncio.to_thread(cli, env, "reindex", "rollback")
        assert rolled.returncode == 0, rolled.stderr[-3000:]
        await asyncio.sleep(1.0)  # searches go on over the rollback too
        searching.clear()
        await searcher
        await assert_stored_state(env, expected)  # `chunks` is generation 1 again, exact
        await assert_stored_state(env, expected, table="chunks_g2", dimensions=256)
    finally:
        searching.clear()
        stop.set()
        await asyncio.wait_for(worker, 60)
    assert failures == [], failures[:3]
    assert len(searches) > 20, searches
    assert all(hits == 5 for _, hits in searches), searches
    # Generation 1 until the switch, 2 until the rollback, 1 again: never another order.
    served = [generation for generation, _ in searches]
    assert [g for i, g in enumerate(served) if i == 0 or g != served[i - 1]] == [1, 2, 1], served


async def test_a_reindex_killed_halfway_resumes_and_buys_nothing_twice(stack: Services, faults: Any) -> None:
    env = fresh_env(stack, EMBEDDING_BATCH_SIZE="8", EMBEDDING_CONCURRENCY="2")
    tag = uuid.uuid4().hex[:10]
    events = upserts(range(150), 1, words=100, tag=tag)
    await produce(env, events)
    await run_worker(env)
    faults(slow_marker=tag, slow_ms=300)  # slow enough for the kill to land halfway
    before = embedding_stats(env)["inputs"]
    first = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "reindex",
        "start",
        *NEW,
        "--fillers",
        "2",
        env={**os.environ, **env.values},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        async def halfway() -> None:
            assert first.returncode is None, "reindex start ended before the kill"
            assert await scalar(env, f"SELECT to_regclass('{env.schema}.chunks_g2')") is not None
            filled = await scalar(env, f"SELECT count(*) FROM {env.schema}.chunks_g2")
            assert filled >= 100, filled

        await eventually(halfway, 90)
        # From now on every request is held 3 s: a second later, what was answered before is in
        # the ledger, and what is in flight (at most 2 requests of 8) is paid for and lost with
        # the process (the server answers it all the same, as a provider would).
        faults(slow_marker=tag, slow_ms=3000)
        await asyncio.sleep(1.0)
        first.send_signal(signal.SIGKILL)
        await first.wait()
        killed = asyncio.get_running_loop().time()

        async def helpers_gone() -> None:
            assert fillers_of(env.schema) == [], "a helper outlived the reindex start it helped"

        await eventually(helpers_gone, 10)  # told by the kernel (SIGTERM), they give their claims back
    finally:
        if first.returncode is None:
            first.kill()
            await first.wait()
    faults(slow_marker=tag, slow_ms=0)
    pending = await scalar(env, f"SELECT count(*) FROM {env.schema}.generation_pending")
    assert pending > 0, "nothing left to resume"
    again = await asyncio.to_thread(cli, env, "reindex", "start", *NEW)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming generation #2" in again.stderr, again.stderr[-3000:]
    await asyncio.sleep(max(0.0, killed + 3.5 - asyncio.get_running_loop().time()))  # lost ones answered
    bought = embedding_stats(env)["inputs"] - before
    distinct = await scalar(env, f"SELECT count(DISTINCT content_sha256) FROM {env.schema}.chunks_g2")
    # Bought again at most: what was in flight at the kill; besides, each start asks the API for
    # one input of the model before it registers anything (a refused model is a bad flag).
    assert distinct + 2 <= bought <= distinct + 2 * 8 + 2, (bought, distinct)
    switched = await asyncio.to_thread(cli, env, "reindex", "switch")
    assert switched.returncode == 0, switched.stderr[-3000:]
    await assert_stored_state(env, expected_state(events), dimensions=256)


async def test_a_chunking_change_goes_the_same_way_and_settings_must_name_a_generation(
    stack: Services,
) -> None:
    env = fresh_env(stack)
    events = upserts(range(40), 1) + upserts(range(10), 2, words=300) + deletes(range(35, 38))
    await produce(env, events)
    await run_worker(env)
    before = embedding_stats(env)["inputs"]
    started = await asyncio.to_thread(
        cli, env, "reindex", "start", "--chunk-size", "120", "--chunk-overlap", "20"
    )
    assert started.returncode == 0, started.stderr[-3000:]
    assert embedding_stats(env)["inputs"] > before  # new chunks were embedded (same model)
    switched = await asyncio.to_thread(cli, env, "reindex", "switch")
    assert switched.returncode == 0, switched.stderr[-3000:]
    await assert_stored_state(env, expected_state(events), chunking=(120, 20))
    # The old settings name the kept generation: a worker with them runs, ingesting into the one
    # served. Once the kept one is dropped, they name none: one line naming the setting.
    more = upserts(range(40, 45), 1)
    events += more
    await produce(env, more)
    await run_worker(env)
    await assert_stored_state(env, expected_state(events), chunking=(120, 20))
    # verify checks the kept generation too: complete but for what it is behind on.
    conn = await connect(env)
    try:
        await conn.execute(f"DELETE FROM {env.schema}.chunks_g1 WHERE doc_id = 'd3'")
    finally:
        await conn.close()
    damaged = await asyncio.to_thread(
        cli, env.with_(CHUNK_SIZE="120", CHUNK_OVERLAP="20"), "verify", "--json"
    )
    assert damaged.returncode == 1, damaged.stdout + damaged.stderr
    coverage = json.loads(damaged.stdout)["checks"]["generation_coverage"]
    assert coverage["problems"] == 1 and coverage["examples"] == ["d3"], coverage
    dropped = await asyncio.to_thread(cli, env, "reindex", "drop")
    assert dropped.returncode == 0, dropped.stderr
    assert await scalar(env, f"SELECT to_regclass('{env.schema}.chunks_g1')") is None
    refused = await asyncio.to_thread(cli, env, "run", "--stop-when-idle", "1")
    assert refused.returncode == 2
    line = one_line_error(refused)
    assert "CHUNK_SIZE" in line and "#2" in line, line
    verified = await asyncio.to_thread(cli, env.with_(CHUNK_SIZE="120", CHUNK_OVERLAP="20"), "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr


async def test_claims_go_on_from_the_last_key_and_come_back_for_those_left_behind(stack: Services) -> None:
    # A filler claims after the last key it took (the rows it filled before are dead tuples a scan
    # from the first key would wade through on every claim), so what is released, or pending
    # again, behind that key is found only by a claim from the first key again.
    env, _, generation = await with_new_generation(stack, 6, model="local-hash-ngram-v2", dimensions=256)
    async with Store(env.settings, generation) as store:

        async def claim(count: int, after: str = "") -> list[str]:
            rows = await store.claim_pending(count, 600.0, after)
            assert all(r["id"] == r["doc_id"] and r["text"] for r in rows), rows  # with what they hold
            return [r["doc_id"] for r in rows]

        assert await claim(2) == ["d0", "d1"]
        await store.release_pending(["d0"])
        assert await claim(2, after="d1") == ["d2", "d3"]  # not d0: behind the key
        assert await claim(10, after="d3") == ["d4", "d5"]
        assert await claim(10, after="d5") == []
        assert await claim(10) == ["d0"]  # the others are held by this (live) process


async def test_building_an_unserved_generations_index_holds_its_fillers_never_ingestion(
    stack: Services,
) -> None:
    # `reindex start` builds the index of a generation not served plainly (no second pass over the
    # table as CONCURRENTLY makes): it holds the table in SHARE mode, which only fillers write.
    # They must wait holding nothing, above all no document that ingestion wants to write.
    env, _, generation = await with_new_generation(stack, 10, model="local-hash-ngram-v2", dimensions=256)
    events = upserts(range(10), 1)
    table = f"chunks_g{generation.id}"
    build = await connect(env)  # holds the table as the plain CREATE INDEX does
    holding = build.transaction()
    await holding.start()
    await build.execute(f"LOCK TABLE {env.schema}.{table} IN SHARE MODE")
    stop = asyncio.Event()
    worker = asyncio.create_task(serve(env.settings, stop=stop))
    try:
        await asyncio.sleep(5)  # the worker's filler for the generation has found it held
        batch = upserts(range(5), 2) + deletes(range(5, 8)) + upserts(range(10, 20), 1)
        events += batch
        await produce(env, batch)
        expected = expected_state(events)
        await eventually(lambda: assert_stored_state(env, expected), 60)  # ingestion goes on
        pending = f"SELECT count(*) FROM {env.schema}.generation_pending WHERE claimed_by IS NULL"
        assert await scalar(env, pending) == 20, "nothing filled, nothing held while the table is"
        await holding.rollback()  # the build is done
        await eventually(lambda: assert_stored_state(env, expected, table=table, dimensions=256), 60)
        assert await scalar(env, f"SELECT count(*) FROM {env.schema}.generation_pending") == 0
    finally:
        stop.set()
        await asyncio.wait_for(worker, 60)
        await build.close()


async def test_only_a_fillers_commits_skip_the_wait_for_the_disk(stack: Services) -> None:
    env = fresh_env(stack)
    await Store(env.settings).migrate(ann_index=False)
    async with Store(env.settings) as base:
        served = generations.served(await base.generations())
        assert await base._fetchval("SHOW synchronous_commit") == "on", "ingestion's commits wait"
    async with Store(env.settings, served, filling=True) as filling:
        assert await filling._fetchval("SHOW synchronous_commit") == "off"


async def test_a_claim_reaches_its_rows_by_key_however_many_are_pending(stack: Services) -> None:
    # Joined to the rows its subquery picked, a claim's UPDATE matched them by a hash join over a
    # scan of every pending row wherever the planner guessed that cheaper, as at 5,000 (at 8,000
    # documents 0.6 ms of a 1.5 ms claim; at 200,000 it chose the key). Its plan must reach them
    # by key whatever the count.
    env = fresh_env(stack)
    await Store(env.settings).migrate(ann_index=False)
    schema = env.settings.database_schema
    conn = await connect(env)
    try:
        await conn.copy_records_to_table(
            "documents",
            schema_name=schema,
            columns=["id", "version", "text", "content_sha256", "chunk_count"],
            records=[(f"doc{i:05}", 1, f"text {i}", None, 0) for i in range(5000)],
        )
        async with Store(env.settings) as base:
            served = generations.served(await base.generations())
            generation = await base.register_generation(dataclasses.replace(served, id=0, model="m-v2"))
        await conn.execute(f'ANALYZE "{schema}".generation_pending')
        async with Store(env.settings, generation) as store:
            claim = store._sql.claim_pending
            plan = await conn.fetch(f"EXPLAIN {claim}", generation.id, 1, 64, 600.0, "", True)
        lines = [r[0] for r in plan]
        assert not [line for line in lines if "Seq Scan on generation_pending" in line], "\n".join(lines)
        by_key = "Index Scan using generation_pending_pkey on generation_pending p"
        assert any(by_key in line for line in lines), "\n".join(lines)
    finally:
        await conn.close()


async def test_a_fill_that_waited_for_a_writer_clears_what_the_writer_stored(stack: Services) -> None:
    # A worker whose settings name the generation being built writes into its table. A fill that
    # waits for such a write to a document (its share lock behind the writer's) must see, once
    # the write commits, the chunks it stored: it clears them before its COPY. Cleared with the
    # statement's snapshot taken before that wait, they were left, and the COPY collided with them.
    env, served, generation = await with_new_generation(stack, 1, model="m-v2")
    table = f"{env.schema}.chunks_g{generation.id}"
    writer = await connect(env)
    try:
        sha = await writer.fetchval(f"SELECT content_sha256 FROM {env.schema}.documents WHERE id = 'd0'")
        chunks = [Chunk(0, "tomato basil", 0, 12), Chunk(1, "kafka offset", 13, 25)]
        vector = np.ones(served.dimensions, dtype=np.float32)
        held = writer.transaction()
        await held.start()
        await writer.execute(f"SELECT 1 FROM {env.schema}.documents WHERE id = 'd0' FOR UPDATE")
        await writer.execute(
            f"INSERT INTO {table} SELECT doc_id, chunk_index, content, embedding, char_start, char_end, "
            f"'m-v2', content_sha256 FROM {env.schema}.chunks WHERE doc_id = 'd0'"
        )
        async with Store(env.settings, generation, filling=True) as store:
            fill = GenerationFill("d0", sha, False, chunks, [vector, vector])
            filling = asyncio.create_task(store.fill([fill]))
            await asyncio.sleep(1.0)
            assert not filling.done(), "the fill waits for the writer's lock"
            await held.commit()
            assert await asyncio.wait_for(filling, 30) == [], "d0 unchanged: filled"
        rows = await writer.fetch(f"SELECT chunk_index, content FROM {table} ORDER BY chunk_index")
        assert [(r["chunk_index"], r["content"]) for r in rows] == [(0, "tomato basil"), (1, "kafka offset")]
    finally:
        await writer.close()
