"""worker.dependency: the circuit breaker and retry policy, through small async fakes.

Backoff waits are shortened (as in test_worker.py) so breaker rounds take about 0.1 s each.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from prometheus_client import REGISTRY

import worker.dependency
from tests.unit.fakes import fast_backoff
from worker.dependency import Dependency
from worker.errors import (
    AttemptsExhausted,
    DatabaseUnavailable,
    EmbeddingProtocolError,
    EmbeddingUnavailable,
    InputRejected,
    RecordError,
)
from worker.retry import Backoff, ShuttingDown

_names = itertools.count()


class Dependencies:
    """Builds Dependencies with a fresh metric label each, and trips their breakers.

    At teardown every stop event is set, so callers still waiting end (ShuttingDown) rather than
    being cancelled, and every prober is closed.
    """

    def __init__(self) -> None:
        self.made: list[tuple[Dependency, asyncio.Event]] = []
        self.tasks: list[asyncio.Task[Any]] = []

    def __call__(
        self,
        *,
        probe: Callable[[], Awaitable[object]] | None = None,
        stop: asyncio.Event | None = None,
        threshold: int = 5,
        backoff: Backoff = fast_backoff,
    ) -> Dependency:
        stop = stop or asyncio.Event()
        dep = Dependency(  # the real retry logic, its jittered waits short (the prober adds 0.1 s a round)
            f"test-dep-{next(_names)}",
            probe=probe or _healthy,
            stop=stop,
            threshold=threshold,
            backoff=backoff,
        )
        self.made.append((dep, stop))
        return dep

    async def trip(self, dep: Dependency, threshold: int) -> None:
        """Open the breaker: ``threshold`` consecutive failures of some other caller (left waiting)."""
        self.tasks.append(asyncio.create_task(dep.call(Flaky([unavailable() for _ in range(threshold)]))))
        await until(lambda: not dep.up)

    async def aclose(self) -> None:
        for _, stop in self.made:
            stop.set()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for dep, _ in self.made:
            await dep.close()


@pytest.fixture
async def make_dependency() -> AsyncIterator[Dependencies]:
    deps = Dependencies()
    yield deps
    await deps.aclose()


async def _healthy() -> None:
    return None


def up_metric(dep: Dependency) -> float | None:
    return REGISTRY.get_sample_value("ingest_dependency_up", {"dependency": dep.name})


class Flaky:
    """An async callable failing with ``errors`` in turn, then returning ``result``; counts calls."""

    def __init__(self, errors: list[Exception], result: Any = "ok") -> None:
        self.errors = list(errors)
        self.result = result
        self.calls = 0

    async def __call__(self) -> Any:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.result


def unavailable(status: int = 503, retry_after: float | None = None) -> EmbeddingUnavailable:
    return EmbeddingUnavailable(f"HTTP {status}", status=status, retry_after=retry_after)


class GatedProbe:
    """A probe that fails (DependencyError) until ``healthy`` is set; counts its calls."""

    def __init__(self) -> None:
        self.healthy = asyncio.Event()
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1
        if not self.healthy.is_set():
            raise DatabaseUnavailable("probe: still down")


async def until(predicate: Callable[[], bool], within: float = 1.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


# -- passing through and retrying ---------------------------------------------------------------


async def test_success_passes_through_with_one_call(make_dependency: Dependencies) -> None:
    dep = make_dependency()
    fn = Flaky([], result={"vectors": [1.0]})

    assert await dep.call(fn, attempts=1) == {"vectors": [1.0]}
    assert fn.calls == 1
    assert dep.up
    assert dep.describe() is None
    assert up_metric(dep) == 1.0


async def test_retriable_failures_are_retried_until_success(make_dependency: Dependencies) -> None:
    dep = make_dependency(threshold=10)
    fn = Flaky([unavailable(503), DatabaseUnavailable("reset"), unavailable(502)], result=42)

    assert await dep.call(fn, attempts=5) == 42
    assert fn.calls == 4
    assert dep.up


async def test_a_success_resets_the_consecutive_failure_count(make_dependency: Dependencies) -> None:
    dep = make_dependency(threshold=3)
    # Two failures, a success, two failures: never three in a row, so the breaker stays closed.
    assert await dep.call(Flaky([unavailable(), unavailable()])) == "ok"
    assert await dep.call(Flaky([unavailable(), unavailable()])) == "ok"
    assert dep.up
    assert up_metric(dep) == 1.0


async def test_retry_after_is_the_wait_used(
    make_dependency: Dependencies, monkeypatch: pytest.MonkeyPatch
) -> None:
    waits: list[float] = []

    async def recording_sleep(stop: asyncio.Event, seconds: float) -> None:
        waits.append(seconds)

    monkeypatch.setattr(worker.dependency, "sleep_unless", recording_sleep)
    dep = make_dependency(threshold=10)
    fn = Flaky([unavailable(429, retry_after=7.0), unavailable(503, retry_after=2.0), unavailable(503)])

    assert await dep.call(fn) == "ok"
    assert len(waits) == 3
    assert 7.0 <= waits[0] <= 7.7  # Retry-After plus at most 10 % jitter
    assert 2.0 <= waits[1] <= 2.2
    assert waits[2] == 0.001  # no Retry-After: the (given) backoff


async def test_retry_after_really_waits(make_dependency: Dependencies) -> None:
    dep = make_dependency(threshold=10)
    fn = Flaky([unavailable(503, retry_after=0.1)])

    started = time.monotonic()
    assert await dep.call(fn) == "ok"
    assert 0.1 <= time.monotonic() - started < 0.35
    assert fn.calls == 2


@pytest.mark.parametrize(
    "error",
    [ValueError("bug"), InputRejected("input too long"), EmbeddingProtocolError("wrong dimension")],
    ids=["ValueError", "InputRejected", "EmbeddingProtocolError"],
)
async def test_non_retriable_errors_propagate_at_once(
    make_dependency: Dependencies, error: Exception
) -> None:
    dep = make_dependency(threshold=1)
    fn = Flaky([error])

    with pytest.raises(type(error)) as raised:
        await dep.call(fn, attempts=5)
    assert raised.value is error
    assert fn.calls == 1
    assert dep.up, "a non-retriable error says nothing about the dependency"
    assert up_metric(dep) == 1.0


# -- attempts ---------------------------------------------------------------------------------


async def test_attempts_burn_while_the_breaker_stays_closed(make_dependency: Dependencies) -> None:
    dep = make_dependency(threshold=10)
    errors = [unavailable(500) for _ in range(10)]
    fn = Flaky(errors)

    with pytest.raises(AttemptsExhausted) as raised:
        await dep.call(fn, attempts=3)
    exhausted = raised.value
    assert fn.calls == 3
    assert exhausted.attempts == 3
    assert isinstance(exhausted, RecordError)
    assert exhausted.stage == "embed"
    assert isinstance(exhausted.last, EmbeddingUnavailable)
    assert exhausted.__cause__ is exhausted.last
    assert dep.up


async def test_deadline_counts_only_time_with_the_breaker_closed(make_dependency: Dependencies) -> None:
    dep = make_dependency(threshold=10_000)

    async def always_failing() -> None:
        await asyncio.sleep(0.005)
        raise unavailable(500)

    started = time.monotonic()
    with pytest.raises(AttemptsExhausted) as raised:
        await dep.call(always_failing, deadline=0.05)
    assert 0.05 <= time.monotonic() - started < 0.3
    assert raised.value.attempts >= 2


async def test_rate_limits_never_burn_attempts(make_dependency: Dependencies) -> None:
    dep = make_dependency(threshold=100)
    fn = Flaky([unavailable(429, retry_after=0.001) for _ in range(6)], result="embedded")

    assert await dep.call(fn, attempts=1) == "embedded"
    assert fn.calls == 7


async def test_rate_limits_do_not_count_but_other_failures_do(make_dependency: Dependencies) -> None:
    dep = make_dependency(threshold=100)
    fn = Flaky(
        [unavailable(429, retry_after=0.001), unavailable(500), unavailable(429, retry_after=0.001)] * 3
    )

    with pytest.raises(AttemptsExhausted) as raised:
        await dep.call(fn, attempts=2)
    assert raised.value.attempts == 2
    assert fn.calls == 5  # 429, 500 (1), 429, 429, 500 (2)


async def test_a_failure_during_an_outage_does_not_burn(make_dependency: Dependencies) -> None:
    probe = GatedProbe()
    dep = make_dependency(probe=probe, threshold=2)
    in_flight, fail_now = asyncio.Event(), asyncio.Event()
    calls = 0

    async def slow_then_fine() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            in_flight.set()
            await fail_now.wait()
            raise unavailable(503)
        return "after recovery"

    caller = asyncio.create_task(dep.call(slow_then_fine, attempts=1))
    await in_flight.wait()
    await make_dependency.trip(dep, threshold=2)  # the outage begins while the caller's request is in flight
    fail_now.set()  # ... and that request fails during it: not the input's fault
    await asyncio.sleep(0.05)
    assert not caller.done(), "the caller should wait out the outage, not give up"
    assert calls == 1

    probe.healthy.set()
    assert await asyncio.wait_for(caller, 1.0) == "after recovery"
    assert calls == 2


# -- the breaker ------------------------------------------------------------------------------


async def test_breaker_opens_after_threshold_consecutive_failures(make_dependency: Dependencies) -> None:
    probe = GatedProbe()
    dep = make_dependency(probe=probe, threshold=3)
    fn = Flaky([unavailable(503) for _ in range(3)])
    caller = asyncio.create_task(dep.call(fn))

    await until(lambda: not dep.up)
    assert fn.calls == 3
    assert up_metric(dep) == 0.0
    why = dep.describe()
    assert why is not None
    assert why.startswith("down since ")
    assert "EmbeddingUnavailable: HTTP 503" in why

    probe.healthy.set()
    assert await asyncio.wait_for(caller, 1.0) == "ok"
    assert dep.up
    assert dep.describe() is None
    assert up_metric(dep) == 1.0


async def test_fewer_than_threshold_failures_keep_it_closed(make_dependency: Dependencies) -> None:
    dep = make_dependency(threshold=3)
    assert await dep.call(Flaky([unavailable(), unavailable()])) == "ok"
    assert dep.up
    assert dep.describe() is None
    assert up_metric(dep) == 1.0


async def test_while_down_callers_wait_and_the_prober_probes(make_dependency: Dependencies) -> None:
    probe = GatedProbe()
    dep = make_dependency(probe=probe, threshold=2)
    await make_dependency.trip(dep, threshold=2)

    callers_fn = Flaky([])
    callers = [asyncio.create_task(dep.call(callers_fn, attempts=1)) for _ in range(5)]
    await until(lambda: probe.calls >= 1)  # a probe round takes about 0.1 s
    assert callers_fn.calls == 0, "callers must not call the dependency while it is down"
    assert not any(task.done() for task in callers)
    assert not dep.up
    assert "DatabaseUnavailable: probe: still down" in (dep.describe() or "")

    probe.healthy.set()
    results = await asyncio.wait_for(asyncio.gather(*callers), 1.0)
    assert results == ["ok"] * 5
    assert callers_fn.calls == 5
    assert dep.up
    assert up_metric(dep) == 1.0
    probes = probe.calls
    await asyncio.sleep(0.12)
    assert probe.calls == probes, "the prober stops once the dependency is back"


async def test_the_breaker_can_open_again_after_recovery(make_dependency: Dependencies) -> None:
    probe = GatedProbe()
    probe.healthy.set()
    dep = make_dependency(probe=probe, threshold=2)
    for _ in range(2):
        await make_dependency.trip(dep, threshold=2)
        assert up_metric(dep) == 0.0
        await until(lambda: dep.up)
        assert up_metric(dep) == 1.0
        assert dep.describe() is None
        await asyncio.wait_for(make_dependency.tasks[-1], 1)  # its success resets the count: not mid-trip


async def test_a_poisonous_input_is_exhausted_even_with_threshold_one(
    make_dependency: Dependencies,
) -> None:
    dep = make_dependency(threshold=1)  # the probe is healthy: the API answers others
    fn = Flaky([unavailable(500) for _ in range(1000)])
    caller = asyncio.create_task(dep.call(fn, attempts=1, deadline=0.05))
    make_dependency.tasks.append(caller)  # ended by the stop event at teardown if it loops

    await until(caller.done, within=0.3)
    with pytest.raises(AttemptsExhausted):
        caller.result()


async def test_cancelling_a_waiting_caller_leaves_no_tasks_behind(make_dependency: Dependencies) -> None:
    # Retries and probes far apart: the tripping caller's retry (1 ms later with the fast backoff)
    # or a new probe round (0.1 s) begun during the test, which a loaded machine stretches, made
    # tasks that counted as this caller's (two Event.wait tasks, in one clean-clone CI).
    dep = make_dependency(probe=GatedProbe(), threshold=1, backoff=lambda attempt, **_: 60.0)
    await make_dependency.trip(dep, threshold=1)
    before = asyncio.all_tasks()
    caller = asyncio.create_task(dep.call(Flaky([])))
    await asyncio.sleep(0.02)
    assert not caller.done()

    caller.cancel()
    await asyncio.gather(caller, return_exceptions=True)
    await asyncio.sleep(0)
    left = asyncio.all_tasks() - before
    for task in left:  # so that the leak, while it lasts, does not outlive this test
        task.cancel()
    await asyncio.gather(*left, return_exceptions=True)
    assert left == set()


# -- stopping ---------------------------------------------------------------------------------


async def test_stop_while_waiting_out_an_outage_raises_shutting_down(make_dependency: Dependencies) -> None:
    stop = asyncio.Event()
    dep = make_dependency(probe=GatedProbe(), stop=stop, threshold=2)
    await make_dependency.trip(dep, threshold=2)
    fn = Flaky([])
    caller = asyncio.create_task(dep.call(fn))
    await asyncio.sleep(0.02)
    assert not caller.done()

    stop.set()
    started = time.monotonic()
    with pytest.raises(ShuttingDown):
        await asyncio.wait_for(caller, 1.0)
    assert time.monotonic() - started < 0.5
    assert fn.calls == 0


async def test_stop_during_a_retry_wait_raises_shutting_down(make_dependency: Dependencies) -> None:
    stop = asyncio.Event()
    dep = make_dependency(stop=stop, threshold=10)
    fn = Flaky([unavailable(503, retry_after=60.0)])
    caller = asyncio.create_task(dep.call(fn))
    await until(lambda: fn.calls == 1)
    await asyncio.sleep(0.02)

    stop.set()
    started = time.monotonic()
    with pytest.raises(ShuttingDown):
        await asyncio.wait_for(caller, 1.0)
    assert time.monotonic() - started < 0.5
    assert fn.calls == 1


async def test_close_cancels_the_prober(make_dependency: Dependencies) -> None:
    probing, cancelled = asyncio.Event(), asyncio.Event()
    calls = 0

    async def hanging_probe() -> None:
        nonlocal calls
        calls += 1
        probing.set()
        try:
            await asyncio.Event().wait()  # never answers
        except asyncio.CancelledError:
            cancelled.set()
            raise

    dep = make_dependency(probe=hanging_probe, threshold=1)
    await make_dependency.trip(dep, threshold=1)
    await asyncio.wait_for(probing.wait(), 1.0)

    await asyncio.wait_for(dep.close(), 0.5)
    assert cancelled.is_set()
    await asyncio.sleep(0.12)
    assert calls == 1, "no probe after close()"
    assert not dep.up
