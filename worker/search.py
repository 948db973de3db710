"""Nearest chunks to a query vector: exact where that is cheap, else through the HNSW index.

HNSW is approximate and misses true neighbours even on small tables, so a search is exact while
there are at most ``EXACT_SEARCH_MAX_ROWS`` candidates (an exact scan of that many takes a few
milliseconds). Above it, the index is searched with a beam (ef_search) of
``max(ANN_MIN_EF_SEARCH, ANN_EF_SEARCH_PER_HIT * k)`` (pgvector's default of 40 misses true
neighbours; figures in bench/MEASUREMENTS.md) and an iterative scan that reads on, up to
``ANN_MAX_SCAN_TUPLES`` index tuples, past rows a tenant filter drops; the rows are put in exact
order, and a search that still comes back short is done exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import asyncpg
import structlog

from worker.sql import (
    ANN_SEARCH_SETTINGS_SQL,
    ANN_SEARCH_SQL,
    COUNT_CANDIDATES_SQL,
    EXACT_SEARCH_SQL,
    Statements,
)
from worker.types import Vector

log = structlog.get_logger()

EXACT_SEARCH_MAX_ROWS: Final = 10_000
ANN_MIN_EF_SEARCH: Final = 400
ANN_EF_SEARCH_PER_HIT: Final = 4
ANN_MAX_EF_SEARCH: Final = 1000  # pgvector's limit
ANN_MAX_SCAN_TUPLES: Final = 20_000


@dataclass(frozen=True, slots=True)
class Hit:
    doc_id: str
    chunk_index: int
    content: str
    score: float


async def nearest(
    conn: asyncpg.Connection,
    sql: Statements,
    model: str,
    embedding: Vector,
    k: int,
    tenant: str | None = None,
    exact_up_to: int = EXACT_SEARCH_MAX_ROWS,
) -> list[Hit]:
    """The ``k`` chunks of ``model`` (and of ``tenant``, if given) nearest ``embedding``, nearest
    first (ties by document id and chunk index), read in one read-only transaction."""
    if tenant is None:
        candidates, args = sql.search_candidates, [model]
    else:
        candidates, args = sql.search_tenant_candidates, [model, tenant]
    names = {
        "candidates": candidates,
        "limit": f"${len(args) + 1}",
        "query": f"${len(args) + 1}",
        "k": f"${len(args) + 2}",
    }
    async with conn.transaction(readonly=True):
        count = await conn.fetchval(COUNT_CANDIDATES_SQL.format(**names), *args, exact_up_to + 1)
        method = "exact"
        if count > exact_up_to:
            beam = min(ANN_MAX_EF_SEARCH, max(ANN_MIN_EF_SEARCH, ANN_EF_SEARCH_PER_HIT * k))
            await conn.execute(ANN_SEARCH_SETTINGS_SQL, str(beam), str(ANN_MAX_SCAN_TUPLES))
            rows = await conn.fetch(ANN_SEARCH_SQL.format(**names), *args, embedding, k)
            method = "hnsw" if len(rows) >= k else "hnsw_then_exact"
        if method != "hnsw":
            rows = await conn.fetch(EXACT_SEARCH_SQL.format(**names), *args, embedding, k)
    log.debug("search_done", method=method, candidates=count, hits=len(rows), tenant=tenant)
    return [Hit(r["doc_id"], r["chunk_index"], r["content"], float(r["score"])) for r in rows]
