"""The benchmark's state: what to run (Plan), the stack and its servers (Bench), the limits."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.ceilings import Ceiling
from bench.corpus import Published, publish
from bench.cpu import PidSource, postgres_pids, wait_for_quiet
from bench.report import BUSY_MACHINE_CORES, Report, cpu_line, megabytes, rate
from bench.runner import WorkerRun, run_workers, worker_command
from worker.chunk import chunk_text
from worker.dev.embedserver.admin import EmbeddingAdmin
from worker.dev.stack import EmbeddingServer, Stack

TOPIC = "bench"
LARGE_TOPIC = "bench_large"
QUIET_WAIT_PER_RUN = 30.0  # seconds a run waits at most for the machine to be quiet
WARM_BATCH = 256  # texts per request when the instant server is warmed


@dataclass(frozen=True)
class Plan:
    """What to run: the worker's settings and flags, the workload, the sweep."""

    worker_settings: Mapping[str, str]
    worker_args: tuple[str, ...]
    idle_seconds: float
    partitions: int
    docs: int
    naive_sample: int
    backlog_factor: int
    latency_ms: float
    scaling_processes: tuple[int, ...]
    scaling_settings: Mapping[str, str]
    sweep_latencies_ms: tuple[float, ...]
    sweep_concurrency: tuple[int, ...]
    repeats: int = 1  # runs of items 2 and 3 (and the COPY ceilings); the best counts
    churn_docs: int = 5000  # the rebalance churn topic (item 8)

    def setting(self, name: str, default: int) -> int:
        return int(self.worker_settings.get(name, default))

    @property
    def backfill(self) -> bool:
        return "--backfill" in self.worker_args


