"""Embedding through an OpenAI-compatible ``POST {EMBEDDING_URL}/embeddings``.

One shared ``aiohttp.ClientSession`` whose connector is sized to the concurrency cap, explicit
timeouts, answers matched by their ``index`` (servers may reorder them), base64 or float
answers alike. HTTP failures become typed errors: the retry policy and the dead-letter path
read their type, never their text.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import aiohttp
import numpy as np
import numpy.typing as npt
import orjson

from worker import metrics
from worker.errors import EmbeddingProtocolError, EmbeddingUnavailable, InputRejected, RecordError
from worker.limits import AdaptiveConcurrency, Budget
from worker.settings import Settings

Vector = npt.NDArray[np.float32]

# Statuses that say "this input can never be embedded": the record is at fault.
_REJECTED = frozenset({400, 413, 422})
_MAX_RETRY_AFTER = 60.0


class Embedder(Protocol):
    async def embed(self, texts: Sequence[str]) -> list[Vector]:
        """One vector per text, in order. Raises InputRejected or EmbeddingUnavailable."""
        ...


KNOWN_GOOD_INPUT = "health check"


async def probe(embedder: Embedder) -> None:
    """Embed an input any model takes. An API that refuses even it refuses every record (a setting
    it does not accept, such as `dimensions` for a model without it): that is an outage to wait
    out and report, not a reason to dead-letter records."""
    try:
        await embedder.embed([KNOWN_GOOD_INPUT])
    except InputRejected as exc:
        raise EmbeddingUnavailable(
            f"the embedding API refuses every input, {KNOWN_GOOD_INPUT!r} too ({exc}); "
            "check EMBEDDING_MODEL, EMBEDDING_DIMENSIONS and EMBEDDING_SEND_DIMENSIONS",
            status=400,
        ) from exc


class OpenAIEmbedder:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._url = settings.embedding_url.rstrip("/") + "/embeddings"
        self._headers = {"Content-Type": "application/json"}
        if settings.api_key:
            self._headers["Authorization"] = f"Bearer {settings.api_key}"
        self.concurrency = AdaptiveConcurrency(settings.embedding_concurrency)
        self._budget = Budget(
            requests_per_minute=settings.embedding_max_rpm, tokens_per_minute=settings.embedding_max_tpm
        )
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> OpenAIEmbedder:
        connector = aiohttp.TCPConnector(
            limit=self._settings.embedding_concurrency, ttl_dns_cache=300, enable_cleanup_closed=True
        )
        timeout = aiohttp.ClientTimeout(
            total=self._settings.embedding_timeout, sock_connect=min(10.0, self._settings.embedding_timeout)
        )
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, headers=self._headers, json_serialize=_dumps
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def embed(self, texts: Sequence[str]) -> list[Vector]:
        assert self._session is not None, "use OpenAIEmbedder as an async context manager"
        body: dict[str, Any] = {"model": self._settings.embedding_model, "input": list(texts)}
        if self._settings.embedding_send_dimensions:
            body["dimensions"] = self._settings.embedding_dimensions
        if self._settings.embedding_encoding == "base64":
            body["encoding_format"] = "base64"
        await self._budget.spend(sum(map(len, texts)))
        async with self.concurrency.slot():
            started = time.perf_counter()
            status = "error"
            try:
                async with self._session.post(self._url, json=body) as response:
                    status = str(response.status)
                    payload = await response.read()
                    if response.status != 200:
                        raise _http_error(
                            response.status, response.headers, self._redact(payload), len(texts)
                        )
            except (aiohttp.ClientError, TimeoutError) as exc:
                message = self._redact(f"{type(exc).__name__}: {exc}".encode()).decode()
                raise EmbeddingUnavailable(f"embedding request failed: {message}") from exc
            finally:
                latency = time.perf_counter() - started
                metrics.EMBEDDING_REQUESTS.labels(status=status).inc()
                metrics.EMBEDDING_SECONDS.observe(latency)
                if self._settings.embedding_adaptive:
                    if status == "429":
                        self.concurrency.throttled()
                    elif status == "200":
                        self.concurrency.succeeded(latency)
        metrics.EMBEDDING_INPUTS.inc(len(texts))
        return parse_embeddings(payload, len(texts), self._settings.embedding_dimensions)

    def _redact(self, payload: bytes) -> bytes:
        """Some providers echo the key they were given: never let it reach a log or a dead letter."""
        key = self._settings.api_key
        return payload.replace(key.encode(), b"**********") if key else payload

    async def ping(self) -> None:
        """Cheap reachability check for /readyz: any HTTP answer means the API is there."""
        assert self._session is not None
        try:
            async with self._session.get(
                self._settings.embedding_url, timeout=aiohttp.ClientTimeout(total=3)
            ):
                pass
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise EmbeddingUnavailable(f"embedding API unreachable: {type(exc).__name__}") from exc


def parse_embeddings(payload: bytes, count: int, dimensions: int) -> list[Vector]:
    """Decode an OpenAI embeddings answer into ``count`` vectors ordered by their ``index``."""
    try:
        data = orjson.loads(payload)["data"]
        vectors: list[Vector | None] = [None] * count
        for item in data:
            embedding = item["embedding"]
            if isinstance(embedding, str):
                vector = np.frombuffer(base64.b64decode(embedding), dtype="<f4").astype(
                    np.float32, copy=False
                )
            else:
                vector = np.asarray(embedding, dtype=np.float32)
            index = item["index"]
            if not isinstance(index, int) or not 0 <= index < count:
                raise _bad_index(index, count)
            vectors[index] = vector
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError, ValueError) as exc:
        raise EmbeddingProtocolError(f"embedding answer is not in the OpenAI format: {exc!r:.200}") from exc
    result: list[Vector] = []
    for index, found in enumerate(vectors):
        if found is None:
            raise EmbeddingProtocolError(f"embedding answer has no item with index {index}")
        if found.shape != (dimensions,):
            raise EmbeddingProtocolError(
                f"embedding API returned vectors of shape {found.shape}; EMBEDDING_DIMENSIONS is {dimensions}"
            )
        result.append(found)
    return result


def _bad_index(index: object, count: int) -> ValueError:
    return ValueError(f"item with index {index!r} does not answer one of {count} inputs")


def _http_error(status: int, headers: Any, payload: bytes, count: int) -> Exception:
    message = _error_message(payload)
    if status in _REJECTED:
        return InputRejected(f"embedding API answered {status} for {count} input(s): {message}")
    retry_after = None
    if status == 429:
        try:
            retry_after = min(float(headers.get("Retry-After", "")), _MAX_RETRY_AFTER)
        except ValueError:
            retry_after = None
    return EmbeddingUnavailable(
        f"embedding API answered {status}: {message}", status=status, retry_after=retry_after
    )


def _error_message(payload: bytes) -> str:
    try:
        error = orjson.loads(payload)["error"]
        return str(error.get("message", error))[:300]
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return payload[:300].decode("utf-8", "replace")


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()


class EmbeddingBatcher:
    """Fill embedding requests across documents, partitions and tenants.

    ``submit`` returns a future per text. A dispatcher forms a request when one of
    ``max_outstanding`` request slots is free and it has ``batch_size`` inputs or
    ``batch_chars`` characters pending, or its oldest input has waited ``linger`` seconds.
    Requests are filled round-robin across tenants, one input each in turn, so a tenant that
    floods (or keeps failing) gets its share of the embedding capacity and no more.
    """

    def __init__(
        self,
        send: Callable[[list[str]], Awaitable[Sequence[Vector | RecordError]]],
        *,
        batch_size: int,
        batch_chars: int,
        linger: float,
        max_outstanding: int,
    ) -> None:
        self._send = send
        self._batch_size = batch_size
        self._batch_chars = batch_chars
        self._linger = linger
        self._queues: dict[str | None, collections.deque[tuple[str, asyncio.Future[Vector]]]] = {}
        self._turns: collections.deque[str | None] = collections.deque()  # tenants with work, in turn order
        self._count = 0
        self._chars = 0
        self._oldest: float | None = None
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(max_outstanding)
        self._requests: dict[asyncio.Task[None], list[asyncio.Future[Vector]]] = {}
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch(), name="embed-dispatcher")

    def submit(self, text: str, tenant: str | None = None) -> asyncio.Future[Vector]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Vector] = loop.create_future()
        queue = self._queues.get(tenant)
        if queue is None:
            queue = self._queues[tenant] = collections.deque()
            self._turns.append(tenant)
        queue.append((text, future))
        self._count += 1
        self._chars += len(text)
        if self._oldest is None:
            self._oldest = loop.time()
        self._wakeup.set()
        return future

    @property
    def pending(self) -> int:
        return self._count

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
                            await asyncio.wait_for(self._wakeup.wait(), remaining)
                    else:
                        await self._wakeup.wait()
                texts, futures = self._take()
            except BaseException:
                self._slots.release()
                raise
            task = loop.create_task(self._request(texts, futures), name="embed-request")
            self._requests[task] = futures
            task.add_done_callback(self._request_done)

    def _request_done(self, task: asyncio.Task[None]) -> None:
        for future in self._requests.pop(task, ()):
            if not future.done():  # the task was cancelled before it could answer them
                future.cancel()
        self._slots.release()

    def _take(self) -> tuple[list[str], list[asyncio.Future[Vector]]]:
        """One input from each tenant in turn until the request is full."""
        texts: list[str] = []
        futures: list[asyncio.Future[Vector]] = []
        chars = 0
        while self._turns and len(texts) < self._batch_size:
            tenant = self._turns[0]
            queue = self._queues[tenant]
            text, future = queue[0]
            if texts and chars + len(text) > self._batch_chars:
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
            chars += len(text)
        self._count -= len(texts)
        self._chars -= chars
        self._oldest = asyncio.get_running_loop().time() if self._count else None
        return texts, futures

    async def _request(self, texts: list[str], futures: list[asyncio.Future[Vector]]) -> None:
        if not texts:
            return
        try:
            results = await self._send(texts)
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
            for _, future in queue:
                future.cancel()
        self._queues.clear()
        self._turns.clear()
        self._count = self._chars = 0
        for task in list(self._requests):
            task.cancel()
        await asyncio.gather(self._dispatcher, *self._requests, return_exceptions=True)
