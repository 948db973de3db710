"""worker.limits: the AIMD concurrency limit and the per-process request/token budget."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
from prometheus_client import REGISTRY

import worker.limits as limits
from worker.limits import DECREASE_EVERY, LATENCY_RISE, AdaptiveConcurrency, Budget


class Clock:
    """Stands in for ``time`` inside worker.limits: decreases are timed by it alone."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(limits, "time", SimpleNamespace(monotonic=fake.monotonic))
    return fake


def limit_metric() -> float | None:
    return REGISTRY.get_sample_value("ingest_embedding_concurrency_limit")


async def peak_concurrency(limiter: AdaptiveConcurrency, callers: int) -> int:
    """Run ``callers`` tasks through ``slot()`` at once; the most that were inside together."""
    inside = peak = 0

    async def one() -> None:
        nonlocal inside, peak
        async with limiter.slot():
            inside += 1
            peak = max(peak, inside)
            for _ in range(3):
                await asyncio.sleep(0)
            inside -= 1

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(callers))), 2.0)
    return peak


# -- the slot ---------------------------------------------------------------------------------


async def test_slot_admits_at_most_the_limit(clock: Clock) -> None:
    limiter = AdaptiveConcurrency(4)
    assert await peak_concurrency(limiter, 40) == 4

    limiter.throttled()  # 4 -> 2
    assert limiter.limit == 2.0
    assert await peak_concurrency(limiter, 40) == 2


async def test_slot_admits_the_integer_part_of_a_fractional_limit(clock: Clock) -> None:
    limiter = AdaptiveConcurrency(5)
    limiter.throttled()
    assert limiter.limit == 2.5
    assert await peak_concurrency(limiter, 30) == 2


async def test_a_lowered_limit_holds_back_waiters_until_in_flight_drops_below_it(clock: Clock) -> None:
    limiter = AdaptiveConcurrency(4)
    release = [asyncio.Event() for _ in range(4)]
    entered: list[int] = []

    async def holder(i: int) -> None:
        async with limiter.slot():
            entered.append(i)
            await release[i].wait()

    holders = [asyncio.create_task(holder(i)) for i in range(4)]
    await asyncio.sleep(0.01)
    assert sorted(entered) == [0, 1, 2, 3]

    limiter.throttled()  # 4 -> 2 while 4 are in flight
    waiter_in = asyncio.Event()

    async def waiter() -> None:
        async with limiter.slot():
            waiter_in.set()

    late = asyncio.create_task(waiter())
    release[0].set()
    await asyncio.sleep(0.01)
    assert not waiter_in.is_set(), "3 in flight and a limit of 2: no room"
    release[1].set()
    await asyncio.sleep(0.01)
    assert not waiter_in.is_set(), "2 in flight and a limit of 2: no room"
    release[2].set()
    await asyncio.wait_for(waiter_in.wait(), 1.0)

    release[3].set()
    await asyncio.gather(late, *holders)


async def test_a_slot_is_given_back_when_the_body_raises(clock: Clock) -> None:
    limiter = AdaptiveConcurrency(1)
    with pytest.raises(RuntimeError):
        async with limiter.slot():
            raise RuntimeError("request failed")
    async with asyncio.timeout(0.5), limiter.slot():
        pass


# -- decreasing -------------------------------------------------------------------------------


def test_throttled_halves_at_most_once_per_interval(clock: Clock) -> None:
    limiter = AdaptiveConcurrency(16)
    assert limit_metric() == 16.0

    limiter.throttled()
    assert limiter.limit == 8.0
    assert limit_metric() == 8.0

    limiter.throttled()  # the same burst of 429s
    clock.now += DECREASE_EVERY - 0.01
    limiter.throttled()
    assert limiter.limit == 8.0

    clock.now += 0.01  # exactly DECREASE_EVERY after the first decrease
    limiter.throttled()
    assert limiter.limit == 4.0
    assert limit_metric() == 4.0


def test_throttled_never_goes_below_the_minimum(clock: Clock) -> None:
    limiter = AdaptiveConcurrency(8, minimum=3)
    seen = []
    for _ in range(5):
        limiter.throttled()
        seen.append(limiter.limit)
        clock.now += DECREASE_EVERY
    assert seen == [4.0, 3.0, 3.0, 3.0, 3.0]


