"""Bad usage and settings end in one line naming the argument or setting: never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from tests.integration.helpers import Env, connect, one_line_error
from worker.store import Store

pytestmark = pytest.mark.integration


def ingest(env: Env, *args: str, **overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env={"PATH": "/usr/bin:/bin", **env.values, "STARTUP_TIMEOUT_SECONDS": "5", **overrides},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, *names: str) -> None:
    line = one_line_error(result)
    for name in names:
        assert name in line, line
    assert result.returncode == code, (result.returncode, line)


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))
        listener.listen()
        yield int(listener.getsockname()[1])


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (("search", "query", "-k", "-1"), ("-k", "at least 1")),
        (("search", "query", "-k", "0"), ("-k", "at least 1")),
        (("search", "  "), ("query is empty",)),
        (("replay", "--rate", "-5"), ("--rate", "unlimited")),
        (("replay", "--max-replays", "-1"), ("--max-replays",)),
        (("dev", "--partitions", "0"), ("--partitions",)),
        (("produce", "/nonexistent/events.jsonl"), ("/nonexistent/events.jsonl", "not a file")),
        (("produce", "/tmp"), ("/tmp", "not a file")),
        (("run", "--kafka-ssl-cafile", "/nonexistent/ca.pem"), ("KAFKA_SSL_CAFILE",)),
        (("run", "--database-url", "postgresql://u@localhost:54x2/db"), ("DATABASE_URL", "port")),
    ],
    ids=lambda value: "-".join(value) if isinstance(value, tuple) else value,
)
def test_bad_usage_exits_2_with_one_line(env: Env, args: tuple[str, ...], names: tuple[str, ...]) -> None:
    assert_one_line(ingest(env, *args), 2, *names)


async def test_search_and_build_index_on_a_schema_never_migrated_say_to_migrate(env: Env) -> None:
    conn = await connect(env)
    try:  # the database has pgvector (else the line names DATABASE_URL), not this schema
        await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    finally:
        await conn.close()
    for args in (("search", "anything"), ("build-index",)):
        assert_one_line(ingest(env, *args), 2, "DATABASE_SCHEMA", "migrate")


async def test_search_with_other_dimensions_than_the_stored_column_names_the_setting(env: Env) -> None:
    await Store(env.settings).migrate()
    result = ingest(
        env, "search", "anything", "--embedding-dimensions", "128", "--embedding-send-dimensions", "false"
    )
    assert_one_line(result, 2, "EMBEDDING_DIMENSIONS", "vector(384)")


async def test_replay_of_a_dead_letter_topic_that_does_not_exist_says_so_and_creates_nothing(
    env: Env,
) -> None:
    result = ingest(env, "replay", KAFKA_DLQ_TOPIC=f"{env.topic}.no-such-dlq")
    assert_one_line(result, 2, "KAFKA_DLQ_TOPIC", f"{env.topic}.no-such-dlq", "does not exist")
    admin = AIOKafkaAdminClient(bootstrap_servers=env.stack.bootstrap)
    await admin.start()
    try:
        assert f"{env.topic}.no-such-dlq" not in await admin.list_topics()
    finally:
        await admin.close()


def test_a_health_port_in_use_names_the_setting(env: Env, busy_port: int, tmp_path: Path) -> None:
    result = ingest(env, "run", "--stop-when-idle", "1", HEALTH_PORT=str(busy_port))
    assert_one_line(result, 2, "HEALTH_PORT", str(busy_port))
