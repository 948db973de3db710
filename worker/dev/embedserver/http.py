"""The OpenAI embeddings API (POST /v1/embeddings, GET /v1/models) and the admin API."""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import pybase64
from aiohttp import web

from worker.dev.embedserver.budget import Budget, duration, retry_headers
from worker.dev.embedserver.state import FaultError, Faults, ServerState, Stats, text_hash
from worker.tokens import TokenCounter

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request
# The fields of a request body the worker sets itself; any other (input_type, user...) is counted
# in Stats.extra_fields, so a test can see EMBEDDING_EXTRA_BODY arrive.
REQUEST_FIELDS = frozenset({"model", "input", "dimensions", "encoding_format"})
THREAD_THRESHOLD_CHARS = 32_000  # embed larger requests off the event loop
_CL100K = TokenCounter("cl100k_base")
CLIENT_GONE = 499  # counted, never sent: the client hung up before its answer (nginx's code for it)


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
    extra: dict[str, Any]  # the body's other fields
    dimensions_sent: bool  # else ``dimensions`` is the server's own


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
            state.stats.empty_input_refusals += 1
            raise _Invalid(_invalid(f"'$.input[{index}]' is invalid: the string must not be empty."))
    dimensions = body.get("dimensions", state.dimensions)
    limit = state.backend.max_dimensions
    if isinstance(dimensions, bool) or not isinstance(dimensions, int) or not 1 <= dimensions <= limit:
        message = f"'dimensions' must be an integer from 1 to {limit} for this model, got {dimensions!r}."
        raise _Invalid(_invalid(message, "dimensions"))
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise _Invalid(_invalid("'encoding_format' must be 'float' or 'base64'.", "encoding_format"))
    extra = {key: value for key, value in body.items() if key not in REQUEST_FIELDS}
    return _EmbeddingRequest(model, texts, dimensions, encoding == "base64", extra, "dimensions" in body)


def _over_batch_size(count: int, limit: int) -> web.Response:
    """text-embeddings-inference's answer to more inputs than its --max-client-batch-size."""
    message = f"batch size {count} > maximum allowed batch size {limit}"
    return _json({"error": message, "error_type": "validation"}, 413)


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
    if faults.latency_jitter_ms > 0:  # drawn only when set, so seeded fault sequences stay as they were
        delay_ms += state.rng.uniform(0.0, faults.latency_jitter_ms)
    if faults.slow_rate > 0 and state.rng.random() < faults.slow_rate:
        delay_ms += faults.slow_ms
    if delay_ms > 0:
        await asyncio.sleep(delay_ms / 1000)
        if request.transport is None or request.transport.is_closing():
            return web.Response(status=CLIENT_GONE)  # given up on while it waited: nothing embedded
    denied = _check_auth(request, faults.api_key or state.api_key)
    if denied is not None:
        return denied
    injected = _injected_fault(state)
    if injected is not None:
        return injected
    try:
        parsed = _parse(await request.read(), state)
    except _Invalid as exc:
        return exc.response
    except ConnectionResetError:  # the client hung up while sending its body
        return web.Response(status=CLIENT_GONE)
    state.stats.saw_extra(parsed.extra)
    if faults.max_inputs and len(parsed.texts) > faults.max_inputs:
        return _over_batch_size(len(parsed.texts), faults.max_inputs)
    too_long = _over_token_limits(parsed.texts, faults)
    if too_long is not None:
        return too_long
    tokens = sum(max(1, math.ceil(len(text) / 4)) for text in parsed.texts)  # a rough token count
    if state.budget is not None:
        wait = state.budget.admit(tokens, time.monotonic())
        if wait > 0:
            return _over_budget(state.budget, tokens, wait)
    if faults.slow_marker is not None and any(faults.slow_marker in text for text in parsed.texts):
        await asyncio.sleep(faults.slow_ms / 1000)
    if faults.refuse_dimensions and parsed.dimensions_sent:
        return _invalid("This model does not support specifying dimensions.", "dimensions")
    marker = faults.reject_marker
    if marker is not None:
        for index, text in enumerate(parsed.texts):
            if marker in text:
                message = f"Invalid 'input[{index}]': input at index {index} was rejected by the provider."
                if faults.echo_key:
                    message += f" Request credentials: {request.headers.get('Authorization', 'none')}."
                return _invalid(message)
    texts = parsed.texts
    vectors = await _vectors(state, texts, parsed.dimensions)
    order = list(range(len(vectors)))
    if faults.shuffle:
        state.rng.shuffle(order)
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": (
                pybase64.b64encode_as_string(vectors[i].astype("<f4").tobytes())
                if parsed.base64
                else vectors[i]
            ),
        }
        for i in order
    ]
    state.stats.inputs += len(texts)
    state.stats.blank_inputs += sum(1 for text in texts if text.isspace())
    state.stats.tokens += tokens
    state.stats.by_text.update(text_hash(text) for text in texts)
    return _json(
        {
            "object": "list",
            "data": data,
            "model": parsed.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        },
        headers=state.budget.headers() if state.budget is not None else None,
    )


