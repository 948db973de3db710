"""A database restored from a backup is brought forward from the topic (issue 11).

The worker records, in the database, how far each partition got; at an assignment it starts each
partition from the lower of that and the group's committed offset. The test runs its own
PostgreSQL (it stops it, copies its data directory, and puts the copy back) beside the session's
broker and embedding server.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.integration.helpers import (
    PARTITIONS,
    Env,
    Event,
    assert_stored_state,
    expected_state,
    fresh_env,
    produce,
    run_worker,
)
from tests.integration.services import Services
from worker.dev.stack import Postgres
from worker.kafka import ensure_topic

pytestmark = pytest.mark.integration


@pytest.fixture
def own_postgres(tmp_path: Path) -> Iterator[Postgres]:
    postgres = Postgres(tmp_path / "pg" / "pgdata")
    postgres.start()
    try:
        yield postgres
    finally:
        postgres.stop()


def copy_data_directory(source: Path, target: Path) -> None:
    """As a backup tool would: every file, with its owner and mode (postgres checks both)."""
    shutil.rmtree(target, ignore_errors=True)
    subprocess.run(["cp", "-a", str(source), str(target)], check=True)


def docs(prefix: str, n: int, version: int, words: str) -> list[Event]:
    return [
        (f"{prefix}-{i}", {"id": f"{prefix}-{i}", "version": version, "text": f"{words} {prefix} {i}. " * 6})
        for i in range(n)
    ]


async def test_a_database_restored_from_a_backup_is_brought_forward_from_the_topic(
    stack: Services, own_postgres: Postgres, tmp_path: Path
) -> None:
    env: Env = fresh_env(stack, DATABASE_URL=own_postgres.uri)
    await ensure_topic(env.settings, env.topic, PARTITIONS)
    before = docs("doc", 30, 1, "first text of")
    await produce(env, before)
    await run_worker(env)
    await assert_stored_state(env, expected_state(before))

    own_postgres.stop()
    backup = tmp_path / "backup"
    copy_data_directory(own_postgres.pgdata, backup)
    own_postgres.restart()

    updates = docs("doc", 10, 2, "second text of")  # doc-0..9 change
    deletes: list[Event] = [(f"doc-{i}", None) for i in range(25, 30)]  # tombstones
    new = docs("new", 12, 1, "a new document")
    after = [*updates, *deletes, *new]
    await produce(env, after)
    await run_worker(env)
    await assert_stored_state(env, expected_state(before + after))

    own_postgres.stop()  # the database is restored from the backup taken before `after`
    copy_data_directory(backup, own_postgres.pgdata)
    own_postgres.restart()

    with capture_logs() as logged:
        await run_worker(env)
    await assert_stored_state(env, expected_state(before + after))
    rewound = [e for e in logged if e["event"] == "rewound_to_database"]
    assert rewound, "the worker says it went back to where the database got"
    assert all(e["database"] < e["committed"] for e in rewound)