@dataclass
class Bench:
    """One benchmark run: the stack, the slow embedding server, the corpus, what was measured."""

    plan: Plan
    stack: Stack
    slow_server: EmbeddingServer
    report: Report
    logs: Path
    base: Published | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    quiet_budget: float = 120.0  # seconds, in all, to wait for other jobs before runs

    @property
    def database_url(self) -> str:
        return self.stack.postgres.uri

    @property
    def bootstrap(self) -> str:
        return self.stack.broker.bootstrap

    @property
    def instant(self) -> EmbeddingAdmin:
        return EmbeddingAdmin(self.stack.embeddings.url)

    @property
    def slow(self) -> EmbeddingAdmin:
        return EmbeddingAdmin(self.slow_server.url)

    @property
    def docs(self) -> int:
        assert self.base is not None
        return self.base.records

    async def warm_up(self) -> None:
        """Have the broker create its offsets topic before any measured run, as a running cluster has.

        The first group a fresh Kafka sees waits for ``__consumer_offsets`` to be created, and
        aiokafka logs that wait at error level, which the runner counts as a problem of the run.
        """
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id="bench-warm-up")
        await consumer.start()
        try:
            await asyncio.wait_for(consumer.committed(TopicPartition("bench-warm-up", 0)), 60)
        finally:
            await consumer.stop()

    async def warm_instant(
        self,
        events: Sequence[Mapping[str, Any]] | None = None,
        *,
        dimensions: int | None = None,
        chunk_size: int | None = None,
        chunk_overlap: int | None = None,
    ) -> None:
        """Have the instant server compute the base corpus's chunks before the runs that use it.

        It remembers them (``--memo``, by text and dimensions, whatever the model) and answers the
        runs from memory: as a remote API's compute is not on this machine, and as the COPY
        ceilings compute their vectors before their clock starts. Its counters are reset
        afterwards. ``events`` (the base corpus by default), ``dimensions`` and the chunking (the
        stack's and the worker's by default) name other texts to warm, e.g. a new generation's."""
        env = self.stack.env()
        size = chunk_size if chunk_size is not None else self.plan.setting("CHUNK_SIZE", 1000)
        overlap = chunk_overlap if chunk_overlap is not None else self.plan.setting("CHUNK_OVERLAP", 100)
        dimensions = dimensions if dimensions is not None else int(env["EMBEDDING_DIMENSIONS"])
        texts = list(
            dict.fromkeys(
                c.content
                for e in (self.events if events is None else events)
                for c in chunk_text(e["text"], size=size, overlap=overlap)
            )
        )
        async with aiohttp.ClientSession() as http:
            for i in range(0, len(texts), WARM_BATCH):
                body = {
                    "model": env["EMBEDDING_MODEL"],
                    "input": texts[i : i + WARM_BATCH],
                    "dimensions": dimensions,
                    "encoding_format": "base64",
                }
                async with http.post(f"{self.instant.url}/embeddings", json=body) as answer:
                    answer.raise_for_status()
        self.instant.reset()

    def cpu_sources(self) -> dict[str, PidSource]:
        """The stack's processes by part, for the runner's CPU accounting."""
        servers = [p.pid for p in (self.stack.embeddings.process, self.slow_server.process) if p is not None]
        broker = self.stack.broker.pids()
        return {
            "postgres": postgres_pids(self.stack.postgres.pgdata),
            "embedding": lambda: servers,
            "broker": lambda: broker,
            "bench": lambda: [os.getpid()],
        }

    def env(self, name: str, *, topic: str, embedding_url: str, **overrides: str) -> dict[str, str]:
        return {
            **self.stack.env(),
            **self.plan.worker_settings,
            **overrides,
            "KAFKA_TOPIC": topic,
            "KAFKA_GROUP_ID": f"bench-{name}",
            "DATABASE_SCHEMA": f"bench_{name}",
            "EMBEDDING_URL": embedding_url,
        }

    async def run(
        self,
        name: str,
        *,
        embedding_url: str,
        topic: str = TOPIC,
        docs: int | None = None,
        processes: int = 1,
        schema: str | None = None,
        fresh: bool = True,
        within: float = 240.0,
        settings: Mapping[str, str] | None = None,
    ) -> WorkerRun:
        """Run the worker (``processes`` of them in one group) over ``topic`` once the machine is quiet."""
        docs = self.docs if docs is None else docs
        await self.checkpoint()  # as each COPY ceiling does: every run starts from the same quiet state
        await self.wait_for_quiet()
        env = self.env(name, topic=topic, embedding_url=embedding_url, **(settings or {}))
        if schema is not None:
            env["DATABASE_SCHEMA"] = schema
        print(f"- worker run {name}: {processes} process(es), {docs} records ...", flush=True)
        result = await run_workers(
            name,
            env=env,
            docs=docs,
            database_url=self.database_url,
            log_dir=self.logs,
            processes=processes,
            idle_seconds=self.plan.idle_seconds,
            args=self.plan.worker_args,
            within=within,
            fresh=fresh,
            cpu_sources=self.cpu_sources(),
        )
        problems = f"  PROBLEMS: {'; '.join(result.problems)}" if result.problems else ""
        speed = (
            f"{rate(result.docs_per_s, 'docs/s')}, {rate(result.chunks_per_s, 'chunks/s')} "
            f"over {result.seconds:.2f}s"
            if result.timed
            else "not timed"
        )
        print(
            f"    {speed} (wall {result.wall_seconds:.1f}s), peak RSS "
            f"{' + '.join(megabytes(b) for b in result.peak_rss)}; CPU s {cpu_line(result)}{problems}",
            flush=True,
        )
        if result.foreign:
            shown = ", ".join(f"{name}: {seconds:.1f} s" for name, seconds in result.foreign)
            print(f"    CPU used meanwhile by other processes: {shown}", flush=True)
        self.report.runs.append(result)
        return result

    async def wait_for_quiet(self) -> None:
        """Let another job on the machine finish first, within what is left of ``quiet_budget``."""
        if self.quiet_budget <= 0:
            return
        started = time.monotonic()
        busy = await asyncio.to_thread(
            wait_for_quiet, BUSY_MACHINE_CORES, min(QUIET_WAIT_PER_RUN, self.quiet_budget), sample=0.5
        )
        waited = time.monotonic() - started
        self.quiet_budget -= waited
        if waited > 1.0:
            state = "quiet" if busy <= BUSY_MACHINE_CORES else f"still {busy:.2f} cores busy"
            print(f"    waited {waited:.0f}s for other work on the machine ({state})", flush=True)

    async def repeat(self, name: str, **run: Any) -> list[WorkerRun]:
        """The same run ``plan.repeats`` times, each in its own group and schema (``name``, ``name_2``...)."""
        return [
            await self.run(name if i == 1 else f"{name}_{i}", **run) for i in range(1, self.plan.repeats + 1)
        ]

    async def chunks_by_partition(self, schema: str) -> dict[int, int]:
        """Chunks stored per source partition (empty if the documents table has no such column)."""
        conn = await asyncpg.connect(self.database_url, timeout=10)
        try:
            rows = await conn.fetch(
                f"SELECT source_partition AS p, sum(chunk_count) AS n FROM {schema}.documents "
                "WHERE NOT deleted GROUP BY 1"
            )
        except asyncpg.PostgresError:
            return {}
        finally:
            await conn.close()
        return {int(r["p"]): int(r["n"]) for r in rows if r["p"] is not None}

    async def checkpoint(self) -> None:
        conn = await asyncpg.connect(self.database_url, timeout=10)
        try:
            await conn.execute("CHECKPOINT")
        finally:
            await conn.close()

    async def publish_topic(self, topic: str, events: Sequence[dict[str, Any]]) -> Published:
        """Create ``topic`` (the plan's partitions) and publish ``events`` to it."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, self.plan.partitions, replication_factor=1)])
        finally:
            await admin.close()
        print(f"- publishing {len(events)} documents to `{topic}` ...", flush=True)
        return await publish(self.bootstrap, topic, events, partitions=self.plan.partitions)

    async def drop_schema(self, schema: str) -> None:
        conn = await asyncpg.connect(self.database_url, timeout=10)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()

    async def migrate(self, schema: str, **overrides: str) -> None:
        """``ingest-worker migrate`` into ``schema``: the worker's own tables and indexes (with
        ``overrides`` of the settings, e.g. another EMBEDDING_DIMENSIONS)."""
        env = self.env("migrate", topic=TOPIC, embedding_url=self.stack.embeddings.url, **overrides)
        env["DATABASE_SCHEMA"] = schema
        process = await asyncio.create_subprocess_exec(
            *worker_command(),
            "migrate",
            env={**os.environ, **env},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        try:
            output, _ = await asyncio.wait_for(process.communicate(), 60)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            raise RuntimeError(f"ingest-worker migrate failed: {output.decode(errors='replace')[-500:]}")


@dataclass
class Limits:
    """The ceilings in both units, and the runs later items compare against."""

    consume: Ceiling
    copy: Ceiling  # the COPY ceiling that applies to the worker's mode
    # COPY with as many connections as the worker writes with (item 2's goal): measured between the
    # instant runs, so that both see the machine as it is then; the best of those measurements
    measure_parallel: Callable[[], Awaitable[Ceiling]]
    parallel_runs: list[Ceiling] = field(default_factory=list)

    async def measure_parallel_again(self) -> Ceiling:
        ceiling = await self.measure_parallel()
        self.parallel_runs.append(ceiling)
        return ceiling

    @property
    def parallel(self) -> Ceiling:
        assert self.parallel_runs, "the parallel ceiling is measured with the instant runs"
        return min(self.parallel_runs, key=lambda c: c.seconds)

    @property
    def docs_per_s(self) -> float:
        return min(self.consume.docs_per_s, self.copy.docs_per_s)

    @property
    def chunks_per_s(self) -> float:
        chunks_per_doc = self.copy.items / self.copy.docs
        return min(self.consume.per_s * chunks_per_doc, self.copy.per_s)


def best(runs: Sequence[WorkerRun]) -> WorkerRun:
    """The fastest complete run (noise on a shared machine only ever slows a run down)."""
    complete = [r for r in runs if r.ok] or list(runs)
    return max(complete, key=lambda r: r.chunks_per_s)


def spread(runs: Sequence[WorkerRun], chosen: WorkerRun) -> str:
    """`` (best of 2; the other 1,234 chunks/s)`` for a figure, or nothing for a single run."""
    others = [rate(r.chunks_per_s, "chunks/s") for r in runs if r is not chosen]
    return f" (best of {len(runs)}; other runs {', '.join(others)})" if others else ""


def little_bound(concurrency: int, batch_size: int, latency_ms: float) -> float:
    """Requests in flight x inputs per request / latency: the most chunks/s the embedding API allows."""
    return concurrency * batch_size / (latency_ms / 1000)


def run_note(run: WorkerRun, extra: str = "") -> str:
    problems = f" PROBLEMS: {'; '.join(run.problems)}." if run.problems else ""
    measured = f"in {run.seconds:.2f} s measured" if run.timed else "(not timed: nothing marked the end)"
    return (
        f"`{run.command}`, {run.docs} records -> {run.chunks} chunks {measured} "
        f"({run.wall_seconds:.1f} s wall, work began {run.join_seconds:.1f} s after spawn){extra}.{problems}"
    )
