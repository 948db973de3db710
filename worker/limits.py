"""How hard to push the embedding API: an adaptive concurrency limit and an optional budget.

Concurrency follows AIMD (as TCP does): it grows by about one request per round of successes
and halves on a 429, and shrinks when latency climbs well above its floor. Several replicas
sharing one API key so converge on the provider's limit without talking to each other. A
requests-per-minute and tokens-per-minute budget per process can cap it further.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

from aiolimiter import AsyncLimiter

from worker import metrics

LATENCY_RISE = 3.0  # EWMA latency this many times its floor counts as congestion
DECREASE_EVERY = 1.0  # seconds: at most one decrease per interval, so one burst halves once


class AdaptiveConcurrency:
    def __init__(self, maximum: int, *, minimum: int = 1) -> None:
        self.maximum = maximum
        self.minimum = minimum
        self.limit = float(maximum)
        self._in_flight = 0
        self._changed = asyncio.Condition()
        self._ewma: float | None = None
        self._floor: float | None = None
        self._last_decrease = 0.0
        metrics.EMBEDDING_CONCURRENCY_LIMIT.set(self.limit)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: self._in_flight < max(self.minimum, int(self.limit)))
            self._in_flight += 1
        try:
            yield
        finally:
            async with self._changed:
                self._in_flight -= 1
                self._changed.notify_all()

    def succeeded(self, latency: float) -> None:
        self._ewma = latency if self._ewma is None else 0.8 * self._ewma + 0.2 * latency
        self._floor = latency if self._floor is None else min(self._floor * 1.001, latency)
        if (
            self._ewma > LATENCY_RISE * self._floor
        ):  # congested: shrink (at most once per interval), never grow
            self._decrease(0.9)
            return
        self.limit = min(float(self.maximum), self.limit + 1.0 / self.limit)
        metrics.EMBEDDING_CONCURRENCY_LIMIT.set(self.limit)

    def throttled(self) -> None:
        """A 429: the provider says everyone sharing the key is over the limit."""
        self._decrease(0.5)

    def _decrease(self, factor: float) -> bool:
        now = time.monotonic()
        if now - self._last_decrease < DECREASE_EVERY:
            return False
        self._last_decrease = now
        self.limit = max(float(self.minimum), self.limit * factor)
        metrics.EMBEDDING_CONCURRENCY_LIMIT.set(self.limit)
        return True


class Budget:
    """Requests and tokens per minute for this process (0: no cap). Tokens are estimated as chars/4."""

    def __init__(self, *, requests_per_minute: int, tokens_per_minute: int) -> None:
        self._requests = AsyncLimiter(requests_per_minute, 60) if requests_per_minute else None
        self._tokens = AsyncLimiter(tokens_per_minute, 60) if tokens_per_minute else None
        self._tokens_per_minute = tokens_per_minute

    async def spend(self, characters: int) -> None:
        if self._requests is not None:
            await self._requests.acquire()
        if self._tokens is not None:
            await self._tokens.acquire(min(self._tokens_per_minute, max(1, characters // 4)))
