"""How long `search`'s exact query takes over N rows: what EXACT_SEARCH_MAX_ROWS rests on.

    .venv/bin/python -m bench.search                      # 384 and 1536 dimensions, 5k-50k rows
    .venv/bin/python -m bench.search --dimensions 1536 --rows 10000

Starts the embedded PostgreSQL with pgvector in a temporary directory, fills a `chunks` table (as
`migrate` makes it) with random unit vectors and 300-character contents, and times the store's own
exact search (EXACT_SEARCH_SQL, k = 10) with a warm cache: the median and the fastest of 5 queries.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import numpy as np
from pgvector.asyncpg import register_vector

from worker.dev.stack import Postgres
from worker.settings import Settings
from worker.sql import CHUNK_COLUMNS, EXACT_SEARCH_SQL, SEARCH_CANDIDATES_SQL
from worker.store import Store

MODEL = "bench-model"


async def measure(url: str, dimensions: int, rows: list[int], repeats: int) -> None:
    schema = f"search_{dimensions}"
    settings = Settings.load(
        {
            "DATABASE_URL": url,
            "DATABASE_SCHEMA": schema,
            "EMBEDDING_MODEL": MODEL,
            "EMBEDDING_DIMENSIONS": str(dimensions),
        }
    )
    await Store(settings).migrate(ann_index=False)
    sql = EXACT_SEARCH_SQL.format(
        candidates=SEARCH_CANDIDATES_SQL.format(chunks=f"{schema}.chunks_g1"),
        query="$2",
        k="$3",
    )
    rng = np.random.default_rng(1)
    conn = await asyncpg.connect(url)
    try:
        await register_vector(conn)
        await conn.execute(f"INSERT INTO {schema}.documents (id) VALUES ('d')")
        stored = 0
        for n in sorted(rows):
            vectors = rng.standard_normal((n - stored, dimensions)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            records = [("d", stored + i, "x" * 300, v, 0, 300, MODEL, b"") for i, v in enumerate(vectors)]
            await conn.copy_records_to_table(
                "chunks_g1",  # the served generation's table (`chunks` is a view of it)
                schema_name=schema,
                columns=CHUNK_COLUMNS,
                records=records,
            )
            stored = n
            await conn.execute(f"VACUUM ANALYZE {schema}.chunks_g1")
            query = rng.standard_normal(dimensions).astype(np.float32)
            await conn.fetch(sql, MODEL, query, 10)  # warm the cache
            seconds = []
            for _ in range(repeats):
                started = time.perf_counter()
                await conn.fetch(sql, MODEL, query, 10)
                seconds.append(time.perf_counter() - started)
            print(
                f"{dimensions:>5} dimensions {n:>7,} rows: exact search median "
                f"{statistics.median(seconds) * 1000:.1f} ms, fastest {min(seconds) * 1000:.1f} ms",
                flush=True,
            )
    finally:
        await conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.search", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dimensions", type=int, action="append", help="[384 and 1536]")
    parser.add_argument("--rows", type=int, action="append", help="[5000, 10000, 20000, 50000]")
    parser.add_argument("--repeats", type=int, default=5, help="queries timed per size [5]")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-search-") as workdir:
        postgres = Postgres(Path(workdir) / "pgdata")
        postgres.start()
        try:
            for dimensions in args.dimensions or [384, 1536]:
                asyncio.run(
                    measure(postgres.uri, dimensions, args.rows or [5000, 10000, 20000, 50000], args.repeats)
                )
        finally:
            postgres.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
