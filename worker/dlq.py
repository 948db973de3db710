"""The dead-letter topic: records that can never succeed, with why (CONTRACT: Dead-letter records)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from aiokafka.errors import KafkaError

from worker import metrics
from worker.errors import BrokerUnavailable, RecordError
from worker.settings import Settings

Headers = Sequence[tuple[str, bytes]]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers
    error: RecordError
    attempts: int = 1


class DeadLetterSink(Protocol):
    async def send(self, letters: Sequence[DeadLetter]) -> None:
        """Publish and wait for the broker's acknowledgement of every letter."""
        ...

    async def ping(self) -> None:
        """Raise BrokerUnavailable unless the dead-letter topic can be reached."""
        ...


def dead_letter_headers(
    letter: DeadLetter, *, failed_at: dt.datetime | None = None
) -> list[tuple[str, bytes]]:
    failed_at = failed_at or dt.datetime.now(dt.UTC)
    ours = {
        "dlq.original.topic": letter.topic,
        "dlq.original.partition": str(letter.partition),
        "dlq.original.offset": str(letter.offset),
        "dlq.error.stage": letter.error.stage,
        "dlq.error.class": type(letter.error).__name__,
        "dlq.error.message": str(letter.error)[:2000],
        "dlq.attempts": str(letter.attempts),
        "dlq.failed.at": failed_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    kept = [(k, v) for k, v in letter.headers if k not in ours]
    return kept + [(k, v.encode("utf-8")) for k, v in ours.items()]


class KafkaDeadLetterSink:
    def __init__(self, producer: object, settings: Settings) -> None:
        self._producer = producer
        self._topic = settings.dlq_topic

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        try:
            futures = [
                await self._producer.send(  # type: ignore[attr-defined]
                    self._topic, key=letter.key, value=letter.value, headers=dead_letter_headers(letter)
                )
                for letter in letters
            ]
            for future in futures:
                await future
        except KafkaError as exc:
            raise BrokerUnavailable(f"dead-letter topic {self._topic} not writable: {exc!r:.300}") from exc
        for letter in letters:
            metrics.DEAD_LETTERS.labels(stage=letter.error.stage).inc()

    async def ping(self) -> None:
        try:
            await asyncio.wait_for(self._producer.partitions_for(self._topic), 5)  # type: ignore[attr-defined]
        except (KafkaError, TimeoutError) as exc:
            raise BrokerUnavailable(f"dead-letter topic {self._topic} unreachable: {exc!r:.300}") from exc
