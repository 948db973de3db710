"""``ingest-worker`` (= ``python -m worker``): run, migrate, produce, search, dev.

Every setting is an environment variable with an equal ``--flag`` (flags win). Bad
configuration exits 2 with one line naming the setting.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, NoReturn

import structlog
from aiokafka.errors import KafkaError

from worker import logs
from worker.errors import ConfigError, WorkerError
from worker.kafka import BrokerError, refusal
from worker.settings import Settings, describe

log = structlog.get_logger()


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    flags = {name.lower(): getattr(args, name.lower(), None) for name, _, _ in describe()}
    try:
        settings = Settings.load(os.environ, flags)
    except ConfigError as exc:
        print(f"ingest-worker: error: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level, secrets=settings.secrets)
    command: Callable[[Settings, argparse.Namespace], Coroutine[Any, Any, int]] = args.command
    try:
        try:
            return _run_async(command(settings, args))
        except KafkaError as exc:  # whatever a command did not handle: one line, not a traceback
            raise refusal(exc, settings) or BrokerError(f"{type(exc).__name__}: {exc}") from exc
    except ConfigError as exc:
        print(f"ingest-worker: error: {exc}", file=sys.stderr)
        return 2
    except WorkerError as exc:
        print(f"ingest-worker: stopped: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _run_async(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency everywhere but Windows
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


class _Parser(argparse.ArgumentParser):
    """A usage error is one line and where to look, not the usage of 50 flags."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    settings_flags = _Parser(add_help=False)
    group = settings_flags.add_argument_group("settings (each also an environment variable)")
    for name, default, help_text in describe():
        shown = f" [{default}]" if default else ""
        group.add_argument(
            f"--{name.lower().replace('_', '-')}",
            dest=name.lower(),
            metavar="VALUE",
            help=f"{name}: {help_text}{shown}",
        )

    parser = _Parser(
        prog="ingest-worker", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="name", required=True, metavar="COMMAND")

    run = commands.add_parser("run", parents=[settings_flags], help="join the group and ingest until stopped")
    run.add_argument(
        "--stop-when-idle",
        type=float,
        metavar="SECONDS",
        help="exit 0 once caught up, committed and idle this long",
    )
    run.add_argument("--no-migrate", action="store_true", help="do not create the schema at start")
    run.add_argument(
        "--backfill",
        action="store_true",
        help="load without the HNSW index; build it once caught up (at the end with --stop-when-idle)",
    )
    run.add_argument("--progress", action="store_true", help="show a progress bar on stderr")
    run.set_defaults(command=_cmd_run)

    migrate = commands.add_parser(
        "migrate", parents=[settings_flags], help="create extension, tables, indexes"
    )
    migrate.add_argument("--no-ann-index", action="store_true", help="leave the HNSW index out (backfill)")
    migrate.set_defaults(command=_cmd_migrate)

    index = commands.add_parser("build-index", parents=[settings_flags], help="build the HNSW index now")
    index.set_defaults(command=_cmd_build_index)

    produce = commands.add_parser("produce", parents=[settings_flags], help="publish JSON-lines events")
    produce.add_argument("file", help="JSON-lines file, or - for standard input")
    produce.set_defaults(command=_cmd_produce)

    replay = commands.add_parser(
        "replay", parents=[settings_flags], help="move dead letters back to their topic, then exit"
    )
    replay.add_argument("--to", metavar="TOPIC", help="publish here instead of each record's original topic")
    replay.add_argument("--stage", choices=("decode", "validate", "chunk", "embed", "store"))
    replay.add_argument(
        "--error-class", metavar="NAME", help="only records that failed with this error class"
    )
    replay.add_argument("--original-topic", metavar="TOPIC", help="only records that came from this topic")
    replay.add_argument("--key", help="only records with this key (document id)")
    replay.add_argument(
        "--since", type=_iso_time, metavar="ISO-8601", help="failed at or after (dlq.failed.at)"
    )
    replay.add_argument("--until", type=_iso_time, metavar="ISO-8601", help="failed before")
    replay.add_argument(
        "--dry-run", action="store_true", help="list what would move; move and commit nothing"
    )
    replay.add_argument(
        "--max-replays", type=_count(0), metavar="N", help="refuse records already replayed N times"
    )
    replay.add_argument(
        "--rate", type=_rate, metavar="PER_SECOND", help="records per second at most; 0 for no limit [0]"
    )
    replay.add_argument("--group", help="consumer group [<KAFKA_GROUP_ID>.replay]; a new one starts over")
    replay.set_defaults(command=_cmd_replay)

    search = commands.add_parser("search", parents=[settings_flags], help="print the chunks nearest a query")
    search.add_argument("query")
    search.add_argument("-k", type=_count(1), default=5, help="how many hits [5]")
    search.add_argument("--tenant", help="only chunks of this tenant's documents")
    search.set_defaults(command=_cmd_search)

    dev = commands.add_parser("dev", parents=[settings_flags], help="start the embedded stack")
    dev.add_argument("--partitions", type=_count(1), default=4, help="partitions of the topic it creates [4]")
    dev.add_argument(
        "--broker",
        choices=("tansu", "kafka"),
        default="tansu",
        help="Tansu (in memory, starts at once) or Apache Kafka (from Maven Central) [tansu]",
    )
    dev.add_argument("--workdir", type=Path, default=Path(".run/dev"), help="where its data lives [.run/dev]")
    dev.set_defaults(command=_cmd_dev)
    return parser


