"""The Worker owns the lifecycle: group membership, fetching, backpressure, commits, shutdown.

Nothing else starts tasks behind its back. ``stop()`` only sets an event; every wait races it.
On a rebalance the worker stores what is ready, commits, and holds the rest of its
:class:`~worker.pipeline.Pipeline`; given its partitions again (the sticky assignor keeps as many
as it can where they were), it goes on with their work in flight, fetching on from where it had
got to, and drops that of the partitions another member took, which that member re-processes.
On stop it stores what is ready, commits, and abandons the rest. Nobody waits on the embedding
API. Embeddings are bought through one registry for the process (worker.purchases), and every one
paid for is kept in the ledger (worker.ledger), so the abandoned work costs nothing to redo. On
stop, once it has left the group, the worker still lets the requests it had sent be answered
(within the grace period), and keeps their vectors.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog
from aiokafka import TopicPartition

from worker import metrics
from worker.consume import RecordSource
from worker.dependency import Dependencies
from worker.dlq import DeadLetterSink
from worker.embed import Embedder
from worker.embed import probe as probe_embedding
from worker.errors import DependencyError, Fenced, describe
from worker.pipeline import Pipeline
from worker.purchases import Buying
from worker.retry import Backoff, ShuttingDown, backoff, unless_stopped, wait_within
from worker.settings import Settings
from worker.store import DocumentStore
from worker.types import Record

log = structlog.get_logger()

REWIND_READ_TIMEOUT = 10.0  # seconds to read (or record) the database's offsets


class Worker:
    def __init__(
        self,
        *,
        source: RecordSource,
        store: DocumentStore,
        embedder: Embedder,
        dead_letters: DeadLetterSink,
        settings: Settings,
        stop_when_idle: float | None = None,
        backoff: Backoff = backoff,
    ) -> None:
        self._source = source
        self._store = store
        self._embedder = embedder
        self._dead_letters = dead_letters
        self._settings = settings
        self._stop_when_idle = stop_when_idle
        self._stop = asyncio.Event()
        self.dependencies = Dependencies.of(
            embedding=lambda: probe_embedding(embedder),
            database=store.probe,
            dead_letters=dead_letters.ping,
            stop=self._stop,
            threshold=settings.embedding_max_attempts,
            backoff=backoff,
        )
        self._buying: Buying | None = None  # made in run()
        self._pipeline: Pipeline | None = None
        self._retiring: Pipeline | None = None  # draining on stop or revoke: its records still count
        self._fetching: asyncio.Future[list[Record]] | None = None
        self._recorded: dict[TopicPartition, int] = {}  # progress last recorded in the database
        self._lost = False  # fenced: waiting for the next assignment
        self._epoch: int | None = None  # the current assignment's claim on its partitions
        self._paused = False
        self._last_commit = 0.0
        self._records_before = 0  # finished by pipelines of earlier assignments
        self._abandoned = 0  # left undone by the last pipeline, until the partitions are assigned again
        self.heartbeat: float | None = None  # the fetch loop's last turn (for /healthz); None until it runs
        self._caught_up = asyncio.Event()  # set the first time the fetch loop finds caught_up()
        self._next_generation: Callable[[], Settings] | None = None  # see change_generation()
        self.failure: BaseException | None = None

    def stop(self) -> None:
        self._stop.set()

    def use(self, settings: Settings) -> None:
        """Before run(): the settings of the generation it ingests into (worker.generations)."""
        self._settings = settings

    def change_generation(self, apply: Callable[[], Settings]) -> None:
        """Ingest into another generation of the index (a `reindex switch` or `rollback` served it):
        at the fetch loop's next turn, store what is ready and commit it, let go of the rest as on
        a stop (what was paid for stays in the ledger), ``apply`` the change (it points the store
        and the embedder at the generation and returns its settings), and fetch the partitions
        again from their commits. The group is not left: no rebalance."""
        self._next_generation = apply

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _pipelines(self) -> list[Pipeline]:
        """The current pipeline, and one draining on stop or revoke."""
        return [p for p in (self._pipeline, self._retiring) if p is not None]

    @property
    def records_done(self) -> int:
        return self._records_before + sum(p.finished_records for p in self._pipelines())

    def remaining(self) -> int | None:
        """Records not done yet: in flight, or in the assigned partitions beyond the last fetch."""
        unfetched = self._source.unfetched()
        if unfetched is None:
            return None
        fetching = self._fetching
        in_transit = 0  # fetched, and the fetch loop not yet back to admit them
        if fetching is not None and fetching.done() and not fetching.cancelled() and not fetching.exception():
            in_transit = len(fetching.result())
        return unfetched + in_transit + sum(p.in_flight for p in self._pipelines()) + self._abandoned

    @property
    def last_error(self) -> str | None:
        """What stops progress now, for /readyz: a failure, else a dependency's last error."""
        if self.failure is not None:
            return f"{type(self.failure).__name__}: {self.failure}"
        return next((d.last_error for d in self.dependencies.all() if not d.up), None)

    def down(self) -> dict[str, str]:
        """Dependencies whose circuit breaker is open, with since when and why; and writes that the
        database keeps cancelling even one document at a time (it answers, but stores nothing)."""
        down = {d.name: why for d in self.dependencies.all() if (why := d.describe()) is not None}
        if self._pipeline is not None and self._pipeline.write_failure is not None:
            down["database_writes"] = self._pipeline.write_failure
        return down

    def assignment(self) -> set[TopicPartition]:
        return self._source.assignment()

    def lag(self) -> int | None:
        return self._source.lag()

    def caught_up(self) -> bool:
        """Every assigned partition committed up to its end, and nothing fetched still in flight."""
        if self._pipeline is not None and not self._pipeline.idle:
            return False
        return self._source.caught_up()

    async def first_caught_up(self) -> None:
        """Return once the worker has caught up for the first time (at once if it has)."""
        await self._caught_up.wait()

    async def run(self) -> None:
        self._source.on_rebalance(revoked=self._on_revoked, assigned=self._on_assigned)
        last_arrival = time.monotonic()
        self._buying = self._make_buying()
        try:
            await self._source.start()
            log.info(
                "worker_started", topics=list(self._settings.kafka_topic), group=self._settings.kafka_group_id
            )
            while not self._stop.is_set():
                self.heartbeat = time.monotonic()
                records = await self._fetch()
                if records:
                    last_arrival = time.monotonic()
                    self._admit(records)
                self._take_failure()
                await self._leave_if_fenced()
                self._apply_backpressure()
                await self._commit_due()
                if self._next_generation is not None:
                    await self._change_generation(self._next_generation)
                if not self._caught_up.is_set() and self.caught_up():
                    self._caught_up.set()
                if self._idle_for(last_arrival):
                    log.info("worker_idle", seconds=self._stop_when_idle)
                    break
        finally:
            stopped_at = time.monotonic()
            await self._retire_pipeline()
            await self._source.stop()
            await self._finish_buying(stopped_at)
            for dependency in self.dependencies.all():
                await dependency.close()
            log.info("worker_stopped", records=self.records_done, write_seconds=metrics.write_step_totals())
        if self.failure is not None:
            raise self.failure

    # -- the fetch loop ------------------------------------------------------------------------

    async def _fetch(self) -> list[Record]:
        self._fetching = asyncio.ensure_future(self._source.fetch(max_wait=0.2))
        try:
            return await unless_stopped(self._stop, self._fetching)
        except ShuttingDown:
            return []
        finally:
            self._fetching = None

    def _admit(self, records: list[Record]) -> None:
        if self._lost:
            return  # fetched before the pause took effect: the partitions' new owner has them
        assigned = self._source.assignment()
        if self._pipeline is None:
            self._pipeline = self._new_pipeline()
        for record in records:
            if record.tp in assigned:  # a fetch that raced a rebalance may carry others' records
                self._pipeline.admit(record)

    def _take_failure(self) -> None:
        """A pipeline stage that crashed stops the worker (after committing what is stored)."""
        if self._pipeline is not None and self._pipeline.failure is not None and self.failure is None:
            self.failure = self._pipeline.failure
            self._stop.set()

    async def _leave_if_fenced(self) -> None:
        """Another member claimed this one's partitions (it was frozen past its session): abandon
        the pipeline, commit nothing, fetch nothing until the group assigns partitions again."""
        if self._pipeline is None or not self._pipeline.fenced:
            return
        pipeline, self._pipeline = self._pipeline, None
        log.warning(
            "partitions_lost",
            abandoned=pipeline.in_flight,
            hint="another member owns them now; waiting for the group to assign partitions again",
        )
        await pipeline.close()
        self._records_before += pipeline.finished_records
        self._abandoned = pipeline.in_flight
        self._lost = True
        if not self._paused:
            self._set_paused(True)

    def _apply_backpressure(self) -> None:
        """Pause fetching while the window is full or a dependency is down (group membership and
        heartbeats go on); resume once it has drained far enough and everything is up."""
        if self._pipeline is None:
            return
        metrics.IN_FLIGHT_RECORDS.set(self._pipeline.in_flight)
        depths = self._pipeline.queue_depths()
        depths["embedding"] = self._buying.stage.queued if self._buying is not None else 0
        for stage, depth in depths.items():
            metrics.QUEUE_DEPTH.labels(stage=stage).set(depth)
        metrics.update_backlog(self._pipeline.in_flight_bytes)
        hold = self._pipeline.full or not all(d.up for d in self.dependencies.all())
        if not self._paused and hold:
            self._set_paused(True)
        elif self._paused and not hold and self._pipeline.can_resume:
            self._set_paused(False)

    def _set_paused(self, paused: bool) -> None:
        if paused:
            self._source.pause()
        else:
            self._source.resume()
        self._paused = paused
        metrics.PAUSED.set(int(paused))
        in_flight = self._pipeline.in_flight if self._pipeline is not None else 0
        log.debug("fetch_paused" if paused else "fetch_resumed", records=in_flight)

    async def _commit_due(self) -> None:
        if time.monotonic() - self._last_commit >= self._settings.commit_interval_ms / 1000:
            await self._commit()

    async def _commit(self) -> None:
        self._last_commit = time.monotonic()
        if self._pipeline is not None:
            marks = self._pipeline.watermarks()
            await self._record_progress(marks)
            self._source.mark_stored(marks)
        await self._source.commit()

    async def _record_progress(self, marks: dict[TopicPartition, int]) -> None:
        """Tell the database how far it got, also where no write did (dead letters, unchanged
        documents at a partition's end): else a rebalance would rewind those partitions to its last
        write. Best effort: a write records its own progress anyway."""
        if marks == self._recorded or not self.dependencies.database.up:
            return  # unchanged, or the database is down (and the commit must not wait on it)
        try:
            await wait_within(self._store.record_progress(marks, self._epoch), REWIND_READ_TIMEOUT)
        except (DependencyError, TimeoutError, Fenced):
            return
        self._recorded = dict(marks)

    def _idle_for(self, last_arrival: float) -> bool:
        if self._stop_when_idle is None or time.monotonic() - last_arrival < self._stop_when_idle:
            return False
        return self.caught_up()

    # -- assignments -----------------------------------------------------------------------------

    async def _finish_buying(self, stopped_at: float) -> None:
        """Out of the group: let the requests already sent be answered, within what is left of
        the grace period, and keep their vectors in the ledger (they are paid for)."""
        if self._buying is None:
            return
        await self._buying.close(stopped_at + self._settings.shutdown_grace_seconds)
        self._buying = None

    def _make_buying(self) -> Buying:
        return Buying.of(
            self._embedder, self._store.ledger, self._store.usage, self.dependencies, self._settings
        )

    async def _change_generation(self, apply: Callable[[], Settings]) -> None:
        """See change_generation()."""
        self._next_generation = None
        await self._retire_pipeline()
        await self._finish_buying(time.monotonic())
        self._settings = apply()
        self._buying = self._make_buying()
        assigned = self._source.assignment()
        if assigned and not self._lost:
            starts = await self._source.start_offsets(assigned)
            for tp, offset in starts.items():
                self._source.resume_from(tp, offset)
        self._abandoned = 0
        log.info("generation_changed", model=self._settings.embedding_model, partitions=len(assigned))

    def _new_pipeline(self) -> Pipeline:
        assert self._buying is not None, "pipelines are made in run()"
        pipeline = Pipeline(
            store=self._store,
            purchases=self._buying.purchases,
            dead_letters=self._dead_letters,
            settings=self._settings,
            stop=self._stop,
            dependencies=self.dependencies,
        )
        pipeline.epoch = self._epoch
        return pipeline

    async def _retire_pipeline(self) -> None:
        """Store what is ready (within the grace period), commit, and abandon the rest at once."""
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is None:
            await self._source.commit()
            return
        self._retiring = pipeline
        settled = await self._store_what_is_ready(pipeline)
        if pipeline.in_flight:
            log.info(
                "work_abandoned",
                records=pipeline.in_flight,
                hint="the partitions' next owner processes them; what was paid for is not bought again"
                if settled
                else f"not stored within SHUTDOWN_GRACE_SECONDS ({self._settings.shutdown_grace_seconds:g})",
            )
        await self._source.commit()
        await pipeline.close()
        self._records_before += pipeline.finished_records
        self._abandoned = pipeline.in_flight
        self._retiring = None
        if pipeline.failure is not None and self.failure is None:
            self.failure = pipeline.failure

    async def _store_what_is_ready(self, pipeline: Pipeline) -> bool:
        """Settle the pipeline within the grace period (False: time ran out) and mark what it
        stored, recorded in the database, for the next commit."""
        settled = await pipeline.settle(within=self._settings.shutdown_grace_seconds)
        marks = pipeline.watermarks()
        await self._record_progress(marks)
        self._source.mark_stored(marks)
        return settled

    async def _claim(self, starts: dict[TopicPartition, int]) -> int | None:
        """Claim the assigned partitions in the database (a new owner epoch): from now on a member
        that held them before, frozen past its session, has its writes refused."""
        try:
            return await wait_within(self._store.claim(starts), REWIND_READ_TIMEOUT)
        except (DependencyError, TimeoutError) as exc:
            log.warning(
                "partitions_unclaimed",
                error=describe(exc),
                hint="writes go unfenced until the next assignment",
            )
            return None

    async def _database_offsets(self, assigned: set[TopicPartition]) -> dict[TopicPartition, int]:
        """The database's own record of how far it got on each partition ({} when unreadable)."""
        try:
            return await wait_within(self._store.stored_offsets(assigned), REWIND_READ_TIMEOUT)
        except (DependencyError, TimeoutError) as exc:
            log.warning(
                "database_offsets_unread", error=describe(exc), hint="partitions start where committed"
            )
            return {}

    def _database_behind(self, stored: dict[TopicPartition, int]) -> set[TopicPartition]:
        """Partitions the database has recorded less of than the group committed (a restore)."""
        return {
            tp
            for tp, database in stored.items()
            if (committed := self._source.committed_offset(tp)) is not None and database < committed
        }

    async def _rewind_to_database(
        self, assigned: set[TopicPartition], stored: dict[TopicPartition, int], behind: set[TopicPartition]
    ) -> dict[TopicPartition, int]:
        """Start each partition the database is ``behind`` on from its own record of how far it
        got (``stored``), below the group's commit: a database restored from a backup is brought
        forward from the topic (as far as its retention allows) instead of missing what came
        since. Every other partition starts where the group committed. Returns where each starts."""
        starts = await self._source.start_offsets(assigned - behind)
        for tp in sorted(assigned & behind):
            committed, database = self._source.committed_offset(tp), stored[tp]
            resumed = starts[tp] = await self._source.rewind(tp, database)
            log.warning(
                "rewound_to_database",
                topic=tp.topic,
                partition=tp.partition,
                committed=committed,
                database=database,
                resumed=resumed,
                hint="the database is behind the group's commits (restored from a backup?)",
            )
            if resumed > database:
                log.error(
                    "database_behind_retention",
                    topic=tp.topic,
                    partition=tp.partition,
                    database=database,
                    resumed=resumed,
                    lost=resumed - database,
                    hint="retention removed records the database never stored: republish them",
                )
        return starts

    async def _on_revoked(self, revoked: set[TopicPartition]) -> None:
        """aiokafka's eager protocol revokes every partition: store what is ready, commit it (the
        source commits after this), and hold the rest until the assignment says what stays."""
        pipeline = self._pipeline
        if pipeline is not None and not await self._store_what_is_ready(pipeline):
            grace = self._settings.shutdown_grace_seconds
            log.warning("work_unsettled", records=pipeline.in_flight, grace_seconds=grace)

    async def _keep_what_stays(self, assigned: set[TopicPartition]) -> dict[TopicPartition, int]:
        """The held pipeline goes on with the partitions assigned again, fetched on from where it
        had got to, and drops the others' work; where it cannot, it is abandoned whole."""
        pipeline = self._pipeline
        if pipeline is None or not pipeline.suspended:
            return {}
        kept = {tp: offset for tp, offset in pipeline.partitions().items() if tp in assigned}
        dropped = pipeline.keep_only(set(kept))
        if dropped is None:
            await self._retire_pipeline()
            return {}
        log.info("work_kept", records=pipeline.in_flight, partitions=len(kept), dropped=dropped)
        return kept

    async def _on_assigned(self, assigned: set[TopicPartition]) -> None:
        try:
            await self._take(assigned)
        except Exception as exc:  # aiokafka would swallow it, leaving positions unset
            log.exception("assignment_failed", error=describe(exc))
            if self.failure is None:
                self.failure = exc  # stop: a restart starts from the commits, nothing lost
            self._stop.set()

    async def _take(self, assigned: set[TopicPartition]) -> None:
        """Decide where each assigned partition is fetched from (kept work, a restored database,
        or the commit), claim them, then set every position with no await left: whatever was
        fetched meanwhile, the source handed none of it out."""
        stored = await self._database_offsets(assigned)
        behind = self._database_behind(stored)
        kept = await self._keep_what_stays(assigned - behind)
        starts = await self._rewind_to_database(assigned - kept.keys(), stored, behind)
        marks = self._pipeline.watermarks() if self._pipeline is not None else {}
        stored_up_to = {tp: marks.get(tp, offset) for tp, offset in kept.items()}  # not what was fetched
        self._epoch = await self._claim(starts | stored_up_to)
        for tp, offset in (starts | kept).items():
            self._source.resume_from(tp, offset)
        self._lost = False
        self._abandoned = 0  # fetched again from the commits, so counted by unfetched() from now on
        if self._pipeline is None:
            self._pipeline = self._new_pipeline()
        self._pipeline.epoch = self._epoch
        self._pipeline.resume()
        if self._paused:  # the new assignment's partitions are not paused: backpressure decides anew
            self._set_paused(False)
