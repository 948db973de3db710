"""worker/embedding.py EmbeddingBatcher: how requests are filled, flushed, answered and cancelled."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence

import numpy as np
import pytest

from worker.embedding import EmbeddingBatcher
from worker.errors import EmbeddingUnavailable, InputRejected, RecordError
from worker.types import Vector

LONG = 60.0  # a linger that never runs out within a test


def vector_for(text: str) -> Vector:
    return np.asarray([len(text), sum(map(ord, text)) % 997], dtype=np.float32)


class FakeSend:
    """The batcher's ``send``: records each request; answers a vector per text, or an InputRejected
    for texts containing "bad"; can fail whole requests or hold them until released."""

    def __init__(self) -> None:
        self.requests: list[list[str]] = []
        self.sent_at: list[float] = []
        self.fail: Exception | None = None  # raised by the next request, once
        self.gate: asyncio.Event | None = None  # requests wait for it while set
        self.running = 0
        self.most_running = 0
        self.cancelled = 0

    async def __call__(self, texts: list[str], tenants: list[str | None]) -> Sequence[Vector | RecordError]:
        self.requests.append(list(texts))
        self.sent_at.append(time.monotonic())
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1
        if self.fail is not None:
            exc, self.fail = self.fail, None
            raise exc
        return [InputRejected(f"refused {t!r}") if "bad" in t else vector_for(t) for t in texts]


Make = Callable[..., EmbeddingBatcher]


@pytest.fixture
async def send() -> FakeSend:
    return FakeSend()


@pytest.fixture
async def make(send: FakeSend) -> AsyncIterator[Make]:
    """Build batchers around ``send``; every one is closed at the end of the test."""
    made: list[EmbeddingBatcher] = []

    def build(
        *,
        batch_size: int = 100,
        batch_chars: int = 10_000,
        linger: float = LONG,
        max_outstanding: int = 4,
        batch_tokens: int | None = None,
    ) -> EmbeddingBatcher:
        batcher = EmbeddingBatcher(
            send,
            batch_size=batch_size,
            batch_chars=batch_chars,
            linger=linger,
            max_outstanding=max_outstanding,
            batch_tokens=batch_tokens,
            tokens=lambda text: 2 * len(text),  # a tokenizer unlike characters
        )
        made.append(batcher)
        return batcher

    yield build
    if send.gate is not None:
        send.gate.set()
    for batcher in made:
        await batcher.close()


async def settle(rounds: int = 20) -> None:
    """Let the dispatcher and request tasks run as far as they can without time passing."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def until(condition: Callable[[], bool], limit: float = 1.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.001)


# -- when a request is sent -----------------------------------------------------------------


async def test_a_request_is_sent_as_soon_as_it_holds_batch_size_inputs(make: Make, send: FakeSend) -> None:
    batcher = make(batch_size=3)
    futures = [batcher.submit(t) for t in ("one", "two")]
    await settle()
    assert send.requests == [], "two of three: waits for more (the linger is long)"
    futures.append(batcher.submit("three"))
    futures.append(batcher.submit("four"))
    await settle()
    assert send.requests == [["one", "two", "three"]]
    assert [f.result().tolist() for f in futures[:3]] == [
        vector_for(t).tolist() for t in ("one", "two", "three")
    ]
    assert not futures[3].done(), "the fourth input waits for the next request"


async def test_an_input_that_would_overflow_batch_chars_starts_the_next_request(
    make: Make, send: FakeSend
) -> None:
    batcher = make(batch_chars=10)
    batcher.submit("aaaa")
    batcher.submit("bbbb")
    await settle()
    assert send.requests == [], "8 of 10 characters: waits"
    batcher.submit("cccc")  # 12 characters pending: a request, without the input that overflows
    await settle()
    assert send.requests == [["aaaa", "bbbb"]]
    last = batcher.submit("dddddd")  # 4 + 6 = 10: full
    await settle()
    assert send.requests == [["aaaa", "bbbb"], ["cccc", "dddddd"]]
    assert last.result() is not None
    assert all(sum(map(len, r)) <= 10 for r in send.requests)


async def test_a_request_never_holds_more_than_batch_tokens(make: Make, send: FakeSend) -> None:
    batcher = make(batch_size=3, batch_tokens=10)
    for text in ("aa", "bbb", "c"):  # 4 + 6 tokens: the third would make 12
        batcher.submit(text)
    await settle()
    assert send.requests == [["aa", "bbb"]]
    batcher.submit("dddd")  # 2 + 8 = 10 tokens, and not yet 3 inputs: waits
    batcher.submit("e")  # 3 inputs: a request, as full as 10 tokens allow
    await settle()
    assert send.requests == [["aa", "bbb"], ["c", "dddd"]]


async def test_an_input_longer_than_batch_chars_is_sent_alone(make: Make, send: FakeSend) -> None:
    batcher = make(batch_chars=10)
    batcher.submit("ab")
    batcher.submit("x" * 25)
    await settle()
    assert send.requests == [["ab"], ["x" * 25]]


async def test_a_partial_request_is_sent_after_the_linger(make: Make, send: FakeSend) -> None:
    linger = 0.05
    batcher = make(linger=linger)
    submitted = time.monotonic()
    futures = [batcher.submit(t) for t in ("p", "q")]
    await asyncio.sleep(linger / 3)
    assert send.requests == [], "not before the linger"
    await until(lambda: bool(send.requests))
    assert send.requests == [["p", "q"]]
    assert send.sent_at[0] - submitted >= linger * 0.9
    assert send.sent_at[0] - submitted < linger + 0.5
    await until(lambda: all(f.done() for f in futures))


