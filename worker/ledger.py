"""The embedding ledger: every embedding kept the moment it is paid for, and each purchase
announced before it is made, so that no content is bought twice, across processes and restarts.

    claim (intents, before sending) -> the API answers -> keep (the vector, written at once)
      -> a stored chunk holds it -> pruned (also: past its retention, or its buyer gone)

A revoked or stopping pipeline can therefore drop unfinished work at once: what it paid for is
in the ledger (the reuse lookup reads it), and what it was still buying is announced there, so
that the partitions' new owner waits for those answers instead of buying them again. A buyer is
alive while its process holds a session advisory lock of its number (``LedgerTable.buyer``): a
killed process's connection closes, its lock goes, and its announced purchases are taken over at
once. An announcement is also a lease its buyer renews while it waits: a frozen process's ones
are taken over once they are ``LEASE`` seconds old.

A process buying a model's embeddings alone announces nothing (``LedgerTable.sole``): announcing
costs a sixth of a reindex's fill, and there is nobody to tell. Another process wanting to buy
with that model waits until the sole buyer has announced what it is buying and has not written
yet (it looks every ``WATCH_INTERVAL``); from then on both announce.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import secrets
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import asyncpg
import pgvector
import structlog

from worker import metrics
from worker.dependency import Dependency
from worker.errors import DatabaseUnavailable, DependencyError, describe
from worker.retry import ShuttingDown, wait_within
from worker.schema import OUTAGE_ERRORS
from worker.settings import Settings
from worker.sql import (
    LEDGER_PRUNE_LIMIT,
    LEDGER_PRUNE_LOCK,
    SOLE_BUYER_LOCK,
    WAITING_TO_SHARE_SQL,
    Statements,
)
from worker.types import Vector
from worker.usage import UsageRows

log = structlog.get_logger()

WATCH_INTERVAL = 0.25  # seconds between looks at purchases another process is making
LEASE = 10.0  # seconds an announced purchase stands unrenewed (renewed every third of it)
# Each answer waits this long after it came before it is written: most are stored by then (a batch
# takes tens of milliseconds), and those are not written twice, only their announcement taken
# back. What a kill -9 loses of what was paid for is at most this much of the answers. An answer's
# own age counts, not the oldest's of a window: a write takes those at least half as old too (one
# statement every WRITE_DELAY / 2 at most), never one younger (a window wrote a tenth of a
# reindex's answers, stored a few milliseconds later).
WRITE_DELAY = 0.25
PRUNE_INTERVAL = 60.0  # seconds between prunes
KEEP_BATCH = 256  # answers kept per statement (a burst of thousands in one array: +10 MB peak RSS)


class PaidEmbeddings(Protocol):
    """The ledger's table (a fake implements it in unit tests)."""

    @property
    def enabled(self) -> bool: ...
    @property
    def sole(self) -> bool: ...
    async def present(self) -> None: ...
    async def wanted(self) -> bool: ...
    async def share(self, hashes: Sequence[bytes]) -> None: ...
    async def claim(self, hashes: Sequence[bytes]) -> set[bytes]: ...
    async def keep(self, vectors: Mapping[bytes, Vector]) -> None: ...
    async def drop(self, hashes: Sequence[bytes]) -> None: ...
    async def renew(self, hashes: Sequence[bytes]) -> None: ...
    async def watch(self, hashes: Sequence[bytes]) -> dict[bytes, Vector | bool]: ...
    async def prune(self) -> int: ...


def ledger_key(settings: Settings) -> str:
    """What a ledger row's model column says: the model and the dimensions it was asked for (two
    generations may embed with one model at different dimensions)."""
    return f"{settings.embedding_model}@{settings.embedding_dimensions}"


