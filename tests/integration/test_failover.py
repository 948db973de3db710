"""Broker failover on a real three-node Apache Kafka cluster.

KRaft, every node broker and controller, replication factor 3, ``min.insync.replicas`` 2: one
node down still accepts ``acks=all`` writes. While a worker is ingesting (the embedding server
slowed down so that the stream lasts well beyond the failure, and few records in flight so that
it keeps fetching throughout), the tests

- ``kill -9`` the leader of the busiest partition, publish more while it is down, start it again;
- restart all three nodes one at a time, as operators do: SIGTERM (a controlled shutdown), wait
  for the exit, start it again, wait until it serves and every partition's ISR is full again,
  and only then the next node; more events are published while each node is down.

Each ends in the exact stored state, no dead letter, and the group's committed offsets at the end
of every partition (and the worker's own count of finished records covers every record published:
none skipped behind a later version of its document). "Mid-stream" is checked, not hoped for: the
worker must still be running at each step, must have committed past the first record published
after the kill while that node is still down, and must progress during each node's restart.
PostgreSQL and the embedding server are the session's; the cluster is this module's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from prometheus_client import REGISTRY

from tests.integration.helpers import (
    Env,
    Event,
    assert_stored_state,
    committed_offsets,
    expected_state,
    fresh_env,
    produce,
    run_worker,
    stored_documents,
)
from tests.integration.services import Services
from worker.dev import apache_kafka
from worker.dev.apache_kafka import KafkaCluster
from worker.kafka import ensure_topic

pytestmark = pytest.mark.integration

PARTITIONS = 6
DOCS = 150
# Small fetches, few records in flight, one slow embedding request at a time: the records stay
# in Kafka until the worker gets to them, so it fetches from every partition's leader all along.
PACED = {
    "KAFKA_MAX_POLL_RECORDS": "10",
    "KAFKA_MAX_PARTITION_FETCH_BYTES": "2048",
    "MAX_IN_FLIGHT_RECORDS": "20",
    "EMBEDDING_BATCH_SIZE": "4",
    "EMBEDDING_CONCURRENCY": "1",
}
# Latency added to each embedding request while the cluster is being broken (lifted afterwards):
# the kill test must reach records published after the kill while the node is still down.
KILL_SLOW_MS = 100
ROLLING_SLOW_MS = 250


@pytest.fixture(scope="module")
def cluster() -> Iterator[KafkaCluster]:
    if not apache_kafka.available():
        pytest.skip("a three-node Apache Kafka cluster needs `java` and `mvn` (or the jars fetched already)")
    # Not under pytest's tmp_path: a concurrent pytest run may prune those directories.
    workdir = Path(tempfile.mkdtemp(prefix="ingest-test-failover-"))
    kafka = KafkaCluster(workdir, size=3)
    try:
        kafka.start()
        yield kafka
    finally:
        kafka.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
async def cluster_env(stack: Services, cluster: KafkaCluster) -> Env:
    """A fresh topic, group and schema, with the cluster as the broker (every node up, ISR full)."""
    for node in cluster.nodes:  # a test that failed half-way may have left one down
        if not node.running:
            await asyncio.to_thread(cluster.restart, node.node_id)
    await wait_fully_replicated(cluster)
    services = dataclasses.replace(
        stack,
        kind="kafka",
        bootstrap=cluster.bootstrap,
        broker=cluster,
        producer_idempotence=True,
        session_timeout_ms=10_000,
    )
    env = fresh_env(services, "failover", **PACED)
    await ensure_replicated_topic(env)
    return env


async def ensure_replicated_topic(env: Env, within: float = 30) -> None:
    assert await ensure_topic(env.settings, env.topic, PARTITIONS)
    # The controller has the topic once create_topics answers; the broker asked may learn of it
    # a moment later (its metadata then lists the topic with no partitions).
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    partitions = await describe(env.stack.bootstrap, env.topic)
    while len(partitions) < PARTITIONS and loop.time() < deadline:
        await asyncio.sleep(0.2)
        partitions = await describe(env.stack.bootstrap, env.topic)
    assert len(partitions) == PARTITIONS
    # What the test claims to test: every partition on all three nodes.
    assert all(len(p["replicas"]) == 3 for p in partitions.values()), partitions


# -- the stream --------------------------------------------------------------------------------


def stream(start: int, count: int) -> list[Event]:
    """Upserts of growing versions over DOCS documents, stale versions, tombstones, deletes by op."""
    events: list[Event] = []
    for i in range(start, start + count):
        doc = f"f-{i % DOCS}"
        text = f"failover event {i} of {doc}, tenant {i % 3}. " * (3 + i % 9)
        events.append((doc, {"id": doc, "text": text, "version": i, "tenant": f"t{i % 3}"}))
        if i % 13 == 5:  # an older version arriving late: must not win
            events.append((doc, {"id": doc, "text": "STALE text. " * 20, "version": i - 5}))
        if i % 17 == 3:  # tombstone
            events.append((f"f-{(i * 7) % DOCS}", None))
        if i % 29 == 11:  # delete by op, with a version; a later upsert brings it back
            other = f"f-{(i * 11) % DOCS}"
            events.append((other, {"id": other, "op": "delete", "version": i}))
    return events


def merged(*ends: dict[TopicPartition, int]) -> dict[TopicPartition, int]:
    out: dict[TopicPartition, int] = {}
    for part in ends:
        for tp, end in part.items():
            out[tp] = max(out.get(tp, 0), end)
    return out


# -- the cluster, seen from a client -----------------------------------------------------------


async def describe(bootstrap: str, topic: str | None = None) -> dict[tuple[str, int], dict[str, Any]]:
    """Each partition's metadata (``leader``, ``replicas``, ``isr``) by (topic, partition)."""
    return (await metadata(bootstrap, topic))[1]


