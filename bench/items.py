"""The measured items, in the order they run, each adding its checks to the report."""

from __future__ import annotations

from collections.abc import Mapping

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.budget import budget
from bench.ceilings import Ceiling, chunk_rows, consume_ceiling, copy_ceiling
from bench.churn import churn
from bench.context import LARGE_TOPIC, TOPIC, Bench, Limits, best, little_bound, run_note, spread
from bench.corpus import make_documents, publish
from bench.loop import loop_lag
from bench.naive import NaiveConfig, run_naive
from bench.reindex import reindex
from bench.report import Check, SweepPoint, megabytes, rate
from bench.runner import WorkerRun

# Goals, from the project's issue.
GOAL_INSTANT_OF_CEILING = 0.8  # of the COPY ceiling, when the worker runs with --backfill
GOAL_INSTANT_OF_PARALLEL = 0.9  # of the COPY + HNSW ceiling on the worker's DATABASE_WRITERS connections
GOAL_SLOW_OF_BOUND = 0.85
GOAL_OVER_NAIVE = 20.0
GOAL_RSS_GROWTH = 1.2
GOAL_RSS_BYTES = 250 * 1_048_576
GOAL_TWO_PROCESSES = 1.8
GOAL_SAVED = 1.0


# -- setup -------------------------------------------------------------------------------------


async def publish_base(bench: Bench) -> None:
    plan = bench.plan
    print(f"- publishing {plan.docs} documents to `{TOPIC}` ({plan.partitions} partitions) ...", flush=True)
    admin = AIOKafkaAdminClient(bootstrap_servers=bench.bootstrap)
    await admin.start()
    try:
        await admin.create_topics(
            [NewTopic(t, plan.partitions, replication_factor=1) for t in (TOPIC, LARGE_TOPIC)]
        )
    finally:
        await admin.close()
    bench.events = make_documents(plan.docs)
    bench.base = await publish(bench.bootstrap, TOPIC, bench.events, partitions=plan.partitions)
    ends = sorted((tp.partition, end) for tp, end in bench.base.ends.items())
    print(
        f"    {bench.base.payload_bytes / 1e6:.1f} MB in {bench.base.seconds:.1f}s; ends {ends}", flush=True
    )


# -- 1. ceilings -------------------------------------------------------------------------------


async def ceilings(bench: Bench) -> Limits:
    assert bench.base is not None
    plan, report = bench.plan, bench.report
    print("- ceilings ...", flush=True)
    consume = await consume_ceiling(
        bench.bootstrap, bench.base, max_poll_records=plan.setting("KAFKA_MAX_POLL_RECORDS", 500)
    )
    await bench.migrate("bench_template")
    stack_env = bench.stack.env()
    rows = chunk_rows(
        bench.events,
        chunk_size=plan.setting("CHUNK_SIZE", 1000),
        chunk_overlap=plan.setting("CHUNK_OVERLAP", 100),
        model=stack_env["EMBEDDING_MODEL"],
        dimensions=int(stack_env["EMBEDDING_DIMENSIONS"]),
    )
    writers = plan.setting("DATABASE_WRITERS", 2)

    async def copy_once(approximate_index: bool, connections: int = 1) -> Ceiling:
        return await copy_ceiling(
            bench.database_url,
            "bench_template",
            rows,
            approximate_index=approximate_index,
            connections=connections,
            index_build_memory=plan.worker_settings.get("INDEX_BUILD_MEMORY", "512MB"),
        )

    async def copy_best(approximate_index: bool) -> Ceiling:
        tries = [await copy_once(approximate_index) for _ in range(plan.repeats)]
        return min(tries, key=lambda c: c.seconds)

    copy_ann = await copy_best(True)
    copy_backfill = await copy_best(False)

    async def copy_parallel() -> Ceiling:
        return await copy_once(True, writers)

    report.add(
        Check(
            "1a. ceiling: consume + decode",
            f"{rate(consume.per_s, 'records/s')} (= docs/s)",
            note="aiokafka with the partitions assigned (no group) from offset 0, orjson.loads of each "
            f"value; best of 3 reads of {consume.items} records",
        )
    )
    how = {
        "1b": "",
        "1c": ", its HNSW index dropped; building it afterwards took "
        f"{copy_backfill.build_seconds:.1f} s more (COPY + build: "
        f"{rate(copy_backfill.with_build().per_s, 'rows/s')}, the ceiling for a `--backfill` worker)",
    }
    for number, ceiling in (("1b", copy_ann), ("1c", copy_backfill)):
        report.add(
            Check(
                f"{number}. ceiling: binary {ceiling.name}",
                f"{rate(ceiling.per_s, 'rows/s')}, {rate(ceiling.docs_per_s, 'docs/s')}",
                note=f"best of {plan.repeats}: copy_records_to_table (pgvector codec) of "
                f"{ceiling.items} chunk rows ({ceiling.docs} docs) with their vectors into a "
                f"`LIKE chunks INCLUDING ALL` copy of a migrated schema's table{how[number]}; the "
                f"machine kept {ceiling.cores:.2f} cores busy meanwhile",
            )
        )
    limits = Limits(consume, copy_backfill.with_build() if plan.backfill else copy_ann, copy_parallel)
    report.copy_rows_per_s = limits.copy.per_s
    return limits


