"""A worker's look at the registry (worker.fill.Fillers), with a small fake of the store."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from worker.fill import Fillers
from worker.generations import Generation
from worker.settings import Settings

SERVED = Generation(1, "small", 384, "vector", 1000, 100, "chars", "served")


class FakeStore:
    def __init__(self, registry: list[Generation]) -> None:
        self.registry = registry
        self.generation = SERVED
        self.looks = 0
        self.looked_thrice = asyncio.Event()

    async def generations(self) -> list[Generation]:
        self.looks += 1
        if self.looks >= 3:
            self.looked_thrice.set()
        return list(self.registry)

    def reuse_from(self, found: Sequence[Generation]) -> None:
        pass


async def test_a_stop_ends_the_watch_quietly_however_it_finds_it() -> None:
    store = FakeStore([SERVED])
    stop = asyncio.Event()
    fillers = Fillers(Settings.load({}), store, lambda _: None, stop=stop, poll=0.01)  # type: ignore[arg-type]
    watching = asyncio.create_task(fillers.watch())
    await asyncio.wait_for(store.looked_thrice.wait(), 5)
    stop.set()
    await asyncio.wait_for(watching, 5)  # returns: no ShuttingDown (the app logs side_task_died)
    assert watching.exception() is None


class FakeRunning:
    """A started filler: closing it takes a moment, as closing pools and sessions does."""

    def __init__(self) -> None:
        self.store = FakeStore([])
        self.closes = 0

    async def close(self) -> None:
        await asyncio.sleep(0.05)
        self.closes += 1


async def test_the_app_closing_while_the_cancelled_watch_closes_too_closes_each_filler_once() -> None:
    # serve() cancels the watch, whose shielded close goes on, then closes the fillers itself: the
    # two ran over each other ("dictionary changed size during iteration", CI on 7780ac8).
    building = Generation(2, "large", 256, "vector", 1000, 100, "chars", "building")
    store = FakeStore([SERVED, building])
    stop = asyncio.Event()
    fillers = Fillers(Settings.load({}), store, lambda _: None, stop=stop, poll=0.01)  # type: ignore[arg-type]
    started: list[FakeRunning] = []

    async def start(generation: Generation) -> FakeRunning:
        started.append(FakeRunning())
        return started[-1]

    fillers._start = start  # type: ignore[method-assign,assignment]
    watching = asyncio.create_task(fillers.watch())
    await asyncio.wait_for(store.looked_thrice.wait(), 5)
    watching.cancel()
    await asyncio.sleep(0)  # the watch's close has begun
    await asyncio.wait_for(fillers.close(), 5)
    assert [r.closes for r in started] == [1]  # closed once, and before close() returned
    await asyncio.gather(watching, return_exceptions=True)
    assert [r.closes for r in started] == [1]
