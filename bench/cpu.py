"""Where the CPU went during a run, read from /proc (Linux): per process group and machine-wide.

Used to tell which part was the bottleneck (the worker, a PostgreSQL backend, the embedding
server) and whether something outside the benchmark was eating the CPUs at the same time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

PidSource = Callable[[], Iterable[int]]


def process_cpu(pid: int) -> float | None:
    """User + system CPU seconds of a live process, None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


def all_processes() -> dict[int, float]:
    """CPU seconds of every live process."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            used = process_cpu(int(entry.name))
            if used is not None:
                found[int(entry.name)] = used
    return found


def process_name(pid: int) -> str:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"pid {pid}"
    shown = " ".join(w.decode(errors="replace") for w in words[:3] if w)
    return (shown[:60] or f"pid {pid}") + f" ({pid})"


def children(parent: int) -> list[int]:
    """Direct children of ``parent`` (e.g. a postmaster's backends)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent:
            found.append(int(entry.name))
    return found


def machine_busy() -> float:
    """CPU seconds all cores spent not idle since boot (from the first line of /proc/stat)."""
    try:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / TICK


def busy_cores(seconds: float = 1.0) -> float:
    """How many cores' worth of CPU the machine spent busy over the next ``seconds`` (blocks)."""
    start = machine_busy()
    time.sleep(seconds)
    return (machine_busy() - start) / seconds


def wait_for_quiet(threshold: float, within: float, *, sample: float = 1.0) -> float:
    """Sample the machine's busy cores until below ``threshold`` or ``within`` seconds pass (blocks)."""
    deadline = time.monotonic() + within
    busy = busy_cores(sample)
    while busy > threshold and time.monotonic() < deadline:
        busy = busy_cores(sample)
    return busy


def postgres_pids(pgdata: Path, *, every: float = 1.0) -> PidSource:
    """The postmaster named in ``pgdata/postmaster.pid`` and its children, looked up again once
    ``every`` seconds have passed (a scan of /proc costs the machine CPU the runs are measured by;
    a backend first seen late still counts from zero)."""
    found: list[int] = []
    looked = -every

    def pids() -> list[int]:
        nonlocal found, looked
        if time.monotonic() - looked < every:
            return found
        looked = time.monotonic()
        try:
            postmaster = int((pgdata / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            found = []
        else:
            found = [postmaster, *children(postmaster)]
        return found

    return pids


@dataclass
class CpuMeter:
    """CPU seconds a changing set of processes used since it was made (newcomers count from zero)."""

    pids: PidSource
    _base: dict[int, float] = field(default_factory=dict)
    _last: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for pid in self.pids():
            used = process_cpu(pid)
            if used is not None:
                self._base[pid] = self._last[pid] = used

    def tick(self) -> None:
        for pid in self.pids():
            used = process_cpu(pid)
            if used is not None:
                self._last[pid] = used

    def used(self) -> float:
        return sum(last - self._base.get(pid, 0.0) for pid, last in self._last.items())

    def seen(self) -> set[int]:
        return set(self._last)

    def busiest(self) -> float:
        return max((last - self._base.get(pid, 0.0) for pid, last in self._last.items()), default=0.0)


@dataclass
class CpuAccount:
    """Named meters plus the machine's total, so what nobody here used shows up as ``others``."""

    sources: Mapping[str, PidSource]
    meters: dict[str, CpuMeter] = field(init=False)
    machine_start: float = field(init=False)
    machine_end: float = field(init=False)

    processes_start: dict[int, float] = field(init=False)
    # (wall time, each meter's use so far, the machine's busy seconds) at every tick
    timeline: list[tuple[float, dict[str, float], float]] = field(init=False)

    def __post_init__(self) -> None:
        self.meters = {name: CpuMeter(source) for name, source in self.sources.items()}
        self.machine_start = self.machine_end = machine_busy()
        self.processes_start = all_processes()
        self.timeline = []

    def tick(self) -> None:
        for meter in self.meters.values():
            meter.tick()
        self.machine_end = machine_busy()
        used = {name: meter.used() for name, meter in self.meters.items()}
        self.timeline.append((time.time(), used, self.machine_end))

    def between(self, start: float, end: float) -> dict[str, float]:
        """CPU seconds by part from the tick nearest ``start`` to the one nearest ``end`` (wall
        times), with ``machine`` (every core's busy time) and ``others`` (the machine's less ours)."""
        if len(self.timeline) < 2:
            return {}

        def nearest(at: float) -> tuple[float, dict[str, float], float]:
            return min(self.timeline, key=lambda sample: abs(sample[0] - at))

        (_, first, busy_first), (_, last, busy_last) = nearest(start), nearest(end)
        out = {name: last[name] - first.get(name, 0.0) for name in last}
        out["machine"] = busy_last - busy_first
        out["others"] = max(0.0, out["machine"] - sum(last[n] - first.get(n, 0.0) for n in last))
        return out

    def summary(self) -> dict[str, float]:
        out = {name: meter.used() for name, meter in self.meters.items()}
        if "postgres" in self.meters:
            out["postgres busiest"] = self.meters["postgres"].busiest()
        ours = sum(meter.used() for meter in self.meters.values())
        out["others"] = max(0.0, (self.machine_end - self.machine_start) - ours)
        return out

    def foreign(self, top: int = 3, at_least: float = 0.2) -> list[tuple[str, float]]:
        """The processes not ours that used the most CPU since the start (those still alive)."""
        ours = set().union(*(meter.seen() for meter in self.meters.values()))
        used = [
            (pid, cpu - self.processes_start.get(pid, 0.0))
            for pid, cpu in all_processes().items()
            if pid not in ours
        ]
        used.sort(key=lambda item: -item[1])
        return [(process_name(pid), seconds) for pid, seconds in used[:top] if seconds >= at_least]
