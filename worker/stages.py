"""A pipeline stage's loop: take a batch from its asyncio queue, handle it, mark it done."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


Most = int | Callable[[], int]  # a batch's size limit, or how to work it out when a batch begins


async def stage_loop(
    queue: asyncio.Queue[T], most: Most, linger: float, handle: Callable[[list[T]], Awaitable[None]]
) -> None:
    """A stage's loop: take a batch from its queue, handle it, mark it done (also when handling fails)."""
    while True:
        batch = await take(queue, most, linger=linger)
        try:
            await handle(batch)
        finally:
            for _ in batch:
                queue.task_done()


async def take(queue: asyncio.Queue[T], most: Most, *, linger: float) -> list[T]:
    """Wait for one item, then gather up to ``most`` (worked out once the first has come) within
    ``linger`` seconds."""
    items = [await queue.get()]
    limit = most() if callable(most) else most
    loop = asyncio.get_running_loop()
    deadline = loop.time() + linger
    while len(items) < limit:
        try:
            items.append(queue.get_nowait())
            continue
        except asyncio.QueueEmpty:
            pass
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        with contextlib.suppress(TimeoutError):
            items.append(await asyncio.wait_for(queue.get(), remaining))
    return items
