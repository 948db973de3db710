"""What the embeddings cost: requests, inputs and tokens bought, and inputs reused instead, per
UTC day, tenant and model, in ``embedding_usage``.

Counted as answers arrive: the API's ``usage.prompt_tokens``, shared among the request's inputs
by their length (its tokenizer's count where the API sends none); a request is counted under
the tenant of its first input. A reused input's tokens are estimated at the rate the API has
counted so far.

Counts are added up in memory from the moment an answer arrives, and every transaction that
makes vectors durable (a batch of chunks stored, answers kept in the embedding ledger) carries
every count pending so far (``UsageRows.carried``): so no vector is durable without its count,
and a count goes back to pending if that transaction does not commit. A ``kill -9`` therefore
loses only counts of answers whose vectors it loses too (bought, and counted, again after the
restart), as the provider bills them twice. What no such transaction carries is written by
itself ``WRITE_DELAY`` after an answer, and at stop. A write that fails in an outage is carried
by the next one; one the database refuses (a privilege missing) is logged and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final, Protocol

import asyncpg
import structlog

from worker import metrics
from worker.errors import DatabaseUnavailable, DependencyError, describe
from worker.schema import OUTAGE_ERRORS
from worker.sql import Statements
from worker.tokens import TokenCounter

log = structlog.get_logger(__name__)

WRITE_DELAY: Final = 0.25  # seconds: the embedding ledger's (worker.ledger.WRITE_DELAY)
RETRY_SECONDS: Final = 1.0  # after a write failed in an outage
CHARS_PER_TOKEN: Final = 4.0  # until the API has counted some: its usual rate for English text

Key = tuple[datetime.date, str, str]  # day (UTC), tenant ('' for none), model


@dataclasses.dataclass
class Tally:
    requests: int = 0
    inputs: int = 0
    tokens: int = 0
    saved_inputs: int = 0
    saved_tokens: int = 0

    def add(self, other: Tally) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))


class UsageTable(Protocol):
    @property
    def enabled(self) -> bool: ...
    async def add(self, tallies: dict[Key, Tally]) -> None: ...
    def attach(self, usage: Usage) -> None: ...


Carry = Callable[[asyncpg.Connection], Awaitable[None]]


class UsageRows:
    """``embedding_usage`` in PostgreSQL, through the store's pool; ``enabled`` once the table is
    there (a schema migrated before it has none, and runs without)."""

    def __init__(self, sql: Statements, pool: Callable[[], asyncpg.Pool | None]) -> None:
        self._sql = sql
        self._pool = pool
        self._usage: Usage | None = None  # whose pending counts a transaction carries
        self.exists = False  # set by the store when it finds the table

    @property
    def enabled(self) -> bool:
        return self.exists

    def attach(self, usage: Usage) -> None:
        self._usage = usage

    async def add(self, tallies: dict[Key, Tally]) -> None:
        pool = self._pool()
        if pool is None:
            raise DatabaseUnavailable("not connected yet")
        try:
            async with pool.acquire() as conn:
                await conn.execute(self._sql.add_usage, *_columns(tallies))
        except OUTAGE_ERRORS as exc:
            raise DatabaseUnavailable(f"usage write failed: {describe(exc)}") from exc

    @contextlib.asynccontextmanager
    async def carried(self) -> AsyncIterator[Carry]:
        """Around a transaction that makes vectors durable: ``carry(conn)``, inside it, adds every
        count pending so far (in a savepoint: a refusal cannot undo the transaction's rows), and
        they go back to pending unless the transaction commits."""
        taken: dict[Key, Tally] = {}

        async def carry(conn: asyncpg.Connection) -> None:
            nonlocal taken
            if self._usage is None or not self.exists:
                return
            taken = self._usage.take()
            if not taken:
                return
            try:
                async with conn.transaction():
                    await conn.execute(self._sql.add_usage, *_columns(taken))
            except OUTAGE_ERRORS:
                raise
            except asyncpg.PostgresError as exc:  # refused: counted nowhere, the rows go on
                log.warning("usage_write_failed", rows=len(taken), error=describe(exc))
                taken = {}

        try:
            yield carry
        except BaseException:
            if taken and self._usage is not None:
                self._usage.put_back(taken)
            raise


class Usage:
    """This process's counts, written in the background."""

    def __init__(
        self,
        table: UsageTable,
        model: str,
        tokens: TokenCounter,
        *,
        delay: float = WRITE_DELAY,
        retry: float = RETRY_SECONDS,
        today: Callable[[], datetime.date] = lambda: datetime.datetime.now(datetime.UTC).date(),
    ) -> None:
        self._table = table
        self._model = model
        self._tokens = tokens
        self._delay = delay
        self._retry = retry
        self._wake = asyncio.Event()
        self._today = today
        self._pending: dict[Key, Tally] = {}
        self._chars = 0  # of inputs bought, and the tokens the API counted for them
        self._counted = 0
        self._task = asyncio.get_running_loop().create_task(self._write_loop(), name="usage-writer")
        table.attach(self)

    def bought(self, texts: Sequence[str], tenants: Sequence[str | None], prompt_tokens: int | None) -> None:
        """One answered request: ``texts`` embedded for ``tenants``, ``prompt_tokens`` by the API."""
        if not texts:
            return
        lengths = [len(text) for text in texts]
        if prompt_tokens is None:
            shares = [self._tokens.count(text) for text in texts]
        else:
            shares = _shared(prompt_tokens, lengths)
            self._chars += sum(lengths)
            self._counted += prompt_tokens
        by_tenant: dict[str | None, Tally] = {}  # one tally and one metric update per tenant
        for tenant, share in zip(tenants, shares, strict=True):
            tally = by_tenant.setdefault(tenant, Tally())
            tally.inputs += 1
            tally.tokens += share
        by_tenant[tenants[0]].requests = 1
        for tenant, tally in by_tenant.items():
            self._tally(tenant).add(tally)
            metrics.EMBEDDING_TOKENS.labels(tenant=tenant or "", model=self._model).inc(tally.tokens)
        self._wake.set()

    def saved(self, tenant: str | None, texts: Sequence[str]) -> None:
        """Inputs a document did not buy: stored already, kept in the ledger, or being bought."""
        if not texts:
            return
        rate = self._counted / self._chars if self._chars else 1 / CHARS_PER_TOKEN
        estimate = round(sum(map(len, texts)) * rate)
        tally = self._tally(tenant)
        tally.saved_inputs += len(texts)
        tally.saved_tokens += estimate
        metrics.EMBEDDING_TOKENS_SAVED.labels(tenant=tenant or "", model=self._model).inc(estimate)
        self._wake.set()

    def take(self) -> dict[Key, Tally]:
        """Every count pending, to be written now (``put_back`` if that fails)."""
        taken, self._pending = self._pending, {}
        return taken

    def put_back(self, tallies: dict[Key, Tally]) -> None:
        for key, tally in tallies.items():
            self._pending.setdefault(key, Tally()).add(tally)
        self._wake.set()

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self._write()

    def _tally(self, tenant: str | None) -> Tally:
        key = (self._today(), tenant or "", self._model)
        if (tally := self._pending.get(key)) is None:
            tally = self._pending[key] = Tally()
        return tally

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(self._delay)
            self._wake.clear()
            if not await self._write():
                await asyncio.sleep(self._retry)
                self._wake.set()

    async def _write(self) -> bool:
        """Write what is pending; False if an outage kept it for the next write."""
        if not self._pending or not self._table.enabled:
            return True
        writing = self.take()
        try:
            await self._table.add(writing)
        except DatabaseUnavailable:  # added to what the next write carries
            self.put_back(writing)
            return False
        except (DependencyError, asyncpg.PostgresError) as exc:  # refused: counted nowhere
            log.warning("usage_write_failed", rows=len(writing), error=describe(exc))
        return True


def _columns(tallies: dict[Key, Tally]) -> list[list[Any]]:
    keys = sorted(tallies)  # in key order: two workers adding the same rows cannot deadlock
    columns: list[list[Any]] = [[k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]]
    for field in dataclasses.fields(Tally):
        columns.append([getattr(tallies[k], field.name) for k in keys])
    return columns


def _shared(total: int, weights: Sequence[int]) -> list[int]:
    """``total`` split in proportion to ``weights``, in whole numbers that add up to it exactly
    (largest remainders first)."""
    whole = sum(weights)
    if whole == 0:
        return [total // len(weights) + (i < total % len(weights)) for i in range(len(weights))]
    exact = [total * w / whole for w in weights]
    shares = [int(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: exact[i] - shares[i], reverse=True)
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares
