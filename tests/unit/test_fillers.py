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
