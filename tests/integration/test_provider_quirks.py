"""Providers' quirks on a real broker and PostgreSQL, against the local embedding server playing
them: a provider's own request fields (EMBEDDING_EXTRA_BODY), a provider that takes fewer inputs
per request than OpenAI (text-embeddings-inference's 413; EMBEDDING_MAX_INPUTS), and documents
whose text is empty or whitespace only (never sent: OpenAI answers 400 to an empty input)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.helpers import (
    Env,
    Event,
    assert_stored_state,
    committed_offsets,
    embedding_admin,
    expected_state,
    produce,
    run_worker,
)
from tests.integration.test_operations import read_dead_letters

pytestmark = pytest.mark.integration

PROVIDER_MAX_INPUTS = 8  # the server's limit, as text-embeddings-inference's --max-client-batch-size
BATCH_SIZE = "32"  # what the batcher aims for: more than the provider takes
BLANKS = ["", " ", "\n\n", " \t\r\n\u3000\u00a0 "]


def corpus() -> list[Event]:
    """Documents of several chunks each (some 250 inputs in all), with blank ones among them, and
    a document whose later event is blank (its chunks go)."""
    events: list[Event] = []
    for i in range(60):
        text = " ".join(f"Document {i} sentence {j} tells of a provider's quirk." for j in range(8 + i % 5))
        events.append((f"q-{i}", {"id": f"q-{i}", "text": text}))
        if i % 12 == 5:
            blank = BLANKS[(i // 12) % len(BLANKS)]
            events.append((f"blank-{i}", {"id": f"blank-{i}", "text": blank}))
    events.append(("q-7", {"id": "q-7", "text": "  \n  "}))
    return events


async def ingest(env: Env, faults: Any, **settings: str) -> dict[str, Any]:
    """Publish the corpus, run a worker until idle against a server that refuses more than
    PROVIDER_MAX_INPUTS inputs, check that everything is stored and nothing dead-lettered; the
    server's counters."""
    events = corpus()
    assert sum(1 for _, value in events if value is not None and not value["text"].strip()) == 6
    faults(max_inputs=PROVIDER_MAX_INPUTS)
    admin = embedding_admin(env)
    admin.reset()
    ends = await produce(env, events)
    await run_worker(env.with_(EMBEDDING_BATCH_SIZE=BATCH_SIZE, **settings), within=180)
    await assert_stored_state(env, expected_state(events))
    assert await read_dead_letters(env, expected=1, within=2) == []
    assert await committed_offsets(env, list(ends)) == ends
    stats = admin.stats()
    assert stats["inputs"] >= 200, "enough inputs to fill requests past the provider's limit"
    assert stats["empty_input_refusals"] == 0, "an empty input was sent"
    assert stats["blank_inputs"] == 0, "a whitespace-only input was sent"
    return stats


async def test_a_providers_fields_and_limit_are_honoured_and_blank_documents_never_sent(
    env: Env, faults: Any
) -> None:
    stats = await ingest(
        env,
        faults,
        EMBEDDING_EXTRA_BODY='{"input_type":"document"}',
        EMBEDDING_MAX_INPUTS=str(PROVIDER_MAX_INPUTS),
    )
    assert stats["status_counts"] == {"200": stats["requests"]}, "no request refused, none over 8 inputs"
    assert stats["requests"] >= stats["inputs"] / PROVIDER_MAX_INPUTS
    assert stats["extra_fields"] == {"input_type": {'"document"': stats["requests"]}}, "on every request"


async def test_without_max_inputs_the_worker_learns_the_providers_limit_from_its_first_413(
    env: Env, faults: Any
) -> None:
    """EMBEDDING_MAX_INPUTS left at OpenAI's 2048 against a provider that takes 8 and says so in
    its 413 (TEI's "maximum allowed batch size 8"): the requests in flight then are split into
    parts of 8, and every later one holds 8 at most. Everything is stored, nothing dead-lettered."""
    stats = await ingest(env, faults)
    refused = stats["status_counts"].get("413", 0)
    assert refused > 0, "no request went over the provider's limit: the test tests nothing"
    assert set(stats["status_counts"]) == {"200", "413"}, "refused with nothing but 413"
    assert stats["extra_fields"] == {}
    concurrency = int(env.settings.embedding_concurrency)
    assert refused <= concurrency, "only the requests sent before the first 413 was read"
    # Before the worker learned it, each request of 32 was halved after a probe (measured: 56
    # requests, 21 of them refused, against 27 with EMBEDDING_MAX_INPUTS=8).