async def metadata(
    bootstrap: str, topic: str | None = None
) -> tuple[set[int], dict[tuple[str, int], dict[str, Any]]]:
    """The brokers serving, and each partition's metadata (of ``topic``, or of every topic)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        brokers = {b["node_id"] for b in (await admin.describe_cluster())["brokers"]}
        topics = await admin.describe_topics(None if topic is None else [topic])
    finally:
        await admin.close()
    return brokers, {(t["topic"], p["partition"]): p for t in topics for p in t["partitions"]}


async def wait_fully_replicated(cluster: KafkaCluster, within: float = 90) -> None:
    """Until every node serves and every partition of every topic has a leader and a full ISR."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    nodes = {node.node_id for node in cluster.nodes}
    lagging: list[Any] = []
    while loop.time() < deadline:
        try:
            brokers, partitions = await metadata(cluster.bootstrap)
        except KafkaError as exc:
            lagging = [repr(exc)]
        else:
            lagging = [
                (key, p["leader"], p["isr"], p["replicas"])
                for key, p in sorted(partitions.items())
                if p["leader"] < 0 or set(p["isr"]) != set(p["replicas"])
            ]
            if brokers != nodes:
                lagging.insert(0, f"brokers serving: {sorted(brokers)}")
            if not lagging:
                return
        await asyncio.sleep(0.2)
    pytest.fail(f"the cluster is not whole again after {within:.0f}s: {lagging[:8]}")


async def dead_letters(env: Env) -> list[Any]:
    """Every record on the dead-letter topic, read from the beginning up to its end offsets."""
    dlq = env.settings.dlq_topic
    partitions = [p for topic, p in await describe(env.stack.bootstrap, dlq) if topic == dlq]
    assert partitions, f"the worker did not create its dead-letter topic {dlq}"
    consumer = AIOKafkaConsumer(
        bootstrap_servers=env.stack.bootstrap, enable_auto_commit=False, group_id=None
    )
    await consumer.start()
    letters: list[Any] = []
    try:
        tps = [TopicPartition(dlq, p) for p in partitions]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
            assert loop.time() < deadline, f"could not read {dlq} to its end offsets {ends}"
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                letters.extend(messages)
    finally:
        await consumer.stop()
    return letters


def letter_summary(letters: list[Any]) -> list[tuple[Any, ...]]:
    return [(m.key, dict((k, v.decode(errors="replace")) for k, v in m.headers or ())) for m in letters]


# -- the worker, seen from outside -------------------------------------------------------------


async def committed_total(env: Env) -> int:
    tps = [TopicPartition(env.topic, p) for p in range(PARTITIONS)]
    return sum(offset or 0 for offset in (await committed_offsets(env, tps)).values())


@contextlib.asynccontextmanager
async def worker_task(env: Env, within: float) -> AsyncIterator[asyncio.Task[None]]:
    """A worker ingesting in this process until idle; cancelled if the test leaves early."""
    run = asyncio.create_task(run_worker(env, idle=3.0, within=within))
    try:
        yield run
    finally:
        if not run.done():
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)


def still_running(run: asyncio.Task[None], when: str) -> None:
    """The worker is mid-stream: neither crashed nor finished already."""
    if run.done():
        run.result()  # its exception, if it failed
        pytest.fail(f"the worker finished {when}: the stream was too short to test a failover")


async def wait_until_storing(env: Env, run: asyncio.Task[None], at_least: int = 20) -> None:
    for _ in range(1200):
        still_running(run, "before it stored anything")
        if await stored_documents(env) >= at_least:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"the worker stored fewer than {at_least} documents within 60 s")