# -- 2. and 7. instant embeddings, then the same stream again ---------------------------------------


async def instant_and_redelivery(bench: Bench, limits: Limits) -> tuple[WorkerRun, WorkerRun]:
    """Items 2, 10 and 7; returns the first instant run (the base of item 5) and the fastest."""
    first, fast = await instant(bench, limits, repeats=3 if bench.plan.repeats > 1 else 1)
    await redelivery(bench, first)
    return first, fast


async def instant(bench: Bench, limits: Limits, repeats: int | None = None) -> tuple[WorkerRun, WorkerRun]:
    """Items 2 and 10; the first run's schema (``bench_instant``) is kept for item 7."""
    report = bench.report
    await bench.warm_instant()
    # Each run follows a measurement of the same-parallelism ceiling: both see the machine as it is
    # then (its speed drifts by several per cent over minutes), and the best of each counts.
    await limits.measure_parallel_again()
    first = await bench.run("instant", embedding_url=bench.instant.url)  # its schema is redelivered into
    inputs_first = int(bench.instant.stats()["inputs"])
    runs = [first]
    for i in range(2, (repeats or bench.plan.repeats) + 1):
        await limits.measure_parallel_again()
        runs.append(await bench.run(f"instant_{i}", embedding_url=bench.instant.url))
        await bench.drop_schema(f"bench_instant_{i}")
    fast = best(runs)
    parallel = limits.parallel
    report.add(
        Check(
            f"1d. ceiling: binary {parallel.name}",
            f"{rate(parallel.per_s, 'rows/s')}, {rate(parallel.docs_per_s, 'docs/s')}",
            note=f"best of {len(limits.parallel_runs)} ("
            + ", ".join(rate(c.per_s, "rows/s") for c in limits.parallel_runs)
            + "), each measured just before one of item 2's runs: copy_records_to_table (pgvector "
            f"codec) of {parallel.items} chunk rows ({parallel.docs} docs) with their vectors into a "
            "`LIKE chunks INCLUDING ALL` copy of a migrated schema's table, split by document over "
            f"{bench.plan.setting('DATABASE_WRITERS', 2)} connections copying at once, one transaction "
            "each (the worker's DATABASE_WRITERS): the ceiling item 2 is measured against; the machine "
            f"kept {parallel.cores:.2f} cores busy meanwhile",
        )
    )
    one = fast.docs_per_s / limits.docs_per_s
    if bench.plan.backfill:  # no index while loading: against the COPY without it, and the build
        ratio, goal, against = (
            one,
            GOAL_INSTANT_OF_CEILING,
            f"min(ceilings) = {rate(limits.docs_per_s, 'docs/s')}",
        )
        beside = ""
    else:  # against the database taking the same rows on as many connections as the worker writes with
        same = min(limits.consume.docs_per_s, limits.parallel.docs_per_s)
        ratio, goal, against = (
            fast.docs_per_s / same,
            GOAL_INSTANT_OF_PARALLEL,
            f"the {limits.parallel.name} ceiling",
        )
        beside = f" ({one:.2f} of the 1-connection one)"
    report.add(
        Check(
            "2. end to end, instant embeddings",
            f"{rate(fast.docs_per_s, 'docs/s')}, {rate(fast.chunks_per_s, 'chunks/s')}; "
            f"{ratio:.2f} of {against}{beside}{spread(runs, fast)}",
            f">= {goal}",
            fast.ok and ratio >= goal,
            run_note(
                fast,
                f"; {inputs_first} embedding inputs in the first run; the instant server answers from "
                "memory the chunks it was given before the runs (Bench.warm_instant), as a remote API's "
                "compute is not on this machine and the ceilings compute their vectors before their "
                "clock starts",
            ),
        )
    )

    report.add(
        Check(
            "10. where a write transaction's time goes, instant embeddings",
            write_breakdown(fast.write_seconds),
            note="`ingest_write_step_seconds{step}` summed over the best instant run (the worker logs "
            "the totals in its `worker_stopped` line): acquire = waiting for a pool connection; lock = "
            "the documents' FOR UPDATE read; copy_new = the binary COPY of new documents' chunks "
            "into the table; stage = the binary COPY of stored documents' chunks into a temporary "
            "table; merge = the insert from it into chunks (the HNSW index's cost is in copy_new and "
            "merge); trim = the surplus chunks' delete; offsets = the source_offsets row; commit = "
            "the transaction's commit",
        )
    )
    worker_cpu = fast.cpu_measured.get("worker", 0.0)
    report.add(
        Check(
            "11. the worker's own CPU, instant embeddings",
            f"{worker_cpu / fast.docs * 1000:.2f} CPU-s per 1,000 documents, "
            f"{worker_cpu / max(fast.chunks, 1) * 1000:.2f} per 1,000 chunks",
            note="the worker process's CPU seconds (/proc) over the measured interval of the best "
            f"instant run ({worker_cpu:.2f} s for {fast.docs} documents, {fast.chunks} chunks; "
            f"{fast.cpu.get('worker', 0.0):.2f} s from spawn to exit, start-up and the idle wait "
            "included): what the worker costs the machine beside the database",
        )
    )
    return first, fast


