"""Wire the real parts (Kafka, PostgreSQL, the embedding API, the health server) into a Worker."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import sys
import time
import tracemalloc

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError

from worker import logs, metrics, tracing
from worker.consume import KafkaSource
from worker.dlq import KafkaDeadLetterSink
from worker.embed import OpenAIEmbedder
from worker.errors import ConfigError, DatabaseUnavailable, DependencyError, WorkerError, describe
from worker.fill import Fillers
from worker.generations import Generation
from worker.health import HealthServer
from worker.kafka import (
    BrokerError,
    bootstrap_error,
    ensure_topic,
    make_producer,
    refusal,
    start_producer,
)
from worker.loop_health import LoopMonitor, watch_slow_callbacks
from worker.retry import ShuttingDown, backoff, sleep_unless
from worker.settings import Settings
from worker.store import Store
from worker.worker import Worker

log = structlog.get_logger()

DEBUG_TRACE_FRAMES = 10  # frames tracemalloc keeps per allocation with DEBUG_ENDPOINTS


ATTEMPT_GRACE = 30.0  # seconds a start-up attempt may run past STARTUP_TIMEOUT_SECONDS to fail by itself


class StartupTimeout(WorkerError):
    """A dependency did not answer within STARTUP_TIMEOUT_SECONDS."""


def bound_heap_growth() -> None:
    """Keep glibc from growing the heap with freed fetch and request buffers (Linux only).

    glibc raises its mmap threshold each time a large mmapped block is freed, after which
    multi-megabyte fetch responses and embedding answers come from the heap and fragment it:
    RSS then creeps with the length of the run. A fixed threshold returns them to the OS
    (bench/MEASUREMENTS.md).
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 128 * 1024)
    libc.mallopt(m_trim_threshold, 1024 * 1024)


async def prepare(
    settings: Settings,
    store: Store,
    producer: AIOKafkaProducer,
    stop: asyncio.Event,
    *,
    migrate: bool,
    backfill: bool = False,
) -> None:
    """Migrate, open the pool, make sure the dead-letter topic exists, start the producer.

    An outage (nothing answers) is waited out for ``STARTUP_TIMEOUT_SECONDS``; an answer no
    retry will change (credentials, authorization, idempotence refused) ends start-up at once,
    with one line naming what to fix.
    """
    with logs.quiet_connection_errors():
        await _prepare(settings, store, producer, stop, migrate=migrate, backfill=backfill)


async def _prepare(
    settings: Settings,
    store: Store,
    producer: AIOKafkaProducer,
    stop: asyncio.Event,
    *,
    migrate: bool,
    backfill: bool,
) -> None:
    limit = settings.startup_timeout_seconds
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            # An attempt that hangs (a peer that accepts and never answers) is cut once past the
            # limit, so STARTUP_TIMEOUT_SECONDS bounds start-up however the dependencies behave;
            # an attempt that fails by itself meanwhile says why, as before.
            left = limit - (time.monotonic() - started)
            async with asyncio.timeout(max(left, ATTEMPT_GRACE) if limit else None):
                if migrate:
                    await store.migrate(ann_index=not backfill, only_if_empty=True)
                else:
                    await store.check()
                await store.open()
                await ensure_topic(settings, settings.dlq_topic, partitions=1)
                await start_producer(producer)
        except (DependencyError, KafkaError, OSError, TimeoutError) as exc:
            cause = exc
            if isinstance(exc, KafkaConnectionError):  # aiokafka hides why; a refused password?
                cause = await bootstrap_error(settings) or exc
            refused = refusal(cause, settings)
            if refused is not None:
                raise refused from cause
            attempt += 1
            waited = time.monotonic() - started
            if limit and waited >= limit:
                what = _what_failed(exc, settings, cause)
                raise StartupTimeout(f"STARTUP_TIMEOUT_SECONDS: gave up after {waited:.0f}s: {what}") from exc
            log.warning(
                "waiting_for_dependencies",
                error_class=type(cause).__name__,
                error=_what_failed(exc, settings, cause),
                attempt=attempt,
            )
            pause = backoff(attempt, initial=1.0, cap=15.0)
            await sleep_unless(stop, min(pause, limit - waited) if limit else pause)
        else:
            return