class LedgerTable:
    """``embedding_ledger`` in PostgreSQL, through the store's pool; ``enabled`` once the table is
    there and EMBEDDING_LEDGER_HOURS is not 0."""

    def __init__(
        self,
        settings: Settings,
        sql: Statements,
        *,
        fetch: Callable[..., Awaitable[list[asyncpg.Record]]],
        pool: Callable[[], asyncpg.Pool | None],
        usage: UsageRows,
    ) -> None:
        self._settings = settings
        self._sql = sql
        self._fetch = fetch
        self._pool = pool
        self._usage = usage
        self._model = settings.embedding_model
        self._key = ledger_key(settings)  # the rows' model column: model@dimensions
        self.buyer = secrets.randbits(62) + 1  # this process, as the ledger's rows name it
        self._presence: asyncpg.Connection | None = None
        self._presence_lock = asyncio.Lock()  # one presence connection, one buyer number
        self._sole_key = zlib.crc32(self._key.encode()) & 0x7FFFFFFF  # the sole-buyer lock's second key
        self.sole = False  # the only process buying with this model: its claims are not announced
        self._asking: asyncio.Future[str] | None = None  # its request for the lock shared, while waiting
        self.exists = False  # set by the store when it finds the table

    @property
    def enabled(self) -> bool:
        return self.exists and self._settings.embedding_ledger_hours > 0

    async def claim(self, hashes: Sequence[bytes]) -> set[bytes]:
        """Announce the purchase of these contents; returns those this process is to buy (the rest
        another process is buying, or bought since the caller looked)."""
        if not self.enabled:
            return set(hashes)
        await self.present()
        rows = await self._fetch(self._sql.claim_purchases, self._key, sorted(set(hashes)), self.buyer, LEASE)
        return {bytes(r["content_sha256"]) for r in rows}

    async def keep(self, vectors: Mapping[bytes, Vector]) -> None:
        if not self.enabled or not vectors:
            return
        digests = sorted(vectors)

        async def keep_all(conn: asyncpg.Connection) -> None:
            async with self._usage.carried() as carry, conn.transaction():
                for start in range(0, len(digests), KEEP_BATCH):  # a bounded parameter: memory stays flat
                    part = digests[start : start + KEEP_BATCH]
                    kept = [
                        pgvector.Vector(vectors[digest]) for digest in part
                    ]  # not sequences: one element each
                    await conn.execute(self._sql.keep_embeddings, self._key, part, kept)
                await carry(conn)  # no vector kept without its count (worker.usage)

        await self._run(keep_all)

    async def drop(self, hashes: Sequence[bytes]) -> None:
        if self.enabled and hashes and not self.sole:
            await self._fetch(self._sql.drop_purchases, self._key, sorted(hashes), self.buyer)

    async def renew(self, hashes: Sequence[bytes]) -> None:
        if self.enabled and hashes and not self.sole:
            await self._fetch(self._sql.renew_purchases, self._key, sorted(hashes), self.buyer)

    async def watch(self, hashes: Sequence[bytes]) -> dict[bytes, Vector | bool]:
        """Each content's vector once known; else True while its buyer is still buying it."""
        if not self.enabled or not hashes:
            return {h: False for h in hashes}
        rows = await self._fetch(self._sql.watch_purchases, self._key, list(hashes), LEASE, self._model)
        return {
            bytes(r["content_sha256"]): (
                r["embedding"].to_numpy() if r["embedding"] is not None else bool(r["pending"])
            )
            for r in rows
        }

    async def prune(self) -> int:
        """Delete what need not be kept (one worker at a time); the rows deleted."""
        if not self.enabled:
            return 0
        hours = self._settings.embedding_ledger_hours

        async def once(conn: asyncpg.Connection) -> int:
            async with conn.transaction():
                if not await conn.fetchval("SELECT pg_try_advisory_xact_lock($1)", LEDGER_PRUNE_LOCK):
                    return 0
                status = await conn.execute(self._sql.prune_ledger, hours, self._key)
                return int(status.split()[-1])

        deleted = 0
        while (turn := await self._run(once)) > 0:
            deleted += turn
            if turn < LEDGER_PRUNE_LIMIT:
                break
        return deleted

    async def close(self) -> None:
        self.sole = False
        if self._asking is not None:
            self._asking.cancel()
            self._asking = None
        if self._presence is not None:
            await _close(self._presence)
            self._presence = None

    async def present(self) -> None:
        """Hold this process's buyer lock on a connection of its own (again after it was lost),
        and the model's sole-buyer lock: alone (``sole``), or shared with the other buyers."""
        async with self._presence_lock:
            if self._presence is not None and not self._presence.is_closed():
                return
            self.sole = False
            conn = None
            try:
                conn = await asyncpg.connect(self._settings.database_url.reveal(), timeout=10)
                while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", self.buyer):
                    self.buyer = secrets.randbits(62) + 1  # another process drew the same number
                if self.enabled:
                    await self._join(conn)
            except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                if conn is not None:
                    conn.terminate()
                raise DatabaseUnavailable(f"cannot announce purchases: {describe(exc)}") from exc
            except BaseException:  # cancelled while waiting for the sole buyer
                if conn is not None:
                    conn.terminate()
                raise
            self._presence = conn

    async def _join(self, conn: asyncpg.Connection) -> None:
        """Take the model's sole-buyer lock: alone, shared with other buyers, or, while a sole
        buyer holds it, asked for shared: it shares once it has announced what it is buying. A
        frozen one is waited for ``LEASE`` seconds, as its announcements would be; then this
        process buys beside it, announcing, its request left waiting for when it wakes."""
        keys = (SOLE_BUYER_LOCK, self._sole_key)
        if await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", *keys):
            self.sole = True
            return
        if await conn.fetchval("SELECT pg_try_advisory_lock_shared($1, $2)", *keys):
            return
        asking = asyncio.ensure_future(conn.execute("SELECT pg_advisory_lock_shared($1, $2)", *keys))
        done, _ = await asyncio.wait({asking}, timeout=LEASE)
        if done:
            asking.result()  # a failure: the connection is unusable (raised as an outage)
            return
        log.warning("ledger_sole_buyer_silent", model=self._key, waited_seconds=LEASE)
        self._asking = asking
        asking.add_done_callback(self._granted)

    def _granted(self, asking: asyncio.Future[str]) -> None:
        if self._asking is asking:
            self._asking = None
        if not asking.cancelled() and asking.exception() is None:
            log.info("ledger_sole_buyer_shared", model=self._key)

    async def wanted(self) -> bool:
        """Buying alone, and another process waits to buy with the same model."""
        conn = self._presence
        if not self.sole or conn is None or conn.is_closed():
            return False
        return bool(await conn.fetchval(WAITING_TO_SHARE_SQL, SOLE_BUYER_LOCK, self._sole_key))

    async def share(self, hashes: Sequence[bytes]) -> None:
        """Stop buying alone: announce ``hashes`` (what this process is buying, or has bought and
        not written yet), then share the sole-buyer lock, which lets the waiting buyers in.
        ``sole`` is False from the call on (every later claim is announced); True again if this
        fails, for the next look to try again."""
        conn = self._presence
        assert conn is not None, "sole while present"
        self.sole = False
        try:
            if hashes:
                await self._fetch(
                    self._sql.claim_purchases, self._key, sorted(set(hashes)), self.buyer, LEASE
                )
            keys = (SOLE_BUYER_LOCK, self._sole_key)
            await conn.execute("SELECT pg_advisory_lock_shared($1, $2)", *keys)  # its own: granted at once
            await conn.execute("SELECT pg_advisory_unlock($1, $2)", *keys)
        except BaseException:
            self.sole = not conn.is_closed()  # closed: the lock is gone with it
            raise
        log.info("ledger_shared", model=self._key, announced=len(hashes))

    async def _run(self, work: Callable[[asyncpg.Connection], Awaitable[Any]]) -> Any:
        pool = self._pool()
        if pool is None:
            raise DatabaseUnavailable("not connected yet")
        try:
            async with pool.acquire() as conn:
                return await work(conn)
        except OUTAGE_ERRORS as exc:  # a deadlock with a prune, too: retried
            raise DatabaseUnavailable(f"ledger write failed: {describe(exc)}") from exc


