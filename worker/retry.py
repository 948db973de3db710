"""The one retry policy: retry what says it is retriable, with capped jittered backoff.

Every wait races the worker's stop event so that shutdown is prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt

from worker import metrics
from worker.errors import DependencyError, EmbeddingUnavailable, WorkerError

T = TypeVar("T")


class ShuttingDown(WorkerError):
    """A wait was cut short because the worker is stopping."""


def is_retriable(exc: BaseException) -> bool:
    return isinstance(exc, WorkerError) and exc.retriable


def backoff(attempt: int, *, initial: float = 0.2, cap: float = 30.0) -> float:
    """Full-jitter exponential backoff for the ``attempt``-th retry (1-based)."""
    return random.uniform(0, min(cap, initial * 2 ** (attempt - 1)))


async def sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    """Sleep, or raise ShuttingDown as soon as ``stop`` is set."""
    if stop.is_set():
        raise ShuttingDown("stopping")
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    if stop.is_set():
        raise ShuttingDown("stopping")


async def call_with_retry(
    call: Callable[[], Awaitable[T]], *, stop: asyncio.Event, attempts: int, cap: float = 30.0
) -> T:
    """Run ``call``; retry dependency failures up to ``attempts`` times, honouring Retry-After.

    Other retriable errors (a stale plan) are the caller's to retry: repeating the same call
    would fail the same way.
    """

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if isinstance(exc, EmbeddingUnavailable) and exc.retry_after is not None:
            return exc.retry_after + random.uniform(0, 0.1 * exc.retry_after)
        return backoff(state.attempt_number, cap=cap)

    def count(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        dependency = exc.dependency if isinstance(exc, DependencyError) else "other"
        metrics.RETRIES.labels(dependency=dependency).inc()

    retrying = AsyncRetrying(
        stop=stop_after_attempt(attempts),
        wait=wait,
        retry=retry_if_exception_type(DependencyError),
        sleep=lambda seconds: sleep_unless(stop, seconds),
        before_sleep=count,
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            return await call()
    raise AssertionError("unreachable: tenacity reraises the last error")
