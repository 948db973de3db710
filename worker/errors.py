"""Every failure the worker knows; what is done about one is carried in its type.

A RecordError can never succeed: its record is dead-lettered, under its ``stage``. A
DependencyError is an outage: the dependency's circuit breaker (worker.dependency) retries it and
waits it out. Anything else stops the worker, except the two the pipeline handles itself
(WriteTimedOut: write smaller; StaleRead: plan again) and the one fillers handle (Indexing: wait).
Third-party errors are wrapped with ``raise ... from exc`` so the original stays in the traceback;
``describe`` gives the one-line form logs, /readyz and dead letters use.
"""

from __future__ import annotations

from typing import ClassVar


class WorkerError(Exception):
    """Root of the worker's errors."""


def describe(exc: BaseException, limit: int = 300) -> str:
    """``ClassName: message``, cut to ``limit`` characters of message, for one log or status line."""
    return f"{type(exc).__name__}: {str(exc)[:limit]}".rstrip(": ")


class ConfigError(WorkerError):
    """A setting is missing or malformed; ``setting`` names it."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting


# Record failures: the record itself can never succeed; it goes to the dead-letter topic.


class RecordError(WorkerError):
    """A record that can never succeed. ``stage`` is the CONTRACT's dlq.error.stage."""

    stage: ClassVar[str] = "validate"


class DecodeError(RecordError):
    stage = "decode"


class ValidationError(RecordError):
    stage = "validate"


class ChunkError(RecordError):
    stage = "chunk"


class InputRejected(RecordError):
    """The embedding API refused this record's own content (a 4xx for its input)."""

    stage = "embed"


class TooManyInputs(InputRejected):
    """The API takes at most ``limit`` inputs a request, and said so (TEI's 413 names its
    ``--max-client-batch-size``): not the inputs' fault."""

    def __init__(self, message: str, limit: int) -> None:
        super().__init__(message)
        self.limit = limit


class AttemptsExhausted(RecordError):
    """An embedding request for this input failed every attempt while the API answered others."""

    stage = "embed"

    def __init__(self, last: Exception, attempts: int) -> None:
        super().__init__(f"{attempts} attempts failed while the embedding API was up; last: {last}")
        self.last = last
        self.attempts = attempts


# Dependency failures: an outage, not the record's fault. Retried; never dead-lettered.


class DependencyError(WorkerError):
    """An outage of a dependency, not the record's fault: retried, never dead-lettered."""


class EmbeddingUnavailable(DependencyError):
    """5xx, 429, timeouts and connection errors of the embedding API."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class EmbeddingProtocolError(WorkerError):
    """The embedding API answered something this worker cannot use (wrong dimension, bad shape).

    Not retriable and not the record's fault: a configuration problem the operator must fix.
    """


class DatabaseUnavailable(DependencyError):
    """PostgreSQL cannot be reached, or dropped the connection."""


class DatabaseRefused(DatabaseUnavailable):
    """PostgreSQL refuses every write, whatever its data: a privilege revoked, a table or schema
    missing. Configuration, not a record's fault: waited out (and reported) like an outage."""


class BrokerUnavailable(DependencyError):
    """The dead-letter topic's broker cannot be reached."""


class DeadLetterRefused(WorkerError):
    """The dead-letter topic refuses a letter even without its value, key and original headers.

    Not retriable and not the record's fault: the topic's max.message.bytes is too small to hold
    the dlq.* headers. The worker stops rather than commit past a record it could not dead-letter.
    """


class StoreRejected(RecordError):
    """PostgreSQL refused the batch's data itself (not an outage)."""

    stage = "store"


class WriteTimedOut(WorkerError):
    """PostgreSQL cancelled a write (statement_timeout): retried smaller, never as it was.

    Not a DependencyError, so the breaker does not retry it at the same size; not a RecordError:
    a timeout says the write was too big for the database's limit, not that a record is bad.
    """


class Fenced(WorkerError):
    """This member's partitions were claimed by another (it lost them, frozen past its session):
    what it still holds is abandoned, never written over the new owner's rows."""


class StaleRead(WorkerError):
    """A document changed between planning a batch and writing it (a rebalance race). Re-plan."""


class Indexing(WorkerError):
    """A generation not served is having its HNSW index built, which holds its table: its
    fillers give their documents back and wait (worker.fill)."""
