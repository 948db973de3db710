"""worker.dlq without Kafka: what a letter too large for the dead-letter topic becomes, and that a
size refusal is never taken for an outage (nor an outage for a size refusal)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError, OutOfOrderSequenceNumber
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from tests.unit.test_worker import FakeDeadLetters, log_of, rig, upsert
from worker.dlq import DeadLetter, Fit, KafkaDeadLetterSink, outgoing, smaller_fits
from worker.errors import BrokerUnavailable, DeadLetterRefused, DecodeError, DependencyError
from worker.settings import Settings
from worker.types import Record

SETTINGS = Settings.load({"KAFKA_TOPIC": "docs"})
DLQ = SETTINGS.dlq_topic
Sent = tuple[bytes | None, bytes | None, dict[str, bytes]]
HEADERS = [("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")]


def letter(
    offset: int, value: bytes | None, *, key: bytes | None = b"doc-1", headers: Any = HEADERS
) -> DeadLetter:
    return DeadLetter(Record("docs", 2, offset, key, value, headers), DecodeError("value is not JSON"))


def size(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]) -> int:
    return len(key or b"") + len(value or b"") + sum(len(k) + len(v) for k, v in headers)


class Broker:
    """The dead-letter topic as the fake producers see it: what it holds and the largest batch it takes."""

    def __init__(self, max_message_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self.log: list[Sent] = []
        self.down = False
        self.batches: list[int] = []  # records per batch the producers sent


class FakeProducer:
    """An idempotent producer in the ways that matter here: what one send() call sends before the
    first future is awaited is one batch; a batch over ``max_message_bytes`` is refused whole, and
    the producer's sequence numbers are then out of step: every later batch gets
    OutOfOrderSequenceNumber. A record over ``max_request_size`` is refused at send()."""

    def __init__(self, broker: Broker, *, max_request_size: int = 1_000_000) -> None:
        self.broker = broker
        self.max_request_size = max_request_size
        self.spoilt = False
        self.started = self.stopped = False
        self._batch: list[tuple[Sent, asyncio.Future[None]]] = []

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def partitions_for(self, topic: str) -> set[int]:
        if self.broker.down:
            raise KafkaConnectionError("no broker")
        return {0}

    async def send(
        self, topic: str, *, key: bytes | None, value: bytes | None, headers: list[tuple[str, bytes]]
    ) -> asyncio.Future[None]:
        assert topic == DLQ
        assert not (key is None and value is None), "aiokafka refuses a record without key and value"
        if size(key, value, headers) > self.max_request_size:
            raise MessageSizeTooLargeError("The message is too large for max_request_size")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self._batch:
            asyncio.get_running_loop().call_soon(self._deliver)
        self._batch.append(((key, value, dict(headers)), future))
        return future

    def _deliver(self) -> None:
        batch, self._batch = self._batch, []
        self.broker.batches.append(len(batch))
        total = sum(size(k, v, list(h.items())) for (k, v, h), _ in batch)
        error: Exception | None = None
        if self.broker.down:
            error = KafkaConnectionError("connection refused")
        elif self.spoilt:
            error = OutOfOrderSequenceNumber()
        elif total > self.broker.max_message_bytes:
            error = MessageSizeTooLargeError()
            self.spoilt = True
        for record, future in batch:
            if error is None:
                self.broker.log.append(record)
                future.set_result(None)
            else:
                future.set_exception(error)


class Rig:
    def __init__(self, max_message_bytes: int, *, max_request_size: int = 1_000_000) -> None:
        self.broker = Broker(max_message_bytes)
        self.producers = [FakeProducer(self.broker, max_request_size=max_request_size)]
        self.sink = KafkaDeadLetterSink(self.producers[0], SETTINGS, renew=self._renew)

    def _renew(self) -> FakeProducer:
        self.producers.append(FakeProducer(self.broker, max_request_size=self.producers[0].max_request_size))
        return self.producers[-1]

    def offsets(self) -> list[int]:
        return [int(h["dlq.original.offset"]) for _, _, h in self.broker.log]


def oversize(omitted: str) -> float:
    return REGISTRY.get_sample_value("ingest_dead_letters_oversize_total", {"omitted": omitted}) or 0.0


# -- what a smaller letter carries ------------------------------------------------------------------


def test_a_letter_without_its_value_keeps_key_and_headers_and_says_what_it_left_out() -> None:
    record = outgoing(letter(7, b"v" * 5000), Fit.WITHOUT_VALUE)
    headers = dict(record.headers)
    assert (record.key, record.value) == (b"doc-1", b"")
    assert headers["traceparent"] == HEADERS[0][1]
    assert headers["dlq.value.omitted"] == b"true"
    assert headers["dlq.value.size"] == b"5000"
    assert headers["dlq.original.offset"] == b"7"
    assert "dlq.key.omitted" not in headers


def test_headers_only_leaves_out_key_and_original_headers_too() -> None:
    record = outgoing(letter(7, b"v" * 5000, key=b"k" * 40), Fit.HEADERS_ONLY)
    headers = dict(record.headers)
    assert (record.key, record.value) == (None, b"")
    assert "traceparent" not in headers
    said = ("dlq.value.size", "dlq.key.omitted", "dlq.key.size", "dlq.headers.omitted")
    assert {k: headers[k] for k in said} == {
        "dlq.value.size": b"5000",
        "dlq.key.omitted": b"true",
        "dlq.key.size": b"40",
        "dlq.headers.omitted": b"true",
    }
    assert all(k.startswith("dlq.") for k in headers)


def test_a_left_out_value_is_sent_empty_never_null_so_it_cannot_read_as_a_tombstone() -> None:
    assert outgoing(letter(1, b"{}"), Fit.WITHOUT_VALUE).value == b""
    assert outgoing(letter(1, b"{}"), Fit.HEADERS_ONLY).value == b""
    assert outgoing(letter(1, None)).value is None, "a whole letter is the record unchanged"


def test_smaller_fits_skip_steps_that_would_leave_out_nothing() -> None:
    assert smaller_fits(letter(1, b"x"), Fit.WHOLE) == [Fit.WITHOUT_VALUE, Fit.HEADERS_ONLY]
    assert smaller_fits(letter(1, None), Fit.WHOLE) == [Fit.HEADERS_ONLY]
    assert smaller_fits(letter(1, b"x", key=None, headers=()), Fit.WHOLE) == [Fit.WITHOUT_VALUE]
    assert smaller_fits(letter(1, None, key=None, headers=()), Fit.WHOLE) == []


# -- the sink against a topic that refuses large letters --------------------------------------------


async def test_a_letter_the_broker_refuses_for_size_is_sent_once_without_its_value() -> None:
    r = Rig(max_message_bytes=2000)
    before = oversize("value")
    with capture_logs() as logs:
        await r.sink.send([letter(41, b"<" * 60_000)])
    [(key, value, headers)] = r.broker.log
    assert (key, value) == (b"doc-1", b"")
    assert headers["dlq.value.omitted"] == b"true" and headers["dlq.value.size"] == b"60000"
    assert oversize("value") == before + 1
    [event] = [e for e in logs if e["event"] == "dead_letter_oversize"]
    assert (event["topic"], event["partition"], event["offset"], event["omitted"]) == ("docs", 2, 41, "value")
    assert "the broker" in event["refused_by"]
    assert len(r.producers) == 2, "the refused batch spoilt the producer's sequence: replaced"
    assert r.producers[0].stopped and r.producers[1].started


async def test_a_letter_over_the_producers_request_size_needs_no_new_producer() -> None:
    r = Rig(max_message_bytes=100_000, max_request_size=50_000)
    with capture_logs() as logs:
        await r.sink.send([letter(1, b"{small"), letter(2, b"<" * 60_000), letter(3, b"{small")])
    assert sorted(r.offsets()) == [1, 2, 3], "each letter exactly once"
    omitted = {int(h["dlq.original.offset"]): h.get("dlq.value.omitted") for _, _, h in r.broker.log}
    assert omitted == {1: None, 2: b"true", 3: None}
    assert len(r.producers) == 1
    [event] = [e for e in logs if e["event"] == "dead_letter_oversize"]
    assert "max_request_size" in event["refused_by"]


async def test_letters_refused_together_are_sent_alone_whole_before_any_is_cut() -> None:
    # Each letter fits; the three in one batch do not.
    r = Rig(max_message_bytes=900)
    letters = [letter(offset, b"x" * 300) for offset in (1, 2, 3)]
    await r.sink.send(letters)
    assert sorted(r.offsets()) == [1, 2, 3]
    assert all("dlq.value.omitted" not in h for _, _, h in r.broker.log)
    assert [value for _, value, _ in r.broker.log] == [b"x" * 300] * 3
    assert r.broker.batches == [3, 1, 1, 1], "refused together, then each alone"


async def test_letters_behind_a_refused_one_are_resent_whole_after_the_producer_is_replaced() -> None:
    r = Rig(max_message_bytes=2000)
    await r.sink.send([letter(1, b"<" * 5000)])
    r.producers[-1].spoilt = True  # as if the broker refused a batch we did not see
    await r.sink.send([letter(2, b"{small"), letter(3, b"{small")])
    assert sorted(r.offsets()) == [1, 2, 3]
    by_offset = {int(h["dlq.original.offset"]): v for _, v, h in r.broker.log}
    assert by_offset == {1: b"", 2: b"{small", 3: b"{small"}
    assert len(r.producers) == 3, "replaced after the refusal, and again after the spoilt batch"


async def test_when_even_the_valueless_letter_is_too_large_key_and_headers_go_too() -> None:
    r = Rig(max_message_bytes=3000)
    bulky = [("bulky", b"h" * 5000)]
    before = oversize("value_key_headers")
    await r.sink.send([letter(5, b"{not json", key=b"doc-5", headers=bulky)])
    [(key, value, headers)] = r.broker.log
    assert (key, value) == (None, b"")
    assert "bulky" not in headers
    assert headers["dlq.key.omitted"] == b"true" and headers["dlq.key.size"] == b"5"
    assert headers["dlq.original.offset"] == b"5"
    assert oversize("value_key_headers") == before + 1


async def test_a_topic_that_takes_not_even_the_dlq_headers_is_a_clear_error_not_an_outage() -> None:
    r = Rig(max_message_bytes=100)
    with pytest.raises(DeadLetterRefused, match=r"max\.message\.bytes") as refused:
        await r.sink.send([letter(9, b"<" * 5000)])
    assert not isinstance(refused.value, DependencyError), "no retry changes this: not waited out"
    assert "docs/2/9" in str(refused.value)
    assert r.broker.log == []
    assert len(r.broker.batches) == 3, "whole, without value, headers only: then it gives up"


async def test_an_outage_is_still_an_outage_and_nothing_is_cut() -> None:
    r = Rig(max_message_bytes=2000)
    r.broker.down = True
    with pytest.raises(BrokerUnavailable):
        await r.sink.send([letter(1, b"{small"), letter(2, b"<" * 5000)])
    with pytest.raises(BrokerUnavailable):
        await r.sink.ping()
    assert r.broker.log == []
    assert len(r.producers) == 1
    r.broker.down = False
    await r.sink.ping()
    await r.sink.send([letter(1, b"{small")])
    assert r.offsets() == [1]


# -- the worker ---------------------------------------------------------------------------------------


class RefusingDeadLetters(FakeDeadLetters):
    async def send(self, letters: Sequence[DeadLetter]) -> None:
        raise DeadLetterRefused("the dead-letter topic refuses even headers: raise its max.message.bytes")


async def test_a_dead_letter_topic_that_refuses_even_headers_stops_the_worker_short_of_that_record() -> None:
    w = rig(
        log_of({0: [upsert("a", "Alpha is fine."), (b"x", b"garbage"), upsert("b", "Bravo is fine.")]}),
        dead=RefusingDeadLetters(),
    )
    with pytest.raises(DeadLetterRefused):
        await w.run()
    assert all(mark <= 1 for mark in w.source.committed.values()), "committed past the refused record"
