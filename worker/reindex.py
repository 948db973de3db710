"""`ingest-worker reindex`: build a generation of the index beside the served one, switch to it,
roll back, drop the one not served (worker.generations says what a generation is).

    start    register the generation (every live document pending in it) and fill it from what
             PostgreSQL holds (worker.fill), then build its HNSW index; stopped and started again,
             it goes on where it was
    status   every generation, with documents and chunks done
    switch   serve the generation built (once nothing is pending in it), in one transaction
    rollback serve the kept one again
    drop     remove the generation not served
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import asyncpg

from worker import generations
from worker.embed import KNOWN_GOOD_INPUT, OpenAIEmbedder
from worker.errors import (
    ConfigError,
    DependencyError,
    EmbeddingProtocolError,
    InputRejected,
    WorkerError,
    describe,
)
from worker.fill import Filler
from worker.generations import Generation
from worker.settings import Settings
from worker.store import Store

WAIT_POLL = 1.0  # seconds between looks while `switch --wait` waits
# Processes filling a generation at `reindex start`. One: on 2 cores the fill keeps the machine
# busy (database, embedding server and filler together), and a second process made it no faster
# (bench/MEASUREMENTS.md, "Filling a generation with more processes").
FILLERS = 1
HELPER_REPORT_EVERY = 0.5  # seconds between a helper's `filled` lines


class NotReady(WorkerError):
    """What was asked cannot be done yet (exit 1): the reason says what to do."""


@dataclass(frozen=True, slots=True)
class Wanted:
    """A generation as `reindex start` is asked for it (None: as the served one)."""

    model: str | None = None
    dimensions: int | None = None
    vector_type: str | None = None
    chunk_size: int | None = None
    chunk_overlap: int | None = None
    chunk_unit: str | None = None

    def of(self, served: Generation, settings: Settings) -> Generation:
        """The generation asked for, checked as its settings would be (ConfigError naming the flag)."""
        wanted = Generation(
            id=0,
            model=self.model or served.model,
            dimensions=self.dimensions or served.dimensions,
            vector_type=self.vector_type or served.vector_type,
            chunk_size=self.chunk_size or served.chunk_size,
            chunk_overlap=served.chunk_overlap if self.chunk_overlap is None else self.chunk_overlap,
            chunk_unit=self.chunk_unit or served.chunk_unit,
            state="building",
        )
        try:
            wanted.settings(settings)
        except ConfigError as exc:
            flag = "--" + exc.setting.lower().replace("embedding_", "").replace("_", "-")
            reason = str(exc).removeprefix(f"{exc.setting}: ")
            raise ConfigError(flag, reason) from exc
        return wanted


async def start(
    settings: Settings,
    wanted: Wanted,
    stop: asyncio.Event,
    *,
    progress: bool = True,
    fillers: int = FILLERS,
) -> Generation:
    """Register the generation (or find it registered: resume) and fill it, with ``fillers``
    processes (this one and helpers running `reindex fill`); build its index.
    Raises NotReady when documents are left that cannot be filled (each one's reason logged)."""
    _say(f"reindex start: {settings.database_schema}")
    async with Store(settings) as base:
        found = await _registry(base)
        served = generations.served(found)
        target = wanted.of(served, settings)
        generation = resumable(found, target)
        await _ask_the_api(target, settings)
        if generation is None:
            generation = await base.register_generation(target)
            _say(f"registered generation {generation.describe()}")
        else:
            _say(f"resuming generation {generation.describe()}")
    started = time.perf_counter()
    store = Store(settings, generation, filling=True)
    store.reuse_from(found)
    async with OpenAIEmbedder(store.settings) as embedder, store:
        filler = Filler(store, embedder, source=lambda: served, stop=stop)
        helpers = Helpers(settings, fillers - 1)
        try:
            live, pending = await _counts(store, generation)
            await helpers.start()
            bar = asyncio.create_task(_progress(filler, helpers, live, live - pending)) if progress else None
            try:
                await filler.run(until_done=True)
                # What is left is claimed by the helpers: once they are done, whatever one of
                # them gave back (or left, stopping) is filled here.
                await helpers.wait()
                await filler.run(until_done=True)
            finally:
                await helpers.stop()
                if bar is not None:
                    bar.cancel()
                    await asyncio.gather(bar, return_exceptions=True)
        finally:
            await filler.close()
        documents, chunks = filler.documents + helpers.documents, filler.chunks + helpers.chunks
        if stop.is_set():
            _say(
                f"stopped after {documents:,} documents ({chunks:,} chunks): the same "
                "`reindex start` goes on where this one was"
            )
            return generation
        seconds = time.perf_counter() - started
        rate = chunks / seconds if seconds else 0.0
        by = f" by {fillers} processes" if fillers > 1 else ""
        _say(
            f"filled {documents:,} documents ({chunks:,} chunks) in {seconds:.1f} s{by}: {rate:,.0f} chunks/s"
        )
        counts = (await store.pending_counts()).get(generation.id)
        if counts is not None and counts["problems"]:
            raise NotReady(
                f"{counts['problems']} documents cannot be filled ({', '.join(counts['examples'])}"
                f"{', ...' if counts['problems'] > len(counts['examples']) else ''}): {counts['problem']}"
            )
        indexing = time.perf_counter()
        await store.build_ann_index()
        _say(f"HNSW index ready in {time.perf_counter() - indexing:.1f} s")
    sys.stdout.write(
        f"generation {generation.describe()} is complete; running workers keep it current. "
        "`ingest-worker reindex switch` serves it.\n"
    )
    return generation


async def fill(settings: Settings, stop: asyncio.Event, *, report_every: float = 0.0) -> tuple[int, int]:
    """Fill the generation being built until nothing is pending in it, without building its index
    (`reindex start` does): what its helper processes run, and what more processes, on this
    machine or others, can run to share a large build. With ``report_every``, a ``filled
    <documents> <chunks>`` line on standard output that often (for the process that spawned it).
    Returns (documents, chunks) filled."""
    async with Store(settings) as base:
        found = await _registry(base)
        served = generations.served(found)
        generation = generations.not_served(found)
        if generation is None or generation.state != "building":
            raise NotReady("no generation is being built: `reindex start` registers one")
    store = Store(settings, generation, filling=True)
    store.reuse_from(found)
    async with OpenAIEmbedder(store.settings) as embedder, store:
        filler = Filler(store, embedder, source=lambda: served, stop=stop)
        reports = asyncio.create_task(_report(filler, report_every)) if report_every else None
        try:
            await filler.run(until_done=True)
        finally:
            await filler.close()
            if reports is not None:
                reports.cancel()
                await asyncio.gather(reports, return_exceptions=True)
                _report_line(filler)
    return filler.documents, filler.chunks


async def _report(filler: Filler, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        _report_line(filler)


def _report_line(filler: Filler) -> None:
    sys.stdout.write(f"filled {filler.documents} {filler.chunks}\n")
    sys.stdout.flush()


class Helpers:
    """``count`` processes running `reindex fill` beside `reindex start`, with its settings; each
    one ends with it (a ``kill -9`` of it too: the kernel sends them SIGTERM, and they give their
    claims back). Their ``filled`` lines keep the totals."""

    def __init__(self, settings: Settings, count: int) -> None:
        self._settings = settings
        self._count = count
        self._processes: list[asyncio.subprocess.Process] = []
        self._filled: dict[int, tuple[int, int]] = {}  # pid -> its last (documents, chunks)
        self._readers: list[asyncio.Task[None]] = []

    @property
    def documents(self) -> int:
        return sum(d for d, _ in self._filled.values())

    @property
    def chunks(self) -> int:
        return sum(c for _, c in self._filled.values())

    async def start(self) -> None:
        for _ in range(self._count):
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "worker",
                "reindex",
                "fill",
                "--report-every",
                str(HELPER_REPORT_EVERY),
                env={**os.environ, **self._settings.environment()},  # PATH, proxies, OTEL_* too
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                preexec_fn=_end_with_parent,
            )
            self._processes.append(process)
            self._readers.append(asyncio.create_task(self._read(process)))

    async def _read(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        async for line in process.stdout:
            word, _, counts = line.decode(errors="replace").partition(" ")
            if word == "filled":
                documents, _, chunks = counts.partition(" ")
                self._filled[process.pid] = (int(documents), int(chunks))

    async def wait(self) -> None:
        """Until every helper has ended (nothing left to claim); one that failed is said, and
        what it held is filled by whoever claims it next."""
        while self._processes:  # each one's end said once (stop() waits again)
            process = self._processes.pop(0)
            code = await process.wait()
            if code != 0:
                _say(f"a helper filler (pid {process.pid}) ended with status {code}: its part is filled here")
        await asyncio.gather(*self._readers, return_exceptions=True)

    async def stop(self) -> None:
        for process in self._processes:
            if process.returncode is None:
                process.terminate()
        await self.wait()


def _end_with_parent() -> None:
    """In the child: SIGTERM when the parent dies, however it dies (Linux's PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # 1: PR_SET_PDEATHSIG


async def status(settings: Settings) -> list[dict[str, object]]:
    """Each generation: what it is, its state, its documents pending and chunks stored."""
    async with Store(settings) as base:
        found = await _registry(base)
        pending = await base.pending_counts()
        live = await base.live_documents()
        rows: list[dict[str, object]] = []
        for g in found:
            chunks = await base.count_chunks(g)
            behind = pending.get(g.id)
            waiting = int(behind["pending"]) if behind is not None else 0
            problems = int(behind["problems"]) if behind is not None else 0
            done = live - waiting - problems
            estimate = round(chunks * live / done) if done > 0 else None
            rows.append(
                {
                    "generation": g.id,
                    "state": g.state,
                    "model": g.model,
                    "dimensions": g.dimensions,
                    "vector_type": g.vector_type,
                    "chunking": f"{g.chunk_size}/{g.chunk_overlap} {g.chunk_unit}",
                    "documents_done": done,
                    "documents": live,
                    "chunks_done": chunks,
                    "chunks_total": estimate,
                    "problems": problems,
                }
            )
        return rows


async def switch(
    settings: Settings, *, rollback: bool = False, wait: bool = False
) -> tuple[Generation, Generation]:
    """Serve the generation not served (the one built; with ``rollback`` the one kept), in one
    transaction that also checks nothing is pending in it. Returns (served now, served before)."""
    async with Store(settings) as base:
        found = await _registry(base)
        target = generations.not_served(found)
        wanted = "kept" if rollback else "building"
        if target is None or target.state != wanted:
            what = "no generation was served before this one" if rollback else "no generation is being built"
            hint = "; `reindex rollback` serves the kept one" if target is not None and not rollback else ""
            raise NotReady(f"{what}{hint}")
        if await base.ann_index_state_of(target) != "ready":
            if not wait:
                raise NotReady(
                    f"generation {target.describe()} has no HNSW index yet: `reindex start` builds it "
                    "once filled (or `reindex switch --wait`)"
                )
            async with Store(settings, target) as target_store:
                await target_store.build_ann_index()
        while True:
            outcome = await base.serve(target)
            if outcome is None:
                return target, generations.served(found)
            waiting, problems = outcome
            if problems:
                raise NotReady(
                    f"{problems} documents cannot be filled into generation {target.describe()}: "
                    "`reindex status` and `reindex start` say which and why"
                )
            if not wait:
                raise NotReady(
                    f"generation {target.describe()} is {waiting:,} documents behind: wait for "
                    "`reindex start` (or running workers) to fill them, or use --wait"
                )
            _say(f"waiting: {waiting:,} documents pending")
            await asyncio.sleep(WAIT_POLL)


async def drop(settings: Settings) -> Generation:
    async with Store(settings) as base:
        found = await _registry(base)
        target = generations.not_served(found)
        if target is None:
            raise NotReady("only the served generation exists: nothing to drop")
        await base.drop_generation(target)
        return target


async def _registry(store: Store) -> list[Generation]:
    try:
        found = await store.generations()
    except asyncpg.UndefinedTableError as exc:
        raise NotReady(f"no generations table in {store.settings.database_schema}: run `migrate`") from exc
    if not found:
        raise NotReady(f"{store.settings.database_schema} has no generation yet: run `migrate`")
    return found


def resumable(found: list[Generation], target: Generation) -> Generation | None:
    """The registered generation ``target`` is (resumed), None when there is none; ConfigError
    when it is the served one, or another generation stands in its way."""

    def spec(g: Generation) -> tuple[object, ...]:
        return (g.model, g.dimensions, g.vector_type, g.chunking)

    served = generations.served(found)
    if spec(served) == spec(target):
        raise ConfigError(
            "--model",
            f"nothing to build: generation {served.describe()} is the one served; give the "
            "--model, --dimensions, --vector-type or --chunk-* that differ",
        )
    other = generations.not_served(found)
    if other is None:
        return None
    if spec(other) == spec(target) and other.state == "building":
        return other
    verb = "`reindex rollback` serves it again" if other.state == "kept" else "`reindex switch` serves it"
    raise ConfigError(
        "--model",
        f"generation {other.describe()} is {other.state}: one generation beside the served one at a "
        f"time; {verb}, `reindex drop` removes it",
    )


async def _ask_the_api(target: Generation, settings: Settings) -> None:
    """One input embedded with the generation's model and dimensions before anything is registered:
    an API that refuses them (an unknown model, dimensions it does not give) is a bad flag (exit 2),
    not documents to leave pending. One that does not answer is waited for, as ingestion does."""
    async with OpenAIEmbedder(target.settings(settings)) as embedder:
        try:
            await embedder.embed([KNOWN_GOOD_INPUT])
        except (InputRejected, EmbeddingProtocolError) as exc:
            raise ConfigError(
                "--model",
                f"the embedding API at EMBEDDING_URL refuses {target.model} with {target.dimensions} "
                f"dimensions: {describe(exc)}",
            ) from exc
        except DependencyError as exc:
            _say(f"the embedding API does not answer ({describe(exc)}): waiting for it")


async def _counts(store: Store, generation: Generation) -> tuple[int, int]:
    pending = (await store.pending_counts()).get(generation.id)
    return await store.live_documents(), int(pending["pending"]) if pending is not None else 0


async def _progress(filler: Filler, helpers: Helpers, total: int, before: int, every: float = 0.5) -> None:
    """A bar over the generation's live documents: done before this run, then filled by it."""
    from tqdm import tqdm

    with tqdm(
        total=total, initial=before, unit="doc", file=sys.stderr, dynamic_ncols=True, desc="filling"
    ) as bar:
        try:
            while True:
                await asyncio.sleep(every)
                _show(bar, filler, helpers, total, before)
        except asyncio.CancelledError:
            _show(bar, filler, helpers, total, before)  # where it ended


def _show(bar: Any, filler: Filler, helpers: Helpers, total: int, before: int) -> None:
    down = sorted(d.name for d in filler.dependencies.all() if not d.up)
    bar.set_description_str("waiting for " + " and ".join(down) if down else "filling", refresh=False)
    bar.n = min(total, before + filler.documents + helpers.documents)
    bar.set_postfix_str(f"{filler.chunks + helpers.chunks:,} chunks", refresh=False)
    bar.refresh()


def _say(text: str) -> None:
    """A line for the operator, on standard error (standard output carries the outcome)."""
    sys.stderr.write(text + "\n")
