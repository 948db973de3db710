"""Calling a dependency (embedding API, database, dead-letter producer) through failures.

Each dependency has a circuit breaker. Retriable failures are retried with capped, jittered
exponential backoff (``Retry-After`` honoured). After ``threshold`` consecutive failures the
breaker opens: the dependency is down. While it is down, callers wait, and a prober tests it
with a request of its own (never a caller's possibly poisonous input); the Worker pauses
fetching, keeps its group membership, commits nothing it has not stored and dead-letters
nothing. A caller's own attempts burn only while the breaker is closed, so an input that
keeps failing while the dependency answers the probe is the input's fault.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from worker import metrics
from worker.errors import AttemptsExhausted, DependencyError, EmbeddingUnavailable, describe
from worker.retry import Backoff, ShuttingDown, backoff, sleep_unless, unless_stopped

log = structlog.get_logger()
T = TypeVar("T")


class Dependency:
    def __init__(
        self,
        name: str,
        *,
        probe: Callable[[], Awaitable[object]],
        stop: asyncio.Event,
        threshold: int = 5,
        max_backoff: float = 30.0,
        backoff: Backoff = backoff,
    ) -> None:
        self.name = name
        self.backoff = backoff  # the jittered wait before each retry: tests pass a short one
        self._probe = probe
        self._stop = stop
        self._threshold = threshold
        self._max_backoff = max_backoff
        self._consecutive = 0
        self._up = asyncio.Event()
        self._up.set()
        self._prober: asyncio.Task[None] | None = None
        self._down_at = 0.0
        self.down_since: dt.datetime | None = None
        self.last_error: str | None = None
        metrics.DEPENDENCY_UP.labels(dependency=name).set(1)

    @property
    def up(self) -> bool:
        return self._up.is_set()

    def describe(self) -> str | None:
        """Why the dependency is down, for /readyz; None while it is up."""
        if self.down_since is None:
            return None
        return f"down since {self.down_since.isoformat(timespec='seconds')}: {self.last_error}"

    async def call(
        self, fn: Callable[[], Awaitable[T]], *, attempts: int | None = None, deadline: float | None = None
    ) -> T:
        """Run ``fn`` until it succeeds, waiting out outages.

        With ``attempts`` (and ``deadline``, seconds), ``fn`` may fail that many times (or that
        long) while the dependency is up. Then the dependency is probed with a request of its
        own: if the probe fails too, this was an outage (the breaker opens, the call waits and
        starts over); if it succeeds, the fault is ``fn``'s input: AttemptsExhausted. Raises
        ShuttingDown when the worker stops first, and non-retriable errors at once.
        """
        while True:
            try:
                return await self._attempts(fn, attempts, deadline)
            except _OutOfAttempts as out:
                if await self._answers_probe():
                    raise AttemptsExhausted(out.last, out.burned) from out.last
                self._open(out.last)

    async def _attempts(
        self, fn: Callable[[], Awaitable[T]], attempts: int | None, deadline: float | None
    ) -> T:
        burned = 0
        started = time.monotonic()
        waited_down = 0.0

        def exhausted(_: RetryCallState) -> bool:
            if attempts is not None and burned >= attempts:
                return True
            return (
                deadline is not None and burned > 0 and time.monotonic() - started - waited_down >= deadline
            )

        retrying = AsyncRetrying(
            retry=retry_if_exception_type(DependencyError),
            stop=exhausted,
            wait=self._wait,
            sleep=lambda seconds: sleep_unless(self._stop, seconds),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    waited_down += await self._wait_up()
                    try:
                        result = await fn()
                    except DependencyError as exc:
                        metrics.RETRIES.labels(dependency=self.name).inc()
                        if self.up and not _systemic(exc):
                            burned += 1  # it failed while the dependency was up
                        self._failed(exc)
                        raise
                    self._consecutive = 0
                    return result
        except DependencyError as exc:
            raise _OutOfAttempts(exc, burned) from exc
        raise AssertionError("unreachable: tenacity either returns or reraises")

    async def _answers_probe(self) -> bool:
        try:
            await self._probe()
        except DependencyError as exc:
            self.last_error = describe(exc)
            return False
        if not self.up:
            self._recovered()
        return True

    async def close(self) -> None:
        if self._prober is not None:
            self._prober.cancel()
            await asyncio.gather(self._prober, return_exceptions=True)

    async def _wait_up(self) -> float:
        """Wait while the dependency is down; the seconds waited."""
        if self.up:
            return 0.0
        began = time.monotonic()
        await unless_stopped(self._stop, self._up.wait())
        return time.monotonic() - began

    def _wait(self, state: RetryCallState) -> float:
        """Retry-After when the API gives one, else full-jitter exponential backoff."""
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, EmbeddingUnavailable) and exc.retry_after is not None:
            return exc.retry_after + random.uniform(0, 0.1 * exc.retry_after)
        return self.backoff(state.attempt_number, initial=0.2, cap=self._max_backoff)

    def _failed(self, exc: DependencyError) -> None:
        self._consecutive += 1
        self.last_error = describe(exc)
        if self._consecutive >= self._threshold:
            self._open(exc)

    def _open(self, exc: DependencyError) -> None:
        self.last_error = describe(exc)
        if self.up:
            self._up.clear()
            self.down_since = dt.datetime.now(dt.UTC)
            self._down_at = time.monotonic()
            metrics.DEPENDENCY_UP.labels(dependency=self.name).set(0)
            log.error(
                "dependency_down", dependency=self.name, error=self.last_error, failures=self._consecutive
            )
            self._prober = asyncio.create_task(self._probe_until_up(), name=f"probe-{self.name}")

    async def _probe_until_up(self) -> None:
        round_ = 0
        while self.down_since is not None:
            round_ += 1
            try:
                await sleep_unless(self._stop, self.backoff(round_, initial=0.5, cap=self._max_backoff) + 0.1)
            except ShuttingDown:
                return
            try:
                await self._probe()
            except DependencyError as exc:
                self.last_error = describe(exc)
                log.info("dependency_probe_failed", dependency=self.name, error=self.last_error, round=round_)
                continue
            except Exception:  # a broken probe must not leave the breaker open for good
                log.exception("dependency_probe_error", dependency=self.name)
                continue
            if self.down_since is not None:
                self._recovered()

    def _recovered(self) -> None:
        log.warning(
            "dependency_recovered",
            dependency=self.name,
            down_seconds=round(time.monotonic() - self._down_at, 1),
        )
        self._consecutive = 0
        self.down_since = None
        metrics.DEPENDENCY_UP.labels(dependency=self.name).set(1)
        self._up.set()


class _OutOfAttempts(Exception):  # an internal signal between _attempts and call
    def __init__(self, last: DependencyError, burned: int) -> None:
        super().__init__(str(last))
        self.last = last
        self.burned = burned


def _systemic(exc: DependencyError) -> bool:
    """A rate limit throttles everyone: it never counts against one request's attempts."""
    return isinstance(exc, EmbeddingUnavailable) and exc.status == 429


@dataclass(frozen=True)
class Dependencies:
    """One circuit breaker per dependency, shared by every pipeline of a worker."""

    embedding: Dependency
    database: Dependency
    dead_letters: Dependency

    @classmethod
    def of(
        cls,
        *,
        embedding: Callable[[], Awaitable[object]],
        database: Callable[[], Awaitable[object]],
        dead_letters: Callable[[], Awaitable[object]],
        stop: asyncio.Event,
        threshold: int,
        backoff: Backoff = backoff,
    ) -> Dependencies:
        """Breakers for the three dependencies, each probed with the given request of its own."""

        def breaker(name: str, probe: Callable[[], Awaitable[object]]) -> Dependency:
            return Dependency(name, probe=probe, stop=stop, threshold=threshold, backoff=backoff)

        return cls(
            breaker("embedding", embedding),
            breaker("database", database),
            breaker("dead_letters", dead_letters),
        )

    def all(self) -> tuple[Dependency, ...]:
        return (self.embedding, self.database, self.dead_letters)