async def redelivery(bench: Bench, first: WorkerRun) -> None:
    """Item 7: the same stream consumed again into the first instant run's schema."""
    report = bench.report
    bench.instant.reset()
    again = await bench.run(
        "redelivery", embedding_url=bench.instant.url, schema="bench_instant", fresh=False
    )
    inputs = int(bench.instant.stats()["inputs"])
    saved = 1 - inputs / first.chunks if first.chunks else 0.0
    report.add(
        Check(
            "7. embedding inputs saved on redelivery",
            f"{saved:.0%} ({inputs} inputs embedded again for {first.chunks} unchanged chunks)",
            f">= {GOAL_SAVED:.0%}",
            again.ok and first.ok and saved >= GOAL_SAVED,
            f"the same {again.docs} records consumed again by a new group into the instant run's schema; "
            f"inputs from the embedding server's /admin/stats after /admin/reset; {again.chunks} chunks "
            "stored afterwards; " + run_note(again),
        )
    )
    await bench.drop_schema("bench_instant")


# -- 3. and 4. slow embeddings, and the naive baseline at the same latency ------------------------


async def slow_and_naive(bench: Bench, limits: Limits) -> WorkerRun:
    plan, report = bench.plan, bench.report
    concurrency = plan.setting("EMBEDDING_CONCURRENCY", 4)
    batch_size = plan.setting("EMBEDDING_BATCH_SIZE", 64)
    bench.slow.set_faults(latency_ms=float(plan.latency_ms))
    runs = await bench.repeat("slow", embedding_url=bench.slow.url)
    for run in runs:
        await bench.drop_schema(f"bench_{run.name}")
    slow = best(runs)
    bound = little_bound(concurrency, batch_size, plan.latency_ms)
    parallel = min(bound, limits.parallel.per_s)
    ratio = slow.chunks_per_s / min(bound, limits.chunks_per_s)
    report.add(
        Check(
            f"3. end to end, embeddings after {plan.latency_ms:g} ms",
            f"{rate(slow.docs_per_s, 'docs/s')}, {rate(slow.chunks_per_s, 'chunks/s')}; {ratio:.2f} of "
            f"min(Little's bound {rate(bound, 'chunks/s')}, "
            f"ceilings {rate(limits.chunks_per_s, 'chunks/s')}){spread(runs, slow)}",
            f">= {GOAL_SLOW_OF_BOUND}",
            slow.ok and ratio >= GOAL_SLOW_OF_BOUND,
            run_note(
                slow,
                f"; bound = EMBEDDING_CONCURRENCY {concurrency} x EMBEDDING_BATCH_SIZE {batch_size} / "
                f"{plan.latency_ms:g} ms; against min(bound, the {limits.parallel.name} ceiling) the "
                f"ratio is {slow.chunks_per_s / parallel:.2f}",
            ),
        )
    )

    sample = min(plan.naive_sample, bench.docs)
    print(f"- naive baseline: {sample} records, one at a time ...", flush=True)
    await bench.migrate("bench_naive")
    stack_env = bench.stack.env()
    naive = await run_naive(
        NaiveConfig(
            bootstrap=bench.bootstrap,
            topic=TOPIC,
            group="bench-naive",
            database_url=bench.database_url,
            schema="bench_naive",
            embedding_url=bench.slow.url,
            model=stack_env["EMBEDDING_MODEL"],
            dimensions=int(stack_env["EMBEDDING_DIMENSIONS"]),
            chunk_size=plan.setting("CHUNK_SIZE", 1000),
            chunk_overlap=plan.setting("CHUNK_OVERLAP", 100),
        ),
        limit=sample,
    )
    await bench.drop_schema("bench_naive")
    speedup = slow.docs_per_s / naive.docs_per_s
    report.add(
        Check(
            f"4. worker vs naive baseline, {plan.latency_ms:g} ms",
            f"{speedup:.1f}x (naive {rate(naive.docs_per_s, 'docs/s')}, "
            f"{rate(naive.chunks_per_s, 'chunks/s')}; worker {rate(slow.docs_per_s, 'docs/s')})",
            f">= {GOAL_OVER_NAIVE:g}x",
            slow.ok and speedup >= GOAL_OVER_NAIVE,
            "bench/naive.py: decode, one embedding request per record, executemany INSERT, commit the "
            f"offset; capped to a sample of the first {naive.records} records ({naive.chunks} chunks) in "
            f"{naive.seconds:.1f} s (first record received to last offset committed), its rate "
            f"extrapolated: the whole {bench.docs}-record topic would take "
            f"{bench.docs / naive.docs_per_s:.0f} s against the worker's {slow.seconds:.1f} s",
        )
    )
    return slow


