"""``ingest-worker`` (= ``python -m worker``): the command line.

Every setting is an environment variable with an equal ``--flag`` (flags win). Bad
configuration exits 2 with one line naming the setting. Each command's ``--help`` shows the
settings that command reads (``USES``); every command accepts the others all the same, hidden
unless ``--help-all``; ``dev`` alone refuses those it does not honour.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.metadata
import os
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

import structlog
from aiokafka.errors import KafkaError

from worker import commands as do
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
    "usage": "print the embeddings bought and saved, by day, tenant and model, with their cost",
    "reindex": "build a new generation of the index (model, dimensions, chunking), switch to it",
    "verify": "check the stored state (and with --topic, against the topic); exit 1 on a problem",
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
    "KAFKA_SASL_PASSWORD_FILE",
    "KAFKA_SSL_CAFILE",
    "KAFKA_SSL_CERTFILE",
    "KAFKA_SSL_KEYFILE",
)
_PRODUCER = (*_KAFKA_CLIENT, "KAFKA_PRODUCER_IDEMPOTENCE", "MAX_TEXT_BYTES")  # kafka.make_producer
# Store.migrate and Store.check: where the tables are, and the column and model they hold
_SCHEMA = (
    "DATABASE_URL",
    "DATABASE_PASSWORD_FILE",
    "DATABASE_SCHEMA",
    "VECTOR_TYPE",
    "EMBEDDING_DIMENSIONS",
    "EMBEDDING_MODEL",
)
# Compared with the generation the settings name (migrate registers generation 1 with them; search
# and build-index read them, and do not refuse another chunking: they write no chunks)
_CHUNKING = ("CHUNK_SIZE", "CHUNK_OVERLAP", "CHUNK_UNIT")
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
    "EMBEDDING_EXTRA_BODY",
    "EMBEDDING_ADAPTIVE",
    "EMBEDDING_MAX_RPM",
    "EMBEDDING_MAX_TPM",
)
USES: dict[str, frozenset[str]] = {
    "run": frozenset(name for name, _, _ in describe()),  # app.serve: the whole pipeline
    "migrate": frozenset({"LOG_LEVEL", *_SCHEMA, *_CHUNKING, "INDEX_BUILD_MEMORY"}),
    "build-index": frozenset({"LOG_LEVEL", *_SCHEMA, *_CHUNKING, "INDEX_BUILD_MEMORY"}),
    "produce": frozenset({"LOG_LEVEL", *_PRODUCER, "KAFKA_TOPIC"}),
    "replay": frozenset(
        {
            "LOG_LEVEL",
            *_PRODUCER,
            "KAFKA_TOPIC",  # the dead-letter topic's default name
            "KAFKA_DLQ_TOPIC",
            "KAFKA_GROUP_ID",
            "STARTUP_TIMEOUT_SECONDS",  # how long it waits for the group's coordinator
            "KAFKA_SESSION_TIMEOUT_MS",
        }
    ),
    "search": frozenset(
        {"LOG_LEVEL", *_SCHEMA, *_CHUNKING, "DATABASE_POOL_SIZE", "DATABASE_STATEMENT_CACHE_SIZE", *_EMBEDDER}
    ),
    "usage": frozenset(
        {
            "LOG_LEVEL",
            *_SCHEMA,
            "DATABASE_POOL_SIZE",
            "DATABASE_STATEMENT_CACHE_SIZE",
            "EMBEDDING_PRICE_PER_MTOK",
        }
    ),
    # Its own --vector-type, --chunk-size, --chunk-overlap and --chunk-unit name the new
    # generation's: the settings of those names (the served one's) are read from the environment only.
    "reindex": frozenset(
        {
            "LOG_LEVEL",
            *_SCHEMA,
            "DATABASE_POOL_SIZE",
            "DATABASE_STATEMENT_CACHE_SIZE",
            *_EMBEDDER,  # the new generation's model is asked through the same API
            "EMBEDDING_BATCH_SIZE",
            "EMBEDDING_MAX_INPUTS",
            "EMBEDDING_BATCH_CHARS",
            "EMBEDDING_TOKENIZER",
            "EMBEDDING_MAX_INPUT_TOKENS",
            "EMBEDDING_MAX_REQUEST_TOKENS",
            "EMBEDDING_LINGER_MS",
            "EMBEDDING_RETRY_DEADLINE_SECONDS",
            "EMBEDDING_MAX_ATTEMPTS",
            "EMBEDDING_LEDGER_HOURS",
            "INDEX_BUILD_MEMORY",
        }
        - {"VECTOR_TYPE"}
    ),
    "verify": frozenset(
        {
            "LOG_LEVEL",
            *_SCHEMA,
            "DATABASE_STATEMENT_CACHE_SIZE",
            *_KAFKA_CLIENT,  # --topic: worker.topic_fold.read_topics
            "KAFKA_TOPIC",
            "KAFKA_MAX_PARTITION_FETCH_BYTES",
            "MAX_TEXT_BYTES",  # what decodes, as the worker decodes it
        }
    ),
    # The stack sets the broker, database and embedding settings itself; dev refuses the others.
    "dev": frozenset({"LOG_LEVEL", "KAFKA_TOPIC", "KAFKA_DLQ_TOPIC", "HEALTH_PORT"}),
}
REFUSES_UNUSED = frozenset({"dev"})
# Settings whose flag a command gives a meaning of its own (the setting is read from the environment).
OWN_FLAGS = {
    "reindex": frozenset({"VECTOR_TYPE", "CHUNK_SIZE", "CHUNK_OVERLAP", "CHUNK_UNIT"})
}  # commands that refuse (exit 2) a setting flag they do not use


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
        if name in OWN_FLAGS.get(command, ()):
            continue
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
    run.set_defaults(command=do.run)

    migrate = command("migrate")
    migrate.add_argument("--no-ann-index", action="store_true", help="leave the HNSW index out (backfill)")
    migrate.set_defaults(command=do.migrate)

    index = command("build-index")
    index.set_defaults(command=do.build_index)

    produce = command("produce")
    produce.add_argument("file", help="JSON-lines file, or - for standard input")
    produce.set_defaults(command=do.produce)

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
    replay.set_defaults(command=do.replay)

    search = command("search")
    search.add_argument("query", help="the text to search for")
    search.add_argument("-k", type=_count(1), default=5, help="how many hits [5]")
    search.add_argument("--tenant", help="only chunks of this tenant's documents")
    search.set_defaults(command=do.search)

    usage = command("usage")
    usage.add_argument(
        "--since", type=_iso_date, metavar="YYYY-MM-DD", help="from this day on (UTC) [30 days ago]"
    )
    usage.add_argument("--tenant", help="only this tenant ('' for documents without one)")
    usage.set_defaults(command=do.usage)

    reindex = command("reindex", REINDEX_DESCRIPTION)
    reindex.add_argument(
        "action", choices=("start", "fill", "status", "switch", "rollback", "drop"), help="what to do (above)"
    )
    reindex.add_argument(
        "--fillers",
        type=_count(1),
        default=None,
        help="start: processes filling the generation, this one included [1]",
    )
    reindex.add_argument(
        "--report-every",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="fill: print `filled <documents> <chunks>` this often, for a process watching it [off]",
    )
    reindex.add_argument("--model", help="start: the new generation's EMBEDDING_MODEL [the served one's]")
    reindex.add_argument("--dimensions", type=_count(1), help="start: its dimensions [the served one's]")
    reindex.add_argument(
        "--vector-type",
        dest="new_vector_type",
        choices=("vector", "halfvec"),
        help="start: [the served one's]",
    )
    reindex.add_argument(
        "--chunk-size", dest="new_chunk_size", type=_count(1), help="start: its CHUNK_SIZE [the served one's]"
    )
    reindex.add_argument(
        "--chunk-overlap",
        dest="new_chunk_overlap",
        type=_count(0),
        help="start: its CHUNK_OVERLAP [the served one's]",
    )
    reindex.add_argument(
        "--chunk-unit", dest="new_chunk_unit", choices=("chars", "tokens"), help="start: [the served one's]"
    )
    reindex.add_argument("--wait", action="store_true", help="switch, rollback: wait until it is complete")
    reindex.add_argument("--json", action="store_true", help="status: one JSON object per generation")
    reindex.set_defaults(command=do.reindex)

    verify = command("verify", VERIFY_DESCRIPTION)
    verify.add_argument(
        "--topic",
        nargs="?",
        const="",
        metavar="TOPICS",
        help="also compare with the newest event of each document these topics (comma list) hold, "
        "read from the start [KAFKA_TOPIC]",
    )
    verify.add_argument("--json", action="store_true", help="print one JSON object instead")
    verify.set_defaults(command=do.verify)

    dev = command("dev", DEV_DESCRIPTION)
    dev.add_argument("--partitions", type=_count(1), default=4, help="partitions of the topic it creates [4]")
    dev.add_argument(
        "--broker",
        choices=("tansu", "kafka"),
        default="tansu",
        help="Tansu (in memory, starts at once) or Apache Kafka (from Maven Central) [tansu]",
    )
    dev.add_argument("--workdir", type=Path, default=Path(".run/dev"), help="where its data lives [.run/dev]")
    dev.set_defaults(command=do.dev)

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

REINDEX_DESCRIPTION = """\
Change the embedding model, dimensions, vector type or chunking with no downtime: build a new
generation of the index beside the served one, keep both current, switch in one step, roll back.

  start     register the generation (--model, --dimensions, --vector-type, --chunk-size,
            --chunk-overlap, --chunk-unit; each defaults to the served one's) and fill it from
            the documents' stored text, with a progress bar; then build its HNSW index. Content
            that model embedded before is not bought again. Stopped (even by kill -9) and started
            again with the same flags, it goes on where it was. Running workers write every change
            into both generations from the moment it is registered. --fillers N: fill with N
            processes (helpers running `fill`) [1].
  fill      fill the generation being built until nothing is pending, without building its
            index: run it on more machines to share a large build
  status    every generation: state, model, dimensions, chunking, documents and chunks done
  switch    serve the new generation, once nothing is pending in it (--wait: wait for that), in
            one transaction: the `chunks` view and `search` give it, workers ingest into it
  rollback  serve the previous generation again (kept current meanwhile)
  drop      remove the generation not served

Exit 0 done, 1 not possible yet (the reason says what to do), 2 on bad arguments.
"""

VERIFY_DESCRIPTION = """\
Check the stored state: chunks contiguous (0..n-1, as many as documents.chunk_count), contents
matching their hashes and their document's text at their offsets, documents' hashes matching
their text, embeddings of EMBEDDING_DIMENSIONS and the index's model, no chunks of deleted or
unknown documents, no live document with text but no chunks. With --topic, also that each
document's stored state is the newest event the topic holds, by the worker's version rule,
reading every partition from its beginning to its end offset at the start (records that do not
decode, which the worker dead-letters, are counted). Run it when the workers are caught up: the
newest events they have not stored yet show as topic_behind.

It reads every chunk and every document in one snapshot (vectors only for their dimensions, and
only where the column declares none): minutes on tens of millions of rows, no lock taken.
Prints one line per check (ok, or how many documents fail it, with examples) and a summary;
exits 0 when clean, 1 when not (or when the database is down or not migrated), 2 on bad
arguments.
"""


# -- argument types ----------------------------------------------------------------------


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


def _iso_date(text: str) -> dt.date:
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _iso_time(text: str) -> dt.datetime:
    from worker.replay import parse_time

    value = parse_time(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"not an ISO-8601 time: {text!r}")
    return value
