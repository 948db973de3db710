"""Backoff, stop-aware waiting, and isolating the item at fault by halving (the retry policy
itself: worker.dependency).

Every wait races the worker's stop event so that shutdown is prompt.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from worker.errors import WorkerError

T = TypeVar("T")
R = TypeVar("R")


class ShuttingDown(WorkerError):
    """A wait was cut short because the worker is stopping."""


class Backoff(Protocol):
    def __call__(self, attempt: int, *, initial: float = ..., cap: float = ...) -> float: ...


def backoff(attempt: int, *, initial: float = 0.2, cap: float = 30.0) -> float:
    """Full-jitter exponential backoff for the ``attempt``-th retry (1-based)."""
    return random.uniform(0, min(cap, initial * 2 ** (attempt - 1)))


async def unless_stopped(stop: asyncio.Event, awaitable: Awaitable[T]) -> T:
    """``awaitable``'s result, raced against ``stop``: when ``stop`` is set first, the awaitable is
    cancelled and ShuttingDown raised. One home for every wait that must not hold up shutdown."""
    task = asyncio.ensure_future(awaitable)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, stopped, return_exceptions=True)  # both gone before returning
    if task.cancelled() and stop.is_set():
        raise ShuttingDown("stopping")
    return task.result()


async def wait_within(awaitable: Awaitable[T], seconds: float | None) -> T:
    """``awaitable``'s result, or TimeoutError after ``seconds`` (None: no limit), as
    ``asyncio.wait_for`` gives it, without its Python 3.11 flaw: a cancellation that comes after
    the awaitable is done, before the waiting task resumes, is swallowed and its result returned
    (the task then goes on as if never stopped). ``asyncio.timeout`` raises it."""
    async with asyncio.timeout(seconds):
        return await awaitable


async def sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    """Sleep, or raise ShuttingDown as soon as ``stop`` is set."""
    if stop.is_set():
        raise ShuttingDown("stopping")
    await unless_stopped(stop, asyncio.sleep(seconds))
    if stop.is_set():
        raise ShuttingDown("stopping")


async def isolate(
    items: list[T],
    attempt: Callable[[list[T]], Awaitable[list[R]]],
    *,
    faults: tuple[type[Exception], ...],
    alone: Callable[[T, Exception], Awaitable[R]],
) -> list[R]:
    """``attempt(items)``, one result per item; when it raises one of ``faults``, each half is
    attempted on its own, down to single items, which ``alone`` answers with the fault. The
    items at fault are found in about log2(n) rounds each, and the rest succeed as usual."""
    try:
        return await attempt(items)
    except faults as exc:
        if len(items) == 1:
            return [await alone(items[0], exc)]
        half = len(items) // 2
        first = await isolate(items[:half], attempt, faults=faults, alone=alone)
        return [*first, *await isolate(items[half:], attempt, faults=faults, alone=alone)]
