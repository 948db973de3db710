"""The dead-letter topic: records that can never succeed, with why (CONTRACT: Dead-letter records).

A letter too large for the topic (the producer's ``max_request_size``, or the topic's
``max.message.bytes``) is a refusal of that letter, not an outage: it is sent again without
its value, then also without its key and original headers, each time saying so in ``dlq.*``
headers; the original stays findable at ``dlq.original.topic``/``partition``/``offset``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    RecordListTooLargeError,
)

from worker import metrics
from worker.errors import BrokerUnavailable, DeadLetterRefused, RecordError
from worker.kafka import make_producer, start_producer
from worker.logs import trace_id_from
from worker.retry import wait_within
from worker.settings import Settings
from worker.types import Record

log = structlog.get_logger()

# The dlq.* headers (CONTRACT: Dead-letter records); replay reads them and adds REPLAY_COUNT.
PREFIX = "dlq."
ORIGINAL_TOPIC = "dlq.original.topic"
ORIGINAL_PARTITION = "dlq.original.partition"
ORIGINAL_OFFSET = "dlq.original.offset"
ERROR_STAGE = "dlq.error.stage"
ERROR_CLASS = "dlq.error.class"
ERROR_MESSAGE = "dlq.error.message"
ATTEMPTS = "dlq.attempts"
FAILED_AT = "dlq.failed.at"
REPLAY_COUNT = "dlq.replay.count"
VALUE_OMITTED = "dlq.value.omitted"
VALUE_SIZE = "dlq.value.size"
KEY_OMITTED = "dlq.key.omitted"
KEY_SIZE = "dlq.key.size"
HEADERS_OMITTED = "dlq.headers.omitted"

_TOO_LARGE = (MessageSizeTooLargeError, RecordListTooLargeError)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A record that can never succeed, and why."""

    record: Record
    error: RecordError
    attempts: int = 1


class Fit(enum.IntEnum):
    """How much of a letter is sent; each step leaves out more, for a topic that refused the last."""

    WHOLE = 0
    WITHOUT_VALUE = 1  # value empty; key and original headers kept
    HEADERS_ONLY = 2  # value empty, no key, only the dlq.* headers

    @property
    def omitted(self) -> str:
        return ("", "value", "value_key_headers")[self]


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One dead-letter record as it goes to the broker."""

    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]


class DeadLetterSink(Protocol):
    async def send(self, letters: Sequence[DeadLetter]) -> None:
        """Publish and wait for the broker's acknowledgement of every letter."""
        ...

    async def ping(self) -> None:
        """Raise BrokerUnavailable unless the dead-letter topic can be reached."""
        ...


def log_sent(letters: Sequence[DeadLetter]) -> None:
    """One ``record_dead_lettered`` line per letter sent, with its W3C trace id when it has one."""
    for letter in letters:
        record = letter.record
        with structlog.contextvars.bound_contextvars(trace_id=trace_id_from(record.headers)):
            log.warning(
                "record_dead_lettered",
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                stage=letter.error.stage,
                error_class=type(letter.error).__name__,
                error=str(letter.error)[:300],
            )


