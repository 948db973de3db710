"""``ingest-worker`` (= ``python -m worker``): the command line.

Every setting is an environment variable with an equal ``--flag`` (flags win). Bad
configuration exits 2 with one line naming the setting. Each command's ``--help`` shows the
settings that command reads (``USES``); every command accepts the others all the same, hidden
unless ``--help-all``; ``dev`` alone refuses those it does not honour.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import importlib.metadata
import os
import shlex
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

import structlog
from aiokafka.errors import KafkaError

from worker import logs
from worker.errors import ConfigError, WorkerError
from worker.kafka import BrokerError, refusal
from worker.settings import Settings, describe, secrets_in

log = structlog.get_logger()

DISTRIBUTION = "embedding-ingest-worker"  # pyproject.toml's [project] name

COMMANDS = {
    "run": "join the consumer group and ingest until stopped",
    "migrate": "create the extension, tables and indexes (idempotent)",
    "build-index": "build the HNSW index now (after a backfill)",
    "produce": "publish JSON-lines events from a file or standard input",
    "replay": "move dead letters back to their topic, then exit",
    "search": "embed a query and print the nearest chunks",
    "dev": "start the embedded stack and print the settings to reach it",
}

DESCRIPTION = """\
Kafka -> chunks -> embeddings (any OpenAI-compatible API) -> PostgreSQL with pgvector.

commands:
{commands}

Every setting comes from an environment variable or from the equal flag given to a
command (KAFKA_TOPIC or --kafka-topic; the flag wins). Prefer environment variables for
secrets: a flag is visible to anyone who can list this machine's processes.
'ingest-worker COMMAND --help' lists the settings that command uses, '--help-all' all of
them. Bad configuration exits 2 with one line naming the setting.
""".format(commands="\n".join(f"  {name:<13}{purpose}" for name, purpose in COMMANDS.items()))

# The settings each command's code path reads: its --help shows these, --help-all every one.
_KAFKA_CLIENT = (  # kafka.client_options: every Kafka client
    "KAFKA_BOOTSTRAP_SERVERS",
    "KAFKA_SECURITY_PROTOCOL",
    "KAFKA_SASL_MECHANISM",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD",
    "KAFKA_SSL_CAFILE",
)
_PRODUCER = (*_KAFKA_CLIENT, "KAFKA_PRODUCER_IDEMPOTENCE", "MAX_TEXT_BYTES")  # kafka.make_producer
# Store.migrate and Store.check: where the tables are, and the column and model they hold
_SCHEMA = ("DATABASE_URL", "DATABASE_SCHEMA", "VECTOR_TYPE", "EMBEDDING_DIMENSIONS", "EMBEDDING_MODEL")
_EMBEDDER = (  # embed.OpenAIEmbedder
    "EMBEDDING_URL",
    "EMBEDDING_MODEL",
    "EMBEDDING_DIMENSIONS",
    "EMBEDDING_SEND_DIMENSIONS",
    "EMBEDDING_API_KEY",
    "EMBEDDING_API_KEY_FILE",
    "EMBEDDING_CONCURRENCY",
    "EMBEDDING_TIMEOUT",
    "EMBEDDING_ENCODING",
    "EMBEDDING_ADAPTIVE",
    "EMBEDDING_MAX_RPM",
    "EMBEDDING_MAX_TPM",
)
USES: dict[str, frozenset[str]] = {
    "run": frozenset(name for name, _, _ in describe()),  # app.serve: the whole pipeline
    "migrate": frozenset({"LOG_LEVEL", *_SCHEMA, "INDEX_BUILD_MEMORY"}),
    "build-index": frozenset({"LOG_LEVEL", *_SCHEMA, "INDEX_BUILD_MEMORY"}),
    "produce": frozenset({"LOG_LEVEL", *_PRODUCER, "KAFKA_TOPIC"}),
    "replay": frozenset(
        {
            "LOG_LEVEL",
            *_PRODUCER,
            "KAFKA_TOPIC",  # the dead-letter topic's default name
            "KAFKA_DLQ_TOPIC",
            "KAFKA_GROUP_ID",
            "KAFKA_SESSION_TIMEOUT_MS",
        }
    ),
    "search": frozenset(
        {"LOG_LEVEL", *_SCHEMA, "DATABASE_POOL_SIZE", "DATABASE_STATEMENT_CACHE_SIZE", *_EMBEDDER}
    ),
    # The stack sets the broker, database and embedding settings itself; dev refuses the others.
    "dev": frozenset({"LOG_LEVEL", "KAFKA_TOPIC", "KAFKA_DLQ_TOPIC", "HEALTH_PORT"}),
}
REFUSES_UNUSED = frozenset({"dev"})  # commands that refuse (exit 2) a setting flag they do not use


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    flags = {name.lower(): getattr(args, name.lower(), None) for name, _, _ in describe()}
    refused = [name for name, _, _ in describe() if flags[name.lower()] is not None]
    refused = [name for name in refused if args.name in REFUSES_UNUSED and name not in USES[args.name]]
    if refused:
        takes = ", ".join(_flag(name) for name in sorted(USES[args.name]))
        print(
            f"ingest-worker {args.name}: error: {', '.join(map(_flag, refused))}: not taken by "
            f"{args.name}, which takes only {takes} (see `ingest-worker {args.name} --help`)",
            file=sys.stderr,
        )
        return 2
    try:
        settings = Settings.load(os.environ, flags)
    except ConfigError as exc:
        print(f"ingest-worker: error: {exc}", file=sys.stderr)
        return 2
    for name in secrets_in(flags):  # never the value: only which flag carried one
        print(
            f"ingest-worker: warning: {_flag(name)} puts a secret on the command line, where anyone "
            f"who can list this machine's processes can read it; set {name} in the environment instead",
            file=sys.stderr,
        )
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


def _flag(name: str) -> str:
    """A setting's flag: ``KAFKA_TOPIC`` -> ``--kafka-topic``."""
    return "--" + name.lower().replace("_", "-")


