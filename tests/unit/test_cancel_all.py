"""worker.app.cancel_all ends a task whose first cancellation was swallowed (asyncio.wait_for on
Python 3.11 does that when its inner future completes as the cancellation arrives)."""

from __future__ import annotations

import asyncio

from worker.app import cancel_all


async def test_a_task_that_swallowed_a_cancellation_is_cancelled_again_until_it_ends() -> None:
    swallowed = 0

    async def loops() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1  # as asyncio.wait_for can, on 3.11

    async def ends() -> None:
        await asyncio.sleep(10)

    tasks = [asyncio.create_task(loops()), asyncio.create_task(ends())]
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_all(tasks, every=0.05), 5)
    assert swallowed == 1
    assert all(task.cancelled() for task in tasks)
