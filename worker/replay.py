"""``ingest-worker replay``: move dead letters back to the topic each came from.

It reads ``KAFKA_DLQ_TOPIC`` in its own consumer group (``<KAFKA_GROUP_ID>.replay`` unless
``--group``), publishes each matching record to its ``dlq.original.topic`` (or ``--to``) with
``dlq.replay.count`` incremented, waits for the broker's acknowledgements, then commits: a
second run moves nothing twice. It stops at the end of the dead-letter topic.

Letters a run leaves in place (filtered out, refused by ``--max-replays``, or without a
destination) stay reachable by the same group: its committed offset stops at the first of them,
and the letters handled beyond it are named in the commit's metadata, so the next run passes
over those and reads the rest again. A letter whose value was left out (too large for the
dead-letter topic: ``dlq.value.omitted``) is never moved, since its empty value is not the
document: it is listed with where the original is, and counted in the summary.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiolimiter import AsyncLimiter

from worker import dlq
from worker.errors import ConfigError
from worker.kafka import client_options, existing_partitions, make_producer, start_producer
from worker.replay_ledger import LEDGER_BUDGET, LEDGER_PREFIX, Ledger, Ranges
from worker.retry import backoff
from worker.settings import Settings


@dataclass(frozen=True)
class Filters:
    stage: str | None = None
    error_class: str | None = None
    key: str | None = None
    original_topic: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None

    def match(self, headers: dict[str, str], key: bytes | None) -> bool:
        if self.stage is not None and headers.get(dlq.ERROR_STAGE) != self.stage:
            return False
        if self.error_class is not None and headers.get(dlq.ERROR_CLASS) != self.error_class:
            return False
        if self.original_topic is not None and headers.get(dlq.ORIGINAL_TOPIC) != self.original_topic:
            return False
        if self.key is not None and (key or b"").decode("utf-8", "replace") != self.key:
            return False
        if self.since is not None or self.until is not None:
            failed_at = parse_time(headers.get(dlq.FAILED_AT, ""))
            if failed_at is None:
                return False
            if self.since is not None and failed_at < self.since:
                return False
            if self.until is not None and failed_at >= self.until:
                return False
        return True


class Outcome(enum.Enum):
    MOVE = "move"
    LISTED = "listed"  # --dry-run: would move
    FILTERED_OUT = "filtered out"
    REFUSED = "refused"  # replayed --max-replays times already
    UNROUTABLE = "unroutable"  # no original topic header and no --to
    VALUE_OMITTED = "value omitted"  # too large for the dead-letter topic: never movable

    @property
    def handled(self) -> bool:
        """Done with for good: the group need not read it again."""
        return self in (Outcome.MOVE, Outcome.VALUE_OMITTED)


@dataclass
class Summary:
    scanned: int = 0
    moved: int = 0
    listed: int = 0
    filtered_out: int = 0
    refused: int = 0
    unroutable: int = 0
    value_omitted: int = 0
    moved_before: int = 0  # handled by an earlier run of the group, passed over
    stopped: dict[int, int] = field(default_factory=dict)  # partition -> offset a full ledger stopped at
    metadata_kept: bool = True  # whether the broker keeps a commit's metadata
    by_stage: Counter[str] = field(default_factory=Counter)
    group: str = ""
    dry_run: bool = False

    def count(self, outcome: Outcome) -> None:
        attribute = {Outcome.MOVE: "moved"}.get(outcome, outcome.value.replace(" ", "_"))
        setattr(self, attribute, getattr(self, attribute) + 1)

    @property
    def left(self) -> int:
        return self.filtered_out + self.refused + self.unroutable

    def lines(self) -> list[str]:
        stages = ", ".join(f"{stage} {n}" for stage, n in sorted(self.by_stage.items())) or "none"
        lines = [
            f"scanned {self.scanned} dead letters: moved {self.moved}, listed {self.listed}, "
            f"filtered out {self.filtered_out}, refused (max replays) {self.refused}, "
            f"no destination {self.unroutable}",
            f"by stage: {stages}",
        ]
        if self.moved_before:
            lines.append(f"passed over {self.moved_before} moved by an earlier run of group {self.group}")
        if self.left and not self.dry_run:
            lines.append(
                f"left {self.left} in place: group {self.group} reads them again on its next run "
                "(give other filters, or none, to move them)"
            )
        if self.value_omitted:
            letters = "dead letter" if self.value_omitted == 1 else "dead letters"
            lines.append(
                f"passed over {self.value_omitted} {letters} whose value was left out (too large for the "
                "dead-letter topic): republish each original from the topic, partition and offset listed"
            )
        why = (
            "as too many letters handled past one left in place would not fit the group's commit: "
            "run again to go on"
            if self.metadata_kept
            else "as this broker keeps no commit metadata, so letters moved past one left in place "
            "would be moved again by the next run: move those left first (other filters, or none)"
        )
        for partition, offset in sorted(self.stopped.items()):
            lines.append(f"partition {partition}: stopped at offset {offset}, {why}")
        return lines


def parse_time(text: str) -> dt.datetime | None:
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)


@dataclass
class Choices:
    """What the command line asked of this run."""

    filters: Filters = field(default_factory=Filters)
    to_topic: str | None = None
    dry_run: bool = False
    max_replays: int | None = None


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
    group_id = group or f"{settings.kafka_group_id}.replay"
    committed = await _committed(settings, group_id)
    consumer = AIOKafkaConsumer(
        settings.dlq_topic,
        **client_options(settings),
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.kafka_session_timeout_ms,
        heartbeat_interval_ms=max(1000, settings.kafka_session_timeout_ms // 10),
    )
    producer = None if dry_run else make_producer(settings)
    run = _Run(
        Choices(filters, to_topic, dry_run, max_replays),
        Summary(group=group_id, dry_run=dry_run),
        committed,
        consumer,
        producer,
        AsyncLimiter(rate, 1) if rate else None,
        out or sys.stdout,
        settings,
    )
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
                    await run.take(batches)
                bar.total = run.summary.scanned + await _remaining(consumer)
                bar.n = run.summary.scanned
                bar.refresh()
                if await _at_end(consumer) or now - quiet_since > idle_timeout:
                    break
    finally:
        if producer is not None:
            await producer.stop()
        await consumer.stop()
    return run.summary


@dataclass
class _Run:
    choices: Choices
    summary: Summary
    committed: dict[TopicPartition, tuple[int, str]]
    consumer: Any
    producer: Any
    limiter: AsyncLimiter | None
    out: Any
    settings: Settings
    ledgers: dict[TopicPartition, Ledger] = field(default_factory=dict)
    budget: int | None = None  # LEDGER_BUDGET once the broker is seen to keep commit metadata, else 0

    async def take(self, batches: dict[TopicPartition, list[Any]]) -> None:
        """Handle one fetch, wait for the broker's acknowledgements, then commit."""
        if self.budget is None:
            self.budget = LEDGER_BUDGET if self.choices.dry_run else await self._metadata_budget(batches)
            self.summary.metadata_kept = self.budget > 0
        pending = []
        for tp, messages in batches.items():
            for message in messages:
                if tp.partition in self.summary.stopped:
                    break
                if (future := await self._letter(tp, message)) is not None:
                    pending.append(future)
        await asyncio.gather(*pending)
        if not self.choices.dry_run:
            offsets = {tp: c for tp, ledger in self.ledgers.items() if (c := ledger.commit()) is not None}
            await self.consumer.commit(offsets)

    async def _letter(self, tp: TopicPartition, message: Any) -> Any:
        if tp not in self.ledgers:
            start, metadata = self.committed.get(tp, (message.offset, ""))
            self.ledgers[tp] = Ledger(start, Ranges.decode(metadata, start), budget=self.budget or 0)
        ledger = self.ledgers[tp]
        if message.offset in ledger.before:
            self.summary.scanned += 1
            self.summary.moved_before += 1
            ledger.mark(message.offset, handled=True)
            return None
        headers = _headers(message)
        outcome, destination = _decide(message, headers, self.choices)
        if outcome.handled and not ledger.fits(message.offset):
            self.summary.stopped[tp.partition] = message.offset
            self.consumer.pause(tp)
            return None
        self.summary.scanned += 1
        self.summary.count(outcome)
        ledger.mark(message.offset, outcome.handled)
        return await _act(
            message, headers, outcome, destination, self.summary, self.producer, self.limiter, self.out
        )

    async def _metadata_budget(self, batches: dict[TopicPartition, list[Any]]) -> int:
        """Whether the broker keeps a commit's metadata (some Kafka-protocol brokers drop it), seen
        by committing where the group stands with an empty ledger and reading it back."""
        if any(metadata.startswith(LEDGER_PREFIX) for _, metadata in self.committed.values()):
            return LEDGER_BUDGET
        tp, messages = next(iter(batches.items()))
        offset = self.committed.get(tp, (messages[0].offset, ""))[0]
        await self.consumer.commit({tp: (offset, LEDGER_PREFIX)})
        admin = AIOKafkaAdminClient(**client_options(self.settings))
        try:
            await admin.start()
            answer = await admin.list_consumer_group_offsets(self.summary.group, partitions=[tp])
        finally:
            await admin.close()
        return LEDGER_BUDGET if answer[tp].metadata == LEDGER_PREFIX else 0