# -- 6. scaling over processes -----------------------------------------------------------------


async def scaling(bench: Bench) -> list[WorkerRun]:
    plan, report = bench.plan, bench.report
    bench.slow.set_faults(latency_ms=float(plan.latency_ms))
    shares: dict[int, float | None] = {}
    for processes in plan.scaling_processes:
        name = f"scale{processes}"
        run = await bench.run(
            name, embedding_url=bench.slow.url, processes=processes, settings=plan.scaling_settings
        )
        report.scaling.append(run)
        shares[processes] = busiest_share(run, await bench.chunks_by_partition(f"bench_{name}"))
        await bench.drop_schema(f"bench_{name}")
    one, *more = report.scaling
    speedups = {r.processes: r.steady_chunks_per_s / one.steady_chunks_per_s for r in more}
    two = speedups.get(2, 0.0)
    concurrency = int(
        plan.scaling_settings.get("EMBEDDING_CONCURRENCY", plan.setting("EMBEDDING_CONCURRENCY", 4))
    )
    batch_size = int(
        plan.scaling_settings.get("EMBEDDING_BATCH_SIZE", plan.setting("EMBEDDING_BATCH_SIZE", 64))
    )
    bound = little_bound(concurrency, batch_size, plan.latency_ms)
    report.add(
        Check(
            "6. scaling, 2 processes vs 1",
            f"{two:.2f}x ("
            + ", ".join(f"{r.processes}: {rate(r.steady_chunks_per_s, 'chunks/s')}" for r in report.scaling)
            + "; "
            + ", ".join(f"{n} processes {s:.2f}x" for n, s in speedups.items())
            + ")",
            f">= {GOAL_TWO_PROCESSES}x",
            all(r.ok for r in report.scaling) and two >= GOAL_TWO_PROCESSES,
            f"processes started together in one group on the {plan.partitions}-partition topic; "
            f"embeddings after {plan.latency_ms:g} ms with {plan.scaling_settings} (one process's "
            f"Little's bound {rate(bound, 'chunks/s')}; the one process ran at "
            f"{one.steady_chunks_per_s / bound:.2f} of it); each process's chunks/s over its own working "
            f"time (first batch's start to last batch stored, from its batch_stored lines), added up, so "
            f"the second or so one process works while the broker still completes another's join is left "
            f"out; over the whole run instead: "
            + ", ".join(f"{r.processes}: {rate(r.chunks_per_s, 'chunks/s')}" for r in report.scaling)
            + f" ({one.timing}). Partition imbalance: "
            + ", ".join(
                f"of {n} processes the busiest held {share:.0%} of the chunks, so at most {1 / share:.2f}x"
                for n, share in shares.items()
                if n > 1 and share is not None
            ),
        )
    )
    return report.scaling