async def wait_for_commit_past(
    env: Env, run: asyncio.Task[None], tp: TopicPartition, offset: int, within: float = 60
) -> None:
    """Until the group's committed offset of ``tp`` is beyond ``offset`` (the record there is stored)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        still_running(run, f"while waiting for a commit on {tp}")
        committed = (await committed_offsets(env, [tp]))[tp]
        if committed is not None and committed > offset:
            return
        await asyncio.sleep(0.3)
    pytest.fail(f"no commit past offset {offset} of partition {tp.partition} within {within:.0f}s")


def records_finished(env: Env, outcome: str) -> float:
    """The in-process worker's own count (its /metrics) of this topic's records by outcome."""
    labels = {"topic": env.topic, "outcome": outcome}
    return REGISTRY.get_sample_value("ingest_records_total", labels) or 0.0


async def assert_exact_end(env: Env, events: list[Event], ends: dict[TopicPartition, int]) -> None:
    assert len(ends) == PARTITIONS and sum(ends.values()) == len(events)
    await assert_stored_state(env, expected_state(events))
    letters = await dead_letters(env)
    assert letters == [], f"dead letters: {letter_summary(letters)}"
    assert await committed_offsets(env, list(ends)) == ends
    # Every record was finished (stored, or stale/superseded): none skipped behind a later version.
    finished = {outcome: records_finished(env, outcome) for outcome in ("stored", "stale", "dead_lettered")}
    assert finished["dead_lettered"] == 0
    assert finished["stored"] + finished["stale"] >= len(events), finished


# -- the tests ---------------------------------------------------------------------------------


async def test_sigkill_of_the_busiest_partitions_leader_mid_stream(
    cluster_env: Env, cluster: KafkaCluster, faults: Any
) -> None:
    env = cluster_env
    first = stream(0, 150)
    ends = await produce(env, first)
    faults(latency_ms=KILL_SLOW_MS)
    async with worker_task(env, within=180) as run:
        await wait_until_storing(env, run)
        # The busiest partition: the most records not yet committed.
        committed = await committed_offsets(env, list(ends))
        busiest = max(ends, key=lambda tp: ends[tp] - (committed[tp] or 0))
        leader_id = (await describe(env.stack.bootstrap, env.topic))[(env.topic, busiest.partition)]["leader"]
        victim = cluster.node(leader_id)
        still_running(run, "before the kill")

        await asyncio.to_thread(victim.kill)
        assert victim.process is not None and victim.process.returncode == -signal.SIGKILL
        # acks=all with one of three replicas gone: min.insync.replicas=2 still takes writes.
        published_after_kill = ends[busiest]  # the offset of the first record published from here on
        second = stream(150, 450)
        ends = merged(ends, await produce(env, second))
        after = await describe(env.stack.bootstrap, env.topic)
        assert after[(env.topic, busiest.partition)]["leader"] not in (leader_id, -1)
        # While the node is still down, the worker stores a record published after the kill (so
        # fetched from the new leader) and commits it (to a coordinator that may have moved too).
        await wait_for_commit_past(env, run, busiest, published_after_kill)
        assert not victim.running
        still_running(run, "while the node was down")

        await asyncio.to_thread(cluster.restart, leader_id)
        still_running(run, "before the killed node was back")
        faults(latency_ms=0)
        await run
    await wait_fully_replicated(cluster)  # the killed node caught up and is in sync again
    await assert_exact_end(env, first + second, ends)


async def test_rolling_restart_of_every_node_mid_stream(
    cluster_env: Env, cluster: KafkaCluster, faults: Any
) -> None:
    env = cluster_env
    events = stream(0, 360)
    ends = await produce(env, events)
    faults(latency_ms=ROLLING_SLOW_MS)
    async with worker_task(env, within=240) as run:
        await wait_until_storing(env, run)
        for step, node in enumerate(cluster.nodes):
            still_running(run, f"before node {node.node_id} was stopped")
            before = await committed_total(env)
            await asyncio.to_thread(node.stop, 60)  # SIGTERM: a controlled shutdown
            assert node.process is not None
            stopped = node.process.returncode
            assert stopped != -signal.SIGKILL, f"node {node.node_id} did not shut down within 60 s of SIGTERM"
            more = stream(360 + 80 * step, 80)
            ends = merged(ends, await produce(env, more))
            events += more
            await asyncio.to_thread(cluster.restart, node.node_id)
            await wait_fully_replicated(cluster)
            still_running(run, f"before node {node.node_id} was back in sync")
            assert await committed_total(env) > before, f"no progress while node {node.node_id} restarted"
        faults(latency_ms=0)
        await run
    await assert_exact_end(env, events, ends)
