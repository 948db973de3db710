"""``make run``: the whole job on the embedded stack, start to finish, in a few minutes.

Starts the broker, PostgreSQL with pgvector and the local embedding server; creates the topic
with several partitions; publishes the sample corpus; runs the worker until it is idle with a
progress bar (its JSON logs go to a file); searches; stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import asyncpg

from worker.dev.apache_kafka import kafka_version
from worker.dev.stack import BrokerKind, StackRunning, embedded_stack
from worker.kafka import ensure_topic
from worker.settings import Settings

TOPIC = "documents"
PARTITIONS = 4
QUERIES = ("how do I parse JSON", "run a coroutine with a timeout", "compress data with gzip")


def _say(message: str) -> None:
    print(f"\n== {message}", flush=True)  # noqa: T201 - the demo talks to a person


def _cli(*args: str, env: dict[str, str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "worker", *args]
    return subprocess.run(command, env=env, check=True, text=True, **kwargs)  # type: ignore[call-overload, no-any-return]


async def _counts(database_url: str) -> tuple[int, int]:
    conn = await asyncpg.connect(database_url)
    try:
        documents = await conn.fetchval("SELECT count(*) FROM documents WHERE NOT deleted")
        chunks = await conn.fetchval("SELECT count(*) FROM chunks")
    finally:
        await conn.close()
    return int(documents), int(chunks)


BROKERS = {
    "tansu": "Tansu broker (in memory)",
    "kafka": f"Apache Kafka {kafka_version()} (KRaft, from Maven Central)",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.dev.demo", description=__doc__)
    parser.add_argument("--broker", choices=sorted(BROKERS), default="tansu", help="which broker [tansu]")
    parser.add_argument("--workdir", type=Path, default=Path(".run/demo"), help="its data [.run/demo]")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    _say(f"starting the stack: {BROKERS[args.broker]}, PostgreSQL 18 + pgvector, local embedding server")
    try:
        return _demo(workdir, args.broker)
    except StackRunning as exc:  # another stack in this workdir: leave it alone
        print(f"python -m worker.dev.demo: error: {exc}", file=sys.stderr)  # noqa: T201
        return 1


def _demo(workdir: Path, broker: BrokerKind) -> int:
    corpus = resources.files("worker.dev").joinpath("corpus.jsonl")
    with (
        embedded_stack(workdir, broker=broker, fresh=True) as stack,  # its earlier data removed
        resources.as_file(corpus) as corpus_path,
    ):
        env = {**os.environ, **stack.env(), "KAFKA_TOPIC": TOPIC, "HEALTH_PORT": "0"}
        asyncio.run(ensure_topic(Settings.load(env), TOPIC, PARTITIONS))
        print(f"   broker {stack.broker.bootstrap}, embeddings {stack.embeddings.url}")  # noqa: T201

        _say(f"publishing the sample corpus to `{TOPIC}` ({PARTITIONS} partitions)")
        _cli("produce", str(corpus_path), env=env)

        log_path = workdir / "worker.log"
        _say(f"ingesting until idle (JSON logs: {log_path})")
        started = time.perf_counter()
        with open(log_path, "w") as worker_log:
            _cli("run", "--stop-when-idle", "3", "--progress", env=env, stdout=worker_log)
        seconds = time.perf_counter() - started
        documents, chunks = asyncio.run(_counts(stack.postgres.uri))
        print(  # noqa: T201 - the demo talks to a person
            f"   stored {documents} documents as {chunks} chunks in {seconds:.1f}s "
            "(including the group join and 3s of idle wait)"
        )

        for query in QUERIES:
            _say(f'search "{query}"')
            _cli("search", query, "-k", "3", env=env)
        _say("stopping the stack")
    print("done. Point the worker at your own Kafka, Postgres and embedding API: see README.md")  # noqa: T201
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
