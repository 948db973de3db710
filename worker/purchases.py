"""Embeddings bought once per content, across documents, assignments and processes.

    wanted content -> joined (being bought here) | paid (ledger, not yet written) | stored
      -> claimed in the ledger and bought here | awaited (another process is buying it)

One registry per process, outliving the pipelines of successive assignments: a purchase already
sent to the API when its documents were abandoned (a revoke, a stop) is kept until it is
answered, joinable by the next pipeline, and its vector goes to the ledger either way. Only
what was never sent is withdrawn: nobody has paid for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from worker import metrics
from worker.chunk import Chunk
from worker.dependency import Dependencies
from worker.embed import Embedder
from worker.embedding import EmbeddingStage
from worker.ledger import Ledger, PaidEmbeddings
from worker.settings import Settings
from worker.tokens import TokenCounter
from worker.types import Vector
from worker.usage import Usage, UsageTable


class Wanting(Protocol):
    """A document wanting its chunks' vectors (the pipeline's Prepared)."""

    @property
    def chunks(self) -> Sequence[Chunk]: ...
    @property
    def tenant(self) -> str | None: ...
    @property
    def held(self) -> dict[bytes, Purchase]: ...


Lookup = Callable[[list[bytes]], Awaitable[Mapping[bytes, Vector]]]


class Buyer(Protocol):
    """The embedding stage, as purchases see it."""

    def submit(self, text: str, tenant: str | None = None) -> asyncio.Future[Vector]: ...
    def withdraw(self, future: asyncio.Future[Vector]) -> bool: ...


@dataclass(eq=False)
class Purchase:
    """One content's embedding: the future its holders await, and how many prepared documents
    hold it."""

    digest: bytes
    vector: asyncio.Future[Vector]
    holders: int = 1
    bought: asyncio.Future[Vector] | None = None  # this process's request (None: another one buys it)

    @property
    def failed(self) -> bool:
        return self.vector.done() and (self.vector.cancelled() or self.vector.exception() is not None)


class Purchases:
    """Embeddings bought and not yet stored, by content digest (a process embeds with one model).

    A document wanting a chunk whose content is being bought joins that purchase. A purchase is
    forgotten (later documents find the vector in the store or the ledger, or buy afresh) once a
    document holding it is stored, once it fails, or once the last document holding it lets go
    and it is answered or withdrawn.
    """

    def __init__(self, buyer: Buyer, ledger: Ledger, usage: Usage | None = None) -> None:
        self._buyer = buyer
        self._ledger = ledger
        self._usage = usage
        self._by_digest: dict[bytes, Purchase] = {}

    def join(self, digest: bytes) -> Purchase | None:
        """Hold the purchase of this content, if one is in flight and has not failed."""
        purchase = self._by_digest.get(digest)
        if purchase is None or purchase.failed:  # failed: its done callback has not run yet
            return None
        purchase.holders += 1
        return purchase

    async def supply(self, documents: Sequence[Wanting], known: Lookup) -> list[list[asyncio.Future[Vector]]]:
        """Each document's chunk vectors (as futures), buying only what was never paid for:
        contents being bought here for other documents are joined, paid (``known``: stored or in
        the ledger) ones reused, the rest acquired. Purchases are held (in each document's
        ``held``) before the lookups, so none can pass from in flight to paid unseen between them."""
        for d in documents:
            for chunk in d.chunks:
                if chunk.digest not in d.held and (purchase := self.join(chunk.digest)):
                    d.held[chunk.digest] = purchase
        unheld = {c.digest for d in documents for c in d.chunks if c.digest not in d.held}
        found: dict[bytes, Vector] = {}
        for digest in unheld:
            if (vector := self._ledger.unwritten(digest)) is not None:  # not in the table yet
                found[digest] = vector
        if hashes := sorted(unheld - found.keys()):
            found |= await known(hashes)
        missing = unheld - found.keys()
        wanted = {c.digest: (c.content, d.tenant) for d in documents for c in d.chunks if c.digest in missing}
        acquired = await self.acquire(wanted)  # each held once, by its first document
        supplied = []
        for d in documents:
            futures: list[asyncio.Future[Vector]] = []
            for chunk in d.chunks:
                purchase = d.held.get(chunk.digest)
                if purchase is None and chunk.digest in found:
                    futures.append(_resolved(found[chunk.digest]))
                    continue
                if purchase is None:
                    purchase = acquired.pop(chunk.digest, None) or self.join(chunk.digest)
                assert purchase is not None, "every content wanted was acquired"
                d.held[chunk.digest] = purchase
                futures.append(purchase.vector)
            supplied.append(futures)
        metrics.EMBEDDINGS_REUSED.inc(sum(len(d.chunks) for d in documents) - len(wanted))
        if self._usage is not None:
            self._count_saved(documents, set(wanted))
        return supplied

    def _count_saved(self, documents: Sequence[Wanting], bought: set[bytes]) -> None:
        """Every chunk but the first wanting each content bought here was not bought again."""
        assert self._usage is not None
        for d in documents:
            saved = []
            for chunk in d.chunks:
                if chunk.digest in bought:
                    bought.discard(chunk.digest)
                else:
                    saved.append(chunk.content)
            self._usage.saved(d.tenant, saved)

    async def acquire(self, wanted: Mapping[bytes, tuple[str, str | None]]) -> dict[bytes, Purchase]:
        """Purchases of contents nobody here is buying (call ``join`` first), each held once:
        bought here, or awaited where another process announced it is buying them."""
        if not wanted:
            return {}
        claim = asyncio.ensure_future(self._ledger.claim(list(wanted)))
        try:
            mine = await asyncio.shield(claim)
        except asyncio.CancelledError:  # announced, and then abandoned: let others buy them
            claim.add_done_callback(self._abandon)
            raise
        taken: dict[bytes, Purchase] = {}
        for digest, (text, tenant) in wanted.items():
            if (joined := self.join(digest)) is not None:  # acquired meanwhile for another document
                if digest in mine and joined.bought is None:  # awaited from another process: not ours
                    self._ledger.abandon([digest])
                taken[digest] = joined
            elif digest in mine:
                taken[digest] = self._buy(digest, text, tenant)
            else:
                taken[digest] = self._await_elsewhere(digest, text, tenant)
        return taken

    def _abandon(self, claim: asyncio.Future[set[bytes]]) -> None:
        if not claim.cancelled() and claim.exception() is None:
            self._ledger.abandon(claim.result())

    def release(self, held: Iterable[Purchase], *, stored: bool) -> None:
        """A document lets go of its purchases; ``stored``: its chunks are in the store now."""
        for purchase in held:
            purchase.holders -= 1
            if stored:
                self._forget(purchase)
                self._ledger.stored(purchase.digest)  # not written twice, if not written yet
            elif purchase.holders <= 0:
                self._let_go(purchase)

    def __len__(self) -> int:
        return len(self._by_digest)

    def __iter__(self) -> Iterator[Purchase]:
        return iter(list(self._by_digest.values()))

    def _buy(self, digest: bytes, text: str, tenant: str | None) -> Purchase:
        bought = self._submit(digest, text, tenant)
        return self._register(Purchase(digest, bought, bought=bought))

    def _await_elsewhere(self, digest: bytes, text: str, tenant: str | None) -> Purchase:
        """Another process is buying it: wait for the ledger to show it, or to hand it over."""
        metrics.EMBEDDINGS_AWAITED.inc()
        vector: asyncio.Future[Vector] = asyncio.get_running_loop().create_future()
        purchase = self._register(Purchase(digest, vector))
        watched = self._ledger.watch(digest)

        def seen(w: asyncio.Future[Vector | None]) -> None:
            if vector.done():  # let go of meanwhile: a purchase taken over for it is not made
                if not w.cancelled() and w.result() is None:
                    self._ledger.abandon([digest])
                return
            if w.cancelled():
                vector.cancel()
            elif (found := w.result()) is not None:
                vector.set_result(found)
            else:  # that process gave up or died, and this one took the purchase over
                purchase.bought = self._submit(digest, text, tenant)
                _forward(purchase.bought, vector)

        watched.add_done_callback(seen)
        vector.add_done_callback(lambda _: watched.cancel())  # let go of, or answered: stop watching
        return purchase

    def _submit(self, digest: bytes, text: str, tenant: str | None) -> asyncio.Future[Vector]:
        bought = self._buyer.submit(text, tenant)
        bought.add_done_callback(lambda f: self._ledger.settled(digest, f))  # kept, or announced no more
        return bought

    def _register(self, purchase: Purchase) -> Purchase:
        self._by_digest[purchase.digest] = purchase
        purchase.vector.add_done_callback(lambda _: self._settled(purchase))
        return purchase

    def _let_go(self, purchase: Purchase) -> None:
        """No document holds it any more: withdraw it unless it is paid for (sent, or answered)."""
        if purchase.vector.done():
            self._forget(purchase)
        elif purchase.bought is None:
            purchase.vector.cancel()  # only awaited: stop watching
        elif self._buyer.withdraw(purchase.bought):
            self._forget(purchase)
        # else sent: it stays, joinable, until answered (its vector goes to the ledger); then forgotten

    def _settled(self, purchase: Purchase) -> None:
        if purchase.failed or purchase.holders <= 0:
            self._forget(purchase)

    def _forget(self, purchase: Purchase) -> None:
        if self._by_digest.get(purchase.digest) is purchase:  # not a later purchase of the content
            del self._by_digest[purchase.digest]


def _forward(source: asyncio.Future[Vector], target: asyncio.Future[Vector]) -> None:
    """``target`` gets ``source``'s outcome."""

    def done(_: asyncio.Future[Vector]) -> None:
        if target.done():
            return
        if source.cancelled():
            target.cancel()
        elif (exc := source.exception()) is not None:
            target.set_exception(exc)
        else:
            target.set_result(source.result())

    source.add_done_callback(done)


