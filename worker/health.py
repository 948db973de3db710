"""``GET /healthz`` (loops alive), ``/readyz`` (partitions assigned, dependencies answer), ``/metrics``,
and with ``DEBUG_ENDPOINTS``, ``/debug/memory`` (tracemalloc's top allocations)."""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker import metrics, status
from worker.errors import describe
from worker.loop_health import LoopMonitor
from worker.retry import wait_within

Check = Callable[[], Awaitable[None]]
State = Callable[[], Awaitable[str]]

LOOP_STALL_SECONDS = 120.0


class Watched(Protocol):
    heartbeat: float | None  # when the fetch loop last turned; None before it started

    @property
    def last_error(self) -> str | None: ...

    def assignment(self) -> set[object]: ...
    def down(self) -> dict[str, str]: ...


class HealthServer:
    def __init__(
        self,
        worker: Watched,
        checks: dict[str, Check],
        *,
        port: int,
        host: str = "0.0.0.0",
        ann_index: State | None = None,
        loop: LoopMonitor | None = None,
        debug: bool = False,
        settings: Any = None,
    ) -> None:
        self._worker = worker
        self._settings = settings
        self._rates = status.Rates()
        self._loop = loop
        self._checks = checks
        self._ann_index = ann_index
        self._host, self._port = host, port
        self._runner: web.AppRunner | None = None
        self.port = port
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/", self._page)
        app.router.add_get("/status.json", self._status)
        if debug:
            app.router.add_get("/debug/memory", self._memory)
        self._app = app

    async def start(self) -> None:
        self._runner = web.AppRunner(self._app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        sockets = getattr(site._server, "sockets", None)  # how to learn the port picked for 0
        if sockets:
            self.port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _healthz(self, _: web.Request) -> web.Response:
        stuck = self._loop.stalled() if self._loop is not None else None
        if stuck is not None:  # (while it is stuck, nothing answers: the probe times out)
            return web.json_response({"status": "event_loop_stuck", "seconds": round(stuck, 1)}, status=503)
        if self._worker.heartbeat is None:  # start-up waits on dependencies, bounded by its own timeout
            return web.json_response({"status": "starting"})
        stalled = time.monotonic() - self._worker.heartbeat
        if stalled > LOOP_STALL_SECONDS:
            return web.json_response({"status": "stalled", "seconds": round(stalled, 1)}, status=503)
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        body = await self.readiness()
        return web.json_response(body, status=200 if body["ready"] else 503)

    async def readiness(self) -> dict[str, object]:
        """Partitions assigned and every dependency answering; also sets the ``ingest_ready`` gauge."""
        failures: dict[str, str] = {}
        results = await asyncio.gather(
            *(wait_within(check(), 3.0) for check in self._checks.values()), return_exceptions=True
        )
        for name, result in zip(self._checks, results, strict=True):
            if isinstance(result, BaseException):
                failures[name] = describe(result, 200)
        failures.update(self._worker.down())
        partitions = len(self._worker.assignment())
        if partitions == 0:
            failures["partitions"] = "none assigned"
        ready = not failures
        metrics.READY.set(1 if ready else 0)
        body: dict[str, object] = {
            "ready": ready,
            "partitions": partitions,
            "failing": failures,
            "last_error": self._worker.last_error,
        }
        if self._ann_index is not None:  # reported, not a failure: ingestion goes on without it
            try:
                body["ann_index"] = await wait_within(self._ann_index(), 3.0)
            except Exception as exc:  # noqa: BLE001 - the database's own check above says why
                body["ann_index"] = f"unknown ({type(exc).__name__})"
            metrics.ANN_INDEX_READY.set(1 if body["ann_index"] == "ready" else 0)
        return body

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _memory(self, request: web.Request) -> web.Response:
        """The lines that hold the most memory now (``?top=N``, 25 by default), and the totals."""
        if not tracemalloc.is_tracing():
            return web.json_response({"error": "tracemalloc is not tracing (DEBUG_ENDPOINTS)"}, status=503)
        try:
            top = max(1, min(500, int(request.query.get("top", "25"))))
        except ValueError:
            return web.json_response({"error": "top must be a whole number"}, status=400)
        snapshot = await asyncio.to_thread(tracemalloc.take_snapshot)
        stats = await asyncio.to_thread(snapshot.statistics, "lineno")
        current, peak = tracemalloc.get_traced_memory()
        return web.json_response(
            {
                "traced_bytes": current,
                "peak_bytes": peak,
                "top": [
                    {"where": str(stat.traceback[0]), "bytes": stat.size, "blocks": stat.count}
                    for stat in stats[:top]
                ],
            }
        )

    async def _page(self, _: web.Request) -> web.Response:
        return web.Response(text=status.PAGE, content_type="text/html")

    async def _status(self, _: web.Request) -> web.Response:
        partitions = sorted(f"{tp.topic}/{tp.partition}" for tp in self._worker.assignment())  # type: ignore[attr-defined]
        figures = status.status(
            self._rates, partitions=partitions, down=self._worker.down(), settings=self._settings
        )
        return web.json_response(figures)
