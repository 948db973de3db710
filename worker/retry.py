"""Backoff and stop-aware waiting, for every retry loop (the policy itself: worker.dependency).

Every wait races the worker's stop event so that shutdown is prompt.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

from worker.errors import WorkerError


class ShuttingDown(WorkerError):
    """A wait was cut short because the worker is stopping."""


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