def busiest_share(run: WorkerRun, chunks: Mapping[int, int]) -> float | None:
    """The largest share of the chunks one process's partitions held (None if not known)."""
    total = sum(chunks.values())
    held = [sum(chunks.get(p, 0) for p in partitions) for partitions in run.assignments]
    if not total or not all(run.assignments):
        return None
    return max(held) / total


# -- the sweep behind the plot -----------------------------------------------------------------


async def sweep(bench: Bench, known: Mapping[tuple[float, int], WorkerRun]) -> None:
    """Throughput at each latency x concurrency (one process), reusing runs already made."""
    plan = bench.plan
    batch_size = plan.setting("EMBEDDING_BATCH_SIZE", 64)
    try:
        for latency in plan.sweep_latencies_ms:
            for concurrency in plan.sweep_concurrency:
                run = known.get((latency, concurrency))
                if run is None:
                    name = f"sweep_{latency:g}ms_c{concurrency}"
                    bench.slow.set_faults(latency_ms=float(latency))
                    url = bench.instant.url if latency == 0 else bench.slow.url
                    settings = {"EMBEDDING_CONCURRENCY": str(concurrency)}
                    run = await bench.run(name, embedding_url=url, settings=settings)
                    await bench.drop_schema(f"bench_{name}")
                bench.report.sweep.append(SweepPoint(latency, concurrency, batch_size, run))
    finally:
        bench.slow.set_faults(latency_ms=float(plan.latency_ms))


# -- 5. memory against backlog size ------------------------------------------------------------


async def backlog(bench: Bench, base: WorkerRun) -> None:
    plan = bench.plan
    factor = plan.backlog_factor
    count = bench.docs * factor
    print(f"- publishing {count} documents to `{LARGE_TOPIC}` ...", flush=True)
    large = await publish(
        bench.bootstrap, LARGE_TOPIC, make_documents(count, prefix="large"), partitions=bench.plan.partitions
    )
    name = f"backlog_x{factor}"
    big = await bench.run(
        name,
        embedding_url=bench.instant.url,
        topic=LARGE_TOPIC,
        docs=large.records,
        within=max(240.0, 60 + large.records / 50),
    )
    await bench.drop_schema(f"bench_{name}")
    growth = big.max_rss / base.max_rss if base.max_rss else float("inf")
    bench.report.add(
        Check(
            f"5. peak RSS, {factor}x backlog vs base",
            f"{megabytes(big.max_rss)} vs {megabytes(base.max_rss)} = {growth:.2f}x",
            f"<= {GOAL_RSS_GROWTH}x and < {megabytes(GOAL_RSS_BYTES)}",
            big.ok and growth <= GOAL_RSS_GROWTH and big.max_rss < GOAL_RSS_BYTES,
            f"VmHWM of the worker process (polled from /proc every 0.2 s); base = the instant run "
            f"({base.docs} records); the large backlog ({large.records} records, "
            f"{large.payload_bytes / 1e6:.0f} MB) was all published before the worker started; "
            f"{rate(big.docs_per_s, 'docs/s')}, {rate(big.chunks_per_s, 'chunks/s')} on it; " + run_note(big),
        )
    )