async def test_the_minimum_is_admitted_whatever_the_limit(clock: Clock) -> None:
    limiter = AdaptiveConcurrency(8, minimum=3)
    for _ in range(4):
        limiter.throttled()
        clock.now += DECREASE_EVERY
    assert limiter.limit == 3.0
    assert await peak_concurrency(limiter, 20) == 3


def test_latency_well_above_its_floor_shrinks_the_limit(clock: Clock) -> None:
    limiter = AdaptiveConcurrency(10)
    for _ in range(20):
        limiter.succeeded(0.1)  # the floor
    assert limiter.limit == 10.0

    assert LATENCY_RISE == 3.0
    slow = 1.0
    limiter.succeeded(slow)  # EWMA 0.1 -> 0.28: not yet 3x the floor (0.1)
    assert limiter.limit == 10.0
    limiter.succeeded(slow)  # EWMA 0.424: congestion
    assert limiter.limit == pytest.approx(9.0)
    assert limit_metric() == pytest.approx(9.0)

    clock.now += DECREASE_EVERY
    limiter.succeeded(slow)
    assert limiter.limit == pytest.approx(8.1)


def test_latency_below_the_rise_threshold_does_not_shrink(clock: Clock) -> None:
    limiter = AdaptiveConcurrency(10)
    for _ in range(5):
        limiter.succeeded(0.1)
    for _ in range(30):
        limiter.succeeded(0.1 * (LATENCY_RISE - 0.5))  # EWMA tends to 2.5x the floor
        clock.now += DECREASE_EVERY
    assert limiter.limit == 10.0


def test_congested_successes_do_not_grow_the_limit(clock: Clock) -> None:
    limiter = AdaptiveConcurrency(10)
    for _ in range(20):
        limiter.succeeded(0.1)
    limiter.succeeded(1.0)
    limiter.succeeded(1.0)
    assert limiter.limit == pytest.approx(9.0)
    for _ in range(9):  # still congested, within the same decrease interval
        limiter.succeeded(1.0)
    assert limiter.limit <= 9.0


# -- increasing -------------------------------------------------------------------------------


def test_succeeded_grows_additively_up_to_the_maximum(clock: Clock) -> None:
    limiter = AdaptiveConcurrency(10)
    limiter.throttled()
    assert limiter.limit == 5.0

    for _ in range(5):  # one round of the limit's worth of successes: about +1
        limiter.succeeded(0.05)
    assert 5.9 < limiter.limit < 6.0, "additive: about one per round, not doubling"

    previous = limiter.limit
    for _ in range(200):
        limiter.succeeded(0.05)
        assert previous <= limiter.limit <= 10.0
        previous = limiter.limit
    assert limiter.limit == 10.0
    assert limit_metric() == 10.0


def test_the_limit_starts_at_the_maximum_and_stays_there(clock: Clock) -> None:
    limiter = AdaptiveConcurrency(3)
    for _ in range(50):
        limiter.succeeded(0.01)
    assert limiter.limit == 3.0


# -- the budget -------------------------------------------------------------------------------


async def test_budget_requests_per_minute_caps_the_rate() -> None:
    # A leaky bucket: up to a minute's worth at once, then 600/min = one request per 0.1 s.
    budget = Budget(requests_per_minute=600, tokens_per_minute=0)
    started = time.monotonic()
    for _ in range(600):
        await budget.spend(10)
    assert time.monotonic() - started < 0.2

    started = time.monotonic()
    for _ in range(3):
        await budget.spend(10)
    assert 0.25 <= time.monotonic() - started < 0.6


async def test_budget_tokens_per_minute_caps_the_rate() -> None:
    # 6000 tokens/min = 100 tokens/s; tokens are estimated as characters / 4.
    budget = Budget(requests_per_minute=0, tokens_per_minute=6000)
    started = time.monotonic()
    await budget.spend(6000 * 4)
    assert time.monotonic() - started < 0.1

    started = time.monotonic()
    await budget.spend(10 * 4)  # 10 tokens: 0.1 s at 100 tokens/s
    assert 0.08 <= time.monotonic() - started < 0.4


async def test_budget_clamps_a_request_larger_than_the_token_budget() -> None:
    budget = Budget(requests_per_minute=0, tokens_per_minute=1000)
    await asyncio.wait_for(budget.spend(10**9), 0.5)  # 250M tokens: taken as the whole minute's budget


async def test_budget_zero_means_no_cap() -> None:
    budget = Budget(requests_per_minute=0, tokens_per_minute=0)
    started = time.monotonic()
    for _ in range(5000):
        await budget.spend(10**6)
    assert time.monotonic() - started < 0.2


