"""A schema migrated before documents kept their text: `run --no-migrate` still stores everything
(without the text), and `migrate` adds the column, after which the text is stored."""

from __future__ import annotations

import pytest

from tests.integration.helpers import Env, assert_stored_state, cli, connect, expected_state, produce

pytestmark = pytest.mark.integration


async def test_a_schema_without_documents_text_runs_unmigrated_and_migrate_adds_it(env: Env) -> None:
    assert cli(env, "migrate").returncode == 0
    conn = await connect(env)
    try:
        await conn.execute(f"ALTER TABLE {env.schema}.documents DROP COLUMN text")  # as before it existed
        first = [(f"d{i}", {"id": f"d{i}", "text": f"First text of document {i}. " * 8}) for i in range(6)]
        await produce(env, first)
        ran = cli(env, "run", "--no-migrate", "--stop-when-idle", "2")
        assert ran.returncode == 0, ran.stderr[-2000:]
        assert await conn.fetchval(f"SELECT count(*) FROM {env.schema}.documents") == 6
        assert await conn.fetchval(f"SELECT count(*) FROM {env.schema}.chunks") > 6

        assert cli(env, "migrate").returncode == 0
        second = [(f"d{i}", {"id": f"d{i}", "text": f"Second text of document {i}. " * 9}) for i in range(6)]
        await produce(env, second)
        ran = cli(env, "run", "--stop-when-idle", "2")
        assert ran.returncode == 0, ran.stderr[-2000:]
    finally:
        await conn.close()
    await assert_stored_state(env, expected_state(first + second))  # the text included
