"""Where a reindex's fill goes: ``python -m bench.fill [--fillers N] [--ledger-hours H]``.

N documents with their text are written straight into a migrated schema (no broker: the fill
reads PostgreSQL only), then ``reindex start`` of another model runs ``--runs`` times (each run
followed by ``reindex drop``; the first one warms the embedding server's memory, which answers
the next from it). Each run prints the fill's wall time, the CPU seconds each kind of process
spent during the fill (the filler processes, PostgreSQL, the embedding server), the machine's
busy cores over it, and how many answers the ledger kept (those not stored within its
WRITE_DELAY). bench/MEASUREMENTS.md has what it showed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg

from bench.corpus import make_documents
from bench.cpu import all_processes, machine_busy
from worker.dev.stack import EmbeddingServer, Postgres

SCHEMA = "fill_bench"
GROUPS = {b"reindex": "filler", b"embedserver": "embedding", b"postgres": "postgres"}


def cpu_by_group() -> dict[str, float]:
    """CPU seconds so far of the processes alive now, by GROUPS (matched on their command line)."""
    found: dict[str, float] = collections.defaultdict(float)
    for pid, used in all_processes().items():
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        group = next((name for marker, name in GROUPS.items() if marker in command), None)
        if group is not None:
            found[group] += used
    return found


async def one_run(env: dict[str, str], args: list[str]) -> str:
    """`reindex start` once: its fill's time and CPU. A helper filler (--fillers) ends before the
    fill's last line, so its CPU is not counted: the machine's busy cores are."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "worker", "reindex", "start", *args,
        env=env, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert process.stderr is not None
    marks: dict[str, tuple[float, dict[str, float], float]] = {}
    lines = []
    async for raw in process.stderr:
        line = raw.decode(errors="replace").strip()
        if line.startswith("registered generation") or line.startswith("filled "):
            marks["start" if line.startswith("registered") else "end"] = (
                time.perf_counter(),
                cpu_by_group(),
                machine_busy(),
            )
        if "filling" not in line:
            lines.append(line)
    await process.wait()
    if process.returncode != 0 or len(marks) != 2:
        return f"FAILED ({process.returncode}): {' | '.join(lines[-3:])}"
    (t0, cpu0, busy0), (t1, cpu1, busy1) = marks["start"], marks["end"]
    cores = (busy1 - busy0) / (t1 - t0)
    spent = ", ".join(f"{group} {cpu1[group] - cpu0.get(group, 0.0):.2f}" for group in sorted(cpu1))
    return f"fill {t1 - t0:.2f} s; CPU s {spent}; {cores:.2f} cores busy"


async def main(options: argparse.Namespace, uri: str, embeddings: str) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": uri,
        "DATABASE_SCHEMA": SCHEMA,
        "EMBEDDING_URL": embeddings,
        "EMBEDDING_MODEL": "local-hash-ngram",
        "EMBEDDING_DIMENSIONS": "384",
        "CHUNK_SIZE": "1000",
        "CHUNK_OVERLAP": "100",
        "LOG_LEVEL": "warning",
        "EMBEDDING_LEDGER_HOURS": str(options.ledger_hours),
    }
    command = [sys.executable, "-m", "worker"]
    await asyncio.to_thread(subprocess.run, [*command, "migrate"], env=env, check=True, capture_output=True)
    documents = make_documents(options.documents, seed=7)
    conn = await asyncpg.connect(uri)
    try:
        await conn.copy_records_to_table(
            "documents",
            schema_name=SCHEMA,
            columns=["id", "version", "text", "content_sha256", "chunk_count"],
            records=[
                (d["id"], 1, d["text"], hashlib.sha256(d["text"].encode()).digest(), 0) for d in documents
            ],
        )
        args = ["--model", "local-hash-ngram-v2", "--fillers", str(options.fillers)]
        for run in range(options.runs):
            outcome = await one_run(env, args)
            kept = await conn.fetchval(
                f"SELECT count(*) FROM {SCHEMA}.embedding_ledger WHERE embedding IS NOT NULL"
            )
            note = " (warms the embedding server)" if run == 0 else ""
            print(f"run {run}{note}: {outcome}; answers kept in the ledger {kept}", flush=True)
            await conn.execute(f"DELETE FROM {SCHEMA}.embedding_ledger")
            dropped = await asyncio.to_thread(
                subprocess.run, [*command, "reindex", "drop"], env=env, capture_output=True, text=True
            )
            assert dropped.returncode == 0, dropped.stderr
    finally:
        await conn.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--documents", type=int, default=8000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--fillers", type=int, default=1)
    parser.add_argument("--ledger-hours", type=float, default=168.0, help="0: no ledger")
    options = parser.parse_args()
    postgres = Postgres(Path(tempfile.mkdtemp(prefix="fill-bench-")) / "pgdata")
    postgres.start()
    server = EmbeddingServer(args=("--memo", str(options.documents * 10)))
    server.start()
    try:
        asyncio.run(main(options, postgres.uri, server.url))
    finally:
        server.stop()
        postgres.stop()
