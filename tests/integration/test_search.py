"""`search`: exact where that is cheap, one model's vectors only, a tenant's chunks only."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

import pytest
from pgvector.asyncpg import register_vector
from structlog.testing import capture_logs

from tests.integration.helpers import (
    PARTITIONS,
    Env,
    Event,
    cli,
    connect,
    fresh_env,
    one_line_error,
    produce,
    run_worker,
)
from tests.integration.services import Services
from worker import store as store_module
from worker.chunk import chunk_text
from worker.dev.embedserver import hash_embedding
from worker.kafka import ensure_topic
from worker.sql import CHUNK_COLUMNS
from worker.store import Store, sha256

pytestmark = pytest.mark.integration

DIMENSIONS = 384
FEW = "few"
# Questions a reader of the sample corpus (the standard library's docstrings) might ask.
QUERIES = (
    "how do I start a subprocess and wait for it to finish",
    "parse a date and time from a string",
    "compress data with gzip",
    "which partition does a consumer group member own",
    "open a TCP socket connection to a server",
    "round a decimal number to two places",
    "pick a random sample from a list",
    "read rows from a CSV file",
    "hash a password securely",
    "named groups in a regular expression",
    "a thread safe queue between producers and consumers",
    "create a temporary directory and remove it afterwards",
    "convert a time between time zones",
    "configure a logging handler and formatter",
    "send HTTP request headers",
    "parse command line arguments",
    "copy a file and its permissions",
    "run a coroutine until it completes in the event loop",
    "sort a list in place with a key function",
    "encode bytes as base64 text",
    "the greatest common divisor of two integers",
    "wrap long lines of text to a width",
    "serialize an object to JSON",
    "cancel a scheduled event",
)
_HIT = re.compile(r"^\s*\d+\. -?\d+\.\d{3}  (\S+) #(\d+)$")


def hits_of(result: subprocess.CompletedProcess[str]) -> list[tuple[str, int]]:
    """(doc_id, chunk_index) of each hit `search` printed, in rank order."""
    assert result.returncode == 0, result.stderr
    found = [_HIT.match(line) for line in result.stdout.splitlines()]
    return [(m.group(1), int(m.group(2))) for m in found if m is not None]


def sample_corpus() -> list[Event]:
    """The `make run` sample corpus (484 documents of varied text), every 60th document of tenant
    FEW and the rest of tenant "many"."""
    text = resources.files("worker.dev").joinpath("corpus.jsonl").read_text()
    events: list[Event] = []
    for i, line in enumerate(text.splitlines()):
        value = json.loads(line)
        value["tenant"] = FEW if i % 60 == 0 else "many"
        events.append((value["id"], value))
    return events


@pytest.fixture(scope="module")
async def corpus(stack: Services) -> AsyncIterator[Env]:
    """The sample corpus through the real worker, with the default chunking: 832 chunks."""
    env = fresh_env(stack, "search", CHUNK_SIZE="1000", CHUNK_OVERLAP="100")
    await ensure_topic(env.settings, env.topic, PARTITIONS)
    await produce(env, sample_corpus())
    await run_worker(env, within=300)
    yield env


async def brute_force(env: Env, query: str, k: int, *, tenant: str | None = None) -> list[tuple[str, int]]:
    """The true k nearest chunks: every row's distance, no index (ties by doc_id, chunk_index)."""
    conn = await connect(env)
    try:
        await register_vector(conn)
        await conn.execute("SET enable_indexscan = off")
        rows = await conn.fetch(
            f"SELECT c.doc_id, c.chunk_index FROM {env.schema}.chunks c "
            f"JOIN {env.schema}.documents d ON d.id = c.doc_id "
            "WHERE $3::text IS NULL OR d.tenant = $3 "
            "ORDER BY c.embedding <=> $1, c.doc_id, c.chunk_index LIMIT $2",
            hash_embedding(query, DIMENSIONS),
            k,
            tenant,
        )
    finally:
        await conn.close()
    return [(r["doc_id"], r["chunk_index"]) for r in rows]


async def fetch(env: Env, sql: str, *args: Any) -> list[Any]:
    conn = await connect(env)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def test_search_gives_the_exact_nearest_chunks_on_a_small_corpus(corpus: Env) -> None:
    [[rows]] = await fetch(corpus, f"SELECT count(*) FROM {corpus.schema}.chunks")
    assert rows == 832
    [[index_valid]] = await fetch(
        corpus,
        "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)",
        f"{corpus.schema}.chunks_g1_embedding_hnsw_idx",
    )
    assert index_valid, "no HNSW index: the test would not compare it with anything"
    k = 20  # at pgvector's default ef_search (40), HNSW misses more often among 20 than among 10
    async with Store(corpus.settings) as store:
        for query in QUERIES:
            hits = await store.search(hash_embedding(query, DIMENSIONS), k)
            assert [(h.doc_id, h.chunk_index) for h in hits] == await brute_force(corpus, query, k), query
    for query in QUERIES[:3]:  # and the command, end to end
        printed = hits_of(await asyncio.to_thread(cli, corpus, "search", query, "-k", str(k)))
        assert printed == await brute_force(corpus, query, k), query