# -- pacing by the provider's headers -----------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("6m0s", 360.0),
        ("1s", 1.0),
        ("250ms", 0.25),
        ("8.64s", 8.64),
        ("1h2m3.5s", 3723.5),
        ("20", 20.0),
        ("0.5", 0.5),
        ("", None),
        (None, None),
        ("soon", None),
        ("5 minutes", None),
    ],
)
def test_reset_and_retry_durations_parse_in_every_format(text: str | None, seconds: float | None) -> None:
    assert limits.parse_duration(text) == seconds


def test_a_429s_wait_prefers_milliseconds_then_seconds() -> None:
    assert limits.retry_after({"retry-after-ms": "1500", "Retry-After": "2"}) == 1.5
    assert limits.retry_after({"Retry-After": "2"}) == 2.0
    assert limits.retry_after({}) is None


def budget_headers(remaining: float, *, limit: float = 600_000) -> dict[str, str]:
    return {"x-ratelimit-limit-tokens": str(int(limit)), "x-ratelimit-remaining-tokens": str(int(remaining))}


class Tick:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_without_headers_nothing_is_paced() -> None:
    pacer = limits.ProviderPacer(clock=Tick())
    pacer.observe({"Retry-After": "1"}, throttled=False)
    assert not pacer.paced and pacer.rate("tokens") is None


async def test_the_first_request_goes_alone_and_the_others_wait_for_its_answer() -> None:
    pacer = limits.ProviderPacer(clock=Tick())
    await pacer.wait(1000)  # the first goes at once
    second = asyncio.create_task(pacer.wait(1000))
    await asyncio.sleep(0.01)
    assert not second.done(), "waits for the first answer"
    pacer.observe(budget_headers(remaining=40_000), throttled=False)
    pacer.done()
    await asyncio.sleep(0.01)
    assert not second.done(), "and then for the first request's share of the rate it learned"
    assert pacer.rate("tokens") == 600_000 / 60 / 2  # half the limit, to begin with
    second.cancel()


def test_plenty_left_speeds_up_little_left_slows_down_and_a_429_halves_and_holds() -> None:
    tick = Tick()
    pacer = limits.ProviderPacer(clock=tick)
    pacer.observe(budget_headers(50_000), throttled=False)  # the bucket, full
    start = pacer.rate("tokens")
    assert start is not None
    tick.now += 1.0
    pacer.observe(budget_headers(45_000), throttled=False)  # above 3/4 of it: faster
    faster = pacer.rate("tokens")
    assert faster is not None and faster > start
    tick.now += 1.0
    pacer.observe(budget_headers(10_000), throttled=False)  # below half: slower
    slower = pacer.rate("tokens")
    assert slower is not None and slower == pytest.approx(faster * limits.DECREASE)
    tick.now += 0.1
    pacer.observe(budget_headers(5_000), throttled=False)  # again within a second: once only
    assert pacer.rate("tokens") == slower
    tick.now += 2.0
    pacer.observe({**budget_headers(0), "retry-after-ms": "1500"}, throttled=True)
    assert pacer.rate("tokens") == pytest.approx(slower * 0.5)
    assert pacer.due() >= tick.now + 1.5, "every send held for the 429's retry-after-ms"


def test_the_rate_never_falls_below_its_floor() -> None:
    tick = Tick()
    pacer = limits.ProviderPacer(clock=tick)
    for _ in range(50):
        pacer.observe({**budget_headers(0), "retry-after-ms": "10"}, throttled=True)
        tick.now += 1.0
    assert pacer.rate("tokens") == pytest.approx(limits.FLOOR * 600_000 / 60)


def test_requests_are_spaced_by_their_share_of_the_rate() -> None:
    tick = Tick()
    pacer = limits.ProviderPacer(clock=tick)
    pacer.observe(budget_headers(50_000), throttled=False)
    rate = pacer.rate("tokens")
    assert rate is not None
    pacer.sent(5_000)
    assert pacer.due() == pytest.approx(tick.now + 5_000 / rate)


async def test_a_first_request_that_takes_long_holds_the_others_for_the_probe_wait_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(limits, "PROBE_WAIT", 0.05)
    pacer = limits.ProviderPacer()
    await pacer.wait(10)  # goes alone, and never answers here
    await asyncio.wait_for(pacer.wait(10), 1.0)  # goes once the probe wait is over
    await asyncio.wait_for(pacer.wait(10), 0.01)  # and so does every later one, at once
