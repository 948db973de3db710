"""A provider's rate limits, emulated: tokens and requests per minute, as token buckets.

Each bucket holds at most ``window`` seconds' worth of its per-minute limit (60: a whole minute,
as the limit reads; providers enforce over shorter spans too, which a smaller window plays) and
refills continuously. A request is admitted when both buckets hold enough; otherwise it is
answered 429 with how long until they will. Every answer carries OpenAI's headers:
``x-ratelimit-limit-*``, ``x-ratelimit-remaining-*``, ``x-ratelimit-reset-*`` (time until the
bucket is full again, in OpenAI's duration format: ``6m0s``, ``1s``, ``250ms``), and a 429 also
``Retry-After`` (whole seconds) and ``retry-after-ms``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Bucket:
    per_minute: float
    window: float  # seconds of the limit the bucket holds
    level: float
    at: float  # when ``level`` was last brought up to date

    @classmethod
    def full(cls, per_minute: float, window: float, now: float) -> Bucket:
        return cls(per_minute, window, per_minute * window / 60, now)

    @property
    def capacity(self) -> float:
        return self.per_minute * self.window / 60

    @property
    def rate(self) -> float:
        return self.per_minute / 60

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now

    def wait(self, amount: float) -> float:
        """Seconds until ``amount`` is there (inf if it never fits)."""
        if amount > self.capacity:
            return math.inf
        return max(0.0, (amount - self.level) / self.rate)

    def until_full(self) -> float:
        return (self.capacity - self.level) / self.rate


@dataclass
class Budget:
    """Tokens and requests per minute (0: that one unlimited)."""

    tokens: Bucket | None
    requests: Bucket | None

    @classmethod
    def of(cls, tpm: float, rpm: float, window: float, now: float) -> Budget | None:
        if tpm <= 0 and rpm <= 0:
            return None
        return cls(
            Bucket.full(tpm, window, now) if tpm > 0 else None,
            Bucket.full(rpm, window, now) if rpm > 0 else None,
        )

    def admit(self, tokens: int, now: float) -> float:
        """Take one request of ``tokens`` if both buckets allow it now (returns 0), else leave them
        as they are and return the seconds until they would (inf: larger than the token bucket)."""
        wanted = [(b, n) for b, n in ((self.tokens, tokens), (self.requests, 1)) if b is not None]
        for bucket, _ in wanted:
            bucket.refill(now)
        wait = max(bucket.wait(n) for bucket, n in wanted)
        if wait == 0:
            for bucket, n in wanted:
                bucket.level -= n
        return wait

    def levels(self, now: float) -> dict[str, float]:
        """What each bucket holds now."""
        out: dict[str, float] = {}
        for name, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is not None:
                bucket.refill(now)
                out[name] = bucket.level
        return out

    def headers(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is not None:
                out[f"x-ratelimit-limit-{name}"] = str(int(bucket.per_minute))
                out[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(bucket.level)))
                out[f"x-ratelimit-reset-{name}"] = duration(bucket.until_full())
        return out


def retry_headers(wait: float) -> dict[str, str]:
    """A 429's ``Retry-After`` (whole seconds, at least 1) and ``retry-after-ms``."""
    return {
        "Retry-After": str(max(1, math.ceil(wait))),
        "retry-after-ms": str(max(1, math.ceil(wait * 1000))),
    }


def duration(seconds: float) -> str:
    """OpenAI's way of writing a reset time: ``250ms``, ``1s``, ``8.64s``, ``6m0s``, ``1h2m3s``."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{round(secs, 3):g}s"
    if hours >= 1:
        return f"{int(hours)}h{int(minutes)}m{text}"
    if minutes >= 1:
        return f"{int(minutes)}m{text}"
    return text
