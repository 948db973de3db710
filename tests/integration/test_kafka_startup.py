"""Start-up against a broker that refuses: one clear line and a non-zero exit, never a traceback.

On Apache Kafka's SASL listener (an authorizer on, ``admin`` a super user): a wrong password,
a user who may not create the missing dead-letter topic, a user who may not produce
idempotently; and a broker nobody answers at. Tansu, which has no idempotent producers at all,
plays the broker that refuses ``InitProducerId`` outright.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import Env, one_line_error
from worker.dev import apache_kafka
from worker.dev.apache_kafka import SASL_USERS, KafkaCluster
from worker.dev.processes import free_port
from worker.dev.stack import TansuBroker
from worker.kafka import ensure_topic

pytestmark = pytest.mark.integration


def run(env: Env, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env={"PATH": "/usr/bin:/bin", **env.values},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def kafka(env_module_stack: KafkaCluster) -> KafkaCluster:
    return env_module_stack


@pytest.fixture(scope="module")
def env_module_stack(stack: object) -> Iterator[KafkaCluster]:
    broker = getattr(stack, "broker", None)
    if not isinstance(broker, KafkaCluster):
        pytest.skip("needs the local Apache Kafka (its SASL listener and authorizer)")
    # `reader` may read every topic and group, and nothing else: no Create, no Write.
    broker.allow("User:reader", "topic", "*", "Read", "Describe")
    broker.allow("User:reader", "group", "*", "Read")
    yield broker


def as_user(env: Env, kafka: KafkaCluster, user: str, password: str, **overrides: str) -> Env:
    return env.with_(
        KAFKA_BOOTSTRAP_SERVERS=kafka.sasl_bootstrap,
        KAFKA_SECURITY_PROTOCOL="SASL_PLAINTEXT",
        KAFKA_SASL_MECHANISM="PLAIN",
        KAFKA_SASL_USERNAME=user,
        KAFKA_SASL_PASSWORD=password,
        STARTUP_TIMEOUT_SECONDS="20",
        **overrides,
    )


def test_a_wrong_password_exits_2_naming_the_setting(env: Env, kafka: KafkaCluster) -> None:
    result = run(as_user(env, kafka, "reader", "not-the-password"), "run", "--stop-when-idle", "1")
    assert result.returncode == 2, result.stderr
    line = one_line_error(result)
    assert "KAFKA_SASL_PASSWORD" in line
    assert "not-the-password" not in result.stdout + result.stderr


def test_a_missing_dead_letter_topic_the_user_may_not_create_exits_1(env: Env, kafka: KafkaCluster) -> None:
    user = as_user(env, kafka, "reader", SASL_USERS["reader"], KAFKA_PRODUCER_IDEMPOTENCE="false")
    result = run(user, "run", "--stop-when-idle", "1")
    assert result.returncode == 1, result.stderr
    line = one_line_error(result)
    assert f"topic '{env.settings.dlq_topic}' does not exist and cannot be created" in line
    assert "TopicAuthorizationFailed" in line


async def test_a_user_refused_idempotent_producers_exits_2_naming_the_setting(
    env: Env, kafka: KafkaCluster
) -> None:
    await ensure_topic(env.settings, env.settings.dlq_topic, partitions=1)  # as the super user
    user = as_user(env, kafka, "reader", SASL_USERS["reader"])
    result = run(user, "run", "--stop-when-idle", "1")
    assert result.returncode == 2, result.stderr
    line = one_line_error(result)
    assert "KAFKA_PRODUCER_IDEMPOTENCE" in line
    assert "ClusterAuthorizationFailed" in line
    # The advice holds: without idempotence the same user joins, finds nothing to do, and exits 0.
    relaxed = run(user.with_(KAFKA_PRODUCER_IDEMPOTENCE="false"), "run", "--stop-when-idle", "1")
    assert relaxed.returncode == 0, relaxed.stdout[-2000:] + relaxed.stderr[-2000:]


@pytest.mark.parametrize("command", ["run", "replay", "produce"])
async def test_a_broker_that_refuses_init_producer_id_exits_2(env: Env, command: str, tmp_path: Path) -> None:
    tansu = TansuBroker()
    tansu.start()
    try:
        on_tansu = env.with_(KAFKA_BOOTSTRAP_SERVERS=tansu.bootstrap, KAFKA_PRODUCER_IDEMPOTENCE="true")
        await ensure_topic(on_tansu.settings, on_tansu.settings.dlq_topic, partitions=1)
        events = tmp_path / "events.jsonl"
        events.write_text('{"id": "a", "text": "a document"}\n')
        args = {
            "run": ("run", "--stop-when-idle", "1"),
            "replay": ("replay",),
            "produce": ("produce", str(events)),
        }
        result = await asyncio.to_thread(run, on_tansu, *args[command])
    finally:
        tansu.stop()
    assert result.returncode == 2, result.stderr
    line = one_line_error(result)
    assert "KAFKA_PRODUCER_IDEMPOTENCE" in line
    assert "KAFKA_PRODUCER_IDEMPOTENCE=false" in line


@pytest.mark.parametrize("command", [("run",), ("produce", "/dev/null")])
def test_an_unreachable_broker_exits_1_naming_it(env: Env, command: tuple[str, ...]) -> None:
    nowhere = f"127.0.0.1:{free_port()}"
    result = run(env.with_(KAFKA_BOOTSTRAP_SERVERS=nowhere, STARTUP_TIMEOUT_SECONDS="2"), *command)
    assert result.returncode == 1, result.stderr
    line = one_line_error(result)
    assert nowhere in line
    assert "Connection refused" in line, "the real cause, not aiokafka's 'Unable to bootstrap'"
    assert "library_log" not in result.stdout, "each attempt reported once, by the worker's own line"


async def test_replay_on_a_broker_where_no_group_was_ever_used_waits_for_its_coordinator(env: Env) -> None:
    """A fresh broker answers "coordinator not available" while it creates its offsets topic."""
    if not apache_kafka.available():
        pytest.skip("needs the local Apache Kafka (`java` and `mvn`, or the jars fetched already)")
    workdir = Path(tempfile.mkdtemp(prefix="ingest-test-fresh-kafka-"))
    fresh = KafkaCluster(workdir, size=1)
    try:
        await asyncio.to_thread(fresh.start)
        on_fresh = env.with_(KAFKA_BOOTSTRAP_SERVERS=fresh.bootstrap)
        await ensure_topic(on_fresh.settings, on_fresh.settings.dlq_topic, partitions=1)
        result = await asyncio.to_thread(run, on_fresh, "replay")
    finally:
        await asyncio.to_thread(fresh.stop)
        shutil.rmtree(workdir, ignore_errors=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "scanned 0 dead letters" in result.stdout
