"""Providers count tokens: an input over the model's limit is split by the chunker, never sent.

The local embedding server refuses, as OpenAI does, an input over 8,191 cl100k_base tokens with
a 400 (its default ``max_input_tokens``).
"""

from __future__ import annotations

import random

import pytest

from tests.integration.helpers import Env, connect, embedding_admin, produce, run_worker
from tests.integration.test_operations import read_dead_letters
from worker.tokens import TokenCounter

pytestmark = pytest.mark.integration

CL100K = TokenCounter("cl100k_base")
LIMIT = 8191


def dense_text(chars: int) -> str:
    """Numbers and rare words: about 2.5 characters a token, so 40,000 characters hold ~16,000."""
    rng = random.Random(7)
    words: list[str] = []
    while sum(map(len, words)) + len(words) < chars:
        words.append(rng.choice([str(rng.randrange(10**7)), "".join(rng.choices("qxzjkvwy", k=5))]))
    return " ".join(words)[:chars].strip()


async def test_a_chunk_over_the_input_limit_is_split_until_each_part_fits_and_none_is_refused(
    env: Env,
) -> None:
    text = dense_text(40_000)
    assert CL100K.count(text) > 2 * LIMIT
    env = env.with_(CHUNK_SIZE="40000", CHUNK_OVERLAP="100")
    admin = embedding_admin(env)
    admin.reset()
    await produce(env, [("long", {"id": "long", "text": text})])
    await run_worker(env)

    conn = await connect(env)
    try:
        rows = await conn.fetch(
            f"SELECT content, char_start, char_end FROM {env.schema}.chunks "
            "WHERE doc_id = 'long' ORDER BY chunk_index"
        )
    finally:
        await conn.close()
    assert len(rows) >= 3, "the one 40,000-character window became several chunks"
    for row in rows:
        assert row["content"] == text[row["char_start"] : row["char_end"]]
        assert CL100K.count(row["content"]) <= LIMIT
    covered = {i for row in rows for i in range(row["char_start"], row["char_end"])}
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace()), "nothing cut off"
    assert admin.stats()["status_counts"] == {"200": admin.stats()["requests"]}, "no request was refused"


async def test_a_limit_set_above_the_providers_sends_the_input_and_it_is_refused(env: Env) -> None:
    # The counter-check: the server does refuse such an input, so the test above proves the split.
    text = dense_text(40_000)
    env = env.with_(CHUNK_SIZE="40000", CHUNK_OVERLAP="100", EMBEDDING_MAX_INPUT_TOKENS="100000")
    admin = embedding_admin(env)
    admin.reset()
    await produce(env, [("long", {"id": "long", "text": text})])
    await run_worker(env)

    assert admin.stats()["status_counts"].get("400", 0) >= 1
    letters = await read_dead_letters(env, 1)
    assert len(letters) == 1
    assert "maximum context length" in dict(letters[0].headers)["dlq.error.message"].decode()  # type: ignore[attr-defined]
