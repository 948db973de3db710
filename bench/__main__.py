"""``make bench``: every figure of the worker's performance, measured side by side in one run.

    .venv/bin/python -m bench            # the full run (~5 minutes on 2 cores)
    .venv/bin/python -m bench --quick    # a smoke run of the harness itself (~1 minute)

Starts the embedded stack plus a second embedding server that answers after ``LATENCY_MS``,
publishes a deterministic corpus, then measures: the ceilings (plain consume+decode, plain
binary COPY with and without the HNSW index), the real worker with the instant and the slow
embedding server, the naive baseline, peak RSS against a 10x backlog, scaling over processes,
a latency x concurrency sweep, and the embedding inputs saved when the stream is redelivered.
Prints each figure with its goal, writes ``bench/RESULTS.md`` and ``bench/throughput.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.ceilings import Ceiling, chunk_rows, consume_ceiling, copy_ceiling
from bench.corpus import Published, make_documents, publish
from bench.embeddings import EmbeddingAdmin
from bench.naive import NaiveConfig, run_naive
from bench.report import Check, Report, SweepPoint, markdown, megabytes, plot_throughput, rate
from bench.runner import WorkerRun, run_workers, worker_command
from worker.dev.stack import EmbeddingServer, Stack, embedded_stack

# -- What every worker run gets. Edit here: new settings (EMBEDDING_BATCH_CHARS, EMBEDDING_LINGER_MS,
# MAX_IN_FLIGHT_RECORDS, ...) go into this dict, new `run` flags (e.g. "--backfill") into WORKER_ARGS.
WORKER_SETTINGS: dict[str, str] = {
    "HEALTH_PORT": "0",
    "LOG_LEVEL": "info",  # the runner reads the batch_stored lines
    "KAFKA_MAX_POLL_RECORDS": "500",
    "EMBEDDING_BATCH_SIZE": "64",
    "EMBEDDING_CONCURRENCY": "4",
    "CHUNK_SIZE": "1000",
    "CHUNK_OVERLAP": "100",
    "SHUTDOWN_GRACE_SECONDS": "10",
}
WORKER_ARGS: tuple[str, ...] = ()
IDLE_SECONDS = 2.0  # `run --stop-when-idle`

PARTITIONS = 8
LATENCY_MS = 100.0  # the slow embedding server (items 3, 4 and 6)
SCALING_PROCESSES = (1, 2, 4)
SCALING_SETTINGS = {"EMBEDDING_CONCURRENCY": "2"}  # so one process is bound by the latency
SWEEP_LATENCIES_MS = (0.0, 50.0, 100.0, 200.0)
SWEEP_CONCURRENCY = (1, 4, 16)
QUICK_SWEEP_LATENCIES_MS = (0.0, 100.0)
QUICK_SWEEP_CONCURRENCY = (2, 4)

# Goals (from the project's issue).
GOAL_INSTANT_OF_CEILING = 0.8
GOAL_SLOW_OF_BOUND = 0.85
GOAL_OVER_NAIVE = 20.0
GOAL_RSS_GROWTH = 1.2
GOAL_RSS_BYTES = 250 * 1_048_576
GOAL_TWO_PROCESSES = 1.8
GOAL_SAVED = 1.0

ROOT = Path(__file__).resolve().parent


@dataclass
class Bench:
    """One benchmark run: the stack, the slow embedding server, the corpus, what was measured."""

    args: argparse.Namespace
    stack: Stack
    slow: EmbeddingServer
    report: Report
    logs: Path
    base: Published | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    runs: dict[str, WorkerRun] = field(default_factory=dict)

    @property
    def database_url(self) -> str:
        return self.stack.postgres.uri

    @property
    def bootstrap(self) -> str:
        return self.stack.broker.bootstrap

    def setting(self, name: str, default: int) -> int:
        return int(WORKER_SETTINGS.get(name, default))

    def env(self, name: str, *, topic: str, embedding_url: str, **overrides: str) -> dict[str, str]:
        return {
            **self.stack.env(),
            **WORKER_SETTINGS,
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
        topic: str,
        docs: int,
        embedding_url: str,
        processes: int = 1,
        schema: str | None = None,
        fresh: bool = True,
        within: float = 240.0,
        **overrides: str,
    ) -> WorkerRun:
        env = self.env(name, topic=topic, embedding_url=embedding_url, **overrides)
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
            idle_seconds=IDLE_SECONDS,
            args=WORKER_ARGS,
            within=within,
            fresh=fresh,
        )
        problems = f"  PROBLEMS: {'; '.join(result.problems)}" if result.problems else ""
        print(
            f"    {rate(result.docs_per_s, 'docs/s')}, {rate(result.chunks_per_s, 'chunks/s')} "
            f"over {result.seconds:.2f}s (wall {result.wall_seconds:.1f}s), peak RSS "
            f"{' + '.join(megabytes(b) for b in result.peak_rss)}{problems}",
            flush=True,
        )
        self.runs[name] = result
        self.report.runs.append(result)
        return result

    async def drop_schema(self, schema: str) -> None:
        conn = await asyncpg.connect(self.database_url, timeout=10)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        finally:
            await conn.close()


# -- setup -----------------------------------------------------------------------------------


async def create_topics(bootstrap: str, *topics: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(t, num_partitions=PARTITIONS, replication_factor=1) for t in topics]
        )
    finally:
        await admin.close()


async def migrate(bench: Bench, schema: str) -> None:
    """``ingest-worker migrate`` into ``schema``: the worker's own tables and indexes."""
    env = bench.env("migrate", topic="unused", embedding_url=bench.stack.embeddings.url)
    env["DATABASE_SCHEMA"] = schema
    process = await asyncio.create_subprocess_exec(
        *worker_command(),
        "migrate",
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    if process.returncode != 0:
        raise RuntimeError(f"ingest-worker migrate failed: {output.decode(errors='replace')[-500:]}")


# -- the items ---------------------------------------------------------------------------------


async def measure_ceilings(bench: Bench) -> tuple[Ceiling, Ceiling, Ceiling]:
    assert bench.base is not None
    print("- ceilings ...", flush=True)
    consume = await consume_ceiling(
        bench.bootstrap, bench.base, max_poll_records=bench.setting("KAFKA_MAX_POLL_RECORDS", 500)
    )
    await migrate(bench, "bench_template")
    rows = chunk_rows(
        bench.events,
        chunk_size=bench.setting("CHUNK_SIZE", 1000),
        chunk_overlap=bench.setting("CHUNK_OVERLAP", 100),
        model=bench.stack.env()["EMBEDDING_MODEL"],
        dimensions=int(bench.stack.env()["EMBEDDING_DIMENSIONS"]),
    )
    copy_ann = await copy_ceiling(bench.database_url, "bench_template", rows, approximate_index=True)
    copy_backfill = await copy_ceiling(bench.database_url, "bench_template", rows, approximate_index=False)
    r = bench.report
    r.add(
        Check(
            "1a. ceiling: consume + decode",
            f"{rate(consume.per_s, 'records/s')} (= docs/s)",
            note=f"aiokafka, partitions assigned (no group), orjson.loads of each value; best of 3 reads "
            f"of {consume.items} records",
        )
    )
    for number, ceiling in (("1b", copy_ann), ("1c", copy_backfill)):
        r.add(
            Check(
                f"{number}. ceiling: binary {ceiling.name}",
                f"{rate(ceiling.per_s, 'rows/s')}, {rate(ceiling.docs_per_s, 'docs/s')}",
                note=f"one copy_records_to_table of {ceiling.items} chunk rows ({ceiling.docs} docs) with "
                "their vectors into `LIKE chunks INCLUDING ALL` of a migrated schema"
                + ("" if number == "1b" else ", approximate index dropped"),
            )
        )
    return consume, copy_ann, copy_backfill


def limiting(consume: Ceiling, copy: Ceiling) -> tuple[float, float]:
    """min(ceilings) in docs/s and in chunks/s."""
    chunks_per_doc = copy.items / copy.docs
    return min(consume.docs_per_s, copy.docs_per_s), min(consume.per_s * chunks_per_doc, copy.per_s)


def little_bound(concurrency: int, batch_size: int, latency_ms: float) -> float:
    return concurrency * batch_size / (latency_ms / 1000)


def run_note(run: WorkerRun, extra: str = "") -> str:
    problems = f" PROBLEMS: {'; '.join(run.problems)}." if run.problems else ""
    return (
        f"`{run.command}`, {run.docs} records -> {run.chunks} chunks in {run.seconds:.2f} s measured "
        f"({run.wall_seconds:.1f} s wall, work began {run.join_seconds:.1f} s after spawn){extra}.{problems}"
    )


async def bench_main(bench: Bench) -> None:
    args = bench.args
    report = bench.report
    instant_url, slow_url = bench.stack.embeddings.url, bench.slow.url
    instant, slow = EmbeddingAdmin(instant_url), EmbeddingAdmin(slow_url)
    concurrency = bench.setting("EMBEDDING_CONCURRENCY", 4)
    batch_size = bench.setting("EMBEDDING_BATCH_SIZE", 64)

    print(f"- publishing {args.docs} documents to `bench` ({PARTITIONS} partitions) ...", flush=True)
    await create_topics(bench.bootstrap, "bench", "bench_large")
    bench.events = make_documents(args.docs)
    bench.base = await publish(bench.bootstrap, "bench", bench.events)
    docs = bench.base.records
    print(
        f"    {bench.base.payload_bytes / 1e6:.1f} MB in {bench.base.seconds:.1f}s; "
        f"partition ends {sorted((tp.partition, end) for tp, end in bench.base.ends.items())}",
        flush=True,
    )

    consume, copy_ann, copy_backfill = await measure_ceilings(bench)
    copy = copy_backfill if "--backfill" in WORKER_ARGS else copy_ann
    ceiling_docs, ceiling_chunks = limiting(consume, copy)
    report.copy_rows_per_s = copy.per_s

    # 2. instant embeddings
    await instant.reset()
    fast = await bench.run("instant", topic="bench", docs=docs, embedding_url=instant_url)
    inputs_first = int((await instant.stats())["inputs"])
    ratio = fast.docs_per_s / ceiling_docs
    report.add(
        Check(
            "2. end to end, instant embeddings",
            f"{rate(fast.docs_per_s, 'docs/s')}, {rate(fast.chunks_per_s, 'chunks/s')}; "
            f"{ratio:.2f} of min(ceilings) = {rate(ceiling_docs, 'docs/s')}",
            f">= {GOAL_INSTANT_OF_CEILING}",
            fast.ok and ratio >= GOAL_INSTANT_OF_CEILING,
            run_note(fast, f"; embedding inputs {inputs_first}"),
        )
    )

    # 7. redelivery: the same stream again, a new group, the same schema
    await instant.reset()
    again = await bench.run(
        "redelivery",
        topic="bench",
        docs=docs,
        embedding_url=instant_url,
        schema="bench_instant",
        fresh=False,
    )
    stats = await instant.stats()
    inputs = int(stats["inputs"])
    saved = 1 - inputs / fast.chunks if fast.chunks else 0.0
    report.add(
        Check(
            "7. embedding inputs saved on redelivery",
            f"{saved:.0%} ({inputs} inputs embedded again for {fast.chunks} unchanged chunks)",
            f">= {GOAL_SAVED:.0%}",
            again.ok and saved >= GOAL_SAVED,
            f"the same {docs} records consumed again by a new group into the same schema; "
            f"/admin/stats inputs after /admin/reset; {again.chunks} chunks stored afterwards; "
            + run_note(again),
        )
    )
    await bench.drop_schema("bench_instant")

    # 3. slow embeddings
    await slow.set_latency(LATENCY_MS)
    slow_run = await bench.run("slow", topic="bench", docs=docs, embedding_url=slow_url)
    bound = little_bound(concurrency, batch_size, LATENCY_MS)
    target = min(bound, ceiling_chunks)
    ratio = slow_run.chunks_per_s / target
    report.add(
        Check(
            f"3. end to end, embeddings after {LATENCY_MS:g} ms",
            f"{rate(slow_run.docs_per_s, 'docs/s')}, {rate(slow_run.chunks_per_s, 'chunks/s')}; {ratio:.2f} "
            f"of min(Little's bound {rate(bound, 'chunks/s')}, ceilings {rate(ceiling_chunks, 'chunks/s')})",
            f">= {GOAL_SLOW_OF_BOUND}",
            slow_run.ok and ratio >= GOAL_SLOW_OF_BOUND,
            run_note(
                slow_run,
                f"; bound = EMBEDDING_CONCURRENCY {concurrency} x EMBEDDING_BATCH_SIZE {batch_size} / "
                f"{LATENCY_MS:g} ms",
            ),
        )
    )
    await bench.drop_schema("bench_slow")

    # 4. the naive baseline at the same latency
    print(f"- naive baseline: {args.naive_sample} records, one at a time ...", flush=True)
    await migrate(bench, "bench_naive")
    naive = await run_naive(
        NaiveConfig(
            bootstrap=bench.bootstrap,
            topic="bench",
            group="bench-naive",
            database_url=bench.database_url,
            schema="bench_naive",
            embedding_url=slow_url,
            model=bench.stack.env()["EMBEDDING_MODEL"],
            dimensions=int(bench.stack.env()["EMBEDDING_DIMENSIONS"]),
            chunk_size=bench.setting("CHUNK_SIZE", 1000),
            chunk_overlap=bench.setting("CHUNK_OVERLAP", 100),
        ),
        limit=min(args.naive_sample, docs),
    )
    speedup = slow_run.docs_per_s / naive.docs_per_s
    report.add(
        Check(
            f"4. worker vs naive baseline, {LATENCY_MS:g} ms",
            f"{speedup:.1f}x (naive {rate(naive.docs_per_s, 'docs/s')}, "
            f"{rate(naive.chunks_per_s, 'chunks/s')}; worker {rate(slow_run.docs_per_s, 'docs/s')})",
            f">= {GOAL_OVER_NAIVE:g}x",
            slow_run.ok and speedup >= GOAL_OVER_NAIVE,
            f"bench/naive.py: decode, one embedding request per record, executemany INSERT, commit the "
            f"offset; a sample of the first {naive.records} records ({naive.chunks} chunks) in "
            f"{naive.seconds:.1f} s, extrapolated: the whole {docs}-record topic would take "
            f"{docs / naive.docs_per_s:.0f} s against the worker's {slow_run.seconds:.1f} s",
        )
    )
    await bench.drop_schema("bench_naive")

    # 6. scaling over processes, latency-bound
    scaling_concurrency = int(SCALING_SETTINGS.get("EMBEDDING_CONCURRENCY", concurrency))
    for processes in SCALING_PROCESSES:
        name = f"scale{processes}"
        run = await bench.run(
            name, topic="bench", docs=docs, embedding_url=slow_url, processes=processes, **SCALING_SETTINGS
        )
        report.scaling.append(run)
        await bench.drop_schema(f"bench_{name}")
    one, *more = report.scaling
    speedups = {r.processes: r.chunks_per_s / one.chunks_per_s for r in more}
    two = speedups.get(2, 0.0)
    report.add(
        Check(
            "6. scaling, 2 processes vs 1",
            f"{two:.2f}x ("
            + ", ".join(f"{r.processes}: {rate(r.chunks_per_s, 'chunks/s')}" for r in report.scaling)
            + "; "
            + ", ".join(f"{n} procs {s:.2f}x" for n, s in speedups.items())
            + ")",
            f">= {GOAL_TWO_PROCESSES}x",
            all(r.ok for r in report.scaling) and two >= GOAL_TWO_PROCESSES,
            f"processes started together in one group on the {PARTITIONS}-partition topic; embeddings "
            f"after {LATENCY_MS:g} ms, EMBEDDING_CONCURRENCY={scaling_concurrency} (one process's Little's "
            f"bound {rate(little_bound(scaling_concurrency, batch_size, LATENCY_MS), 'chunks/s')}); "
            "measured from the first batch's start in any process to the last batch stored in any",
        )
    )

    # the sweep for the plot
    latencies = QUICK_SWEEP_LATENCIES_MS if args.quick else SWEEP_LATENCIES_MS
    concurrencies = QUICK_SWEEP_CONCURRENCY if args.quick else SWEEP_CONCURRENCY
    if args.sweep:
        known = {(0.0, concurrency): fast, (LATENCY_MS, concurrency): slow_run}
        if 1 in SCALING_PROCESSES:
            known[(LATENCY_MS, scaling_concurrency)] = report.scaling[0]
        for latency in latencies:
            for conc in concurrencies:
                run = known.get((latency, conc))
                if run is None:
                    name = f"sweep_{latency:g}ms_c{conc}"
                    await slow.set_latency(latency)
                    url = instant_url if latency == 0 else slow_url
                    run = await bench.run(
                        name, topic="bench", docs=docs, embedding_url=url, EMBEDDING_CONCURRENCY=str(conc)
                    )
                    await bench.drop_schema(f"bench_{name}")
                report.sweep.append(SweepPoint(latency, conc, batch_size, run))
        await slow.set_latency(LATENCY_MS)

    # 5. memory with a backlog ten times larger
    factor = args.backlog_factor
    print(f"- publishing {docs * factor} documents to `bench_large` ...", flush=True)
    large = await publish(bench.bootstrap, "bench_large", make_documents(docs * factor, prefix="large"))
    big = await bench.run(
        f"backlog_x{factor}",
        topic="bench_large",
        docs=large.records,
        embedding_url=instant_url,
        within=max(240.0, 60 + large.records / 50),
    )
    growth = big.max_rss / fast.max_rss if fast.max_rss else float("inf")
    report.add(
        Check(
            f"5. peak RSS, {factor}x backlog vs base",
            f"{megabytes(big.max_rss)} vs {megabytes(fast.max_rss)} = {growth:.2f}x",
            f"<= {GOAL_RSS_GROWTH}x and < {megabytes(GOAL_RSS_BYTES)}",
            big.ok and growth <= GOAL_RSS_GROWTH and big.max_rss < GOAL_RSS_BYTES,
            f"VmHWM of the worker process; base = the instant run ({fast.docs} records), then "
            f"{large.records} records ({large.payload_bytes / 1e6:.0f} MB) published before the worker "
            f"started; {rate(big.docs_per_s, 'docs/s')}, {rate(big.chunks_per_s, 'chunks/s')} on the "
            f"large backlog; " + run_note(big),
        )
    )
    await bench.drop_schema(f"bench_backlog_x{factor}")


# -- entry point -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=None, help="documents in the base backlog [2000]")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run of the harness (~1 minute)")
    parser.add_argument(
        "--naive-sample", type=int, default=None, help="records the naive baseline does [100]"
    )
    parser.add_argument("--backlog-factor", type=int, default=10, help="the large backlog, x base [10]")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the latency sweep")
    parser.add_argument("--out", type=Path, default=None, help="results file [bench/RESULTS.md]")
    parser.add_argument("--plot", type=Path, default=None, help="plot file [bench/throughput.png]")
    parser.add_argument("--workdir", type=Path, default=Path(".run/bench"), help="worker logs [.run/bench]")
    args = parser.parse_args(argv)
    if args.docs is None:
        args.docs = 200 if args.quick else 2000
    if args.naive_sample is None:
        args.naive_sample = 20 if args.quick else 100
    # A smoke run must not overwrite the real results.
    args.out = args.out or (args.workdir / "RESULTS.md" if args.quick else ROOT / "RESULTS.md")
    args.plot = args.plot or (args.workdir / "throughput.png" if args.quick else ROOT / "throughput.png")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
    settings = {
        **WORKER_SETTINGS,
        "run flags": shlex.join(["--stop-when-idle", f"{IDLE_SECONDS:g}", *WORKER_ARGS]),
        "documents": str(args.docs),
        "topic partitions": str(PARTITIONS),
        "slow embedding latency": f"{LATENCY_MS:g} ms",
        "scaling": f"{SCALING_PROCESSES} processes with {SCALING_SETTINGS}",
    }
    report = Report(command=command, settings=settings)
    shutil.rmtree(args.workdir / "logs", ignore_errors=True)
    started = time.perf_counter()
    print(f"== {command}: starting the embedded stack", flush=True)
    slow = EmbeddingServer(("--latency-ms", f"{LATENCY_MS:g}"))
    try:
        with embedded_stack() as stack:
            slow.start()
            bench = Bench(args, stack, slow, report, args.workdir / "logs")
            asyncio.run(bench_main(bench))
    except (RuntimeError, OSError, TimeoutError, subprocess.SubprocessError) as exc:
        print(f"bench: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        slow.stop()
    report.seconds = time.perf_counter() - started
    report.notes.append(
        f"Worker logs of the last run are in `{args.workdir / 'logs'}`. The whole benchmark took "
        f"{report.seconds:.0f} s."
    )
    plot = plot_throughput(report, args.plot, copy_rows_per_s=report.copy_rows_per_s)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(report, plot))
    failed = [c.item for c in report.checks if c.passed is False]
    print(f"== done in {report.seconds:.0f} s: {args.out}" + (f", plot {plot}" if plot else ""))
    print(f"== {len(failed)} goal(s) not met" + (f": {', '.join(failed)}" if failed else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