def _what_failed(exc: BaseException, settings: Settings, cause: BaseException) -> str:
    """What start-up waits for, with the real cause (aiokafka's own error only says it could not
    bootstrap; the connection attempt beside it says why)."""
    if isinstance(exc, KafkaError):
        why = describe(cause) if cause is not exc else str(exc)
        return (
            f"no Kafka broker answered at KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers} ({why})"
        )
    if type(exc) is TimeoutError and not str(exc):  # the attempt cut at the limit
        return "an attempt did not finish: a dependency accepted the connection but did not answer"
    return describe(exc)


async def serve(
    settings: Settings,
    *,
    stop: asyncio.Event,
    stop_when_idle: float | None = None,
    migrate: bool = True,
    backfill: bool = False,
    progress: bool = False,
) -> None:
    """Run a worker until ``stop`` is set (or it is idle, with ``stop_when_idle``).

    The health server comes up first, so that /healthz answers (and /readyz says why not)
    while the worker waits for a database or broker that is not there yet.
    """
    store = Store(settings)
    producer = make_producer(settings)
    dead_letters = KafkaDeadLetterSink(producer, settings)  # owns the producer from here on
    async with OpenAIEmbedder(settings) as embedder:
        worker = Worker(
            source=KafkaSource(settings),
            store=store,
            embedder=embedder,
            dead_letters=dead_letters,
            settings=settings,
            stop_when_idle=stop_when_idle,
        )
        tracing.configure()
        loop_monitor = LoopMonitor()
        watch_slow_callbacks(asyncio.get_running_loop(), settings.loop_slow_callback_ms)
        if settings.debug_endpoints and not tracemalloc.is_tracing():
            tracemalloc.start(DEBUG_TRACE_FRAMES)
        health = HealthServer(
            worker,
            {"database": store.ping, "embedding": embedder.ping},
            port=settings.health_port,
            ann_index=store.ann_index_state,
            loop=loop_monitor,
            debug=settings.debug_endpoints,
            settings=settings,
        )
        try:
            await health.start()
        except OSError as exc:
            await dead_letters.stop()  # its producer was made, never started: close it all the same
            raise ConfigError(
                "HEALTH_PORT", f"cannot listen on port {settings.health_port}: {exc.strerror}"
            ) from exc
        log.info("health_listening", port=health.port)
        log.info("settings", settings=settings.shown())
        for state in ("in_use", "idle"):
            metrics.DATABASE_CONNECTIONS.labels(state=state).set_function(
                lambda state=state: store.connections()[state]  # type: ignore[misc]
            )
        side = [
            asyncio.create_task(loop_monitor.run(), name="loop-monitor"),
            asyncio.create_task(_stop_on(stop, worker), name="stop-relay"),
            asyncio.create_task(_watch_readiness(health), name="readiness"),
        ]
        if progress:
            side.append(asyncio.create_task(_progress(worker), name="progress"))
        if backfill and stop_when_idle is None:  # no end to build it at: build it once caught up
            side.append(asyncio.create_task(_index_once_caught_up(store, worker), name="ann-index"))
        for task in side:
            task.add_done_callback(lambda t: _side_task_done(t, worker))
        fillers = Fillers(settings, store, lambda g: _ingest_into(g, worker, store, embedder), stop=stop)
        try:
            await prepare(settings, store, producer, stop, migrate=migrate, backfill=backfill)
            # The served generation's model, dimensions and chunking, whichever the settings named.
            embedder.use(store.settings)
            worker.use(store.settings)
            await _report_ann_index(store, backfill=backfill)
            watching = asyncio.create_task(fillers.watch(), name="generations")
            watching.add_done_callback(lambda t: _side_task_done(t, worker))
            side.append(watching)
            # What start-up made (modules, clients, pools) lives as long as the process: out of
            # the collector's sight, each full collection walks only what the work made since.
            # (Its garbage is collected first, or it would be kept for good.)
            gc.collect()
            gc.freeze()
            try:
                await worker.run()
            except KafkaError as exc:  # the group refused us (authorization), or the broker vanished
                raise refusal(exc, settings) or BrokerError(f"{type(exc).__name__}: {exc}") from exc
            if stop_when_idle is not None and not stop.is_set() and worker.failure is None:
                await fillers.drain()  # every generation current before leaving
            if backfill and stop_when_idle is not None and not stop.is_set() and worker.failure is None:
                await _build_index(store)
        except ShuttingDown:
            pass
        finally:
            await cancel_all(side)
            await fillers.close()
            tracing.shutdown()
            log.info("event_loop", **loop_monitor.summary())  # its lag over the run
            await health.stop()
            await dead_letters.stop()
            await store.close()


