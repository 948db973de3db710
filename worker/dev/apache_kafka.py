"""Apache Kafka without Docker: a KRaft broker, or a cluster of them, from Maven Central jars.

``kafka/pom.xml`` beside this file names ``org.apache.kafka:kafka_2.13``; the first start runs
``mvn dependency:copy-dependencies`` to put it and its runtime dependencies into ``kafka/lib``
(ignored by git; Maven's own cache makes later copies local). Each node then runs from those jars
with ``java``: ``kafka.tools.StorageTool format`` on a fresh directory, then ``kafka.Kafka`` with
a ``server.properties`` written here. Every node is broker and controller at once (KRaft
combined mode) on 127.0.0.1, with three listeners:

- ``PLAINTEXT`` for the worker and the tests (its anonymous user is a super user);
- ``SASL_PLAINTEXT`` (PLAIN) with an authorizer, for tests that play a refused or
  least-privilege user (``admin``/``admin-secret`` is a super user; :meth:`KafkaCluster.allow`
  grants others);
- ``SASL_SSL`` (PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512; the SCRAM users made when the storage is
  formatted) and ``SSL`` that requires a client certificate (its CN is the user), both with
  certificates made for the cluster by ``certs.py``;
- ``CONTROLLER`` for the quorum.

Used by the tests, ``make bench``, ``make run BROKER=kafka`` and ``ingest-worker dev --broker kafka``.
Synchronous on purpose, like ``stack.py``: it only starts and stops processes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka.conn import create_conn
from aiokafka.protocol.admin import CreateAclsRequest

from worker.dev.certs import CLIENT_NAME, Certificates, make_certificates
from worker.dev.maven import fetch_once, fetched, pom_property
from worker.dev.processes import Freezable, StackError, free_port, stop_process

POM = Path(__file__).with_name("kafka") / "pom.xml"
LIB = POM.parent / "lib"
HEAP = "768m"
SASL_USERS = {
    "admin": "admin-secret",
    "reader": "reader-secret",
    "writer": "writer-secret",
    CLIENT_NAME: "ingest-secret",  # the worker's own user: granted only what the README lists
}
SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")
_STARTED = "Kafka Server started"


def kafka_version() -> str:
    return pom_property(POM, "kafka.version")


def available() -> bool:
    """Java is here, and the jars are fetched already or Maven can fetch them."""
    return shutil.which("java") is not None and (
        fetched(LIB, kafka_version()) or shutil.which("mvn") is not None
    )


def fetch_jars(timeout: float = 900) -> Path:
    """Copy the broker's jars into ``kafka/lib`` once (one process at a time); return the folder."""
    fetch_once(POM, LIB, kafka_version(), "Apache Kafka", timeout=timeout)
    return LIB