async def vectors_of(futures: list[asyncio.Future[Vector]]) -> list[Vector]:
    """The futures' vectors, or the first failure as soon as there is one.

    Never cancels them (gather would, were its caller cancelled): other documents may be waiting
    for the same purchases.
    """
    if futures:
        await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
    return settled_vectors(futures)


def settled_vectors(futures: list[asyncio.Future[Vector]]) -> list[Vector]:
    """The vectors of futures all done, or one of them failed: the first failure raised (a
    cancelled one, at close, raises CancelledError)."""
    for future in futures:
        if future.done() and not future.cancelled() and (exc := future.exception()) is not None:
            raise exc
    return [future.result() for future in futures]


def _resolved(vector: Vector) -> asyncio.Future[Vector]:
    future: asyncio.Future[Vector] = asyncio.get_running_loop().create_future()
    future.set_result(vector)
    return future


@dataclass(eq=False)
class Buying:
    """How a process buys one model's embeddings: the embedding stage, the ledger, the purchases
    made through them and the usage they count (the Worker's for ingestion, each Filler's)."""

    stage: EmbeddingStage
    ledger: Ledger
    purchases: Purchases
    usage: Usage

    @classmethod
    def of(
        cls,
        embedder: Embedder,
        paid: PaidEmbeddings,
        counted: UsageTable,
        dependencies: Dependencies,
        settings: Settings,
    ) -> Buying:
        usage = Usage(counted, settings.embedding_model, TokenCounter(settings.embedding_tokenizer))
        stage = EmbeddingStage(embedder, dependencies.embedding, settings, usage)
        ledger = Ledger(paid, dependencies.database)
        return cls(stage, ledger, Purchases(stage, ledger, usage), usage)

    async def close(self, deadline: float) -> None:
        """Let the requests already sent be answered until ``deadline`` (time.monotonic()) and
        keep their vectors in the ledger (they are paid for); write the counts."""
        await self.stage.finish(within=max(0.0, deadline - time.monotonic()))
        await self.ledger.close(within=max(1.0, deadline - time.monotonic()))  # a write takes a moment
        await self.usage.close()
