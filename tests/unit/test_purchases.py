"""worker/purchases.py and worker/ledger.py: each content bought once, in this process and
across processes; what was paid for is kept; what was never sent is withdrawn."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from tests.unit.fakes import FakeLedgerTable, fast_backoff, until
from worker.dependency import Dependency
from worker.errors import InputRejected
from worker.ledger import Ledger
from worker.purchases import Purchases, vectors_of
from worker.retry import ShuttingDown
from worker.types import Vector

D1, D2 = bytes(32), bytes([1] * 32)  # content digests
VECTOR = np.ones(4, dtype=np.float32)


class FakeBuyer:
    """The embedding stage: a pending future per input; ``send()`` marks the queued ones sent."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []
        self.queued: list[asyncio.Future[Vector]] = []
        self.sent: list[asyncio.Future[Vector]] = []

    def submit(self, text: str, tenant: str | None = None) -> asyncio.Future[Vector]:
        self.calls.append((text, tenant))
        future: asyncio.Future[Vector] = asyncio.get_running_loop().create_future()
        self.queued.append(future)
        return future

    def withdraw(self, future: asyncio.Future[Vector]) -> bool:
        if future.done() or future in self.sent:
            return False
        future.cancel()
        return True

    def send(self) -> None:
        self.sent += self.queued
        self.queued = []


class Process:
    """One process's purchases, over a ledger table it may share with others."""

    def __init__(self, table: FakeLedgerTable) -> None:
        self.table = table
        self.buyer = FakeBuyer()
        database = Dependency("database", probe=table.prune, stop=asyncio.Event(), backoff=fast_backoff)
        self.ledger = Ledger(table, database, watch_every=0.005, write_delay=0.005)
        self.purchases = Purchases(self.buyer, self.ledger)

    async def close(self) -> None:
        await self.ledger.close(within=1)


@pytest.fixture
async def here() -> AsyncIterator[Process]:
    process = Process(FakeLedgerTable())
    yield process
    await process.close()


async def test_a_content_in_flight_is_joined_not_bought_again(here: Process) -> None:
    purchases = here.purchases
    assert purchases.join(D1) is None
    first = (await purchases.acquire({D1: ("boilerplate", "acme")}))[D1]
    assert purchases.join(D1) is first, "being embedded: shared"
    first.vector.set_result(VECTOR)
    assert purchases.join(D1) is first, "embedded and not yet stored: shared"
    assert first.holders == 3
    assert here.buyer.calls == [("boilerplate", "acme")]


async def test_a_purchase_leaves_once_a_holder_is_stored_and_its_other_holders_keep_its_vector(
    here: Process,
) -> None:
    purchases = here.purchases
    first = (await purchases.acquire({D1: ("boilerplate", None)}))[D1]
    other = purchases.join(D1)
    assert other is first
    first.vector.set_result(VECTOR)
    purchases.release([first], stored=True)
    assert len(purchases) == 0 and purchases.join(D1) is None, "from now on the store has it"
    assert other.vector.result() is VECTOR
    here.table.vectors.clear()  # e.g. once the stored document was deleted and the ledger pruned
    later = (await purchases.acquire({D1: ("boilerplate", None)}))[D1]
    purchases.release([other], stored=False)
    assert purchases.join(D1) is later, "letting go of the old purchase leaves a later one alone"


async def test_a_purchase_leaves_when_its_last_holder_lets_go_unstored(here: Process) -> None:
    purchases = here.purchases
    first = (await purchases.acquire({D1: ("boilerplate", None)}))[D1]
    second = purchases.join(D1)
    assert second is first
    first.vector.set_result(VECTOR)
    purchases.release([first], stored=False)  # e.g. dead-lettered for another of its chunks
    assert len(purchases) == 1, "still held by the second document"
    purchases.release([second], stored=False)
    assert len(purchases) == 0


@pytest.mark.parametrize("failure", ["rejected", "cancelled"])
async def test_a_failed_purchase_leaves_at_once_and_the_next_document_buys_afresh(
    here: Process, failure: str
) -> None:
    purchases = here.purchases
    failed = (await purchases.acquire({D1: ("boilerplate", None)}))[D1]
    if failure == "rejected":
        failed.vector.set_exception(InputRejected("embedding API answered 400"))
    else:
        failed.vector.cancel()
    assert purchases.join(D1) is None, "not even before its done callback has run"
    await asyncio.sleep(0)
    assert len(purchases) == 0
    fresh = (await purchases.acquire({D1: ("boilerplate", None)}))[D1]
    assert fresh is not failed and len(here.buyer.calls) == 2
    purchases.release([failed], stored=False)
    assert purchases.join(D1) is fresh