def _version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


class _Parser(argparse.ArgumentParser):
    """A usage error is one line and where to look, not the usage of 50 flags."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hidden_help: dict[argparse.Action, str] = {}  # settings --help leaves out: their help
        self.epilog_all: str | None = None  # the epilog of --help-all

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

    def show_all(self) -> None:
        for action, text in self.hidden_help.items():
            action.help = text
        self.epilog = self.epilog_all


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)


class _HelpAll(argparse.Action):
    """``--help-all``: the help with every setting, also those this command does not use."""

    def __init__(
        self,
        option_strings: Sequence[str],
        dest: str = argparse.SUPPRESS,
        default: Any = argparse.SUPPRESS,
        help: str | None = None,
    ) -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        assert isinstance(parser, _Parser)
        parser.show_all()
        parser.print_help()
        parser.exit()


def _add_settings(parser: _Parser, command: str) -> None:
    """Every setting as a flag; those ``command`` does not use hidden from --help."""
    used = USES[command]
    group = parser.add_argument_group("settings (each also an environment variable)")
    for name, default, help_text in describe():
        text = f"{name}: {help_text}" + (f" [{default}]" if default else "")
        action = group.add_argument(
            _flag(name),
            dest=name.lower(),
            metavar="VALUE",
            help=text if name in used else argparse.SUPPRESS,
        )
        if name not in used:
            parser.hidden_help[action] = text
    parser.add_argument(
        "--help-all", action=_HelpAll, help="show this help with every setting, also those not shown here"
    )
    hidden, total = len(parser.hidden_help), len(describe())
    help_all = f"'ingest-worker {command} --help-all'"
    if not hidden:
        ending = f"{command} uses every setting: {help_all} shows no more."
        ending_all = f"{command} uses every setting."
    elif command in REFUSES_UNUSED:
        ending = f"{command} refuses the other {hidden} settings as flags.\n{help_all} shows the rest."
        ending_all = f"{command} takes {total - hidden} of these {total} settings and refuses the others."
    else:
        ending = (
            f"{command} does not use the other {hidden} settings, but accepts them.\n"
            f"{help_all} shows the rest."
        )
        ending_all = f"{command} uses {total - hidden} of these {total} settings; --help shows only those."
    parser.epilog = ending
    parser.epilog_all = ending_all


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ingest-worker", description=DESCRIPTION, formatter_class=_Formatter)
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {_version()}", help="print the version and exit"
    )
    commands = parser.add_subparsers(
        dest="name", required=True, metavar="COMMAND", help="one of the commands above"
    )

    def command(name: str, description: str | None = None) -> _Parser:
        sub = commands.add_parser(  # no help=: the description lists the commands
            name,
            description=description or COMMANDS[name][0].upper() + COMMANDS[name][1:] + ".",
            formatter_class=_Formatter,
        )
        assert isinstance(sub, _Parser)
        return sub

    run = command("run")
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

    migrate = command("migrate")
    migrate.add_argument("--no-ann-index", action="store_true", help="leave the HNSW index out (backfill)")
    migrate.set_defaults(command=_cmd_migrate)

    index = command("build-index")
    index.set_defaults(command=_cmd_build_index)

    produce = command("produce")
    produce.add_argument("file", help="JSON-lines file, or - for standard input")
    produce.set_defaults(command=_cmd_produce)

    replay = command("replay")
    replay.add_argument("--to", metavar="TOPIC", help="publish here instead of each record's original topic")
    replay.add_argument(
        "--stage",
        choices=("decode", "validate", "chunk", "embed", "store"),
        help="only records that failed at this stage (dlq.error.stage)",
    )
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

    search = command("search")
    search.add_argument("query", help="the text to search for")
    search.add_argument("-k", type=_count(1), default=5, help="how many hits [5]")
    search.add_argument("--tenant", help="only chunks of this tenant's documents")
    search.set_defaults(command=_cmd_search)

    dev = command("dev", DEV_DESCRIPTION)
    dev.add_argument("--partitions", type=_count(1), default=4, help="partitions of the topic it creates [4]")
    dev.add_argument(
        "--broker",
        choices=("tansu", "kafka"),
        default="tansu",
        help="Tansu (in memory, starts at once) or Apache Kafka (from Maven Central) [tansu]",
    )
    dev.add_argument("--workdir", type=Path, default=Path(".run/dev"), help="where its data lives [.run/dev]")
    dev.set_defaults(command=_cmd_dev)

    for name, sub in commands.choices.items():
        assert isinstance(sub, _Parser)
        _add_settings(sub, name)
    return parser


DEV_DESCRIPTION = """\
Start the embedded stack (a broker, PostgreSQL with pgvector, a local embedding server) in
the foreground and print the settings that reach it, to paste into another shell; Ctrl-C
or SIGTERM stops it. One stack per --workdir: dev on a workdir whose stack is running
(another dev, or make run) exits 1 at once and leaves it alone.

The stack sets the broker, database and embedding settings itself. Of the other settings,
dev takes --kafka-topic (the topics it creates, with --partitions), --kafka-dlq-topic and
--health-port (passed on in the printed settings) and --log-level; any other setting given
as a flag is refused (exit 2): those belong to 'ingest-worker run'.
"""


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
    from worker.dev.processes import StackError
    from worker.dev.stack import embedded_stack
    from worker.kafka import ensure_topic

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
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