async def run_all(bench: Bench, *, with_sweep: bool) -> None:
    plan = bench.plan
    await bench.warm_up()
    await publish_base(bench)
    limits = await ceilings(bench)
    first, fast = await instant_and_redelivery(bench, limits)
    slow = await slow_and_naive(bench, limits)
    scaled = await scaling(bench)
    await churn(bench)
    if with_sweep:
        concurrency = plan.setting("EMBEDDING_CONCURRENCY", 4)
        known = {(0.0, concurrency): fast, (plan.latency_ms, concurrency): slow}
        only_concurrency = set(plan.scaling_settings) <= {"EMBEDDING_CONCURRENCY"}
        if scaled and scaled[0].processes == 1 and only_concurrency:
            scaling_concurrency = int(plan.scaling_settings.get("EMBEDDING_CONCURRENCY", concurrency))
            known[(plan.latency_ms, scaling_concurrency)] = scaled[0]
        await sweep(bench, known)
    await backlog(bench, first)
    await ledger_cost(bench)
    await budget(bench)
    await reindex(bench)
    await loop_lag(bench)


def write_breakdown(seconds: Mapping[str, float]) -> str:
    """``step s (share), ...`` in the order of the transaction."""
    total = sum(seconds.values())
    if not total:
        return "no write_seconds in the worker's log"
    steps = ", ".join(f"{step} {s:.2f} s ({s / total:.0%})" for step, s in seconds.items())
    return f"{steps}; {total:.2f} s in all"


# -- 9. what the embedding ledger costs the write path -------------------------------------------


async def ledger_cost(bench: Bench) -> None:
    """Instant embeddings with the ledger (the default) and without (EMBEDDING_LEDGER_HOURS=0),
    alternating, so that both see the same machine; the best of each counts."""
    report, repeats = bench.report, max(3, bench.plan.repeats)
    await bench.warm_instant()  # the backlog's texts have pushed the corpus out of its memo
    runs: dict[bool, list[WorkerRun]] = {True: [], False: []}
    for i in range(repeats):
        for on in (True, False):
            name = f"ledger_{'on' if on else 'off'}_{i + 1}"
            settings = {} if on else {"EMBEDDING_LEDGER_HOURS": "0"}
            runs[on].append(await bench.run(name, embedding_url=bench.instant.url, settings=settings))
            await bench.drop_schema(f"bench_{name}")
    with_ledger, without = best(runs[True]), best(runs[False])
    ratio = with_ledger.chunks_per_s / without.chunks_per_s if without.chunks_per_s else 0.0
    report.add(
        Check(
            "9. the embedding ledger's cost, instant embeddings",
            f"{ratio:.2f} of the throughput without it ({rate(with_ledger.chunks_per_s, 'chunks/s')} vs "
            f"{rate(without.chunks_per_s, 'chunks/s')})",
            note=f"{repeats} runs each, alternating, the best counts ("
            + ", ".join(f"{rate(r.chunks_per_s, 'chunks/s')}" for r in runs[True])
            + " with; "
            + ", ".join(f"{rate(r.chunks_per_s, 'chunks/s')}" for r in runs[False])
            + " without); instant embeddings, so the database is the bottleneck and the ledger's "
            "writes (announcements, answers not stored within a quarter second, their removal) are "
            "all it costs",
        )
    )


ONLY = ("churn", "ledger", "write", "budget", "reindex", "loop")  # items `--only` can run by themselves


async def run_only(bench: Bench, item: str) -> None:
    """One item with just the setup it needs (``--only``)."""
    assert item in ONLY
    await bench.warm_up()
    if item == "ledger":
        await publish_base(bench)
        await ledger_cost(bench)
    elif item == "budget":
        await publish_base(bench)
        await budget(bench)
    elif item == "reindex":  # item 13: builds its own served index from the base corpus
        await publish_base(bench)
        await reindex(bench)
    elif item == "loop":  # item 14: its own topic
        await loop_lag(bench)
    elif item == "write":  # items 1, 2 and 10: the write path against the COPY ceilings
        await publish_base(bench)
        limits = await ceilings(bench)
        await instant(bench, limits, repeats=max(3, bench.plan.repeats))
        await bench.drop_schema("bench_instant")
    else:
        await churn(bench)
