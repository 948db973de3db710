"""retry.wait_within: asyncio.wait_for's timeout without its Python 3.11 flaw."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from worker.retry import wait_within

Waiter = Callable[[Awaitable[Any], float], Awaitable[Any]]


async def cancelled_as_its_wait_ends(waiter: Waiter) -> bool:
    """Cancel a task waiting through ``waiter`` right after what it waits for is done, before the
    task resumes (a stop that comes as an answer arrives): True when the task is cancelled."""
    answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(waiter(answer, 10.0))
    for _ in range(3):
        await asyncio.sleep(0)
    answer.set_result(1)
    if sys.version_info < (3, 12) and waiter is asyncio.wait_for:
        await asyncio.sleep(0)  # 3.11's wait_for waits through a task of its own: one step more
    assert not task.done()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return True
    return False


async def test_a_cancellation_as_the_wait_ends_is_never_swallowed() -> None:
    assert await cancelled_as_its_wait_ends(wait_within)


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="the flaw is Python 3.11's")
async def test_asyncio_wait_for_swallows_it_on_python_3_11() -> None:
    # Why wait_within exists: the task would go on as if never stopped.
    assert not await cancelled_as_its_wait_ends(asyncio.wait_for)


async def test_it_times_out_as_wait_for_does_and_cancels_what_it_waited_for() -> None:
    never: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        await wait_within(never, 0.01)
    assert never.cancelled()
    assert await wait_within(asyncio.sleep(0, "answer"), None) == "answer"