async def test_the_linger_counts_from_the_oldest_waiting_input(make: Make, send: FakeSend) -> None:
    linger = 0.06
    batcher = make(linger=linger)
    first = time.monotonic()
    batcher.submit("early")
    await asyncio.sleep(linger / 2)
    batcher.submit("late")  # does not restart the clock
    await until(lambda: bool(send.requests))
    assert send.requests == [["early", "late"]]
    assert send.sent_at[0] - first < linger * 1.5 + 0.05


async def test_no_more_than_max_outstanding_requests_at_once(make: Make, send: FakeSend) -> None:
    send.gate = asyncio.Event()
    batcher = make(batch_size=1, max_outstanding=2)
    futures = [batcher.submit(f"t{i}") for i in range(5)]
    await settle()
    assert send.requests == [["t0"], ["t1"]]
    send.gate.set()
    await until(lambda: all(f.done() for f in futures))
    assert send.requests == [[f"t{i}"] for i in range(5)]
    assert send.most_running == 2


async def test_requests_take_one_input_per_tenant_in_turn(make: Make, send: FakeSend) -> None:
    batcher = make(batch_size=4, linger=0.01)
    for i in range(6):
        batcher.submit(f"a{i}", "tenant-a")
    for i in range(2):
        batcher.submit(f"b{i}", "tenant-b")
    await until(lambda: sum(map(len, send.requests)) == 8)
    assert send.requests[0] == ["a0", "b0", "a1", "b1"], "a flooding tenant gets its turn, no more"
    assert sorted(send.requests[1]) == ["a2", "a3", "a4", "a5"]


async def test_an_input_whose_future_was_cancelled_is_not_sent(make: Make, send: FakeSend) -> None:
    batcher = make(batch_size=3, linger=0.01)
    keep = batcher.submit("keep")
    batcher.submit("drop").cancel()
    also = batcher.submit("also")
    await asyncio.wait_for(asyncio.gather(keep, also), 1)
    assert [t for r in send.requests for t in r] == ["keep", "also"]
    assert keep.result().tolist() == vector_for("keep").tolist()


# -- what the futures get ---------------------------------------------------------------------


async def test_each_future_gets_the_vector_of_its_own_text(make: Make, send: FakeSend) -> None:
    batcher = make(batch_size=3, linger=0.005)
    texts = [f"text number {i}" * (i + 1) for i in range(8)]
    futures = [batcher.submit(t) for t in texts]
    results = await asyncio.wait_for(asyncio.gather(*futures), 1)
    assert len(send.requests) == 3
    for text, vector in zip(texts, results, strict=True):
        assert np.array_equal(vector, vector_for(text))


async def test_a_rejected_input_fails_only_its_own_future(make: Make, send: FakeSend) -> None:
    batcher = make(batch_size=3)
    good1, bad, good2 = (batcher.submit(t) for t in ("fine", "bad input", "also fine"))
    await asyncio.wait_for(asyncio.wait({good1, bad, good2}), 1)
    assert send.requests == [["fine", "bad input", "also fine"]]
    assert np.array_equal(good1.result(), vector_for("fine"))
    assert np.array_equal(good2.result(), vector_for("also fine"))
    with pytest.raises(InputRejected, match="bad input"):
        bad.result()


async def test_a_failed_request_fails_every_future_of_that_request_only(make: Make, send: FakeSend) -> None:
    send.fail = EmbeddingUnavailable("embedding API answered 503")
    batcher = make(batch_size=2, max_outstanding=1)
    first = [batcher.submit(t) for t in ("a", "b")]
    second = [batcher.submit(t) for t in ("c", "d")]
    await asyncio.wait_for(asyncio.wait([*first, *second]), 1)
    assert send.requests == [["a", "b"], ["c", "d"]]
    for future in first:
        with pytest.raises(EmbeddingUnavailable, match="503"):
            future.result()
    assert [f.result().tolist() for f in second] == [vector_for("c").tolist(), vector_for("d").tolist()]


# -- closing ------------------------------------------------------------------------------------


async def test_close_cancels_queued_inputs_and_running_requests(make: Make, send: FakeSend) -> None:
    send.gate = asyncio.Event()
    batcher = make(batch_size=2)
    running = [batcher.submit(t) for t in ("r1", "r2")]
    queued = batcher.submit("q1")
    await settle()
    assert send.requests == [["r1", "r2"]] and send.running == 1
    await asyncio.wait_for(batcher.close(), 1)
    assert all(f.cancelled() for f in running), "the running request's futures"
    assert queued.cancelled(), "the input still waiting for a request"
    assert send.cancelled == 1, "the running request itself was cancelled"
    await settle()
    assert send.requests == [["r1", "r2"]], "nothing sent after close()"


async def test_close_never_leaves_a_future_pending(send: FakeSend) -> None:
    pending: dict[int, list[str]] = {}
    for turns in range(5):  # close() after 0..4 turns of the loop: every interleaving up to a send
        batcher = EmbeddingBatcher(send, batch_size=2, batch_chars=10_000, linger=LONG, max_outstanding=4)
        futures = [batcher.submit("x"), batcher.submit("y")]
        for _ in range(turns):
            await asyncio.sleep(0)
        await asyncio.wait_for(batcher.close(), 1)
        states = ["cancelled" if f.cancelled() else "done" if f.done() else "pending" for f in futures]
        if "pending" in states:
            pending[turns] = states
    assert pending == {}
