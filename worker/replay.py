"""``ingest-worker replay``: move dead letters back to the topic each came from.

It reads ``KAFKA_DLQ_TOPIC`` in its own consumer group (``<KAFKA_GROUP_ID>.replay`` unless
``--group``), publishes each matching record to its ``dlq.original.topic`` (or ``--to``) with
``dlq.replay.count`` incremented, waits for the broker's acknowledgements, then commits: a
second run moves nothing twice. It stops at the end of the dead-letter topic. Records that do
not match the filters are passed over (and committed with the rest): a fresh ``--group``
reads the topic from the beginning again. A letter whose value was left out (too large for the
dead-letter topic: ``dlq.value.omitted``) is never moved, since its empty value is not the
document: it is listed with where the original is, and counted in the summary.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiolimiter import AsyncLimiter

from worker.dlq import VALUE_OMITTED, VALUE_SIZE
from worker.kafka import client_options, make_producer, start_producer
from worker.settings import Settings

REPLAY_COUNT = "dlq.replay.count"


@dataclass(frozen=True)
class Filters:
    stage: str | None = None
    error_class: str | None = None
    key: str | None = None
    original_topic: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None

    def match(self, headers: dict[str, str], key: bytes | None) -> bool:
        if self.stage is not None and headers.get("dlq.error.stage") != self.stage:
            return False
        if self.error_class is not None and headers.get("dlq.error.class") != self.error_class:
            return False
        if self.original_topic is not None and headers.get("dlq.original.topic") != self.original_topic:
            return False
        if self.key is not None and (key or b"").decode("utf-8", "replace") != self.key:
            return False
        if self.since is not None or self.until is not None:
            failed_at = parse_time(headers.get("dlq.failed.at", ""))
            if failed_at is None:
                return False
            if self.since is not None and failed_at < self.since:
                return False
            if self.until is not None and failed_at >= self.until:
                return False
        return True


@dataclass
class Summary:
    scanned: int = 0
    moved: int = 0
    listed: int = 0
    filtered_out: int = 0
    refused: int = 0  # replayed too often already
    unroutable: int = 0  # no original topic header and no --to
    value_omitted: int = 0  # too large for the dead-letter topic: sent without the value
    by_stage: Counter[str] = field(default_factory=Counter)

    def lines(self) -> list[str]:
        stages = ", ".join(f"{stage} {n}" for stage, n in sorted(self.by_stage.items())) or "none"
        lines = [
            f"scanned {self.scanned} dead letters: moved {self.moved}, listed {self.listed}, "
            f"filtered out {self.filtered_out}, refused (max replays) {self.refused}, "
            f"no destination {self.unroutable}",
            f"by stage: {stages}",
        ]
        if self.value_omitted:
            letters = "dead letter" if self.value_omitted == 1 else "dead letters"
            lines.append(
                f"passed over {self.value_omitted} {letters} whose value was left out (too large for the "
                "dead-letter topic): republish each original from the topic, partition and offset listed"
            )
        return lines


def parse_time(text: str) -> dt.datetime | None:
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


async def replay(
    settings: Settings,
    *,
    filters: Filters,
    to_topic: str | None = None,
    dry_run: bool = False,
    max_replays: int | None = None,
    rate: float | None = None,
    group: str | None = None,
    out: Any = None,
    idle_timeout: float = 10.0,
) -> Summary:
    out = out or sys.stdout
    summary = Summary()
    consumer = AIOKafkaConsumer(
        settings.dlq_topic,
        **client_options(settings),
        group_id=group or f"{settings.kafka_group_id}.replay",
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=max(1000, settings.kafka_session_timeout_ms // 10),
    )
    producer = None if dry_run else make_producer(settings)
    limiter = AsyncLimiter(rate, 1) if rate else None
    from tqdm import tqdm

    await consumer.start()
    try:
        if producer is not None:
            await start_producer(producer)
        with tqdm(desc="replaying", unit="rec", file=sys.stderr, disable=dry_run) as bar:
            quiet_since = asyncio.get_running_loop().time()
            while True:
                batches = await consumer.getmany(timeout_ms=500)
                now = asyncio.get_running_loop().time()
                if batches:
                    quiet_since = now
                pending = []
                offsets: dict[TopicPartition, int] = {}
                for tp, messages in batches.items():
                    for message in messages:
                        summary.scanned += 1
                        offsets[tp] = message.offset + 1
                        future = await _one(
                            message, summary, filters, to_topic, dry_run, max_replays, producer, limiter, out
                        )
                        if future is not None:
                            pending.append(future)
                if pending:
                    await asyncio.gather(*pending)  # acknowledged before the commit below
                if offsets and not dry_run:
                    await consumer.commit(offsets)
                bar.total = summary.scanned + await _remaining(consumer)
                bar.n = summary.scanned
                bar.refresh()
                if await _at_end(consumer) or now - quiet_since > idle_timeout:
                    break
    finally:
        if producer is not None:
            await producer.stop()
        await consumer.stop()
    return summary


async def _one(
    message: Any,
    summary: Summary,
    filters: Filters,
    to_topic: str | None,
    dry_run: bool,
    max_replays: int | None,
    producer: Any,
    limiter: AsyncLimiter | None,
    out: Any,
) -> Any:
    headers = {k: v.decode("utf-8", "replace") for k, v in message.headers or ()}
    if not filters.match(headers, message.key):
        summary.filtered_out += 1
        return None
    if headers.get(VALUE_OMITTED) == "true":
        summary.value_omitted += 1
        parts = ("topic", "partition", "offset")
        original = "/".join(headers.get(f"dlq.original.{part}", "?") for part in parts)
        where = (
            f"{message.partition}:{message.offset}",
            (message.key or b"").decode("utf-8", "replace"),
            f"not moved: value left out ({headers.get(VALUE_SIZE, '?')} bytes), the original is {original}",
        )
        print("\t".join(where), file=out)
        return None
    count = int(headers.get(REPLAY_COUNT, "0") or 0)
    if max_replays is not None and count >= max_replays:
        summary.refused += 1
        return None
    destination = to_topic or headers.get("dlq.original.topic")
    if not destination:
        summary.unroutable += 1
        return None
    stage = headers.get("dlq.error.stage", "?")
    summary.by_stage[stage] += 1
    if dry_run:
        summary.listed += 1
        key = (message.key or b"").decode("utf-8", "replace")
        fields = (
            f"{message.partition}:{message.offset}",
            key,
            stage,
            headers.get("dlq.error.class", "?"),
            headers.get("dlq.failed.at", "?"),
            f"-> {destination}",
            headers.get("dlq.error.message", "")[:120],
        )
        print("\t".join(fields), file=out)
        return None
    if limiter is not None:
        await limiter.acquire()
    kept = [(k, v) for k, v in message.headers or () if not k.startswith("dlq.")]
    kept.append((REPLAY_COUNT, str(count + 1).encode()))
    summary.moved += 1
    return await producer.send(destination, key=message.key, value=message.value, headers=kept)


async def _remaining(consumer: AIOKafkaConsumer) -> int:
    total = 0
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        if highwater is not None:
            total += max(0, highwater - await consumer.position(tp))
    return total


async def _at_end(consumer: AIOKafkaConsumer) -> bool:
    """Every assigned partition's position has reached the high watermark the last fetch reported."""
    assigned = consumer.assignment()
    if not assigned:
        return False
    for tp in assigned:
        highwater = consumer.highwater(tp)
        if highwater is None or await consumer.position(tp) < highwater:
            return False
    return True