# -- run ------------------------------------------------------------------------------------


async def _cmd_run(settings: Settings, args: argparse.Namespace) -> int:
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
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            abort.set()
            return
        log.warning("stop_requested", signal=sig.name, grace_seconds=grace, hint="again to stop at once")
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


# -- migrate, produce, search -------------------------------------------------------------


async def _cmd_build_index(settings: Settings, _: argparse.Namespace) -> int:
    from worker.store import Store

    started = time.perf_counter()
    store = Store(settings)
    await store.check()  # a missing schema says "run migrate", not a traceback
    built = await store.build_ann_index()
    state = "built" if built else "already there"
    print(f"HNSW index on {settings.database_schema}.chunks {state} ({time.perf_counter() - started:.1f}s)")
    return 0


async def _cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
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


async def _cmd_produce(settings: Settings, args: argparse.Namespace) -> int:
    from worker.produce import produce

    return await produce(settings, args.file)


async def _cmd_search(settings: Settings, args: argparse.Namespace) -> int:
    from worker.embed import OpenAIEmbedder
    from worker.store import Store

    if not args.query.strip():
        print("ingest-worker search: error: the query is empty", file=sys.stderr)
        return 2
    async with OpenAIEmbedder(settings) as embedder, Store(settings) as store:
        await store.check()  # tables there, column of these dimensions, this model
        [vector] = await embedder.embed([args.query])
        hits = await store.search(vector, args.k, tenant=args.tenant)
    if not hits:
        print("no chunks stored yet" if args.tenant is None else f"no chunks of tenant {args.tenant!r}")
    for rank, hit in enumerate(hits, 1):
        snippet = " ".join(hit.content.split())[:160]
        print(f"{rank:2}. {hit.score:.3f}  {hit.doc_id} #{hit.chunk_index}\n    {snippet}")
    return 0


def _count(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
        return value

    return parse


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 (unlimited) or more, not {text}")
    return value


def _iso_time(text: str) -> dt.datetime:
    from worker.replay import parse_time

    value = parse_time(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}")
    return value


async def _cmd_replay(settings: Settings, args: argparse.Namespace) -> int:
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


async def _cmd_dev(settings: Settings, args: argparse.Namespace) -> int:
    from worker.dev.stack import embedded_stack
    from worker.kafka import ensure_topic

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with embedded_stack(args.workdir.resolve(), broker=args.broker) as stack:
        env = stack.env()
        stack_settings = Settings.load(env, {"kafka_topic": ",".join(settings.kafka_topic)})
        for topic in settings.kafka_topic:
            await ensure_topic(stack_settings, topic, args.partitions)
        print("# the embedded stack is up; paste these into another shell, then `ingest-worker run`:")
        for key, value in env.items():
            print(f"export {key}='{value}'")
        print(f"export KAFKA_TOPIC='{','.join(settings.kafka_topic)}'", flush=True)
        started = time.monotonic()
        await stop.wait()
        print(f"# stopping after {time.monotonic() - started:.0f}s", file=sys.stderr)
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0