def _over_token_limits(texts: list[str], faults: Faults) -> web.Response | None:
    """OpenAI's 400s for an input over the model's context, or a request over 300,000 tokens
    (counted with cl100k_base only where the UTF-8 length passes the limit)."""
    if faults.max_input_tokens:
        limit = int(faults.max_input_tokens)
        for index, text in enumerate(texts):
            if not _CL100K.within(text, limit):
                return _invalid(
                    f"Invalid 'input[{index}]': This model's maximum context length is {limit} "
                    f"tokens, however you requested {_CL100K.count(text)} tokens. Please reduce "
                    "your prompt."
                )
    if faults.max_request_tokens:
        limit = int(faults.max_request_tokens)
        if sum(len(text.encode()) for text in texts) > limit:
            requested = sum(map(_CL100K.count, texts))
            if requested > limit:
                return _invalid(f"Requested {requested} tokens, max {limit} tokens per request")
    return None


def _over_budget(budget: Budget, tokens: int, wait: float) -> web.Response:
    """A provider's 429: over its rate limit now, or a request larger than it ever allows."""
    headers = budget.headers()
    if math.isinf(wait):
        limit = int(budget.tokens.per_minute) if budget.tokens is not None else 0
        message = f"Request too large on tokens per min (TPM): Limit {limit}, Requested {tokens}."
    else:
        headers |= retry_headers(wait)
        message = f"Rate limit reached on tokens or requests per min. Please try again in {duration(wait)}."
    return _error(429, message, type_="tokens", code="rate_limit_exceeded", headers=headers)


async def _vectors(state: ServerState, texts: list[str], dimensions: int) -> list[Any]:
    """Each text's vector: remembered ones from the memo, the rest computed (and remembered)."""
    memo, backend = state.memo, state.backend
    vectors = [memo.get(text, dimensions) for text in texts]
    missing = [i for i, vector in enumerate(vectors) if vector is None]
    if missing:
        wanted = [texts[i] for i in missing]
        if backend.name != "hash" or sum(map(len, wanted)) > THREAD_THRESHOLD_CHARS:
            computed = await asyncio.to_thread(backend.embed, wanted, dimensions)
        else:
            computed = backend.embed(wanted, dimensions)
        for i, vector in zip(missing, computed, strict=True):
            vectors[i] = vector
            memo.put(texts[i], dimensions, vector)
    return vectors


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
    state = request.app[STATE_KEY]
    texts = request.query.get("texts", "").lower() in {"1", "true", "yes"}
    stats = state.stats.as_dict(texts=texts)
    if state.budget is not None:  # what the buckets hold now: what a span's use is measured against
        stats["budget"] = state.budget.levels(time.monotonic())
    return _json(stats)


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
