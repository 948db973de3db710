"""worker/embedding.py EmbeddingStage: texts in, a vector or the reason there is none out."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest

from tests.unit.fakes import fast_backoff
from worker.dependency import Dependency
from worker.embed import KNOWN_GOOD_INPUT, probe
from worker.embedding import EmbeddingStage
from worker.errors import InputRejected, TooManyInputs
from worker.settings import Settings
from worker.types import Vector

SETTINGS = Settings.load(
    {
        "KAFKA_TOPIC": "docs",
        "EMBEDDING_LINGER_MS": "1",
        "EMBEDDING_BATCH_SIZE": "8",
        "EMBEDDING_MAX_ATTEMPTS": "2",
    }
)


class Refusing:
    """Refuses any request holding a text with ``bad`` in it (``every``: every request)."""

    def __init__(self, *, every: bool = False) -> None:
        self.every = every
        self.requests: list[list[str]] = []

    async def embed(self, texts: Sequence[str]) -> list[Vector]:
        self.requests.append(list(texts))
        if self.every or any("bad" in t for t in texts):
            raise InputRejected("refused")
        return [np.full(2, len(t), dtype=np.float32) for t in texts]


def stage_of(
    embedder: Refusing, stop: asyncio.Event, settings: Settings = SETTINGS
) -> tuple[EmbeddingStage, Dependency]:
    dependency = Dependency(  # as the Worker builds it
        "embedding-test",
        probe=lambda: probe(embedder),
        stop=stop,
        threshold=settings.embedding_max_attempts,
        backoff=fast_backoff,
    )
    return EmbeddingStage(embedder, dependency, settings), dependency


async def test_an_input_the_api_refuses_gets_its_error_and_the_rest_their_vectors() -> None:
    embedder, stop = Refusing(), asyncio.Event()
    stage, dependency = stage_of(embedder, stop)
    texts = ["one", "two", "bad three", "four", "five"]
    futures = [stage.submit(t) for t in texts]
    results = await asyncio.gather(*futures, return_exceptions=True)
    await stage.finish(within=0)
    await dependency.close()
    assert isinstance(results[2], InputRejected)
    assert [float(r[0]) for i, r in enumerate(results) if i != 2] == [3, 3, 4, 4]  # type: ignore[index]
    probes = [r for r in embedder.requests if r == [KNOWN_GOOD_INPUT]]
    assert len(probes) == 1, "the API is checked once per refused request, not at each split"


async def test_an_api_that_refuses_every_input_is_an_outage_not_a_reason_to_dead_letter() -> None:
    embedder, stop = Refusing(every=True), asyncio.Event()
    stage, dependency = stage_of(embedder, stop)
    future = stage.submit("a perfectly good text")
    done, _ = await asyncio.wait({future}, timeout=1.0)
    assert not done, "the text was failed while the API refuses everything"
    assert not dependency.up, "the embedding API is reported down"
    await stage.finish(within=0)
    await dependency.close()
    with pytest.raises(asyncio.CancelledError):
        await future


@pytest.mark.parametrize(
    ("batch_size", "max_inputs", "sizes"),
    [
        ("8", "3", [3, 3, 3, 1]),  # the provider's limit caps what the batcher aims for
        ("4", "2048", [4, 4, 2]),  # the batcher's aim, under the provider's limit
        ("5", "5", [5, 5]),
    ],
)
async def test_requests_hold_at_most_the_smaller_of_batch_size_and_max_inputs(
    batch_size: str, max_inputs: str, sizes: list[int]
) -> None:
    settings = Settings.load(
        {
            "KAFKA_TOPIC": "docs",
            "EMBEDDING_LINGER_MS": "50",
            "EMBEDDING_BATCH_SIZE": batch_size,
            "EMBEDDING_MAX_INPUTS": max_inputs,
        }
    )
    embedder, stop = Refusing(), asyncio.Event()
    stage, dependency = stage_of(embedder, stop, settings)
    results = await asyncio.gather(*(stage.submit(f"text {i}") for i in range(10)))
    await stage.finish(within=0)
    await dependency.close()
    assert len(results) == 10
    assert [len(request) for request in embedder.requests] == sizes


@pytest.mark.parametrize("blank", ["", " ", "\n\t \u3000\u00a0\r\n"])
async def test_a_blank_text_is_never_sent_and_fails_alone(blank: str) -> None:
    embedder, stop = Refusing(), asyncio.Event()
    stage, dependency = stage_of(embedder, stop)
    futures = [stage.submit("before"), stage.submit(blank), stage.submit("after")]
    results = await asyncio.gather(*futures, return_exceptions=True)
    await stage.finish(within=0)
    await dependency.close()
    assert isinstance(results[1], InputRejected)
    assert "not sent" in str(results[1])
    assert [float(r[0]) for r in (results[0], results[2])] == [6, 5]  # type: ignore[index]
    assert embedder.requests == [["before", "after"]], "one request, without the blank text; no probe"


class Limited(Refusing):
    """Takes at most ``limit`` inputs a request, and says so, as TEI's 413 does."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    async def embed(self, texts: Sequence[str]) -> list[Vector]:
        self.requests.append(list(texts))
        if len(texts) > self.limit:
            raise TooManyInputs(
                f"batch size {len(texts)} > maximum allowed batch size {self.limit}", self.limit
            )
        return [np.full(2, len(t), dtype=np.float32) for t in texts]


async def test_an_api_that_names_its_input_limit_is_taught_once_and_every_input_gets_its_vector() -> None:
    embedder, stop = Limited(3), asyncio.Event()
    stage, dependency = stage_of(embedder, stop)  # EMBEDDING_BATCH_SIZE 8
    first = await asyncio.gather(*(stage.submit(f"text {i}") for i in range(8)))
    later = await asyncio.gather(*(stage.submit(f"more {i}") for i in range(9)))
    await stage.finish(within=0)
    await dependency.close()
    assert len(first) == 8 and len(later) == 9
    refused = [r for r in embedder.requests if len(r) > 3]
    assert refused == [embedder.requests[0]], "only the first request was too large"
    assert [len(r) for r in embedder.requests[-3:]] == [3, 3, 3], "the later ones hold the API's limit"
    assert [KNOWN_GOOD_INPUT] not in embedder.requests, "no probe: the API said what was wrong"