def _ingest_into(generation: Generation, worker: Worker, store: Store, embedder: OpenAIEmbedder) -> None:
    """A switch served ``generation``: the worker ingests into it from its next turn."""

    def apply() -> Settings:
        store.use(generation)
        embedder.use(store.settings)
        log.info("generation_served", generation=generation.describe())
        return store.settings

    worker.change_generation(apply)


async def _report_ann_index(store: Store, *, backfill: bool) -> None:
    """Say at start when searches have no ANN index: `run` does not build one over stored rows."""
    state = await store.ann_index_state()
    metrics.ANN_INDEX_READY.set(1 if state == "ready" else 0)
    if state != "ready" and not backfill:
        log.warning(
            "ann_index_missing",
            state=state,
            hint="searches scan every chunk until `ingest-worker build-index` builds it (CONCURRENTLY)",
        )


async def _build_index(store: Store, **context: object) -> None:
    log.info("ann_index_build_started", **context)
    started = time.perf_counter()
    built = await store.build_ann_index()
    metrics.ANN_INDEX_READY.set(1)
    log.info(
        "ann_index_built" if built else "ann_index_exists",
        seconds=round(time.perf_counter() - started, 2),
        **context,
    )


async def _index_once_caught_up(store: Store, worker: Worker) -> None:
    """`run --backfill` without `--stop-when-idle`: build the HNSW index once the worker first
    catches up (every assigned partition committed to its end, nothing in flight), CONCURRENTLY
    (writers go on), in this task while the worker goes on consuming. A database outage is waited
    out and the build tried again; with several such workers the first to take the build lock
    builds it and the others find it there."""
    await worker.first_caught_up()
    attempt = 0
    while True:
        try:
            await _build_index(store, after="backfill_caught_up", records=worker.records_done)
        except DatabaseUnavailable as exc:
            attempt += 1
            log.warning("ann_index_build_failed", error=str(exc)[:300], attempt=attempt)
            await asyncio.sleep(backoff(attempt, initial=1.0, cap=60.0))
        else:
            return


async def _watch_readiness(health: HealthServer, every: float = 10.0) -> None:
    """Keep the ``ingest_ready`` gauge current even when nothing polls /readyz."""
    while True:
        await health.readiness()
        await asyncio.sleep(every)


async def cancel_all(tasks: list[asyncio.Task[None]], every: float = 0.5) -> None:
    """Cancel ``tasks`` and wait for them all to end, cancelling again those still running: on
    Python 3.11 a cancellation that reaches ``asyncio.wait_for`` as its inner future completes is
    swallowed (fixed in 3.12), and a task that loops would then never end. Seen: a worker whose
    start-up was refused hanging at exit, its readiness watch still looping."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=every)
    await asyncio.gather(*tasks, return_exceptions=True)


async def _stop_on(stop: asyncio.Event, worker: Worker) -> None:
    await stop.wait()
    worker.stop()


def _side_task_done(task: asyncio.Task[None], worker: Worker) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("side_task_died", task=task.get_name(), error=repr(task.exception()))
        worker.stop()


async def _progress(worker: Worker, every: float = 0.5) -> None:
    """A progress bar over the records of the assigned partitions: a total that holds still (done
    plus remaining, each record counted once), a rate over the time spent working (not joining,
    waiting for a dependency or idle), and a word on what the worker is doing."""
    from tqdm import tqdm

    bar_format = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]"
    with tqdm(file=sys.stderr, dynamic_ncols=True, bar_format=bar_format, desc="joining group") as bar:
        working = 0.0
        last = worker.records_done
        while True:
            await asyncio.sleep(every)
            done, remaining = worker.records_done, worker.remaining()
            state = _state(worker, remaining)
            if state == "ingesting" or done > last:
                working += every
            last = done
            if remaining is not None:
                bar.total = done + remaining
            bar.n = done
            bar.set_description_str(state, refresh=False)
            bar.set_postfix_str(f"{done / working if working else 0:,.0f} rec/s working", refresh=False)
            bar.refresh()


def _state(worker: Worker, remaining: int | None) -> str:
    if worker.stopping:
        return "stopping"
    if not worker.assignment():
        return "joining group"
    if down := worker.down():
        return "waiting for " + ", ".join(sorted(down))
    return "caught up" if remaining == 0 else "ingesting"