def dead_letter_headers(
    letter: DeadLetter, *, failed_at: dt.datetime | None = None, fit: Fit = Fit.WHOLE
) -> list[tuple[str, bytes]]:
    failed_at = failed_at or dt.datetime.now(dt.UTC)
    ours = {
        ORIGINAL_TOPIC: letter.record.topic,
        ORIGINAL_PARTITION: str(letter.record.partition),
        ORIGINAL_OFFSET: str(letter.record.offset),
        ERROR_STAGE: letter.error.stage,
        ERROR_CLASS: type(letter.error).__name__,
        ERROR_MESSAGE: str(letter.error)[:2000],
        ATTEMPTS: str(letter.attempts),
        FAILED_AT: failed_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    if fit >= Fit.WITHOUT_VALUE:
        ours |= {VALUE_OMITTED: "true", VALUE_SIZE: str(len(letter.record.value or b""))}
    if fit >= Fit.HEADERS_ONLY:
        ours |= {KEY_OMITTED: "true", KEY_SIZE: str(len(letter.record.key or b"")), HEADERS_OMITTED: "true"}
        return [(k, v.encode("utf-8")) for k, v in ours.items()]
    kept = [(k, v) for k, v in letter.record.headers if k not in ours]
    return kept + [(k, v.encode("utf-8")) for k, v in ours.items()]


def outgoing(letter: DeadLetter, fit: Fit = Fit.WHOLE) -> Outgoing:
    """The record to publish for ``letter``. A value left out is sent empty, never null: a null
    value would read as a tombstone (a delete) to anything that replays it."""
    headers = dead_letter_headers(letter, fit=fit)
    if fit == Fit.WHOLE:
        return Outgoing(letter.record.key, letter.record.value, headers)
    return Outgoing(letter.record.key if fit == Fit.WITHOUT_VALUE else None, b"", headers)


def smaller_fits(letter: DeadLetter, after: Fit) -> list[Fit]:
    """The fits after ``after`` that leave out something ``letter`` has."""
    has = {
        Fit.WITHOUT_VALUE: bool(letter.record.value),
        Fit.HEADERS_ONLY: bool(letter.record.key) or bool(letter.record.headers),
    }
    return [fit for fit in Fit if fit > after and has[fit]]


class KafkaDeadLetterSink:
    """Owns its producer from here on: it may replace it, and :meth:`stop` stops the current one.

    A broker that refused a batch of an idempotent producer leaves the producer's sequence
    numbers for that partition ahead of the broker's (aiokafka does not rewind them): every later
    batch would fail with OutOfOrderSequenceNumber. After such a refusal the producer is replaced.
    """

    def __init__(self, producer: Any, settings: Settings, *, renew: Callable[[], Any] | None = None) -> None:
        self._producer = producer
        self._topic = settings.dlq_topic
        self._renew = renew or functools.partial(make_producer, settings)
        self._stale = False  # the current producer must be replaced before its next use

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        await self._usable()
        outcomes = await self._publish([outgoing(letter) for letter in letters])
        self._stale = any(_spoils_producer(outcome) for outcome in outcomes)
        outage = next((o for o in outcomes if o is not None and not _resend(o)), None)
        if outage is not None:
            raise self._unavailable(outage) from _cause(outage)
        for letter, outcome in zip(letters, outcomes, strict=True):
            if outcome is None:
                continue
            # Refused in company (a batch can exceed the topic's limit when no letter in it does),
            # or spoilt by a refused batch before it: try it alone, whole, first.
            whole_again = isinstance(outcome, OutOfOrderSequenceNumber) or (
                len(letters) > 1 and not isinstance(outcome, _NotSent)
            )
            fits = ([Fit.WHOLE] if whole_again else []) + smaller_fits(letter, Fit.WHOLE)
            await self._send_fitting(letter, fits, outcome)
        for letter in letters:
            metrics.DEAD_LETTERS.labels(stage=letter.error.stage).inc()

    async def ping(self) -> None:
        await self._usable()
        try:
            await wait_within(self._producer.partitions_for(self._topic), 5)
        except (KafkaError, TimeoutError) as exc:
            raise BrokerUnavailable(f"dead-letter topic {self._topic} unreachable: {exc!r:.300}") from exc

    async def stop(self) -> None:
        await self._producer.stop()

    async def _send_fitting(self, letter: DeadLetter, fits: list[Fit], refusal: BaseException) -> None:
        """Send ``letter`` alone in the first of ``fits`` the topic takes; never loops."""
        for fit in fits:
            await self._usable()
            [outcome] = await self._publish([outgoing(letter, fit)])
            if outcome is None:
                if fit != Fit.WHOLE:
                    _shrunk(letter, fit, self._topic, refusal)
                return
            self._stale = _spoils_producer(outcome)
            if not _too_large(outcome):
                raise self._unavailable(outcome) from _cause(outcome)
            refusal = outcome
        raise DeadLetterRefused(
            f"the dead-letter topic {self._topic} refuses the letter of {_where(letter.record)} "
            f"even without its value, key and headers ({_describe(refusal)}): "
            "raise the topic's max.message.bytes"
        ) from _cause(refusal)

    def _unavailable(self, outcome: BaseException) -> BrokerUnavailable:
        return BrokerUnavailable(f"dead-letter topic {self._topic} not writable: {_cause(outcome)!r:.300}")

    async def _publish(self, records: Sequence[Outgoing]) -> list[BaseException | None]:
        """Send ``records`` together; for each, None once acknowledged, else why not."""
        outcomes: list[BaseException | None] = [None] * len(records)
        futures: dict[int, asyncio.Future[Any]] = {}
        for i, record in enumerate(records):
            try:
                futures[i] = await self._producer.send(
                    self._topic, key=record.key, value=record.value, headers=record.headers
                )
            except KafkaError as exc:  # over max_request_size, or the send buffer stayed full
                outcomes[i] = _NotSent(exc)
        for i, future in futures.items():
            try:
                await future
            except KafkaError as exc:
                outcomes[i] = exc
        return outcomes

    async def _usable(self) -> None:
        """Replace a producer whose sequence numbers a refusal spoilt, before using it again."""
        if not self._stale:
            return
        old, self._producer = self._producer, self._renew()
        try:
            await old.stop()
        except KafkaError as exc:  # it is being replaced because it failed; its stop may too
            log.warning("dead_letter_producer_stop_failed", error=repr(exc)[:300])
        try:
            await start_producer(self._producer)
        except KafkaError as exc:
            raise BrokerUnavailable(f"dead-letter producer did not start: {exc!r:.300}") from exc
        self._stale = False
        log.info("dead_letter_producer_replaced", topic=self._topic)


class _NotSent(Exception):  # an outcome, never raised
    """The producer refused a record before sending it (no broker saw it)."""

    def __init__(self, cause: KafkaError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _cause(outcome: BaseException) -> BaseException:
    return outcome.cause if isinstance(outcome, _NotSent) else outcome


def _too_large(outcome: BaseException) -> bool:
    return isinstance(_cause(outcome), _TOO_LARGE)


def _resend(outcome: BaseException) -> bool:
    """Refused for its size, or spoilt by a refusal before it: sent again, not waited out."""
    return _too_large(outcome) or isinstance(outcome, OutOfOrderSequenceNumber)


def _spoils_producer(outcome: BaseException | None) -> bool:
    """A broker refused a batch: the idempotent producer's sequence numbers are now out of step."""
    return isinstance(outcome, (*_TOO_LARGE, OutOfOrderSequenceNumber))


def _describe(refusal: BaseException) -> str:
    """Who refused a letter for its size, and what they said."""
    where = "the producer (max_request_size)" if isinstance(refusal, _NotSent) else "the broker"
    return f"{where}: {_cause(refusal)}"


def _shrunk(letter: DeadLetter, fit: Fit, topic: str, refusal: BaseException) -> None:
    metrics.DEAD_LETTERS_OVERSIZE.labels(omitted=fit.omitted).inc()
    log.warning(
        "dead_letter_oversize",
        topic=letter.record.topic,
        partition=letter.record.partition,
        offset=letter.record.offset,
        dlq_topic=topic,
        omitted=fit.omitted,
        value_bytes=len(letter.record.value or b""),
        key_bytes=len(letter.record.key or b""),
        refused_by=_describe(refusal),
    )


def _where(record: Record) -> str:
    return f"{record.topic}/{record.partition}/{record.offset}"
