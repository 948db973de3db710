"""The event loop's health (worker.loop_health): its lag measured, logged when it lasts, a stuck
loop named by the watchdog and failed by /healthz."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from worker.loop_health import LoopMonitor, watch_slow_callbacks


def lag_samples() -> float:
    return REGISTRY.get_sample_value("ingest_event_loop_lag_seconds_count") or 0.0


async def test_a_callback_that_holds_the_loop_is_measured_as_lag() -> None:
    monitor = LoopMonitor(interval=0.01)
    before = lag_samples()
    running = asyncio.create_task(monitor.run())
    try:
        await asyncio.sleep(0.05)
        asyncio.get_running_loop().call_soon(time.sleep, 0.3)  # a CPU-bound call on the loop
        await asyncio.sleep(0.1)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    assert lag_samples() > before + 3
    worst = REGISTRY.get_sample_value("ingest_event_loop_lag_seconds_bucket", {"le": "0.25"})
    total = REGISTRY.get_sample_value("ingest_event_loop_lag_seconds_count")
    assert worst is not None and total is not None and worst < total  # one wake-up came >= 0.25 s late


def test_lag_that_lasts_is_logged_once_per_interval_and_a_blip_is_not() -> None:
    monitor = LoopMonitor(threshold=0.05, sustained=0.0, every=60.0)
    with capture_logs() as logs:
        monitor.woke(0.01)
        monitor.woke(0.2)
        monitor.woke(0.3)  # within the minute: not again
        monitor.woke(0.01)
    lines = [line for line in logs if line["event"] == "event_loop_lag"]
    assert len(lines) == 1 and lines[0]["lag_ms"] == 200.0, logs
    quiet = LoopMonitor(threshold=0.05, sustained=5.0)
    with capture_logs() as logs:
        quiet.woke(0.2)  # above the threshold, but not for `sustained` seconds yet
    assert not [line for line in logs if line["event"] == "event_loop_lag"]


def test_a_stall_fails_health_for_a_while_after_it_ended() -> None:
    monitor = LoopMonitor(stuck=1.0, remember=0.2)
    assert monitor.stalled() is None
    monitor.woke(0.5)
    assert monitor.stalled() is None  # late, not stuck
    monitor.woke(1.5)
    assert monitor.stalled() == 1.5
    time.sleep(0.25)
    monitor.woke(0.0)
    assert monitor.stalled() is None  # `remember` seconds later, healthy again


async def test_the_watchdog_names_what_holds_a_stuck_loop() -> None:
    monitor = LoopMonitor(interval=0.01, stuck=0.3)
    running = asyncio.create_task(monitor.run())
    try:
        await asyncio.sleep(0.05)
        with capture_logs() as logs:

            def hold_the_loop() -> None:
                time.sleep(1.0)

            hold_the_loop()  # the loop's own thread, blocked: only the watchdog thread runs
            await asyncio.sleep(0.05)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
    stuck = [line for line in logs if line["event"] == "event_loop_stuck"]
    assert len(stuck) == 1, logs
    assert "hold_the_loop" in stuck[0]["stack"], stuck[0]["stack"]
    assert monitor.stalled() is not None  # and /healthz says so for a while after


async def test_slow_callbacks_are_named_when_asked_for(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    debug, duration = loop.get_debug(), loop.slow_callback_duration
    try:
        watch_slow_callbacks(loop, 50)
        with caplog.at_level(logging.WARNING, logger="asyncio"):

            def crunch() -> None:
                time.sleep(0.1)

            loop.call_soon(crunch)
            await asyncio.sleep(0.2)
    finally:
        loop.set_debug(debug)
        loop.slow_callback_duration = duration
    assert any("crunch" in r.getMessage() and "took" in r.getMessage() for r in caplog.records), caplog.text


def test_the_summary_gives_the_lags_percentiles_and_worst() -> None:
    monitor = LoopMonitor()
    assert monitor.summary() == {"wakeups": 0}
    for lag in [0.001] * 98 + [0.2, 0.5]:
        monitor.woke(lag)
    assert monitor.summary() == {"wakeups": 100, "p50_ms": 1.0, "p99_ms": 500.0, "max_ms": 500.0}