async def _committed(settings: Settings, group_id: str) -> dict[TopicPartition, tuple[int, str]]:
    """The group's committed offsets on the dead-letter topic, with their metadata; refuses a
    topic that does not exist rather than letting the broker create it empty."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    try:
        await admin.start()
        partitions, missing = await existing_partitions(admin, [settings.dlq_topic])
        if missing:
            raise ConfigError(
                "KAFKA_DLQ_TOPIC",
                f"topic {settings.dlq_topic!r} does not exist on {settings.kafka_bootstrap_servers}: "
                "nothing to replay (the worker creates it when it starts)",
            )
        # Partitions named: some Kafka-protocol brokers answer the "all partitions" form malformed.
        offsets = await _group_offsets(admin, group_id, partitions, settings.startup_timeout_seconds)
    finally:
        await admin.close()
    return {
        tp: (meta.offset, meta.metadata or "")
        for tp, meta in offsets.items()
        if tp.topic == settings.dlq_topic and meta.offset >= 0
    }


async def _group_offsets(
    admin: AIOKafkaAdminClient, group_id: str, partitions: list[TopicPartition], within: float
) -> dict[TopicPartition, Any]:
    """The group's committed offsets, waiting (up to ``within`` seconds) for a coordinator: a
    broker where no group was ever used answers "not available" while it creates its offsets
    topic, which is a wait, not a failure."""
    deadline = asyncio.get_running_loop().time() + within
    attempt = 0
    while True:
        try:
            offsets: dict[TopicPartition, Any] = await admin.list_consumer_group_offsets(
                group_id, partitions=partitions
            )
        except KafkaError as exc:
            attempt += 1
            if not exc.retriable or asyncio.get_running_loop().time() >= deadline:
                raise
            await asyncio.sleep(backoff(attempt, initial=0.5, cap=5.0))
        else:
            return offsets


def _decide(message: Any, headers: dict[str, str], choices: Choices) -> tuple[Outcome, str | None]:
    if not choices.filters.match(headers, message.key):
        return Outcome.FILTERED_OUT, None
    if headers.get(dlq.VALUE_OMITTED) == "true":
        return Outcome.VALUE_OMITTED, None
    replays = int(headers.get(dlq.REPLAY_COUNT, "0") or 0)
    if choices.max_replays is not None and replays >= choices.max_replays:
        return Outcome.REFUSED, None
    destination = choices.to_topic or headers.get(dlq.ORIGINAL_TOPIC)
    if not destination:
        return Outcome.UNROUTABLE, None
    return (Outcome.LISTED if choices.dry_run else Outcome.MOVE), destination


async def _act(
    message: Any,
    headers: dict[str, str],
    outcome: Outcome,
    destination: str | None,
    summary: Summary,
    producer: Any,
    limiter: AsyncLimiter | None,
    out: Any,
) -> Any:
    """Print or publish one letter; returns the broker's acknowledgement to wait for, if any."""
    where = f"{message.partition}:{message.offset}"
    key = (message.key or b"").decode("utf-8", "replace")
    if outcome is Outcome.VALUE_OMITTED:
        original = "/".join(
            headers.get(name, "?")
            for name in (dlq.ORIGINAL_TOPIC, dlq.ORIGINAL_PARTITION, dlq.ORIGINAL_OFFSET)
        )
        size = headers.get(dlq.VALUE_SIZE, "?")
        print(
            f"{where}\t{key}\tnot moved: value left out ({size} bytes), the original is {original}", file=out
        )
        return None
    if outcome not in (Outcome.MOVE, Outcome.LISTED):
        return None
    stage = headers.get(dlq.ERROR_STAGE, "?")
    summary.by_stage[stage] += 1
    if outcome is Outcome.LISTED:
        fields = (
            where,
            key,
            stage,
            headers.get(dlq.ERROR_CLASS, "?"),
            headers.get(dlq.FAILED_AT, "?"),
            f"-> {destination}",
            headers.get(dlq.ERROR_MESSAGE, "")[:120],
        )
        print("\t".join(fields), file=out)
        return None
    if limiter is not None:
        await limiter.acquire()
    count = int(headers.get(dlq.REPLAY_COUNT, "0") or 0)
    kept = [(k, v) for k, v in message.headers or () if not k.startswith(dlq.PREFIX)]
    kept.append((dlq.REPLAY_COUNT, str(count + 1).encode()))
    return await producer.send(destination, key=message.key, value=message.value, headers=kept)


def _headers(message: Any) -> dict[str, str]:
    return {k: v.decode("utf-8", "replace") for k, v in message.headers or ()}


async def _remaining(consumer: AIOKafkaConsumer) -> int:
    total = 0
    for tp in consumer.assignment() - consumer.paused():
        highwater = consumer.highwater(tp)
        if highwater is not None:
            total += max(0, highwater - await consumer.position(tp))
    return total


async def _at_end(consumer: AIOKafkaConsumer) -> bool:
    """Every assigned partition not stopped has reached the high watermark the last fetch reported."""
    assigned = consumer.assignment()
    if not assigned:
        return False
    for tp in assigned - consumer.paused():
        highwater = consumer.highwater(tp)
        if highwater is None or await consumer.position(tp) < highwater:
            return False
    return True
