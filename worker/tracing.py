"""Traces: each document's trace id, and OpenTelemetry spans of its way through the worker.

A document's trace id is its record's W3C ``traceparent`` trace id, or one made for it when the
record has none. The worker's log lines about it carry it (``trace_id``, bound through structlog's
contextvars), and each ``batch_stored`` line lists those of the documents it stored.

With the ``otel`` extra installed and ``OTEL_EXPORTER_OTLP_ENDPOINT`` set (the OpenTelemetry SDK's
own settings: ``OTEL_SERVICE_NAME``, ``OTEL_EXPORTER_OTLP_HEADERS``, ...), each document stored gives
a span ``ingest.document`` (a child of its record's ``traceparent``: the producer's trace goes on
here) from its fetch to its write, with one child per stage: ``ingest.prepare`` (waiting, planning,
chunking), ``ingest.embed`` (its vectors bought or reused) and ``ingest.store`` (the write
transaction, shared with its batch). Each batch also gives one ``ingest.write`` span, linked to its
documents' spans. The spans are made once the batch is stored, with the times noted on the way, so
the pipeline does no tracing work while it runs; without the extra, or without the endpoint,
nothing is made at all.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from worker.logs import traceparent
from worker.types import Record

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

log = structlog.get_logger()

SERVICE = "ingest-worker"


def new_trace_id() -> str:
    """A random W3C trace id (32 hex digits, not all zero)."""
    return secrets.token_hex(16)


def trace_of(record: Record) -> tuple[str, str | None]:
    """The record's trace id and parent span id from its ``traceparent``, or a made trace id."""
    found = traceparent(record.headers)
    if found is None or found[0] == "0" * 32:
        return new_trace_id(), None
    trace_id, parent = found
    return trace_id, parent if len(parent) == 16 and parent != "0" * 16 else None


@dataclass(frozen=True)
class DocumentTimes:
    """One stored document's way through the worker (wall clock, seconds since the epoch)."""

    doc_id: str
    trace_id: str
    parent_span_id: str | None
    record: Record
    chunks: int
    admitted: float
    prepared: float
    embedded: float


_tracer: Tracer | None = None
_provider: Any = None


def configure(provider: Any = None) -> bool:
    """Make spans with ``provider`` (a TracerProvider: the tests give one with an in-memory
    exporter), or, given none, with an OTLP/HTTP exporter when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is
    set. False (no spans) when neither, or when the ``otel`` extra is not installed."""
    global _tracer, _provider
    if provider is None and not os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        _tracer = None
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        log.warning(
            "tracing_unavailable",
            hint="OTEL_EXPORTER_OTLP_ENDPOINT is set but the otel extra is not installed: "
            "pip install 'embedding-ingest-worker[otel]'",
        )
        _tracer = None
        return False
    if provider is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME", SERVICE)})
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    _provider, _tracer = provider, provider.get_tracer("worker")
    return True


def shutdown() -> None:
    """Send the spans still buffered, and close the exporter (at exit)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def enabled() -> bool:
    return _tracer is not None


def batch_stored(documents: Sequence[DocumentTimes], started: float, ended: float, **attributes: Any) -> None:
    """The spans of one stored batch (see the module); nothing when tracing is off."""
    if _tracer is None or not documents:
        return
    from opentelemetry import trace
    from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, TraceFlags

    def ns(seconds: float) -> int:
        return int(seconds * 1e9)

    links = []
    for d in documents:
        parent = SpanContext(
            trace_id=int(d.trace_id, 16),
            span_id=int(d.parent_span_id or secrets.token_hex(8), 16),
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )
        context = trace.set_span_in_context(NonRecordingSpan(parent))
        span = _tracer.start_span(
            "ingest.document",
            context=context,
            start_time=ns(d.admitted),
            attributes={
                "messaging.system": "kafka",
                "messaging.destination.name": d.record.topic,
                "messaging.kafka.partition": d.record.partition,
                "messaging.kafka.offset": d.record.offset,
                "document.id": d.doc_id,
                "document.chunks": d.chunks,
            },
        )
        inner = trace.set_span_in_context(span)
        for name, start, end in (
            ("ingest.prepare", d.admitted, d.prepared),
            ("ingest.embed", d.prepared, d.embedded),
            ("ingest.store", started, ended),
        ):
            _tracer.start_span(name, context=inner, start_time=ns(start)).end(end_time=ns(max(start, end)))
        span.end(end_time=ns(ended))
        links.append(Link(span.get_span_context()))
    write = _tracer.start_span(
        "ingest.write",
        start_time=ns(started),
        links=links,
        attributes={"documents": len(documents), **attributes},
    )
    write.end(end_time=ns(ended))
