"""The event loop's health: how late it runs what is due, and what holds it when it is stuck.

Everything the worker does (fetching, heartbeats to the group, embedding requests, writes, the
health port) runs on one event loop: a callback that holds it holds all of them. ``LoopMonitor``
sleeps ``interval`` seconds over and over and measures how much later than asked it wakes:

- every lateness goes into ``ingest_event_loop_lag_seconds`` (a histogram);
- ``event_loop_lag`` is logged while the lag stays above ``threshold`` (at most every ``every``
  seconds), with the worst seen since the last line;
- a watchdog thread logs ``event_loop_stuck`` with the stack the loop's thread is in when no wake-up
  has come for ``stuck`` seconds (the callback at fault, named while it still runs);
- ``/healthz`` fails while the loop is, or just was, stuck (``stalled()``).

asyncio's own ``slow_callback_duration`` logging names each slow callback when
``LOOP_SLOW_CALLBACK_MS`` is set (it needs the loop's debug mode, which costs some speed).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
import traceback
from collections import deque

import structlog

from worker import metrics

log = structlog.get_logger()

INTERVAL = 0.1  # seconds between wake-ups asked for
THRESHOLD = 0.05  # lag above this, sustained, is logged
SUSTAINED = 1.0  # seconds the lag must stay above the threshold before it is logged
LOG_EVERY = 10.0  # seconds between event_loop_lag lines while it lasts
STUCK = 10.0  # seconds without a wake-up: the loop is stuck (longer than a group session may allow)
REMEMBER = 30.0  # seconds /healthz keeps failing after a stall ended (a probe may have missed it)
KEPT = 10_000  # the latest wake-ups kept for summary() (about 17 minutes at INTERVAL)


class LoopMonitor:
    def __init__(
        self,
        *,
        interval: float = INTERVAL,
        threshold: float = THRESHOLD,
        sustained: float = SUSTAINED,
        every: float = LOG_EVERY,
        stuck: float = STUCK,
        remember: float = REMEMBER,
    ) -> None:
        self.interval = interval
        self.threshold = threshold
        self.sustained = sustained
        self.every = every
        self.stuck = stuck
        self.remember = remember
        self._woke = time.monotonic()  # the last wake-up
        self._worst_stall: tuple[float, float] | None = None  # (seconds, when it ended)
        self._above_since: float | None = None  # lag above the threshold since
        self._worst = 0.0  # the worst lag since the last event_loop_lag line
        self._logged = 0.0
        self._thread_id: int | None = None
        self._watching = threading.Event()
        self._lags: deque[float] = deque(maxlen=KEPT)
        self.max_lag = 0.0

    async def run(self) -> None:
        """Until cancelled; starts the watchdog thread and stops it on the way out."""
        self._thread_id = threading.get_ident()
        self._woke = time.monotonic()
        self._watching.set()
        watchdog = threading.Thread(target=self._watch, name="loop-watchdog", daemon=True)
        watchdog.start()
        try:
            while True:
                asked = time.monotonic()
                await asyncio.sleep(self.interval)
                self.woke(time.monotonic() - asked - self.interval)
        finally:
            self._watching.clear()

    def woke(self, lag: float) -> None:
        """A wake-up ``lag`` seconds late (``run`` calls it; tests feed it)."""
        now = time.monotonic()
        self._woke = now
        lag = max(0.0, lag)
        metrics.EVENT_LOOP_LAG.observe(lag)
        self._lags.append(lag)
        self.max_lag = max(self.max_lag, lag)
        if lag >= self.stuck:
            self._worst_stall = (lag, now)
        self._worst = max(self._worst, lag)
        if lag <= self.threshold:
            self._above_since = None
            return
        if self._above_since is None:
            self._above_since = now - lag
        if now - self._above_since >= self.sustained and now - self._logged >= self.every:
            log.warning(
                "event_loop_lag",
                lag_ms=round(lag * 1000, 1),
                worst_ms=round(self._worst * 1000, 1),
                for_seconds=round(now - self._above_since, 1),
                hint="a callback holds the loop: LOOP_SLOW_CALLBACK_MS names it",
            )
            self._logged = now
            self._worst = 0.0

    def summary(self) -> dict[str, float]:
        """The lag's p50 and p99 over the latest KEPT wake-ups and its worst since the start (ms),
        for the ``event_loop`` line at exit."""
        lags = sorted(self._lags)
        if not lags:
            return {"wakeups": 0}
        return {
            "wakeups": len(lags),
            "p50_ms": round(lags[len(lags) // 2] * 1000, 2),
            "p99_ms": round(lags[min(len(lags) - 1, int(len(lags) * 0.99))] * 1000, 2),
            "max_ms": round(self.max_lag * 1000, 2),
        }

    def stalled(self) -> float | None:
        """Seconds the loop is (or, within ``remember`` seconds, was) stuck; None if it is not."""
        now = time.monotonic()
        overdue = now - self._woke - self.interval
        if overdue >= self.stuck:
            return overdue
        if self._worst_stall is not None:
            seconds, ended = self._worst_stall
            if now - ended <= self.remember:
                return seconds
        return None

    def _watch(self) -> None:
        """The watchdog thread: the loop's stack once per stall, while the stall goes on."""
        reported = 0.0  # the wake-up a stall was reported for
        while self._watching.is_set():
            time.sleep(min(1.0, self.stuck / 4))
            woke = self._woke
            stalled = time.monotonic() - woke - self.interval
            if stalled < self.stuck or woke == reported:
                continue
            reported = woke
            frame = sys._current_frames().get(self._thread_id or 0)
            stack = "".join(traceback.format_stack(frame)[-12:]) if frame is not None else "(not found)"
            log.error(
                "event_loop_stuck",
                seconds=round(stalled, 1),
                stack=stack,
                hint="a callback has held the event loop this long: heartbeats, fetches and health "
                "answers wait behind it",
            )


def watch_slow_callbacks(loop: asyncio.AbstractEventLoop, milliseconds: int) -> None:
    """LOOP_SLOW_CALLBACK_MS: asyncio logs each callback that holds the loop longer (debug mode)."""
    if milliseconds > 0:
        loop.set_debug(True)
        loop.slow_callback_duration = milliseconds / 1000