class Ledger:
    """This process's side of the ledger: announces purchases, writes answers as they arrive
    (batched, in the background), watches purchases other processes are making, and prunes."""

    def __init__(
        self,
        table: PaidEmbeddings,
        database: Dependency,
        *,
        watch_every: float = WATCH_INTERVAL,
        write_delay: float = WRITE_DELAY,
    ) -> None:
        self._table = table
        self._database = database
        self._watch_every = watch_every
        self._write_delay = write_delay
        self._unwritten: dict[bytes, Vector] = {}  # answered, not yet in the table
        self._arrivals: collections.deque[tuple[float, bytes]] = collections.deque()  # when, in order
        self._writing: dict[bytes, Vector] = {}  # being written now
        self._dropped: set[bytes] = set()  # announced, then not bought after all
        self._announced: set[bytes] = set()  # announced here and not answered yet: renewed
        self._watched: dict[bytes, asyncio.Future[Vector | None]] = {}
        self._wake = asyncio.Event()
        self._hurry = asyncio.Event()  # flush(): write now, without the delay
        self._written = asyncio.Event()
        self._written.set()
        self._tasks = [
            asyncio.create_task(self._write_loop(), name="ledger-writer"),
            asyncio.create_task(self._watch_loop(), name="ledger-watcher"),
            asyncio.create_task(self._prune_loop(), name="ledger-pruner"),
            asyncio.create_task(self._renew_loop(), name="ledger-renewer"),
        ]
        for task in self._tasks:
            task.add_done_callback(_died)

    @property
    def enabled(self) -> bool:
        return self._table.enabled

    def unwritten(self, digest: bytes) -> Vector | None:
        """A vector paid for and not yet in the table (the reuse lookup cannot see it yet)."""
        return self._unwritten.get(digest, self._writing.get(digest))

    async def claim(self, hashes: Sequence[bytes]) -> set[bytes]:
        self._dropped.difference_update(hashes)
        if self.enabled:
            await self._database.call(self._table.present)
        if self._table.sole:  # nobody to tell; noted before any await, for _share to announce
            mine = set(hashes)
        else:
            mine = await self._database.call(lambda: self._table.claim(hashes))
        if self.enabled:
            self._announced |= mine
        return mine

    def abandon(self, hashes: Iterable[bytes]) -> None:
        """Announced, then not bought after all (the caller was cancelled): others may buy them."""
        hashes = set(hashes)
        self._announced -= hashes
        self._dropped.update(hashes)
        self._to_write()

    def settled(self, digest: bytes, future: asyncio.Future[Vector]) -> None:
        """A purchase's answer: its vector is kept; a failed or withdrawn one is dropped."""
        if not self.enabled:
            return
        if future.cancelled() or future.exception() is not None:
            self.abandon([digest])
            return
        self._announced.discard(digest)
        self._unwritten[digest] = future.result()
        self._arrivals.append((asyncio.get_running_loop().time(), digest))
        self._to_write()

    def _to_write(self) -> None:
        self._written.clear()
        self._wake.set()

    def stored(self, digest: bytes) -> None:
        """A stored chunk holds this content's vector now: it need not be written here too."""
        if self._unwritten.pop(digest, None) is not None:
            self._dropped.add(digest)

    def watch(self, digest: bytes) -> asyncio.Future[Vector | None]:
        """A future for a content another process is buying: its vector once that is paid for;
        None once this process has taken the purchase over (that one gave up, or died): buy it."""
        future: asyncio.Future[Vector | None] = asyncio.get_running_loop().create_future()
        self._watched[digest] = future
        return future

    async def flush(self, within: float) -> bool:
        """Wait until every answer so far is in the table; False when ``within`` ran out first.
        Answers whose futures are done but whose callbacks (``settled``) have not run yet count:
        they run first (a close right after the last answers arrived keeps them too)."""
        await asyncio.sleep(0)
        self._hurry.set()
        try:
            await wait_within(self._written.wait(), within)
        except TimeoutError:
            return False
        return True

    async def close(self, within: float) -> None:
        if not await self.flush(within) and self._unwritten:
            log.warning("ledger_unwritten", embeddings=len(self._unwritten) + len(self._writing))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for future in self._watched.values():
            future.cancel()

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            oldest = self._arrivals[0][0] if self._arrivals else loop.time()  # drops alone: the delay
            if (wait := oldest + self._write_delay - loop.time()) > 0 and not self._hurry.is_set():
                with contextlib.suppress(TimeoutError):
                    await wait_within(self._hurry.wait(), wait)
            self._writing = self._due(loop.time())
            dropped, self._dropped = sorted(self._dropped - self._writing.keys()), set()
            stopping = False
            try:
                await self._write(dropped, self._writing)
            except ShuttingDown:  # nothing more can be written: the next answer tries again
                self._put_back(self._writing)  # close() says how many were not written
                stopping = True
            except (DependencyError, asyncpg.PostgresError) as exc:  # refused (not an outage): unkept
                log.warning("ledger_write_failed", embeddings=len(self._writing), error=describe(exc))
            self._writing = {}
            if not self._unwritten and not self._dropped:
                self._written.set()
            elif not stopping:
                self._wake.set()  # younger ones: written when they are due

    def _due(self, now: float) -> dict[bytes, Vector]:
        """The unwritten answers at least half the delay old (all of them when hurried); those
        stored meanwhile are gone from ``_unwritten`` already."""
        cutoff = now if self._hurry.is_set() else now - self._write_delay / 2
        due: dict[bytes, Vector] = {}
        while self._arrivals and self._arrivals[0][0] <= cutoff:
            digest = self._arrivals.popleft()[1]
            if (vector := self._unwritten.pop(digest, None)) is not None:
                due[digest] = vector
        return due

    def _put_back(self, vectors: Mapping[bytes, Vector]) -> None:
        self._unwritten.update(vectors)
        self._arrivals.extendleft((0.0, digest) for digest in vectors)  # due at once

    async def _write(self, dropped: list[bytes], kept: Mapping[bytes, Vector]) -> None:
        if dropped:
            await self._database.call(lambda: self._table.drop(dropped))
        if kept:
            await self._database.call(lambda: self._table.keep(kept))
            metrics.EMBEDDINGS_KEPT.inc(len(kept))

    async def _watch_loop(self) -> None:
        while True:
            await asyncio.sleep(self._watch_every)
            if self._table.sole:
                try:
                    if await self._table.wanted():
                        await self._share()
                except ShuttingDown:
                    return
                except (DependencyError, asyncpg.PostgresError, OSError) as exc:  # the next look tries again
                    log.info("ledger_share_failed", error=describe(exc))
            for digest in [d for d, f in self._watched.items() if f.done()]:
                del self._watched[digest]  # withdrawn by every document that wanted it
            if not self._watched:
                continue
            try:
                await self._look(list(self._watched))
            except ShuttingDown:
                return
            except (DependencyError, asyncpg.PostgresError) as exc:
                log.info("ledger_watch_failed", error=describe(exc))

    async def _look(self, digests: list[bytes]) -> None:
        seen = await self._database.call(lambda: self._table.watch(digests))
        free = [d for d in digests if seen.get(d) is False and self._watching(d)]
        mine = await self.claim(free) if free else set()
        for digest in digests:
            state = seen.get(digest)
            if not self._watching(digest):  # let go of meanwhile: a purchase taken over is not made
                self._watched.pop(digest, None)
                if digest in mine:
                    self.abandon([digest])
                continue
            if state is None or state is True or (state is False and digest not in mine):
                continue
            future = self._watched.pop(digest)
            if isinstance(state, bool):  # False, and taken over: this process buys it
                future.set_result(None)
            else:
                future.set_result(state)

    async def _share(self) -> None:
        """Another process wants to buy with this model: announce what is being bought here, and
        what was bought and is not written yet (its lookups cannot see those), then share."""
        buying = self._announced | self._unwritten.keys() | self._writing.keys()  # no await before share()
        await self._table.share(sorted(buying))
        # settled meanwhile: a drop may have run before the announcement, which would then stand
        if settled := buying - (self._announced | self._unwritten.keys() | self._writing.keys()):
            self._dropped |= settled
            self._to_write()

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(LEASE / 3)
            if self._announced:
                with contextlib.suppress(DependencyError, asyncpg.PostgresError):
                    await self._table.renew(sorted(self._announced))

    def _watching(self, digest: bytes) -> bool:
        future = self._watched.get(digest)
        return future is not None and not future.done()

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(PRUNE_INTERVAL)
            try:
                if deleted := await self._table.prune():
                    log.info("ledger_pruned", rows=deleted)
            except (DependencyError, asyncpg.PostgresError) as exc:  # the next turn tries again
                log.info("ledger_prune_failed", error=describe(exc))


async def _close(conn: asyncpg.Connection) -> None:
    """Close a connection; at once where it cannot be closed cleanly (a lock request still waiting)."""
    try:
        await conn.close(timeout=2)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
        conn.terminate()


def _died(task: asyncio.Task[None]) -> None:
    """A ledger task that crashed (a bug): said loudly; purchases go on, bought without it."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("ledger_task_died", task=task.get_name(), error=describe(exc), exc_info=exc)
