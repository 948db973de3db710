"""The embedding ledger's statements on the real PostgreSQL (worker/ledger.py, worker/sql.py):
announcements between two processes, a buyer's liveness through its session lock, and the prune.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from tests.integration.helpers import Env, Event, connect, produce, run_worker
from worker.ledger import KEEP_BATCH
from worker.store import Store, sha256

pytestmark = pytest.mark.integration

X, Y = sha256("content x"), sha256("content y")


def vector(env: Env, value: float) -> np.ndarray:
    return np.full(env.settings.embedding_dimensions, value, dtype=np.float32)


async def test_a_purchase_announced_by_a_live_process_is_awaited_and_taken_over_once_it_dies(
    env: Env,
) -> None:
    await Store(env.settings).migrate(ann_index=False)  # as `migrate` does: before any open()
    a, b = Store(env.settings), Store(env.settings)  # two processes
    await a.open()
    await b.open()
    try:
        await a.ledger.present()
        assert a.ledger.sole, "the first buyer with a model buys alone"
        await a.ledger.share([])  # nobody waits here: sharing needs no request
        assert not a.ledger.sole
        await b.ledger.present()
        assert not b.ledger.sole, "a process joining buyers that share announces too"
        assert await a.ledger.claim([X, Y]) == {X, Y}
        assert await b.ledger.claim([X, Y]) == set(), "announced by a live buyer: not b's to buy"
        assert await b.ledger.watch([X, Y]) == {X: True, Y: True}
        await a.ledger.keep({X: vector(env, 0.5)})
        seen = await b.ledger.watch([X, Y])
        assert isinstance(seen[X], np.ndarray) and seen[X].tolist() == vector(env, 0.5).tolist()
        assert seen[Y] is True
        assert X in await b.known_embeddings([X, Y]), "the reuse lookup reads the ledger"
        await a.close()  # its session, and with it the buyer's lock, is gone: as after a kill -9
        assert (await b.ledger.watch([Y]))[Y] is False
        assert await b.ledger.claim([Y]) == {Y}, "taken over at once"
        await b.ledger.drop([Y])
        conn = await connect(env)
        try:
            rows = await conn.fetch(f"SELECT content_sha256 FROM {env.schema}.embedding_ledger")
        finally:
            await conn.close()
        assert [bytes(r[0]) for r in rows] == [X], "a dropped announcement leaves no row"
    finally:
        await a.close()
        await b.close()


async def test_a_sole_buyer_announces_what_it_buys_before_another_process_joins_it(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    await Store(env.settings).migrate(ann_index=False)
    a, b, c = Store(env.settings), Store(env.settings), Store(env.settings)
    for store in (a, b, c):
        await store.open()
    try:
        await a.ledger.present()
        assert a.ledger.sole and not await a.ledger.wanted()
        joining = asyncio.create_task(b.ledger.present())
        for _ in range(100):  # b's request for the lock shared shows in pg_locks
            if await a.ledger.wanted():
                break
            await asyncio.sleep(0.05)
        assert await a.ledger.wanted(), "a sees b waiting"
        assert not joining.done(), "b waits while a buys alone"
        await a.ledger.share([X])  # what a is buying
        await asyncio.wait_for(joining, 5)
        assert not a.ledger.sole and not b.ledger.sole
        assert await b.ledger.claim([X, Y]) == {Y}, "announced by a before b came in"
        await asyncio.wait_for(c.ledger.present(), 5)  # buyers that share: a third joins at once
        assert not c.ledger.sole
    finally:
        for store in (a, b, c):
            await store.close()
    # a sole buyer that never answers (frozen) is waited for as long as its announcements would be
    monkeypatch.setattr("worker.ledger.LEASE", 0.5)
    frozen, late = Store(env.settings), Store(env.settings)
    await frozen.open()
    await late.open()
    try:
        await frozen.ledger.present()
        assert frozen.ledger.sole
        await asyncio.wait_for(late.ledger.present(), 5)
        assert not late.ledger.sole, "after the lease, it buys beside it, announcing"
        assert await frozen.ledger.wanted(), "its request stays, for when the frozen one wakes"
        await frozen.ledger.share([])
        assert not await frozen.ledger.wanted()
    finally:
        await frozen.close()
        await late.close()


async def test_the_prune_keeps_only_what_is_paid_for_unstored_and_recent(env: Env) -> None:
    events: list[Event] = [("d1", {"id": "d1", "text": "stored content of the first document."})]
    await produce(env, events)
    await run_worker(env)
    conn = await connect(env)
    store = Store(env.settings)
    await store.open()
    try:
        [stored] = [bytes(r[0]) for r in await conn.fetch(f"SELECT content_sha256 FROM {env.schema}.chunks")]
        fresh, old, dead, live = (sha256(f"ledger row {n}") for n in range(4))
        await store.ledger.keep({stored: vector(env, 0.1), fresh: vector(env, 0.2), old: vector(env, 0.3)})
        await conn.execute(
            f"UPDATE {env.schema}.embedding_ledger SET bought_at = now() - interval '200 hours' "
            "WHERE content_sha256 = $1",
            old,
        )
        assert await store.ledger.claim([live]) == {live}  # this process: alive
        await conn.execute(
            f"INSERT INTO {env.schema}.embedding_ledger (model, content_sha256, buyer) VALUES ($1, $2, 42)",
            env.settings.embedding_model,
            dead,
        )  # announced by a process whose lock is gone
        assert await store.ledger.prune() == 3
        rows = await conn.fetch(f"SELECT content_sha256 FROM {env.schema}.embedding_ledger")
        assert {bytes(r[0]) for r in rows} == {fresh, live}
    finally:
        await store.close()
        await conn.close()


async def test_a_retention_of_part_of_an_hour_is_kept_as_given(env: Env) -> None:
    env = env.with_(EMBEDDING_LEDGER_HOURS="0.5")
    await Store(env.settings).migrate(ann_index=False)
    store = Store(env.settings)
    await store.open()
    conn = await connect(env)
    try:
        await store.ledger.keep({X: vector(env, 0.1), Y: vector(env, 0.2)})
        for digest, minutes in ((X, 10), (Y, 40)):
            await conn.execute(
                f"UPDATE {env.schema}.embedding_ledger SET bought_at = now() - $2 * interval '1 minute' "
                "WHERE content_sha256 = $1",
                digest,
                minutes,
            )
        assert await store.ledger.prune() == 1
        rows = await conn.fetch(f"SELECT content_sha256 FROM {env.schema}.embedding_ledger")
        assert [bytes(r[0]) for r in rows] == [X], "half an hour, not none"
    finally:
        await store.close()
        await conn.close()


@pytest.mark.parametrize("vector_type", ["vector", "halfvec"])
async def test_answers_are_kept_in_one_statement_in_either_vector_type(env: Env, vector_type: str) -> None:
    typed = env.with_(VECTOR_TYPE=vector_type)
    await Store(typed.settings).migrate(ann_index=False)
    async with Store(typed.settings) as store:
        assert await store.ledger.claim([X, Y]) == {X, Y}
        await store.ledger.keep({Y: vector(typed, 0.25), X: vector(typed, 0.5)})
        await store.ledger.keep({X: vector(typed, 0.75)})  # paid for already: the first answer stays
        seen = await store.ledger.watch([X, Y])
    assert {h: np.asarray(v).tolist() for h, v in seen.items()} == {
        X: vector(typed, 0.5).tolist(),
        Y: vector(typed, 0.25).tolist(),
    }


async def test_a_burst_of_answers_is_kept_whole_over_several_statements(env: Env) -> None:
    await Store(env.settings).migrate(ann_index=False)
    many = {sha256(f"content {i}"): vector(env, i / 1000) for i in range(KEEP_BATCH * 2 + 3)}
    async with Store(env.settings) as store:
        await store.ledger.keep(many)
        seen = await store.ledger.watch(list(many))
    assert len(seen) == len(many)
    assert all(np.asarray(seen[h]).tolist() == v.tolist() for h, v in many.items())
