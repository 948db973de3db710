"""Trace ids and OpenTelemetry spans (worker.tracing), through the worker with small fakes and
the OpenTelemetry SDK's in-memory exporter."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.unit.fakes import TEXT_B, TEXT_C, log_of, rig, upsert
from worker import tracing
from worker.types import Record

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = [("traceparent", f"00-{TRACE_ID}-{PARENT}-01".encode())]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    assert tracing.configure(provider)
    yield exporter
    tracing.shutdown()
    assert not tracing.enabled()


def test_a_records_traceparent_gives_its_trace_and_parent_and_a_record_without_one_gets_a_new_trace() -> None:
    traced = Record("t", 0, 1, b"k", b"v", tuple(TRACEPARENT), 2)
    assert tracing.trace_of(traced) == (TRACE_ID, PARENT)
    plain = Record("t", 0, 2, b"k", b"v", (), 2)
    made, parent = tracing.trace_of(plain)
    assert parent is None and len(made) == 32 and made != tracing.trace_of(plain)[0]
    invalid = Record(
        "t", 0, 3, b"k", b"v", (("traceparent", b"00-" + b"0" * 32 + b"-" + b"0" * 16 + b"-01"),), 2
    )
    assert tracing.trace_of(invalid)[0] != "0" * 32


async def test_each_stored_document_is_a_span_in_its_records_trace_with_one_span_per_stage(
    spans: InMemorySpanExporter,
) -> None:
    r = rig(log_of({0: [upsert("traced", TEXT_C), upsert("plain", TEXT_B)]}, headers={(0, 0): TRACEPARENT}))
    with structlog.testing.capture_logs() as logged:
        await r.run()
    finished = spans.get_finished_spans()
    documents = {s.attributes["document.id"]: s for s in finished if s.name == "ingest.document"}
    assert set(documents) == {"traced", "plain"}
    traced = documents["traced"]
    assert format(traced.context.trace_id, "032x") == TRACE_ID  # the producer's trace goes on here
    assert traced.parent is not None and format(traced.parent.span_id, "016x") == PARENT
    assert traced.attributes["messaging.kafka.offset"] == r.source.delivered[0].offset
    stages = sorted(
        s.name for s in finished if s.parent is not None and s.parent.span_id == traced.context.span_id
    )
    assert stages == ["ingest.embed", "ingest.prepare", "ingest.store"]
    for stage in (s for s in finished if s.name.startswith("ingest.") and s.parent is not None):
        assert (
            stage.start_time is not None and stage.end_time is not None and stage.start_time <= stage.end_time
        )
    writes = [s for s in finished if s.name == "ingest.write"]
    linked = {link.context.span_id for w in writes for link in w.links}
    assert linked == {s.context.span_id for s in documents.values()}
    # The log says the same: each batch_stored line lists its documents' trace ids.
    plain_trace = format(documents["plain"].context.trace_id, "032x")
    listed = {t for line in logged if line["event"] == "batch_stored" for t in line["trace_ids"]}
    assert listed == {TRACE_ID, plain_trace}
    stored = [line for line in logged if line["event"] == "batch_stored"]
    assert all(
        line["bytes"] > 0 and set(line["stage_seconds"]) == {"prepare", "embed", "write_wait"}
        for line in stored
    )


async def test_no_spans_are_made_without_an_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    assert not tracing.configure()
    r = rig(log_of({0: [upsert("a", TEXT_C)]}))
    await r.run()
    assert not tracing.enabled()
    assert r.store.documents.keys() == {"a"}


async def test_spans_go_over_otlp_http_to_the_endpoint_set(monkeypatch: pytest.MonkeyPatch) -> None:
    received: list[tuple[str, bytes]] = []

    class Collector(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert tracing.configure()
        r = rig(log_of({0: [upsert("traced", TEXT_C)]}, headers={(0, 0): TRACEPARENT}))
        await r.run()
        tracing.shutdown()  # what is buffered is sent
    finally:
        server.shutdown()
        server.server_close()
    assert received and all(path == "/v1/traces" for path, _ in received), received
    assert any(bytes.fromhex(TRACE_ID) in body and b"ingest.document" in body for _, body in received)
