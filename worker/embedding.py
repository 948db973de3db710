"""The embedding stage: texts in, one vector (or the reason there is none) out per text.

    submit(text) -> batcher (requests filled across documents and tenants)
      -> the embedding API's circuit breaker (retries, outages waited out)
      -> the API client (worker.embed)

A request the API refuses, or that fails every attempt while the API is up, is split in halves
until the inputs at fault are alone: they get their RecordError, the rest their vectors. The
pipeline only submits texts and awaits futures.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable, Sequence

import structlog

from worker.dependency import Dependency
from worker.embed import Embedder, probe
from worker.errors import AttemptsExhausted, EmbeddingProtocolError, InputRejected, RecordError, TooManyInputs
from worker.retry import isolate, wait_within
from worker.settings import Settings
from worker.tokens import TokenCounter
from worker.types import Vector
from worker.usage import Usage

log = structlog.get_logger(__name__)


class EmbeddingStage:
    def __init__(
        self, embedder: Embedder, dependency: Dependency, settings: Settings, usage: Usage | None = None
    ) -> None:
        self._embedder = embedder
        self._dependency = dependency
        self._usage = usage
        self._attempts = settings.embedding_max_attempts
        self._deadline = settings.embedding_retry_deadline_seconds
        self._batcher = EmbeddingBatcher(
            self._request,
            batch_size=min(settings.embedding_batch_size, settings.embedding_max_inputs),
            batch_chars=settings.embedding_batch_chars,
            batch_tokens=settings.embedding_max_request_tokens,
            tokens=TokenCounter(settings.embedding_tokenizer).bound,
            linger=settings.embedding_linger_ms / 1000,
            max_outstanding=settings.embedding_concurrency,
        )

    def submit(self, text: str, tenant: str | None = None) -> asyncio.Future[Vector]:
        """A future for ``text``'s vector; it fails with the RecordError of an input at fault.

        A blank text is never sent: OpenAI answers 400 to an empty input, which would cost a
        refused request, a probe and the halving of the request it shared. Chunks are never
        blank (chunk.py strips them); this guards against anything else submitting one."""
        if not text.strip():
            refused: asyncio.Future[Vector] = asyncio.get_running_loop().create_future()
            refused.set_exception(InputRejected("an empty or whitespace-only input: not sent"))
            return refused
        return self._batcher.submit(text, tenant)

    def withdraw(self, future: asyncio.Future[Vector]) -> bool:
        """Cancel ``future``'s input unless it was sent already (then it is paid for): True if so."""
        return self._batcher.withdraw(future)

    @property
    def queued(self) -> int:
        """Inputs waiting for a request."""
        return self._batcher.queued

    async def finish(self, within: float) -> None:
        """Let requests already sent be answered (they are paid for) within ``within`` seconds,
        then cancel whatever is left, queued or in flight (its futures too)."""
        await self._batcher.answered(within)
        await self._batcher.close()

    async def _request(self, texts: list[str], tenants: list[str | None]) -> list[Vector | RecordError]:
        """One request; when the API refuses it (or it fails every attempt while the API is up),
        the inputs at fault are isolated. A refusal is first checked against an input any model
        takes (once per request, not at each split): an API that refuses that too refuses every
        record, and is waited out as an outage. An API that says how many inputs it takes
        (TEI's 413) gets this request in parts of that size, and no larger ones after it."""

        async def attempt(part: list[int]) -> list[Vector | RecordError]:
            inputs = [texts[i] for i in part]

            async def once() -> list[Vector]:
                try:
                    return await self._embedder.embed(inputs)
                except TooManyInputs:  # not the inputs' fault, nor the API's: no probe
                    raise
                except InputRejected:
                    if len(part) == len(texts):  # the whole request, not a half of it
                        await probe(self._embedder)  # EmbeddingUnavailable if it refuses all
                    raise

            try:
                vectors = await self._dependency.call(once, attempts=self._attempts, deadline=self._deadline)
            except TooManyInputs as exc:
                self._batcher.limit_inputs(exc.limit)
                parts = [part[start : start + exc.limit] for start in range(0, len(part), exc.limit)]
                return [
                    result for p in parts for result in await isolate(p, attempt, faults=faults, alone=alone)
                ]
            if self._usage is not None:
                tokens = getattr(vectors, "prompt_tokens", None)
                self._usage.bought(inputs, [tenants[i] for i in part], tokens)
            return list(vectors)

        async def alone(_: int, exc: Exception) -> Vector | RecordError:
            assert isinstance(exc, RecordError)
            return exc

        faults = (InputRejected, AttemptsExhausted)
        return await isolate(list(range(len(texts))), attempt, faults=faults, alone=alone)


