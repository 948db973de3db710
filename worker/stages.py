"""A pipeline stage's loop: take a batch from its asyncio queue, handle it, mark it done."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

from worker.retry import wait_within

T = TypeVar("T")


async def stage_loop(
    queue: asyncio.Queue[T], most: int, linger: float, handle: Callable[[list[T]], Awaitable[None]]
) -> None:
    """A stage's loop: take a batch from its queue, handle it, mark it done (also when handling fails)."""
    while True:
        batch = await take(queue, most, linger=linger)
        try:
            await handle(batch)
        finally:
            for _ in batch:
                queue.task_done()


async def take(queue: asyncio.Queue[T], most: int, *, linger: float) -> list[T]:
    """Wait for one item, then gather up to ``most`` within ``linger`` seconds."""
    items = [await queue.get()]
    await gather(queue, items, most, linger=linger)
    return items


async def gather(queue: asyncio.Queue[T], items: list[T], most: int, *, linger: float) -> None:
    """Add items from ``queue`` to ``items`` until it holds ``most`` or ``linger`` seconds pass."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + linger
    while len(items) < most:
        try:
            items.append(queue.get_nowait())
            continue
        except asyncio.QueueEmpty:
            pass
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        with contextlib.suppress(TimeoutError):
            items.append(await wait_within(queue.get(), remaining))
