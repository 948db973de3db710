"""What each ``ingest-worker`` command does, once the command line is parsed (worker.cli)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import structlog

from worker.errors import ConfigError, WorkerError
from worker.settings import Settings
from worker.signals import on_stop_signals

log = structlog.get_logger()


# -- run ------------------------------------------------------------------------------------


async def run(settings: Settings, args: argparse.Namespace) -> int:
    from worker.app import bound_heap_growth, serve

    bound_heap_growth()
    stop, abort = asyncio.Event(), asyncio.Event()
    _on_stop_signals(stop, abort, grace=settings.shutdown_grace_seconds)
    serving = asyncio.ensure_future(
        serve(
            settings,
            stop=stop,
            stop_when_idle=args.stop_when_idle,
            migrate=not args.no_migrate,
            backfill=args.backfill,
            progress=args.progress,
        )
    )
    aborting = asyncio.ensure_future(abort.wait())
    await asyncio.wait({serving, aborting}, return_when=asyncio.FIRST_COMPLETED)
    if not serving.done():  # a second signal: leave now, as a crash would (nothing is lost)
        log.warning("stop_forced", hint="records not committed are delivered again")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    aborting.cancel()
    serving.result()
    return 0


def _on_stop_signals(stop: asyncio.Event, abort: asyncio.Event, *, grace: float) -> None:
    """SIGTERM or SIGINT: stop (finish in-flight work within ``grace``, commit, leave), saying so
    at once; a second one: ``abort``. The handlers only set events."""

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            abort.set()
            return
        log.warning("stop_requested", signal=sig.name, grace_seconds=grace, hint="again to stop at once")
        stop.set()

    on_stop_signals(on_signal)


# -- migrate, produce, search -------------------------------------------------------------


async def build_index(settings: Settings, _: argparse.Namespace) -> int:
    from worker.store import Store

    started = time.perf_counter()
    store = Store(settings)
    await store.check(chunking=False)  # a missing schema says "run migrate", not a traceback
    built = await store.build_ann_index()
    state = "built" if built else "already there"
    print(f"HNSW index on {settings.database_schema}.chunks {state} ({time.perf_counter() - started:.1f}s)")
    return 0


async def migrate(settings: Settings, args: argparse.Namespace) -> int:
    from worker.store import Store

    try:
        await Store(settings).migrate(ann_index=not args.no_ann_index)
    except ConfigError:
        raise
    except WorkerError as exc:
        print(f"ingest-worker: migrate failed: {exc}", file=sys.stderr)
        return 1
    column = f"{settings.vector_type}({settings.embedding_dimensions})"
    print(f"schema {settings.database_schema} is ready ({column})")
    return 0


async def produce(settings: Settings, args: argparse.Namespace) -> int:
    from worker.produce import produce

    return await produce(settings, args.file)


async def search(settings: Settings, args: argparse.Namespace) -> int:
    from worker.embed import OpenAIEmbedder
    from worker.generations import Generation
    from worker.store import Store
    from worker.types import Vector

    if not args.query.strip():
        print("ingest-worker search: error: the query is empty", file=sys.stderr)
        return 2
    async with OpenAIEmbedder(settings) as embedder, Store(settings) as store:
        await store.check(chunking=False)  # tables there, settings naming a generation of the index

        async def embed(served: Generation) -> Vector:  # with the served generation's model
            embedder.use(served.settings(settings))
            [vector] = await embedder.embed([args.query])
            return vector

        _, hits = await store.search_served(embed, args.k, tenant=args.tenant)
    if not hits:
        print("no chunks stored yet" if args.tenant is None else f"no chunks of tenant {args.tenant!r}")
    for rank, hit in enumerate(hits, 1):
        snippet = " ".join(hit.content.split())[:160]
        print(f"{rank:2}. {hit.score:.3f}  {hit.doc_id} #{hit.chunk_index}\n    {snippet}")
    return 0


async def usage(settings: Settings, args: argparse.Namespace) -> int:
    from worker.store import Store

    since = args.since or dt.datetime.now(dt.UTC).date() - dt.timedelta(days=30)
    async with Store(settings) as store:
        rows = await store.usage_rows(since, args.tenant)
    if rows is None:
        print(
            "ingest-worker usage: error: no embedding_usage table in DATABASE_SCHEMA; run `migrate`",
            file=sys.stderr,
        )
        return 1
    price = settings.embedding_price_per_mtok / 1_000_000
    header = (
        "day",
        "tenant",
        "model",
        "requests",
        "inputs",
        "tokens",
        "cost",
        "saved inputs",
        "saved tokens",
        "saved",
    )
    table: list[tuple[str, ...]] = [header]
    totals = [0, 0, 0, 0, 0]
    for row in rows:
        counts = [row["requests"], row["inputs"], row["tokens"], row["saved_inputs"], row["saved_tokens"]]
        totals = [a + b for a, b in zip(totals, counts, strict=True)]
        table.append((str(row["day"]), row["tenant"] or "-", row["model"], *_counted(counts, price)))
    table.append(("total", "", "", *_counted(totals, price)))
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print(
            "  ".join(
                cell.ljust(w) if i < 3 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(line, widths, strict=True))
            )
        )
    price_per_mtok = settings.embedding_price_per_mtok
    print(f"cost at {price_per_mtok:g} per million tokens (EMBEDDING_PRICE_PER_MTOK); saved tokens estimated")
    return 0


async def reindex(settings: Settings, args: argparse.Namespace) -> int:
    from worker import reindex as do

    try:
        return await _reindex(settings, args)
    except do.NotReady as exc:
        print(f"ingest-worker reindex {args.action}: {exc}", file=sys.stderr)
        return 1


async def _reindex(settings: Settings, args: argparse.Namespace) -> int:
    import orjson

    from worker import reindex as do

    if args.action == "start":
        stop = asyncio.Event()
        on_stop_signals(lambda _: stop.set())
        wanted = do.Wanted(
            model=args.model,
            dimensions=args.dimensions,
            vector_type=args.new_vector_type,
            chunk_size=args.new_chunk_size,
            chunk_overlap=args.new_chunk_overlap,
            chunk_unit=args.new_chunk_unit,
        )
        await do.start(settings, wanted, stop, fillers=args.fillers or do.FILLERS)
        return 130 if stop.is_set() else 0
    if args.action == "fill":
        stop = asyncio.Event()
        on_stop_signals(lambda _: stop.set())
        documents, chunks = await do.fill(settings, stop, report_every=args.report_every)
        if not args.report_every:
            print(f"filled {documents:,} documents ({chunks:,} chunks)")
        return 130 if stop.is_set() else 0
    if args.action == "status":
        for row in await do.status(settings):
            if args.json:
                print(orjson.dumps(row).decode())
                continue
            total = f"~{row['chunks_total']:,}" if row["chunks_total"] is not None else "?"
            problems = f", {row['problems']:,} cannot be filled" if row["problems"] else ""
            print(
                f"#{row['generation']} {row['state']:<8} {row['model']} {row['vector_type']}"
                f"({row['dimensions']}) chunks {row['chunking']}: documents {row['documents_done']:,} "
                f"of {row['documents']:,}, chunks {row['chunks_done']:,} of {total}{problems}"
            )
        return 0
    if args.action in ("switch", "rollback"):
        now, before = await do.switch(settings, rollback=args.action == "rollback", wait=args.wait)
        print(
            f"generation {now.describe()} served; {before.describe()} kept, and kept current "
            "(`reindex rollback` serves it again, `reindex drop` removes it)"
        )
        return 0
    dropped = await do.drop(settings)
    print(f"generation {dropped.describe()} dropped")
    return 0


async def verify(settings: Settings, args: argparse.Namespace) -> int:
    import orjson

    from worker.topic_fold import TopicMissing
    from worker.verify import NotMigrated, verify

    topics = None
    if args.topic is not None:  # --topic alone: KAFKA_TOPIC's
        topics = tuple(t.strip() for t in args.topic.split(",") if t.strip()) or settings.kafka_topic
    try:
        report = await verify(settings, topics)
    except NotMigrated as exc:
        print(f"ingest-worker verify: error: {exc}", file=sys.stderr)
        return 1
    except TopicMissing as exc:
        print(
            f"ingest-worker verify: error: {'--topic' if args.topic else 'KAFKA_TOPIC'}: {exc}",
            file=sys.stderr,
        )
        return 2
    if args.json:
        print(orjson.dumps(report.as_json()).decode())
    else:
        for line in report.lines():
            print(line)
    return 0 if report.clean else 1


def _counted(counts: list[int], price: float) -> tuple[str, ...]:
    requests, inputs, tokens, saved_inputs, saved_tokens = counts
    return (
        f"{requests:,}",
        f"{inputs:,}",
        f"{tokens:,}",
        f"{tokens * price:,.4f}",
        f"{saved_inputs:,}",
        f"{saved_tokens:,}",
        f"{saved_tokens * price:,.4f}",
    )


async def replay(settings: Settings, args: argparse.Namespace) -> int:
    from worker.replay import Filters, replay

    filters = Filters(args.stage, args.error_class, args.key, args.original_topic, args.since, args.until)
    summary = await replay(
        settings,
        filters=filters,
        to_topic=args.to,
        dry_run=args.dry_run,
        max_replays=args.max_replays,
        rate=args.rate,
        group=args.group,
    )
    for line in summary.lines():
        print(line)
    return 0


# -- dev --------------------------------------------------------------------------------------


async def dev(settings: Settings, args: argparse.Namespace) -> int:
    from worker.dev.processes import StackError
    from worker.dev.stack import embedded_stack
    from worker.kafka import ensure_topic

    stop = asyncio.Event()
    on_stop_signals(lambda _: stop.set())
    try:
        with embedded_stack(args.workdir.resolve(), broker=args.broker) as stack:
            env = stack.env()
            topics = ",".join(settings.kafka_topic)
            stack_settings = Settings.load(env, {"kafka_topic": topics})
            for topic in settings.kafka_topic:
                await ensure_topic(stack_settings, topic, args.partitions)
            env["KAFKA_TOPIC"] = topics
            if settings.kafka_dlq_topic:
                env["KAFKA_DLQ_TOPIC"] = settings.kafka_dlq_topic
            env["HEALTH_PORT"] = str(settings.health_port)
            print("# the embedded stack is up; paste these into another shell:")
            for key, value in env.items():
                print(f"export {key}='{value}'")
            print(f"# then run the worker there: {_self_command()} run", flush=True)
            started = time.monotonic()
            await stop.wait()
            print(f"# stopping after {time.monotonic() - started:.0f}s", file=sys.stderr)
    except StackError as exc:  # another stack in this workdir (left alone), or one that did not start
        print(f"ingest-worker dev: error: {exc}", file=sys.stderr)
        return 1
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0


def _self_command() -> str:
    """How another shell runs this same ingest-worker: the console script's absolute path when
    that is what runs, else this interpreter with ``-m worker``."""
    script = Path(sys.argv[0])
    if script.stem == "ingest-worker" and script.is_file():
        return shlex.quote(str(script.absolute()))
    return f"{shlex.quote(sys.executable)} -m worker"
