"""The usage ledger: every answered request counted once, by tenant; reuse counted apart as saved."""

from __future__ import annotations

import asyncio
import datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.unit.fakes import FakeUsageTable, log_of, rig, upsert
from worker.tokens import TokenCounter
from worker.usage import Tally, Usage, _shared

TODAY = datetime.date(2026, 11, 30)


@settings(max_examples=300, deadline=None, database=None)
@given(total=st.integers(0, 10**6), weights=st.lists(st.integers(0, 5000), min_size=1, max_size=64))
def test_a_requests_tokens_are_shared_in_whole_numbers_that_add_up_exactly(
    total: int, weights: list[int]
) -> None:
    shares = _shared(total, weights)
    assert sum(shares) == total
    assert all(share >= 0 for share in shares)
    whole = sum(weights)
    if whole:
        assert all(abs(share - total * w / whole) < 1 for share, w in zip(shares, weights, strict=True))


async def test_a_request_counts_once_under_its_first_inputs_tenant_and_tokens_by_length() -> None:
    table = FakeUsageTable()
    usage = Usage(table, "m", TokenCounter("cl100k_base"), delay=3600, today=lambda: TODAY)
    usage.bought(["aaaa", "bbbbbbbbbbbb"], ["t1", "t2"], prompt_tokens=8)
    usage.bought(["cc"], [None], prompt_tokens=None)  # no usage in the answer: counted here
    usage.saved("t2", ["dddd", "eeee"])
    await usage.close()
    assert table.rows == {
        (TODAY, "t1", "m"): Tally(requests=1, inputs=1, tokens=2),
        (TODAY, "t2", "m"): Tally(requests=0, inputs=1, tokens=6, saved_inputs=2, saved_tokens=4),
        (TODAY, "", "m"): Tally(requests=1, inputs=1, tokens=1),
    }


async def test_counts_kept_through_an_outage_are_written_once_it_ends() -> None:
    table = FakeUsageTable()
    table.failures = 2
    usage = Usage(table, "m", TokenCounter("bytes"), delay=0.01, retry=0.01, today=lambda: TODAY)
    usage.bought(["x" * 10], ["t"], prompt_tokens=3)
    usage.bought(["y" * 10], ["t"], prompt_tokens=4)
    for _ in range(100):
        if table.rows:
            break
        await asyncio.sleep(0.01)
    await usage.close()
    assert table.failures == 0
    assert table.rows == {(TODAY, "t", "m"): Tally(requests=2, inputs=2, tokens=7)}


async def test_the_worker_counts_every_input_it_bought_and_every_one_it_reused() -> None:
    text = "Alpha beta gamma. " * 40
    entries = [upsert("a", text, tenant="t1"), upsert("b", text, tenant="t2")]
    records = log_of({0: entries})
    first = rig(records)
    await first.run()
    bought = sum(len(call) for call in first.embedder.answered)
    total = first.store.usage.total()
    assert total.inputs == bought
    assert total.requests == len(first.embedder.answered)
    chunks = sum(len(stored) for stored in first.store.chunks.values())
    assert chunks > bought, "the documents repeat their sentences, and b's chunks are a's"
    assert total.saved_inputs == chunks - bought, "each content bought once; every other chunk saved"

    again = rig(records, store=first.store)
    await again.run()
    assert again.embedder.answered == []
    assert first.store.usage.total() == total, "a redelivery, already applied, buys and counts nothing"

    republished = rig(log_of({0: [*entries, upsert("b", text, tenant="t2")]}), store=first.store)
    await republished.run()
    assert republished.embedder.answered == []
    assert first.store.usage.total().inputs == bought, "b published again buys nothing"
    assert first.store.usage.total().saved_inputs == total.saved_inputs + len(first.store.chunks["b"])
