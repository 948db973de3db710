"""The Kafka side of the worker: group membership, fetching, and offsets.

Offsets are committed only for what is stored: the worker marks a partition's next offset as
stored after the batch's transaction (and its dead letters) succeeded; ``commit`` sends exactly
those, and only for partitions still assigned. A commit refused because of a rebalance is
logged and survived: the partition's new owner re-processes, and idempotent writes make that safe.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Protocol

import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.coordinator.assignors.sticky.sticky_assignor import StickyPartitionAssignor
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError

from worker import metrics
from worker.errors import ConfigError, WorkerError
from worker.kafka import client_options
from worker.retry import wait_within
from worker.settings import Settings
from worker.types import Record

log = structlog.get_logger()

PartitionsCallback = Callable[[set[TopicPartition]], Awaitable[None]]
END_OFFSETS_EVERY = 5.0  # seconds between end-offset requests while paused
TWIN_ASSIGNMENTS = 5  # static member assignments within one session timeout that tell of a twin


class RecordSource(Protocol):
    """What the Worker needs of Kafka (a fake implements it in unit tests)."""

    def on_rebalance(self, *, revoked: PartitionsCallback, assigned: PartitionsCallback) -> None: ...
    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def fetch(self, max_wait: float) -> list[Record]: ...
    def mark_stored(self, offsets: dict[TopicPartition, int]) -> None: ...
    async def commit(self, partitions: Iterable[TopicPartition] | None = None) -> None: ...
    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def assignment(self) -> set[TopicPartition]: ...
    def caught_up(self) -> bool: ...
    def lag(self) -> int | None: ...
    def unfetched(self) -> int | None: ...
    def committed_offset(self, tp: TopicPartition) -> int | None: ...
    async def rewind(self, tp: TopicPartition, offset: int) -> int: ...
    def resume_from(self, tp: TopicPartition, offset: int) -> None: ...
    async def start_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]: ...


class KafkaSource:
    def __init__(self, settings: Settings, *, stop_timeout: float = 10.0) -> None:
        self._settings = settings
        self._stop_timeout = stop_timeout
        self._consumer: Any = None  # made by start(), so a start-up that fails earlier leaves none open
        self._stored: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._revoked: PartitionsCallback | None = None
        self._assigned: PartitionsCallback | None = None
        self._assigned_at: list[float] = []  # recent assignments, to tell a twin static member
        self._paused = False
        self._ends: dict[TopicPartition, int] = {}  # end offsets asked for while paused
        self._fetched: dict[TopicPartition, int] = {}  # the next offset each partition's fetch gives
        self._ends_asked = 0.0
        self._fatal: WorkerError | None = None  # raised by the next fetch
        # From a revoke until the assignment's callback has run: records fetched then may come
        # from positions the callback is about to set (it sets them last), so none is handed out.
        self._rebalancing = False

    def on_rebalance(self, *, revoked: PartitionsCallback, assigned: PartitionsCallback) -> None:
        self._revoked, self._assigned = revoked, assigned

    async def start(self) -> None:
        self._consumer = self._make_consumer()
        self._consumer.subscribe(list(self._settings.kafka_topic), listener=_Listener(self))
        await self._consumer.start()

    def _make_consumer(self) -> Any:
        settings = self._settings
        # A revoke waits for the in-flight batch for up to the grace period: the group must wait longer.
        rebalance_ms = int(max(60_000, 2_000 * settings.shutdown_grace_seconds + 10_000))
        return AIOKafkaConsumer(
            **client_options(settings),
            group_id=settings.kafka_group_id,
            # A static member leaves no group on stop: back within the session timeout, it gets
            # its partitions again and the other members keep theirs (no rebalance).
            group_instance_id=settings.kafka_group_instance_id or None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=settings.kafka_max_poll_records,
            max_partition_fetch_bytes=settings.kafka_max_partition_fetch_bytes,
            # A fetch response is read whole, then decoded (a copy) while its records are handed out:
            # capping it at one partition's worth keeps memory flat however large the backlog
            # (bench/MEASUREMENTS.md).
            fetch_max_bytes=settings.kafka_max_partition_fetch_bytes,
            session_timeout_ms=settings.kafka_session_timeout_ms,
            heartbeat_interval_ms=max(1000, settings.kafka_session_timeout_ms // 10),
            max_poll_interval_ms=settings.kafka_max_poll_interval_ms,
            rebalance_timeout_ms=rebalance_ms,
            # Sticky: a rebalance moves as few partitions as it can, and a member keeps its work in
            # flight on those it keeps (Worker). Range as well, the protocol of members older than
            # this one, so that a rolling deploy's mixed group agrees on one.
            partition_assignment_strategy=(StickyPartitionAssignor, RangePartitionAssignor),
        )

    async def stop(self) -> None:
        """Leave the group; bounded, since a dead broker must not hold shutdown forever."""
        if self._consumer is None:
            return
        try:
            await wait_within(self._consumer.stop(), self._stop_timeout)
        except TimeoutError:
            log.warning("consumer_stop_timeout", seconds=self._stop_timeout)

    async def fetch(self, max_wait: float) -> list[Record]:
        if self._fatal is not None:
            raise self._fatal
        batches = await self._consumer.getmany(timeout_ms=int(max_wait * 1000))
        if self._rebalancing:
            return []  # from positions the assignment's callback is about to set: fetched again
        if self._paused and time.monotonic() - self._ends_asked >= END_OFFSETS_EVERY:
            await self._ask_end_offsets()
        self._update_lag()
        for tp, messages in batches.items():
            self._fetched[tp] = messages[-1].offset + 1
        records = [
            Record(
                m.topic,
                m.partition,
                m.offset,
                m.key,
                m.value,
                tuple(m.headers or ()),
                (len(m.key) if m.key else 0) + (len(m.value) if m.value else 0),
            )
            for messages in batches.values()
            for m in messages
        ]
        metrics.fetched(len(records), sum(r.size for r in records))
        return records

    def mark_stored(self, offsets: dict[TopicPartition, int]) -> None:
        for tp, offset in offsets.items():
            if offset > self._stored.get(tp, -1):
                self._stored[tp] = offset

    async def commit(self, partitions: Iterable[TopicPartition] | None = None) -> None:
        assigned = self.assignment()
        wanted = assigned if partitions is None else set(partitions) & assigned
        offsets = {
            tp: offset
            for tp, offset in self._stored.items()
            if tp in wanted and offset > self._committed.get(tp, -1)
        }
        if not offsets:
            return
        try:
            await self._consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            metrics.COMMIT_FAILURES.inc()
            log.warning("commit_refused", reason=type(exc).__name__, partitions=len(offsets))
            return
        except KafkaError as exc:
            metrics.COMMIT_FAILURES.inc()
            log.warning("commit_failed", reason=repr(exc)[:300], partitions=len(offsets))
            return
        metrics.COMMITS.inc()
        self._committed.update(offsets)
        self._update_lag()

    def pause(self) -> None:
        """Stop fetching from every assigned partition (group membership and heartbeats go on)."""
        self._consumer.pause(*self.assignment())
        self._paused = True

    def resume(self) -> None:
        self._consumer.resume(*self.assignment())
        self._paused = False

    async def _ask_end_offsets(self) -> None:
        """Paused partitions are not fetched, so their high watermarks stand still: ask the broker,
        so that the lag (metric, autoscalers) keeps growing while an outage holds the worker."""
        self._ends_asked = time.monotonic()
        partitions = list(self.assignment())
        if not partitions:
            return
        try:
            ends = await wait_within(self._consumer.end_offsets(partitions), 5.0)
        except (KafkaError, TimeoutError) as exc:
            log.debug("end_offsets_failed", error=repr(exc)[:200])
            return
        self._ends.update({tp: int(end) for tp, end in ends.items()})

    def assignment(self) -> set[TopicPartition]:
        return set() if self._consumer is None else set(self._consumer.assignment())

    def caught_up(self) -> bool:
        """Every assigned partition's committed offset has reached its high watermark, and so has
        its fetching (a partition rewound below its commit has records to read again). Never while
        a rebalance is under way: the assignment's callback may be about to rewind a partition
        (a database restored from a backup), its position not set yet."""
        if self._rebalancing:
            return False
        lags = self._lags()
        return bool(lags) and all(lag == 0 for lag in lags.values()) and self.unfetched() == 0

    def lag(self) -> int | None:
        lags = self._lags().values()
        return None if None in lags else sum(lag for lag in lags if lag is not None)

    def committed_offset(self, tp: TopicPartition) -> int | None:
        """The group's committed offset for an assigned partition (None: nothing committed yet)."""
        return self._committed.get(tp)

    async def rewind(self, tp: TopicPartition, offset: int) -> int:
        """Where ``tp`` can be fetched again from ``offset`` (below what the group committed):
        ``offset``, or the log's start if retention removed it. What is re-read is stored again
        idempotently, and no commit goes below what the group already committed. The caller
        seeks there (``resume_from``)."""
        start = int((await self._consumer.beginning_offsets([tp]))[tp])
        return max(offset, start)

    def resume_from(self, tp: TopicPartition, offset: int) -> None:
        """Fetch ``tp`` from ``offset`` (called at the end of the assignment's callback, with no
        await after it, so that nothing fetched from another position reaches the Worker)."""
        self._consumer.seek(tp, offset)
        self._fetched[tp] = offset

    async def start_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """Where each partition starts for a new owner: the group's committed offset, else the
        log's start (auto_offset_reset=earliest)."""
        starts = {tp: c for tp in partitions if (c := self._committed.get(tp)) is not None}
        fresh = [tp for tp in partitions if tp not in starts]
        if fresh:  # (not seek_to_beginning: it waits on the fetcher, which waits on the callback)
            starts |= {tp: int(o) for tp, o in (await self._consumer.beginning_offsets(fresh)).items()}
        return starts

    def unfetched(self) -> int | None:
        """Records the assigned partitions hold beyond what was fetched; None before it is known
        (and with no partitions assigned)."""
        assigned = self.assignment()
        if not assigned:
            return None
        total = 0
        for tp in assigned:
            end = self._end(tp)
            if end is None:
                return None
            total += max(0, end - self._fetched.get(tp, self._committed.get(tp, 0)))
        return total

    def _end(self, tp: TopicPartition) -> int | None:
        known = [end for end in (self._consumer.highwater(tp), self._ends.get(tp)) if end is not None]
        return max(known) if known else None

    def _lags(self) -> dict[TopicPartition, int | None]:
        """The newest end offset known (last fetch's high watermark, or the broker's answer while
        paused) minus the committed offset; None before anything is known."""
        lags: dict[TopicPartition, int | None] = {}
        for tp in self.assignment():
            end = self._end(tp)
            lags[tp] = None if end is None else max(0, end - self._committed.get(tp, 0))
        return lags

    def _update_lag(self) -> None:
        total = 0
        for tp, lag in self._lags().items():
            if lag is not None:
                metrics.CONSUMER_LAG.labels(topic=tp.topic, partition=str(tp.partition)).set(lag)
                total += lag
        metrics.lag_is(total)

    async def _partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        self._rebalancing = True
        try:
            await self._assigned_now(assigned)
        finally:
            self._rebalancing = False

    async def _assigned_now(self, assigned: set[TopicPartition]) -> None:
        for tp in assigned:
            with contextlib.suppress(KafkaError):
                committed = await self._consumer.committed(tp)
                if committed is not None:
                    self._committed[tp] = committed
                    self._stored[tp] = max(self._stored.get(tp, -1), committed)
        metrics.ASSIGNED_PARTITIONS.set(len(self.assignment()))
        metrics.REBALANCES.labels(event="assigned").inc()
        log.info("partitions_assigned", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in assigned))
        self._check_for_twin()
        if self._assigned is not None:
            await self._assigned(assigned)

    def _check_for_twin(self) -> None:
        """Two processes with one KAFKA_GROUP_INSTANCE_ID fence each other in turn, for ever: each
        is assigned every partition about once a heartbeat. A static member is otherwise assigned
        only when the group changes, so that many assignments within one session timeout stop it."""
        instance = self._settings.kafka_group_instance_id
        if not instance:
            return
        now = time.monotonic()
        window = self._settings.kafka_session_timeout_ms / 1000
        self._assigned_at = [at for at in self._assigned_at if now - at < window] + [now]
        if len(self._assigned_at) >= TWIN_ASSIGNMENTS:
            self._fatal = ConfigError(
                "KAFKA_GROUP_INSTANCE_ID",
                f"{len(self._assigned_at)} assignments within {window:g}s: another process in group "
                f"{self._settings.kafka_group_id!r} uses instance id {instance!r} and the broker fences "
                "each in turn; give every process its own",
            )

    async def _partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self._rebalancing = True
        if self._revoked is not None:
            await self._revoked(revoked)
        await self.commit(revoked)
        for tp in revoked:
            self._stored.pop(tp, None)
            self._ends.pop(tp, None)
            self._fetched.pop(tp, None)
            self._committed.pop(tp, None)
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(tp.topic, str(tp.partition))
        if revoked:  # (a first join revokes nothing)
            metrics.REBALANCES.labels(event="revoked").inc()
            log.info("partitions_revoked", partitions=sorted(f"{tp.topic}/{tp.partition}" for tp in revoked))


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, source: KafkaSource) -> None:
        self._source = source

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self._source._partitions_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self._source._partitions_assigned(set(assigned))