def _kafka_uuid() -> str:
    """A random cluster id as Kafka makes one: 16 bytes, URL-safe base64, no padding, and (as
    Kafka's own ``Uuid.randomUuid``) never starting with "-", which a command line takes for an option."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not text.startswith("-"):
            return text


def _java(main: str, *args: str, heap: str = "256m") -> list[str]:
    java = shutil.which("java")
    if java is None:
        raise StackError("Apache Kafka needs `java` (17 or newer) on PATH")
    return [
        java,
        f"-Xmx{heap}",
        # C1 only: a development broker's load is light, and C2's compiling is most of its CPU
        # (measured: half the broker's CPU during a bench run), taken from the cores it shares.
        "-XX:TieredStopAtLevel=1",
        "-XX:+UseG1GC",
        "-XX:MaxGCPauseMillis=20",
        "-Djava.awt.headless=true",
        "-cp",
        f"{LIB}/*",
        main,
        *args,
    ]


_LOG4J = """\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.authorizer.name = kafka.authorizer.logger
logger.authorizer.level = WARN
"""


@dataclass
class KafkaNode(Freezable):
    """One KRaft node (broker and controller) of a :class:`KafkaCluster`."""

    node_id: int
    workdir: Path
    port: int = field(default_factory=free_port)
    sasl_port: int = field(default_factory=free_port)
    sasl_ssl_port: int = field(default_factory=free_port)
    ssl_port: int = field(default_factory=free_port)
    controller_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    _log_offset: int = field(default=0, repr=False)  # where this start's lines begin in server.log

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def properties_path(self) -> Path:
        return self.workdir / "server.properties"

    @property
    def log_path(self) -> Path:
        return self.workdir / "server.log"

    def write_properties(
        self, voters: str, replicas: int, overrides: dict[str, object], certificates: Certificates
    ) -> None:
        users = " ".join(f'user_{name}="{password}"' for name, password in SASL_USERS.items())
        plain = (
            "org.apache.kafka.common.security.plain.PlainLoginModule required "
            f'username="admin" password="{SASL_USERS["admin"]}" {users};'
        )
        scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        served = (
            f"PLAINTEXT://127.0.0.1:{self.port},SASL_PLAINTEXT://127.0.0.1:{self.sasl_port},"
            f"SASL_SSL://127.0.0.1:{self.sasl_ssl_port},SSL://127.0.0.1:{self.ssl_port}"
        )
        min_isr = min(2, replicas)
        settings = {
            "process.roles": "broker,controller",
            "node.id": self.node_id,
            "controller.quorum.voters": voters,
            "listeners": f"{served},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": served,
            "listener.security.protocol.map": (
                "PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL,"
                "CONTROLLER:PLAINTEXT"
            ),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": self.workdir / "data",
            "num.partitions": 1,
            "default.replication.factor": replicas,
            "min.insync.replicas": min_isr,
            "offsets.topic.replication.factor": replicas,
            "offsets.topic.num.partitions": 10,
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min_isr,
            "transaction.state.log.num.partitions": 4,
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": min_isr,
            # A group forms at once, and tests may use short sessions to play a frozen member.
            "group.initial.rebalance.delay.ms": 0,
            "group.min.session.timeout.ms": 1000,
            # A dead node is noticed in 3 s instead of 9 s, so failover tests wait less.
            "broker.heartbeat.interval.ms": 500,
            "broker.session.timeout.ms": 3000,
            "sasl.enabled.mechanisms": "PLAIN",
            "listener.name.sasl_plaintext.plain.sasl.jaas.config": plain,
            "listener.name.sasl_ssl.sasl.enabled.mechanisms": ",".join(("PLAIN", *SCRAM_MECHANISMS)),
            "listener.name.sasl_ssl.plain.sasl.jaas.config": plain,
            **{
                f"listener.name.sasl_ssl.{mechanism.lower()}.sasl.jaas.config": scram
                for mechanism in SCRAM_MECHANISMS
            },
            "ssl.keystore.type": "PEM",
            "ssl.keystore.location": certificates.kafka.bundle,
            "ssl.truststore.type": "PEM",
            "ssl.truststore.location": certificates.ca,
            "listener.name.ssl.ssl.client.auth": "required",
            # A client certificate's CN is its user: CN=ingest is User:ingest, as over SASL.
            "ssl.principal.mapping.rules": "RULE:^CN=([^,]+)$/$1/,DEFAULT",
            "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
            "super.users": "User:ANONYMOUS;User:admin",
            **overrides,
        }
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.properties_path.write_text("".join(f"{key}={value}\n" for key, value in settings.items()))
        (self.workdir / "log4j2.properties").write_text(_LOG4J)

    def format_command(self, cluster_id: str) -> list[str]:
        scram = [
            f"{mechanism}=[name={name},password={password}]"
            for mechanism in SCRAM_MECHANISMS
            for name, password in SASL_USERS.items()
        ]
        return _java(
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(self.properties_path),
            "-g",
            *(arg for user in scram for arg in ("--add-scram", user)),
        )

    def start(self) -> None:
        """Start the JVM (the data directory must be formatted); wait with :meth:`wait_started`."""
        if self.process is not None and self.process.poll() is None:
            raise StackError(f"Kafka node {self.node_id} is already running")
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        command = _java("kafka.Kafka", str(self.properties_path), heap=HEAP)
        command.insert(1, f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}")
        with open(self.log_path, "ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def wait_started(self, timeout: float = 90.0) -> None:
        """Until the node logs that it serves (after it joined the quorum and was unfenced)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise StackError(
                    f"Kafka node {self.node_id} exited with status {self.process.returncode}: "
                    f"{self._last_error()} (see {self.log_path})"
                )
            with open(self.log_path, "rb") as log:
                log.seek(self._log_offset)
                if _STARTED.encode() in log.read():
                    return
            time.sleep(0.1)
        raise StackError(
            f"Kafka node {self.node_id} did not start within {timeout:.0f}s: see {self.log_path}"
        )

    def _last_error(self) -> str:
        """The last ERROR line this start logged (why a node exited), or its last line."""
        with open(self.log_path, "rb") as log:
            log.seek(self._log_offset)
            lines = log.read().decode(errors="replace").splitlines()
        errors = [line for line in lines if " ERROR " in line]
        return (errors or lines or ["no output"])[-1][:500]

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM: a controlled shutdown (leadership moves away first)."""
        stop_process(self.process, timeout)

    def kill(self) -> None:
        """SIGKILL, as a crash: no controlled shutdown, nothing flushed."""
        if self.running:
            assert self.process is not None
            self.process.kill()
            self.process.wait()


@dataclass
class KafkaCluster:
    """``size`` KRaft nodes on 127.0.0.1: replication factor ``size``, ``min.insync.replicas`` 2 (or 1)."""

    workdir: Path
    size: int = 1
    properties: dict[str, object] = field(default_factory=dict)  # server.properties overrides
    cluster_id: str = field(default_factory=lambda: _kafka_uuid())
    nodes: list[KafkaNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.nodes:
            self.nodes = [KafkaNode(i, self.workdir / f"node-{i}") for i in range(1, self.size + 1)]

    @functools.cached_property
    def certificates(self) -> Certificates:
        """The cluster's throwaway CA and certificates (made on first use, in its workdir)."""
        return make_certificates(self.workdir / "certs")

    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.nodes)

    @property
    def sasl_bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{node.sasl_port}" for node in self.nodes)

    @property
    def sasl_ssl_bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{node.sasl_ssl_port}" for node in self.nodes)

    @property
    def ssl_bootstrap(self) -> str:
        """The listener that requires a client certificate."""
        return ",".join(f"127.0.0.1:{node.ssl_port}" for node in self.nodes)

    @property
    def version(self) -> str:
        return kafka_version()

    def client_env(self) -> dict[str, str]:
        """Settings a worker needs beyond the bootstrap servers: none, Apache Kafka takes the defaults."""
        return {}

    def pids(self) -> list[int]:
        return [node.process.pid for node in self.nodes if node.process is not None]

    def freeze(self) -> None:
        for node in self.nodes:
            node.freeze()

    def thaw(self) -> None:
        for node in self.nodes:
            node.thaw()

    def node(self, node_id: int) -> KafkaNode:
        return next(node for node in self.nodes if node.node_id == node_id)

    def start(self) -> None:
        """Fetch the jars if needed, format every node's directory, start them all, wait until they serve."""
        fetch_jars()
        voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)
        for node in self.nodes:
            node.write_properties(
                voters, replicas=len(self.nodes), overrides=self.properties, certificates=self.certificates
            )
        formats = [
            subprocess.Popen(
                node.format_command(self.cluster_id),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
            for node in self.nodes
        ]
        for node, process in zip(self.nodes, formats, strict=True):
            output, _ = process.communicate(timeout=120)
            if process.returncode != 0:
                raise StackError(f"formatting Kafka node {node.node_id} failed: {output.decode()[-500:]}")
        try:
            for node in self.nodes:
                node.start()
            for node in self.nodes:
                node.wait_started()
        except BaseException:
            self.stop()
            raise

    def restart(self, node_id: int) -> None:
        """Start a stopped or killed node again on its own data; wait until it serves."""
        node = self.node(node_id)
        node.start()
        node.wait_started()

    def stop(self) -> None:
        """Kill every node at once: a cluster losing its quorum one node at a time can hang on shutdown."""
        for node in self.nodes:
            with contextlib.suppress(ProcessLookupError):
                if node.process is not None and node.process.poll() is None:
                    os.kill(node.process.pid, signal.SIGCONT)
                    node.process.kill()
        for node in self.nodes:
            if node.process is not None:
                node.process.wait()

    def allow(
        self, principal: str, resource: str, name: str, *operations: str, prefixed: bool = False
    ) -> None:
        """Allow ``principal`` (``User:reader``) ``operations`` (``Read``, ``Write``, ``Describe``,
        ``Create``) on a ``resource`` (``topic``, ``group``, ``cluster``) named ``name`` (or, with
        ``prefixed``, every one whose name starts with it): CreateAcls sent as the super user."""
        asyncio.run(self._allow(principal, resource, name, operations, prefixed))

    async def _allow(
        self, principal: str, resource: str, name: str, operations: tuple[str, ...], prefixed: bool
    ) -> None:
        host, _, port = self.nodes[0].bootstrap.rpartition(":")
        conn = await create_conn(host, int(port))
        try:
            for operation in operations:
                request = CreateAclsRequest(
                    _ACL_RESOURCES[resource],
                    name,
                    _ACL_PREFIXED if prefixed else _ACL_LITERAL,
                    principal,
                    "*",
                    _ACL_OPERATIONS[operation],
                    _ACL_ALLOW,
                )
                answer = await conn.send(request)
                for code, message in answer.creation_responses:
                    if code:
                        raise StackError(f"CreateAcls {operation} on {resource} {name!r}: {code} {message}")
        finally:
            conn.close()


# CreateAcls codes (org.apache.kafka.common.acl / resource enums).
_ACL_RESOURCES = {"topic": 2, "group": 3, "cluster": 4}
_ACL_OPERATIONS = {"Read": 3, "Write": 4, "Create": 5, "Describe": 8, "IdempotentWrite": 12}
_ACL_LITERAL, _ACL_PREFIXED, _ACL_ALLOW = 3, 4, 3