async def test_what_was_paid_for_is_kept_the_moment_it_is_answered(here: Process) -> None:
    purchase = (await here.purchases.acquire({D1: ("boilerplate", None)}))[D1]
    assert here.table.intents == {D1: here.table.buyer}, "announced before it is sent"
    purchase.vector.set_result(VECTOR)
    await asyncio.sleep(0)
    assert here.ledger.unwritten(D1) is VECTOR, "visible (to supply) before it is written"
    assert await here.ledger.flush(within=1)
    assert here.table.vectors[D1] is VECTOR and not here.table.intents


async def test_a_vector_stored_before_it_is_written_is_not_written_twice(here: Process) -> None:
    purchase = (await here.purchases.acquire({D1: ("boilerplate", None)}))[D1]
    purchase.vector.set_result(VECTOR)
    await asyncio.sleep(0)
    here.purchases.release([purchase], stored=True)  # stored within the write delay, as most are
    assert await here.ledger.flush(within=1)
    assert here.table.vectors == {} and here.table.intents == {}, "only its announcement taken back"


async def test_letting_go_withdraws_what_was_never_sent_and_keeps_what_was_sent(here: Process) -> None:
    sent, queued = (await here.purchases.acquire({D1: ("sent", None), D2: ("queued", None)})).values()
    here.buyer.sent.append(sent.vector)  # the batcher sent the first one's request
    here.purchases.release([sent, queued], stored=False)  # e.g. a revoke abandoned their document
    assert queued.vector.cancelled(), "never sent, nobody paid: withdrawn"
    assert not sent.vector.cancelled() and list(here.purchases) == [sent], "sent: joinable still"
    assert await here.ledger.flush(within=1)
    assert D2 not in here.table.intents, "its announcement is taken back: others may buy it"
    sent.vector.set_result(VECTOR)  # the answer arrives after its documents were abandoned
    await asyncio.sleep(0)
    assert len(here.purchases) == 0, "answered, held by nobody: the ledger has it from now on"
    assert await here.ledger.flush(within=1)
    assert here.table.vectors[D1] is VECTOR, "paid for: kept for whoever needs it next"


async def test_a_content_another_process_is_buying_is_awaited_not_bought_again(here: Process) -> None:
    there = Process(here.table.elsewhere(buyer=2))
    try:
        theirs = (await there.purchases.acquire({D1: ("boilerplate", None)}))[D1]
        ours = (await here.purchases.acquire({D1: ("boilerplate", None)}))[D1]
        assert here.buyer.calls == [], "announced by the other process: not bought here"
        theirs.vector.set_result(VECTOR)
        assert (await asyncio.wait_for(ours.vector, 2)).tolist() == VECTOR.tolist()
        assert here.buyer.calls == []
    finally:
        await there.close()


async def test_a_purchase_whose_buyer_died_is_taken_over_and_bought_once(here: Process) -> None:
    there = Process(here.table.elsewhere(buyer=2))
    await there.purchases.acquire({D1: ("boilerplate", None)})
    await there.close()
    ours = (await here.purchases.acquire({D1: ("boilerplate", None)}))[D1]
    assert here.buyer.calls == []
    here.table.live.discard(2)  # kill -9: its session, and with it its lock, is gone
    await until(lambda: bool(here.buyer.calls))
    assert here.table.intents == {D1: here.table.buyer}
    here.buyer.queued[0].set_result(VECTOR)
    assert (await asyncio.wait_for(ours.vector, 1)) is VECTOR
    assert here.buyer.calls == [("boilerplate", None)]


async def test_an_announcement_abandoned_half_way_is_taken_back(here: Process) -> None:
    gate = asyncio.Event()
    claim = here.table.claim

    async def slow_claim(hashes: list[bytes]) -> set[bytes]:
        await gate.wait()
        return await claim(hashes)

    here.table.claim = slow_claim  # type: ignore[method-assign]
    acquiring = asyncio.create_task(here.purchases.acquire({D1: ("boilerplate", None)}))
    await asyncio.sleep(0.01)
    acquiring.cancel()  # the pipeline is revoked while the database answers
    gate.set()
    with pytest.raises(asyncio.CancelledError):
        await acquiring
    await until(lambda: D1 not in here.table.intents)
    assert here.buyer.calls == []


async def test_a_document_giving_up_its_wait_never_cancels_a_shared_purchase() -> None:
    loop = asyncio.get_running_loop()
    shared: asyncio.Future[Vector] = loop.create_future()
    waiter = asyncio.create_task(vectors_of([shared]))
    await asyncio.sleep(0)
    waiter.cancel()  # asyncio.gather would cancel ``shared`` with it
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not shared.done(), "other documents still wait for it"


