"""How hard to push the embedding API: an adaptive concurrency limit and an optional budget.

Concurrency follows AIMD (as TCP does): it grows by about one request per round of successes
and halves on a 429, and shrinks when latency climbs well above its floor. Several replicas
sharing one API key so converge on the provider's limit without talking to each other. A
requests-per-minute and tokens-per-minute budget per process can cap it further.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

from aiolimiter import AsyncLimiter

from worker import metrics
from worker.retry import wait_within

LATENCY_RISE = 3.0  # EWMA latency this many times its floor counts as congestion
DECREASE_EVERY = 1.0  # seconds: at most one decrease per interval, so one burst halves once
MAX_RETRY_AFTER = 60.0  # seconds: the longest a 429's Retry-After holds requests


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
        metrics.EMBEDDING_IN_FLIGHT.inc()
        try:
            yield
        finally:
            metrics.EMBEDDING_IN_FLIGHT.dec()
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


# -- pacing by the provider's own signals ---------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_SECONDS_OF = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
# The pacer keeps the provider's bucket between LOW and HIGH (shares of it when full, and never
# below what the largest request needs): below, this process slows down, multiplicatively, once a
# second at most; above, it speeds up by INCREASE x the limit's rate per second since the last
# answer. As AIMD does for TCP, processes sharing a key so settle on fair shares of its budget.
LOW = 0.5
HIGH = 0.75
INCREASE = 0.05
DECREASE = 0.7
FLOOR = 1 / 32  # of the limit's rate: the slowest a process goes (it must still hear answers)
PROBE_WAIT = 2.0  # seconds the others wait for a process's first answer before they go too


def parse_duration(text: str | None) -> float | None:
    """Seconds in a provider's reset format: ``6m0s``, ``1s``, ``250ms``, ``1h2m3.5s``, ``0.5``."""
    if not text:
        return None
    text = text.strip()
    try:
        return max(0.0, float(text))
    except ValueError:
        pass
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _SECONDS_OF[u] for n, u in parts)


def retry_after(headers: Mapping[str, str]) -> float | None:
    """A 429's wait: ``retry-after-ms`` (Azure OpenAI, OpenAI) else ``Retry-After`` in seconds."""
    milliseconds = parse_duration(headers.get("retry-after-ms"))
    if milliseconds is not None:
        return milliseconds / 1000
    return parse_duration(headers.get("Retry-After"))


@dataclass
class _Dimension:
    """One of the provider's limits (tokens or requests per minute) as this process sees it."""

    limit: float  # per minute
    rate: float  # what this process sends at, per second
    capacity: float = 0.0  # the most remaining seen: the provider's bucket when full
    largest: float = 0.0  # the largest request lately, in this dimension's unit
    sent_at: float = 0.0  # when the last request went
    sent: float = 0.0  # and its size
    seen_at: float | None = None  # the last answer's time
    decreased_at: float = -1e9

    def observe(self, remaining: float, now: float) -> None:
        self.capacity = max(self.capacity, remaining)
        per_second = self.limit / 60
        low = max(LOW * self.capacity, 1.2 * self.largest)
        high = max(HIGH * self.capacity, low + 0.1 * self.capacity)
        if remaining < low:
            if now - self.decreased_at >= DECREASE_EVERY:
                self.decreased_at = now
                self.rate = max(FLOOR * per_second, self.rate * DECREASE)
        elif remaining > high and self.seen_at is not None:
            elapsed = min(2.0, now - self.seen_at)
            self.rate = min(2 * per_second, self.rate + INCREASE * per_second * elapsed)
        self.seen_at = now


class ProviderPacer:
    """Sends at the rate the provider's ``x-ratelimit-*`` headers allow, once it sends them.

    Each answer says how much of the key's budget is left (shared by every process using the
    key). With plenty left this process speeds up, with little it slows down (AIMD on the rate,
    see _Dimension.observe): processes sharing a key so converge on the key's budget without
    being told it, and without running it dry (429s). A 429 halves the rate and
    holds every send until its ``retry-after-ms``/``Retry-After``. Without headers nothing is
    paced here (the AIMD concurrency limit then does the work).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._dims: dict[str, _Dimension] = {}
        self._hold_until = 0.0
        self._turn = asyncio.Lock()
        self._observed = asyncio.Event()
        self._answered = asyncio.Event()  # the first answer (or failure) has come
        self._probing = False  # the first request is out
        self._last_tokens = 0  # the last request's size (the first answer's headers pay for it)

    @property
    def paced(self) -> bool:
        return bool(self._dims)

    def rate(self, name: str) -> float | None:
        """Tokens or requests a second this process sends at (None: not paced)."""
        dim = self._dims.get(name)
        return None if dim is None else dim.rate

    def due(self) -> float:
        """When the next request may go: the last one's share of each rate has passed (at the
        rate as it is now, so that a rate raised meanwhile counts at once), and no 429 holds."""
        due = self._hold_until
        for dim in self._dims.values():
            due = max(due, dim.sent_at + dim.sent / dim.rate)
        return due

    def sent(self, tokens: int) -> None:
        now = self._clock()
        for name, amount in (("tokens", float(tokens)), ("requests", 1.0)):
            dim = self._dims.get(name)
            if dim is not None:
                dim.largest = max(dim.largest * 0.99, amount)
                dim.sent_at, dim.sent = now, amount

    async def wait(self, tokens: int) -> None:
        """Until a request of ``tokens`` may go (one waiter at a time, in turn), then count it sent.

        Until the first answer has come (PROBE_WAIT at most), one request goes alone: a fresh
        process (or a whole deployment started at once) learns the budget before it fills every
        slot, not by 429s."""
        self._last_tokens = tokens
        if self._probing:
            try:  # a first request that takes long (an input the API is slow on) holds none for long
                await wait_within(self._answered.wait(), PROBE_WAIT)
            except TimeoutError:
                self._answered.set()
        elif not self._answered.is_set():
            self._probing = True
            return
        async with self._turn:
            while (delay := self.due() - self._clock()) > 0:
                self._observed.clear()  # an answer meanwhile may change the rate: look again
                with contextlib.suppress(TimeoutError):
                    await wait_within(self._observed.wait(), delay)
            self.sent(tokens)

    def done(self) -> None:
        """A request ended, answered or not: the first one lets the others go."""
        self._answered.set()
        self._probing = False

    def observe(self, headers: Mapping[str, str], *, throttled: bool) -> None:
        now = self._clock()
        self._observed.set()
        for name in ("tokens", "requests"):
            try:
                limit = float(headers[f"x-ratelimit-limit-{name}"])
                remaining = float(headers[f"x-ratelimit-remaining-{name}"])
            except (KeyError, ValueError):
                continue
            if limit <= 0:
                continue
            dim = self._dims.get(name)
            if dim is None:  # the first answer: it paid for the request that went alone
                dim = self._dims[name] = _Dimension(limit, rate=limit / 60 / 2, sent_at=now)
                dim.sent = float(self._last_tokens) if name == "tokens" else 1.0
            dim.limit = limit
            if throttled:
                dim.rate = max(FLOOR * limit / 60, dim.rate * 0.5)
                dim.seen_at = dim.decreased_at = now
            else:
                dim.observe(remaining, now)
        if throttled:
            wait = retry_after(headers)
            if wait is not None:
                self._hold_until = max(self._hold_until, now + min(wait, MAX_RETRY_AFTER))
