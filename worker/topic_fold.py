"""A topic read from its beginning to its end offsets, folded into each document's winning event
(for ``verify --topic``).

No consumer group, nothing committed. Each document's events are folded with the worker's own rule
(:func:`worker.plan.apply`), keeping per document only what a comparison with the stored state
needs: its version, whether it is deleted, its text's sha256 and where the winning event is.
Records the worker would dead-letter at decode are counted, not folded.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

from worker.decode import decode_event
from worker.errors import RecordError, WorkerError
from worker.kafka import BrokerError, client_options, existing_partitions
from worker.plan import DocState, apply
from worker.settings import Settings
from worker.types import Record, TopicPartition


class TopicMissing(WorkerError):
    """A topic to compare with does not exist."""


class Winner(NamedTuple):
    """A document's state after the topic's events, and where the event that made it is."""

    version: int | None
    deleted: bool
    text_sha256: bytes | None
    topic: str
    partition: int
    offset: int


@dataclass
class TopicFold:
    """Each document's winning event over the records taken, by the worker's rule."""

    max_text_bytes: int
    ends: Mapping[TopicPartition, int] = field(default_factory=dict)
    winners: dict[str, Winner] = field(default_factory=dict)
    split: set[str] = field(default_factory=set)  # events in more than one partition: order unknown
    records: int = 0
    undecodable: int = 0

    def take(self, record: Record) -> None:
        self.records += 1
        try:
            event = decode_event(record.key, record.value, max_text_bytes=self.max_text_bytes)
        except RecordError:  # the worker dead-letters it; it changes nothing
            self.undecodable += 1
            return
        current = self.winners.get(event.doc_id)
        if current is not None and (current.topic, current.partition) != (record.topic, record.partition):
            self.split.add(event.doc_id)
        after = apply(None if current is None else DocState(current.version, current.deleted), event)
        if after is None:
            return
        digest = None if after.deleted else hashlib.sha256(event.text.encode("utf-8")).digest()
        self.winners[event.doc_id] = Winner(
            after.version, after.deleted, digest, record.topic, record.partition, record.offset
        )


async def read_topics(settings: Settings, topics: Iterable[str], *, idle_timeout: float = 30.0) -> TopicFold:
    """Every partition of ``topics`` from its beginning to its end offset as of now, folded."""
    tps = await _partitions(settings, list(topics))
    consumer = AIOKafkaConsumer(
        **client_options(settings),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=settings.kafka_max_partition_fetch_bytes,
        fetch_max_bytes=settings.kafka_max_partition_fetch_bytes,
    )
    await consumer.start()
    try:
        ends: dict[TopicPartition, int] = dict(await consumer.end_offsets(tps))
        fold = TopicFold(settings.max_text_bytes, ends)
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        left = set(tps)
        loop = asyncio.get_running_loop()
        progress_at = loop.time()
        while True:
            for tp in list(left):
                if await consumer.position(tp) >= ends[tp]:
                    left.discard(tp)
                    consumer.pause(tp)
            if not left:
                return fold
            if loop.time() - progress_at > idle_timeout:
                behind = ", ".join(f"{tp.topic}/{tp.partition}" for tp in sorted(left))
                raise BrokerError(f"reading {behind} to its end offset stalled for {idle_timeout:.0f}s")
            batches = await consumer.getmany(timeout_ms=500)
            for tp, messages in batches.items():
                progress_at = loop.time()
                for m in messages:
                    if m.offset >= ends[tp]:
                        break
                    fold.take(Record(m.topic, m.partition, m.offset, m.key, m.value))
    finally:
        await consumer.stop()


async def _partitions(settings: Settings, topics: list[str]) -> list[TopicPartition]:
    """Every partition of ``topics``; refuses a topic that does not exist (rather than letting a
    broker create it empty)."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    try:
        await admin.start()
        partitions, missing = await existing_partitions(admin, topics)
    finally:
        await admin.close()
    if missing:
        raise TopicMissing(f"no topic {', '.join(map(repr, missing))} on {settings.kafka_bootstrap_servers}")
    return partitions
