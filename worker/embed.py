"""Embedding through an OpenAI-compatible ``POST {EMBEDDING_URL}/embeddings``.

One shared ``aiohttp.ClientSession`` whose connector is sized to the concurrency cap, explicit
timeouts, answers matched by their ``index`` (servers may reorder them), base64 or float
answers alike; every request, the probe's too, carries EMBEDDING_EXTRA_BODY's fields. HTTP
failures become typed errors: the retry policy and the dead-letter path read their type, never
their text.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Sequence
from typing import Any, Protocol

import aiohttp
import numpy as np
import orjson
import pybase64
import structlog

from worker import logs, metrics
from worker.errors import (
    ConfigError,
    EmbeddingProtocolError,
    EmbeddingUnavailable,
    InputRejected,
    TooManyInputs,
)
from worker.limits import MAX_RETRY_AFTER, AdaptiveConcurrency, Budget, ProviderPacer, retry_after
from worker.settings import Settings, read_secret_file
from worker.types import Vector

log = structlog.get_logger()

# Statuses that say "this input can never be embedded": the record is at fault.
_REJECTED = frozenset({400, 413, 422})
# TEI's 413: "batch size 64 > maximum allowed batch size 32"
_BATCH_LIMIT = re.compile(r"maximum allowed batch size (\d+)")


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
        self._extra_body = settings.extra_body  # a provider's own fields (input_type, user), parsed once
        self._headers = {"Content-Type": "application/json"}
        self._key = ApiKey(settings)
        self.concurrency = AdaptiveConcurrency(settings.embedding_concurrency)
        self.pacer = ProviderPacer()
        self._budget = Budget(
            requests_per_minute=settings.embedding_max_rpm, tokens_per_minute=settings.embedding_max_tpm
        )
        self._session: aiohttp.ClientSession | None = None

    def use(self, settings: Settings) -> None:
        """Embed with these settings' model and dimensions from now on (another generation of the
        index; the endpoint, key, pacing and budget stay)."""
        self._settings = settings

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
        body: dict[str, Any] = {
            **self._extra_body,
            "model": self._settings.embedding_model,
            "input": list(texts),
        }
        if self._settings.embedding_send_dimensions:
            body["dimensions"] = self._settings.embedding_dimensions
        if self._settings.embedding_encoding == "base64":
            body["encoding_format"] = "base64"
        await self._budget.spend(sum(map(len, texts)))
        await self.pacer.wait(sum(max(1, -(-len(text) // 4)) for text in texts))  # tokens, roughly
        try:
            payload = await self._post(body, len(texts))
        finally:
            self.pacer.done()  # answered, failed or cancelled: a first request lets the others go
        metrics.EMBEDDING_INPUTS.inc(len(texts))
        return parse_embeddings(payload, len(texts), self._settings.embedding_dimensions)

    async def _post(self, body: dict[str, Any], count: int) -> bytes:
        """One request; on a 401 with EMBEDDING_API_KEY_FILE, the file is read again and the
        request sent again, twice at most (the second time after a pause): a rotated key is
        picked up without a restart, and a refused one fails as any other answer does."""
        for pause in (0.0, KEY_REREAD_PAUSE, None):
            try:
                return await self._send(body, count)
            except EmbeddingUnavailable as exc:
                if exc.status != 401 or pause is None or not self._key.path:
                    raise
            await asyncio.sleep(pause)
            self._key.reread()
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _send(self, body: dict[str, Any], count: int) -> bytes:
        assert self._session is not None
        async with self.concurrency.slot():
            started = time.perf_counter()
            status = "error"
            try:
                async with self._session.post(self._url, json=body, headers=self._key.header()) as response:
                    status = str(response.status)
                    self.pacer.observe(response.headers, throttled=response.status == 429)
                    payload = await response.read()
                    if response.status != 200:
                        raise _http_error(response.status, response.headers, self._redact(payload), count)
            except (aiohttp.ClientError, TimeoutError) as exc:
                message = self._redact(f"{type(exc).__name__}: {exc}".encode()).decode()
                raise EmbeddingUnavailable(f"embedding request failed: {message}") from exc
            finally:
                latency = time.perf_counter() - started
                metrics.EMBEDDING_REQUESTS.labels(status=status).inc()
                metrics.EMBEDDING_SECONDS.observe(latency)
                if self._settings.embedding_adaptive and not self.pacer.paced:  # else it paces
                    if status == "429":
                        self.concurrency.throttled()
                    elif status == "200":
                        self.concurrency.succeeded(latency)
        return payload

    def _redact(self, payload: bytes) -> bytes:
        """Some providers echo the key they were given: never let it reach a log or a dead letter."""
        for key in self._key.seen:
            payload = payload.replace(key.encode(), b"**********")
        return payload

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


KEY_REREAD_PAUSE = 1.0  # seconds between the two reads of a key file (a Secret being swapped)


class ApiKey:
    """The bearer token: EMBEDDING_API_KEY, or EMBEDDING_API_KEY_FILE's text, read again on request
    (a Kubernetes Secret's file is replaced in place when the Secret is rotated)."""

    def __init__(self, settings: Settings) -> None:
        self.path = settings.embedding_api_key_file
        self.value = settings.api_key
        self.seen = [self.value] if self.value else []  # every key used, masked wherever it turns up

    def header(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.value}"} if self.value else {}

    def reread(self) -> None:
        """Read the file again: another key in it is used from now on."""
        try:
            value = read_secret_file("EMBEDDING_API_KEY_FILE", self.path)
        except ConfigError as exc:
            log.warning("api_key_file_unreadable", error=str(exc))
            return
        if value == self.value:
            log.warning("api_key_refused", file=self.path, changed=False)
            return
        self.value = value
        self.seen.append(value)
        logs.hide(value)
        log.info("api_key_reread", file=self.path, changed=True)


class Embeddings(list[Vector]):
    """An answer's vectors, and the tokens the API says it counted (None where it sends none)."""

    prompt_tokens: int | None = None


def parse_embeddings(payload: bytes, count: int, dimensions: int) -> Embeddings:
    """Decode an OpenAI embeddings answer into ``count`` vectors ordered by their ``index``."""
    try:
        answer = orjson.loads(payload)
        data = answer["data"]
        vectors: list[Vector | None] = [None] * count
        joined = _decode_together(data, dimensions)
        for i, item in enumerate(data):
            vector = joined[i] if joined is not None else _decode(item["embedding"])
            index = item["index"]
            if not isinstance(index, int) or not 0 <= index < count:
                raise _bad_index(index, count)
            vectors[index] = vector
    except (orjson.JSONDecodeError, KeyError, TypeError, IndexError, ValueError) as exc:
        raise EmbeddingProtocolError(f"embedding answer is not in the OpenAI format: {exc!r:.200}") from exc
    result = Embeddings()
    usage = answer.get("usage")
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0:
        result.prompt_tokens = tokens
    for index, found in enumerate(vectors):
        if found is None:
            raise EmbeddingProtocolError(f"embedding answer has no item with index {index}")
        if found.shape != (dimensions,):
            raise EmbeddingProtocolError(
                f"embedding API returned vectors of shape {found.shape}; EMBEDDING_DIMENSIONS is {dimensions}"
            )
        result.append(found)
    return result


def _decode(embedding: Any) -> Vector:
    """One answer's vector: base64 of little-endian float32 (decoded leniently, as base64 does), or a list."""
    if isinstance(embedding, str):
        return np.frombuffer(pybase64.b64decode(embedding), dtype="<f4").astype(np.float32, copy=False)
    return np.asarray(embedding, dtype=np.float32)


def _decode_together(data: list[Any], dimensions: int) -> np.ndarray | None:
    """The answer's base64 vectors decoded in one call, one row each, where each is the exact
    encoding of ``dimensions`` floats and needs no padding (dimensions a multiple of 3, as 384,
    768, 1536 and 3072 are): base64.b64decode of each cost a filler a tenth of its CPU on an
    instant embedder, pybase64 (SIMD) of them all together a fifteenth of that. None where that
    does not hold: each is then decoded (``_decode``) and checked alone."""
    size = dimensions * 4
    if not data or size % 3 or not isinstance(data, list):
        return None
    length = size // 3 * 4
    try:
        texts = [item["embedding"] for item in data]
    except (KeyError, TypeError):
        return None
    if not all(isinstance(t, str) and len(t) == length for t in texts):
        return None
    try:
        decoded = pybase64.b64decode("".join(texts), validate=True)
    except ValueError:  # binascii.Error: not base64
        return None
    return np.frombuffer(decoded, dtype="<f4").astype(np.float32, copy=False).reshape(len(texts), dimensions)


def _bad_index(index: object, count: int) -> ValueError:
    return ValueError(f"item with index {index!r} does not answer one of {count} inputs")


def _http_error(status: int, headers: Any, payload: bytes, count: int) -> Exception:
    message = _error_message(payload)
    if status in _REJECTED:
        message = f"embedding API answered {status} for {count} input(s): {message}"
        if (limit := _BATCH_LIMIT.search(message)) is not None and int(limit[1]) < count:
            return TooManyInputs(message, int(limit[1]))
        return InputRejected(message)
    wait = None
    if status == 429 and (wait := retry_after(headers)) is not None:
        wait = min(wait, MAX_RETRY_AFTER)
    message = f"embedding API answered {status}: {message}"
    return EmbeddingUnavailable(message, status=status, retry_after=wait)


def _error_message(payload: bytes) -> str:
    try:
        error = orjson.loads(payload)["error"]
        return str(error.get("message", error))[:300]
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
        return payload[:300].decode("utf-8", "replace")


def _dumps(obj: Any) -> str:
    return orjson.dumps(obj).decode()
