"""Session-scoped services, and a fresh topic, schema and group per test (helpers: helpers.py)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.integration.helpers import PARTITIONS, Env, connect, fresh_env
from tests.integration.services import Services, services
from worker.dev.embedserver import EmbeddingAdmin
from worker.kafka import ensure_topic


@pytest.fixture(scope="session")
def stack() -> Iterator[Services]:
    # Not under pytest's tmp_path: a concurrent pytest run may prune those directories.
    workdir = Path(tempfile.mkdtemp(prefix="ingest-test-stack-"))
    try:
        with services(workdir) as found:
            yield found
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
async def env(stack: Services) -> Env:
    result = fresh_env(stack)
    await ensure_topic(result.settings, result.topic, PARTITIONS)
    return result


@pytest.fixture
def faults(stack: Services) -> Iterator[Any]:
    """Set the embedding server's faults for this test; cleared afterwards."""

    admin = EmbeddingAdmin(stack.embeddings.url)
    yield admin.set_faults
    admin.clear_faults()


@pytest.fixture
async def db(env: Env) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect(env)
    yield conn
    await conn.close()
