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
    "offsets",
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