async def test_a_document_fails_with_its_first_failed_chunk_without_waiting_for_the_others() -> None:
    loop = asyncio.get_running_loop()
    slow: asyncio.Future[Vector] = loop.create_future()
    rejected: asyncio.Future[Vector] = loop.create_future()
    waiter = asyncio.create_task(vectors_of([slow, rejected]))
    rejected.set_exception(InputRejected("embedding API answered 400"))
    with pytest.raises(InputRejected):
        await asyncio.wait_for(waiter, 1)
    assert not slow.done()
    slow.set_result(VECTOR)
    assert [v.tolist() for v in await vectors_of([slow, slow])] == [VECTOR.tolist()] * 2


async def test_a_process_buying_alone_announces_nothing_and_keeps_what_it_paid_for(here: Process) -> None:
    here.table.sole = True
    purchase = (await here.purchases.acquire({D1: ("boilerplate", None)}))[D1]
    assert here.buyer.calls == [("boilerplate", None)]
    assert here.table.intents == {} and not any(e[0] == "ledger_claim" for e in here.table.journal)
    purchase.vector.set_result(VECTOR)
    await asyncio.sleep(0)
    assert await here.ledger.flush(within=1)
    assert here.table.vectors == {D1: VECTOR}, "what was paid for is kept all the same (a kill -9)"


async def test_a_process_buying_alone_announces_what_it_buys_before_another_buys_beside_it(
    here: Process,
) -> None:
    D3 = bytes([3] * 32)
    here.table.sole = True
    buying, answered, stored = (
        await here.purchases.acquire({D1: ("in flight", None), D2: ("answered", None), D3: ("stored", None)})
    ).values()
    here.ledger._write_delay = 60  # answered and not written yet when the other process comes
    answered.vector.set_result(VECTOR)
    stored.vector.set_result(VECTOR)
    await asyncio.sleep(0)
    here.purchases.release([stored], stored=True)
    assert here.table.intents == {}
    here.table.wanting = True  # another process asks for the sole-buyer lock shared
    await until(lambda: not here.table.sole)
    assert here.table.intents == {D1: here.table.buyer, D2: here.table.buyer}, (
        "what it is buying and what it bought and has not written are announced; a stored one need not be"
    )
    there = Process(here.table.elsewhere(buyer=2))
    try:
        theirs = await there.purchases.acquire({D1: ("in flight", None), D2: ("answered", None)})
        assert there.buyer.calls == [], "announced here: awaited there, not bought again"
        assert await here.ledger.flush(within=1)
        assert (await asyncio.wait_for(theirs[D2].vector, 2)) is VECTOR
        assert ("ledger_claim", 1) not in here.table.journal
        later = await here.purchases.acquire({bytes([4] * 32): ("later", None)})
        assert here.table.intents.get(bytes([4] * 32)) == here.table.buyer, "sharing now: announced"
        buying.vector.set_result(VECTOR)
        assert (await asyncio.wait_for(theirs[D1].vector, 2)) is VECTOR
        assert there.buyer.calls == []
        later[bytes([4] * 32)].vector.cancel()
    finally:
        await there.close()


async def test_each_answer_waits_its_own_delay_not_the_oldest_ones(here: Process) -> None:
    here.ledger._write_delay = 0.2
    early, late = (await here.purchases.acquire({D1: ("early", None), D2: ("late", None)})).values()
    early.vector.set_result(VECTOR)
    await asyncio.sleep(0.15)
    late.vector.set_result(VECTOR)  # 0.05 s old when the early one is due
    await until(lambda: D1 in here.table.vectors)
    assert D2 not in here.table.vectors, "too young to be written with the early one"
    here.purchases.release([late], stored=True)  # stored before its own delay ran out
    await asyncio.sleep(0.3)
    assert D2 not in here.table.vectors, "stored: never written twice"
    assert here.table.vectors == {D1: VECTOR}


async def test_a_write_cut_short_by_the_stop_is_not_tried_again_in_a_loop(here: Process) -> None:
    purchase = (await here.purchases.acquire({D1: ("boilerplate", None)}))[D1]
    tries = 0

    async def stopping(dropped: list[bytes], kept: object) -> None:
        nonlocal tries
        tries += 1
        await asyncio.sleep(0)  # (a loop of tries then spins without blocking the test)
        raise ShuttingDown("the worker is stopping")

    here.ledger._write = stopping  # type: ignore[method-assign]
    purchase.vector.set_result(VECTOR)
    await until(lambda: tries > 0)
    await asyncio.sleep(0.1)  # twenty write delays
    assert tries == 1, "put back for close() to count, not tried again and again"
    assert here.ledger.unwritten(D1) is VECTOR