async def test_search_with_a_tenant_gives_only_that_tenants_chunks(corpus: Env) -> None:
    owned = {
        (r["doc_id"], r["chunk_index"])
        for r in await fetch(
            corpus,
            f"SELECT c.doc_id, c.chunk_index FROM {corpus.schema}.chunks c "
            f"JOIN {corpus.schema}.documents d ON d.id = c.doc_id WHERE d.tenant = $1",
            FEW,
        )
    }
    assert 5 < len(owned) < 50, len(owned)
    query = QUERIES[0]
    few = hits_of(await asyncio.to_thread(cli, corpus, "search", query, "-k", "5", "--tenant", FEW))
    assert few == await brute_force(corpus, query, 5, tenant=FEW)
    assert len(few) == 5 and set(few) <= owned
    every = hits_of(await asyncio.to_thread(cli, corpus, "search", query, "-k", "100", "--tenant", FEW))
    assert set(every) == owned and len(every) == len(owned)
    nobody = await asyncio.to_thread(cli, corpus, "search", query, "--tenant", "nobody")
    assert nobody.returncode == 0 and hits_of(nobody) == []
    assert "no chunks of tenant 'nobody'" in nobody.stdout


@pytest.fixture(scope="module")
async def large(stack: Services) -> AsyncIterator[Env]:
    """Past the exact threshold: the sample corpus 13 times over (copy r with each document's lines
    rotated by r, so its chunks differ), 10,822 chunks written straight into the tables (what is
    tested is the search over them), one document in 30 of tenant FEW; then the HNSW index."""
    env = fresh_env(stack, "search-large", CHUNK_SIZE="1000", CHUNK_OVERLAP="100")
    store = Store(env.settings)
    await store.migrate(ann_index=False)
    documents, chunks = [], []
    for r in range(13):
        for i, (_, value) in enumerate(sample_corpus()):
            assert value is not None
            lines = value["text"].splitlines()
            text = "\n".join(lines[r % len(lines) :] + lines[: r % len(lines)])
            doc_id, tenant = f"{value['id']}~{r}", FEW if i % 30 == 0 else "many"
            pieces = chunk_text(text, size=1000, overlap=100)
            documents.append((doc_id, 0, tenant, len(pieces), sha256(text)))
            model = env.settings.embedding_model
            chunks.extend(
                (
                    doc_id,
                    c.index,
                    c.content,
                    hash_embedding(c.content, DIMENSIONS),
                    c.char_start,
                    c.char_end,
                    model,
                    c.digest,
                )
                for c in pieces
            )
    conn = await connect(env)
    try:
        await register_vector(conn)
        await conn.copy_records_to_table(
            "documents",
            schema_name=env.schema,
            columns=("id", "version", "tenant", "chunk_count", "content_sha256"),
            records=documents,
        )
        await conn.copy_records_to_table(  # into the served generation's table (`chunks` is a view)
            "chunks_g1", schema_name=env.schema, columns=CHUNK_COLUMNS, records=chunks
        )
        await conn.execute(f"ANALYZE {env.schema}.documents; ANALYZE {env.schema}.chunks_g1")
    finally:
        await conn.close()
    assert len(chunks) > store_module.EXACT_SEARCH_MAX_ROWS
    assert await store.build_ann_index()
    yield env


async def test_a_large_table_is_searched_through_the_index(large: Env) -> None:
    async with Store(large.settings) as store:
        with capture_logs() as logs:
            hits = await store.search(hash_embedding(QUERIES[2], DIMENSIONS), 10)
    assert len(hits) == 10
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    [done] = [e for e in logs if e["event"] == "search_done"]
    assert done["method"] == "hnsw", done


async def test_a_tenant_filter_through_the_index_scans_on_until_it_has_k_rows(large: Env) -> None:
    """A tenant holding 1 chunk in 25 past the exact threshold (forced here: its 441 chunks are
    below it): the index's iterative scan goes on past the other tenant's rows until it has k."""
    k = 10
    short = 0
    async with Store(large.settings) as store:
        for query in QUERIES[:6]:
            vector = hash_embedding(query, DIMENSIONS)
            with capture_logs() as logs:
                hits = await store.search(vector, k, tenant=FEW, exact_up_to=0)
            assert len(hits) == k, query
            tenants = await fetch(
                large,
                f"SELECT DISTINCT tenant FROM {large.schema}.documents WHERE id = ANY($1::text[])",
                [h.doc_id for h in hits],
            )
            assert [t["tenant"] for t in tenants] == [FEW], query
            assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True), query
            [done] = [e for e in logs if e["event"] == "search_done"]
            assert done["method"] == "hnsw", done  # the index scan found them: no exact fallback
            short += len(await plain_filtered_hnsw(large, vector, k)) < k
    assert short, "a plain HNSW scan found k rows of the tenant every time: the test tested nothing"


async def plain_filtered_hnsw(env: Env, vector: Any, k: int) -> list[Any]:
    """What an HNSW scan without the iterative scan gives for tenant FEW, with a beam of 200."""
    conn = await connect(env)
    try:
        await register_vector(conn)
        async with conn.transaction():
            await conn.execute("SET LOCAL hnsw.ef_search = 200; SET LOCAL hnsw.iterative_scan = off")
            return list(
                await conn.fetch(
                    f"SELECT c.doc_id FROM {env.schema}.chunks c "
                    f"JOIN {env.schema}.documents d ON d.id = c.doc_id WHERE d.tenant = $2 "
                    "ORDER BY c.embedding <=> $1 LIMIT $3",
                    vector,
                    FEW,
                    k,
                )
            )
    finally:
        await conn.close()


async def test_search_and_run_refuse_a_model_that_names_no_generation(env: Env) -> None:
    # Two models in one index compare vectors of different spaces: a worker or a search whose
    # settings name no generation of the index is refused outright, saying which one is served.
    await Store(env.settings).migrate()
    for command in (["search", "anything"], ["run", "--stop-when-idle", "1"]):
        refused = await asyncio.to_thread(cli, env, *command, extra={"EMBEDDING_MODEL": "another-model"})
        assert refused.returncode == 2, refused.stderr
        line = one_line_error(refused)
        assert "EMBEDDING_MODEL" in line and "another-model" in line, line
        assert "#1 (local-hash-ngram, vector(384)" in line and "is served" in line, line