class EmbeddingBatcher:
    """Fill embedding requests across documents, partitions and tenants.

    ``submit`` returns a future per text. A dispatcher forms a request when one of
    ``max_outstanding`` request slots is free and it has ``batch_size`` inputs or
    ``batch_chars`` characters pending, or its oldest input has waited ``linger`` seconds. A
    request holds at most ``batch_tokens`` tokens by ``tokens``, a count never below the API's.
    Requests are filled round-robin across tenants, one input each in turn, so a tenant that
    floods (or keeps failing) gets its share of the embedding capacity and no more.
    """

    def __init__(
        self,
        send: Callable[[list[str], list[str | None]], Awaitable[Sequence[Vector | RecordError]]],
        *,
        batch_size: int,
        batch_chars: int,
        linger: float,
        max_outstanding: int,
        batch_tokens: int | None = None,
        tokens: Callable[[str], int] = len,
    ) -> None:
        self._send = send
        self._batch_size = batch_size
        self._batch_chars = batch_chars
        self._batch_tokens = batch_tokens
        self._tokens = tokens
        self._linger = linger
        self._queues: dict[str | None, collections.deque[tuple[str, int, asyncio.Future[Vector]]]] = {}
        self._turns: collections.deque[str | None] = collections.deque()  # tenants with work, in turn order
        self._count = 0
        self._chars = 0
        self._oldest: float | None = None
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(max_outstanding)
        self._requests: dict[asyncio.Task[None], list[asyncio.Future[Vector]]] = {}
        self._sent: set[asyncio.Future[Vector]] = set()  # inputs of requests in flight
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch(), name="embed-dispatcher")

    def submit(self, text: str, tenant: str | None = None) -> asyncio.Future[Vector]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Vector] = loop.create_future()
        queue = self._queues.get(tenant)
        if queue is None:
            queue = self._queues[tenant] = collections.deque()
            self._turns.append(tenant)
        queue.append((text, self._tokens(text) if self._batch_tokens else 0, future))
        self._count += 1
        self._chars += len(text)
        if self._oldest is None:
            self._oldest = loop.time()
        self._wakeup.set()
        return future

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._slots.acquire()
            try:
                while True:
                    self._wakeup.clear()
                    if self._count >= self._batch_size or self._chars >= self._batch_chars:
                        break
                    if self._count and self._oldest is not None:
                        remaining = self._oldest + self._linger - loop.time()
                        if remaining <= 0:
                            break
                        with contextlib.suppress(TimeoutError):
                            await wait_within(self._wakeup.wait(), remaining)
                    else:
                        await self._wakeup.wait()
                texts, futures, tenants = self._take()
            except BaseException:
                self._slots.release()
                raise
            task = loop.create_task(self._request(texts, futures, tenants), name="embed-request")
            self._requests[task] = futures
            self._sent.update(futures)
            task.add_done_callback(self._request_done)

    @property
    def queued(self) -> int:
        return self._count

    def limit_inputs(self, limit: int) -> None:
        """The API said it takes at most ``limit`` inputs a request: no request holds more."""
        if limit < self._batch_size:
            log.warning(
                "embedding_inputs_limited",
                inputs=limit,
                hint=f"the API takes at most {limit} inputs a request; set EMBEDDING_MAX_INPUTS={limit}",
            )
            self._batch_size = max(limit, 1)

    def withdraw(self, future: asyncio.Future[Vector]) -> bool:
        """Cancel a queued input (``_take`` skips it); False once it was sent, or done."""
        if future.done() or future in self._sent:
            return False
        future.cancel()
        return True

    async def answered(self, within: float) -> None:
        """Wait, at most ``within`` seconds, for the requests in flight now to be answered."""
        if self._requests and within > 0:
            await asyncio.wait(list(self._requests), timeout=within)

    def _request_done(self, task: asyncio.Task[None]) -> None:
        for future in self._requests.pop(task, ()):
            self._sent.discard(future)
            if not future.done():  # the task was cancelled before it could answer them
                future.cancel()
        self._slots.release()

    def _take(self) -> tuple[list[str], list[asyncio.Future[Vector]], list[str | None]]:
        """One input from each tenant in turn until the request is full (and each one's tenant)."""
        texts: list[str] = []
        futures: list[asyncio.Future[Vector]] = []
        tenants: list[str | None] = []
        chars = tokens = 0
        while self._turns and len(texts) < self._batch_size:
            tenant = self._turns[0]
            queue = self._queues[tenant]
            text, cost, future = queue[0]
            if texts and chars + len(text) > self._batch_chars:
                break
            if texts and self._batch_tokens and tokens + cost > self._batch_tokens:
                break
            queue.popleft()
            self._turns.rotate(-1)
            if not queue:
                del self._queues[tenant]
                self._turns.remove(tenant)
            if future.cancelled():
                self._count -= 1
                self._chars -= len(text)
                continue
            texts.append(text)
            futures.append(future)
            tenants.append(tenant)
            chars += len(text)
            tokens += cost
        self._count -= len(texts)
        self._chars -= chars
        self._oldest = asyncio.get_running_loop().time() if self._count else None
        return texts, futures, tenants

    async def _request(
        self, texts: list[str], futures: list[asyncio.Future[Vector]], tenants: list[str | None]
    ) -> None:
        if not texts:
            return
        try:
            results = await self._send(texts, tenants)
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - handed to every waiting document as-is
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return
        if len(results) != len(futures):
            error = EmbeddingProtocolError(f"{len(results)} results for {len(futures)} inputs")
            for future in futures:
                if not future.done():
                    future.set_exception(error)
            return
        for future, result in zip(futures, results, strict=True):
            if future.done():
                continue
            if isinstance(result, RecordError):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def close(self) -> None:
        """Cancel the dispatcher, queued inputs and running requests (their futures too)."""
        self._dispatcher.cancel()
        for queue in self._queues.values():
            for _, _, future in queue:
                future.cancel()
        self._queues.clear()
        self._turns.clear()
        self._count = self._chars = 0
        for task in list(self._requests):
            task.cancel()
        await asyncio.gather(self._dispatcher, *self._requests, return_exceptions=True)
