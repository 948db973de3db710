"""The usage ledger against the embedding server's own count, across a kill -9 and a redelivery.

A worker's writes are held (a lock on the documents table) while it buys every embedding; once
its counts are written it is killed (-9) before storing anything. A second worker takes the
redelivered records, reuses the paid vectors from the embedding ledger, and stores everything.
``embedding_usage`` must then say exactly what the server answered: no count lost, none twice;
and every chunk of the second run counted as saved.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from tests.integration.helpers import (
    Env,
    Event,
    assert_stored_state,
    cli,
    connect,
    embedding_admin,
    expected_state,
    produce,
    run_worker,
)
from tests.integration.services import Services
from tests.integration.test_rebalance_cost import distinct_chunks, documents, killed_once, migrated_env
from tests.integration.test_store_write import FIRST, _vector, write_of
from worker.store import Store, sha256
from worker.tokens import TokenCounter
from worker.usage import Tally, Usage

pytestmark = pytest.mark.integration

SUMS = (
    "SELECT coalesce(sum(requests), 0)::int AS requests, coalesce(sum(inputs), 0)::int AS inputs, "
    "coalesce(sum(tokens), 0)::int AS tokens, coalesce(sum(saved_inputs), 0)::int AS saved_inputs, "
    "count(DISTINCT tenant)::int AS tenants FROM {schema}.embedding_usage"
)


def with_tenants(events: list[Event]) -> list[Event]:
    return [
        (key, {**value, "tenant": f"t{i % 2}"}) for i, (key, value) in enumerate(events) if value is not None
    ]


async def test_usage_equals_the_servers_count_after_a_kill_and_a_redelivery(
    stack: Services, tmp_path: Path
) -> None:
    env = await migrated_env(stack)
    events = with_tenants(documents(60, uuid.uuid4().hex[:10]))
    distinct = len(distinct_chunks(events))
    await produce(env, events)
    admin = embedding_admin(env)
    admin.reset()

    async def usage() -> dict[str, int]:
        conn = await connect(env)
        try:
            return dict(await conn.fetchrow(SUMS.format(schema=env.schema)))
        finally:
            await conn.close()

    async def all_bought_and_counted() -> bool:
        bought = admin.stats()["inputs"]
        return bought >= distinct and (await usage())["inputs"] == bought

    await killed_once(
        env,
        tmp_path / "worker.log",
        all_bought_and_counted,
        "the worker never bought and counted every chunk",
    )
    await run_worker(env, within=120)
    await assert_stored_state(env, expected_state(events))

    server = admin.stats()
    counted = await usage()
    assert server["inputs"] == distinct, "nothing bought twice (issue 11's ledger)"
    assert (counted["inputs"], counted["tokens"]) == (server["inputs"], server["tokens"])
    assert counted["requests"] == server["status_counts"]["200"]
    assert counted["saved_inputs"] >= distinct, "the second run reused every chunk: saved, not bought"
    assert counted["tenants"] == 2

    shown = cli(env, "usage")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert [line.split()[1] for line in lines[1:3]] == ["t0", "t1"]
    assert lines[3].split()[:4] == [
        "total",
        str(counted["requests"]),
        f"{counted['inputs']:,}",
        f"{counted['tokens']:,}",
    ]


async def test_every_transaction_that_makes_vectors_durable_carries_the_counts_pending(env: Env) -> None:
    """No vector kept or stored without its count: the ledger's keep and a batch's write each add
    every count pending in their own transaction; one that does not commit puts them back."""
    assert cli(env, "migrate").returncode == 0

    async def rows() -> tuple[int, int, int]:
        conn = await connect(env)
        try:
            row = await conn.fetchrow(SUMS.format(schema=env.schema))
            return row["requests"], row["inputs"], row["tokens"]
        finally:
            await conn.close()

    async with Store(env.settings) as store:
        await store.check()  # writes the served generation's table, as the worker's store does
        usage = Usage(store.usage, "m", TokenCounter("bytes"), delay=3600)  # never writes by itself
        try:
            usage.bought(["alpha"], ["t"], prompt_tokens=2)
            await store.ledger.keep({sha256("alpha"): _vector(env, "alpha")})
            assert await rows() == (1, 1, 2), "kept with the vector it paid for"

            usage.bought(["beta", "gamma"], ["t", "t"], prompt_tokens=5)
            await store.write([write_of(env, "d", FIRST, None, 1)])
            assert await rows() == (2, 3, 7), "stored with the batch"

            usage.bought(["delta"], ["t"], prompt_tokens=4)
            conn = await connect(env)
            try:
                with pytest.raises(RuntimeError):
                    async with store.usage.carried() as carry, conn.transaction():
                        await carry(conn)
                        raise RuntimeError("the transaction fails")
            finally:
                await conn.close()
            assert await rows() == (2, 3, 7), "not committed"
            assert list(usage.take().values()) == [Tally(requests=1, inputs=1, tokens=4)], "put back"
        finally:
            await usage.close()
