"""Prometheus metrics, served on ``HEALTH_PORT`` at ``/metrics``."""

from __future__ import annotations

import time
from typing import Final

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

RECORDS: Final = Counter(
    "ingest_records", "Records finished, by outcome (stored, stale, dead_lettered)", ["topic", "outcome"]
)
DOCUMENTS_WRITTEN: Final = Counter("ingest_documents_written", "Document events applied", ["op"])
CHUNKS_WRITTEN: Final = Counter("ingest_chunks_written", "Chunk rows written")
EMBEDDING_REQUESTS: Final = Counter(
    "ingest_embedding_requests", "Embedding requests by HTTP status", ["status"]
)
EMBEDDING_INPUTS: Final = Counter("ingest_embedding_inputs", "Texts embedded")
EMBEDDING_SECONDS: Final = Histogram(
    "ingest_embedding_request_seconds",
    "Embedding request latency",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
BATCH_SECONDS: Final = Histogram(
    "ingest_batch_seconds",
    "Time one write transaction takes (waits through outages included)",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
WRITE_STEPS: Final = (
    "acquire",
    "lock",
    "upsert_documents",
    "copy_new",
    "stage",
    "merge",
    "trim",
    "generations",
    "pending",
    "offsets",
    "usage",
    "commit",
)
WRITE_STEP_SECONDS: Final = Histogram(
    "ingest_write_step_seconds",
    "Time each step of a write transaction takes (where the database's time goes)",
    ["step"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)


class WriteLaps:
    """The seconds each step of one write takes, into ``ingest_write_step_seconds{step}``."""

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        WRITE_STEP_SECONDS.labels(step=step).observe(now - self._last)
        self._last = now


def write_step_totals() -> dict[str, float]:
    """Seconds spent in each write step so far, in this process (for the log line at exit)."""
    totals = {
        step: REGISTRY.get_sample_value("ingest_write_step_seconds_sum", {"step": step}) or 0.0
        for step in WRITE_STEPS
    }
    return {step: round(seconds, 3) for step, seconds in totals.items() if seconds}


DEAD_LETTERS: Final = Counter("ingest_dead_letters", "Records sent to the dead-letter topic", ["stage"])
DEAD_LETTERS_OVERSIZE: Final = Counter(
    "ingest_dead_letters_oversize",
    "Dead letters too large for the dead-letter topic, sent without their value (omitted=value) "
    "or without value, key and original headers (omitted=value_key_headers)",
    ["omitted"],
)
CONSUMER_LAG: Final = Gauge(
    "ingest_consumer_lag", "High watermark minus committed offset", ["topic", "partition"]
)
ASSIGNED_PARTITIONS: Final = Gauge("ingest_assigned_partitions", "Partitions this worker owns")
COMMIT_FAILURES: Final = Counter("ingest_commit_failures", "Offset commits refused (rebalance) or failed")
RETRIES: Final = Counter("ingest_retries", "Retried attempts, by dependency", ["dependency"])
READY: Final = Gauge("ingest_ready", "1 when partitions are assigned and dependencies answer")
ANN_INDEX_READY: Final = Gauge(
    "ingest_ann_index_ready",
    "1 when the HNSW index exists and is valid (without it searches scan every chunk)",
)

for _stage in ("decode", "validate", "chunk", "embed", "store"):
    DEAD_LETTERS.labels(stage=_stage)  # present at 0 from the start, so increase() sees the first one
for _omitted in ("value", "value_key_headers"):
    DEAD_LETTERS_OVERSIZE.labels(omitted=_omitted)
EMBEDDINGS_REUSED: Final = Counter(
    "ingest_embeddings_reused", "Chunks whose embedding was already stored or in flight: not bought again"
)
EMBEDDING_TOKENS: Final = Counter(
    "ingest_embedding_tokens",
    "Tokens bought (the API's usage.prompt_tokens, shared among a request's inputs)",
    ["tenant", "model"],
)
EMBEDDING_TOKENS_SAVED: Final = Counter(
    "ingest_embedding_tokens_saved",
    "Tokens not bought again: inputs reused from the store, the ledger or a purchase in flight (estimated)",
    ["tenant", "model"],
)
EMBEDDINGS_KEPT: Final = Counter(
    "ingest_embeddings_kept", "Paid embeddings written to the embedding ledger as they arrived"
)
EMBEDDINGS_AWAITED: Final = Counter(
    "ingest_embeddings_awaited", "Contents another process was buying, awaited instead of bought again"
)
IN_FLIGHT_RECORDS: Final = Gauge(
    "ingest_in_flight_records", "Records fetched and not yet stored or dead-lettered"
)
PAUSED: Final = Gauge("ingest_paused", "1 while fetching is paused because the in-flight window is full")
DEPENDENCY_UP: Final = Gauge(
    "ingest_dependency_up", "0 while a dependency's circuit breaker is open", ["dependency"]
)
EMBEDDING_CONCURRENCY_LIMIT: Final = Gauge(
    "ingest_embedding_concurrency_limit",
    "Embedding requests allowed in flight now (adapts to 429s and latency)",
)
GENERATION_FILLED: Final = Counter(
    "ingest_generation_documents_filled",
    "Documents written into a generation of the index that this process does not ingest into "
    "(reindex start, and workers keeping the other generation current)",
    ["generation"],
)
GENERATION_SERVED: Final = Gauge("ingest_generation_served", "The generation of the index served now")

EVENT_LOOP_LAG: Final = Histogram(
    "ingest_event_loop_lag_seconds",
    "How much later than due the event loop woke a sleeper (worker.loop_health, every 0.1 s): "
    "how long callbacks hold the loop",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
COMMITS: Final = Counter("ingest_commits", "Offset commits the group coordinator accepted")
REBALANCES: Final = Counter(
    "ingest_rebalances", "Partitions assigned to this worker, or revoked from it", ["event"]
)
for _event in ("assigned", "revoked"):
    REBALANCES.labels(event=_event)
QUEUE_DEPTH: Final = Gauge(
    "ingest_queue_depth",
    "Waiting in each stage: documents decoded for preparing, inputs queued for an embedding "
    "request, documents embedded for a write, records for the dead-letter topic",
    ["stage"],
)
DATABASE_CONNECTIONS: Final = Gauge(
    "ingest_database_connections", "The worker's database pool, by state (in_use, idle)", ["state"]
)
EMBEDDING_IN_FLIGHT: Final = Gauge(
    "ingest_embedding_requests_in_flight",
    "Embedding requests sent and not yet answered (HTTP connections in use)",
)
FETCHED_RECORDS: Final = Counter("ingest_fetched_records", "Records fetched from the broker")
FETCHED_BYTES: Final = Counter("ingest_fetched_bytes", "Bytes (key and value) of the records fetched")
IN_FLIGHT_BYTES: Final = Gauge(
    "ingest_in_flight_bytes", "Bytes of the records fetched and not yet stored or dead-lettered"
)
BACKLOG_BYTES: Final = Gauge(
    "ingest_backlog_bytes",
    "Work waiting, weighted by size (for autoscaling): bytes in flight plus the consumer lag times "
    "the mean size of the records fetched so far",
)


class _Backlog:
    """What ``ingest_backlog_bytes`` is made of, kept as plain numbers (reading them back from the
    registry would collect every metric, on every turn of the fetch loop)."""

    records = 0  # fetched so far
    bytes = 0  # of those
    lag = 0  # records behind, over every assigned partition


_BACKLOG = _Backlog()


def fetched(records: int, size: int) -> None:
    FETCHED_RECORDS.inc(records)
    FETCHED_BYTES.inc(size)
    _BACKLOG.records += records
    _BACKLOG.bytes += size


def lag_is(records: int) -> None:
    """The consumer lag over every partition assigned now."""
    _BACKLOG.lag = records


def update_backlog(in_flight_bytes: int) -> None:
    """Set ``ingest_in_flight_bytes`` and ``ingest_backlog_bytes`` (record counts hide size: one
    partition's 1,000 records of 1 MB are more work than another's 1,000 of 1 KB)."""
    IN_FLIGHT_BYTES.set(in_flight_bytes)
    mean = _BACKLOG.bytes / _BACKLOG.records if _BACKLOG.records else 0.0
    BACKLOG_BYTES.set(in_flight_bytes + _BACKLOG.lag * mean)
