"""Run the real worker (``ingest-worker run --stop-when-idle S``) as subprocesses and time it.

The measured interval leaves out process start, the group join and the idle wait. It starts at
the first batch's start (the earliest ``batch_stored`` log line's timestamp minus its ``seconds``)
or, when the worker logs no such lines, at the last ``partitions_assigned`` line before the first
document row appeared. It ends at the last ``batch_stored`` line or, without them, at the moment a
poll of ``count(*)`` on the documents table (every 0.6 s) first saw every document stored; a
backfill's HNSW build (``ann_index_built`` line, logged after the idle wait) adds its seconds.
Peak RSS is each process's ``VmHWM`` from /proc, polled every 0.2 s until it exits; CPU seconds
of the workers, PostgreSQL, the embedding servers and everything else are counted the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson

from bench.cpu import CpuAccount, PidSource

POLL_SECONDS = 0.2
# The stored documents are counted every COUNT_EVERY polls only: the count is a query the database
# answers with the CPU the run is measured by, and the logs time the run to the millisecond anyway.
COUNT_EVERY = 3
START_LOGS = "first batch_stored line's timestamp - seconds"
START_ASSIGNED = "last partitions_assigned line before the first stored row"
START_FIRST_ROW = "first stored row seen by the poll"
END_LOGS = "last batch_stored line"
END_POLL = "poll saw every document stored"
END_EXIT = "last process exit - idle wait"


def worker_command() -> list[str]:
    """The ``ingest-worker`` console script next to this interpreter, else ``python -m worker``."""
    script = Path(sys.executable).with_name("ingest-worker")
    return [str(script)] if script.exists() else [sys.executable, "-m", "worker"]


@dataclass(frozen=True)
class WorkerRun:
    name: str
    processes: int
    docs: int  # records the run had to ingest
    docs_stored: int  # live documents in the schema afterwards
    chunks: int  # chunks in the schema afterwards
    seconds: float  # the measured interval (see the module docstring)
    timing: str
    wall_seconds: float  # spawn to the last exit
    join_seconds: float  # spawn to the first batch's start
    peak_rss: tuple[int, ...]  # bytes, per process
    exit_codes: tuple[int | None, ...]
    timed_out: bool
    command: str
    settings: Mapping[str, str] = field(default_factory=dict)
    cpu: Mapping[str, float] = field(default_factory=dict)  # CPU seconds from spawn to exit, by part
    cpu_measured: Mapping[str, float] = field(default_factory=dict)  # the same, in the measured interval
    foreign: tuple[tuple[str, float], ...] = ()  # other processes that used CPU meanwhile
    assignments: tuple[tuple[int, ...], ...] = ()  # partitions each process held last
    process_rates: tuple[float, ...] = ()  # chunks/s of each process over its own working time
    problems: tuple[str, ...] = ()
    write_seconds: Mapping[str, float] = field(default_factory=dict)  # per write step, all processes

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def timed(self) -> bool:
        """False when only the exit told when the work ended (a redelivery into a full schema)."""
        return not self.timing.endswith(END_EXIT)

    @property
    def docs_per_s(self) -> float:
        return self.docs / self.seconds if self.seconds > 0 else 0.0

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_chunks_per_s(self) -> float:
        """The processes' own rates added up: what they do together once all are working.

        Unlike ``chunks_per_s`` it leaves out the time one process already works while another is
        still joining the group (the embedded broker completes joins up to a second apart)."""
        return sum(self.process_rates) if self.process_rates else self.chunks_per_s

    @property
    def max_rss(self) -> int:
        return max(self.peak_rss, default=0)


@dataclass
class _Log:
    batches: list[tuple[float, float | None]] = field(default_factory=list)  # (end, seconds)
    chunks: int = 0  # chunks the batch_stored lines report
    assigned: list[float] = field(default_factory=list)
    partitions: tuple[int, ...] = ()  # the last assignment's partition numbers
    index_build_seconds: float = 0.0  # a backfill's HNSW build at the end (after the idle wait)
    errors: list[str] = field(default_factory=list)
    write_seconds: dict[str, float] = field(default_factory=dict)  # per write step (worker_stopped)


def log_timestamp(line: dict[str, Any]) -> float | None:
    raw = line.get("timestamp")
    if not isinstance(raw, str):
        return None
    try:
        return datetime.fromisoformat(raw).timestamp()
    except ValueError:
        return None


def json_lines(path: Path) -> Iterator[dict[str, Any]]:
    """The worker log's JSON objects, in file order (anything else on a line is passed over)."""
    for raw in path.read_bytes().splitlines():
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            continue
        if isinstance(line, dict):
            yield line


def _parse_log(path: Path) -> _Log:
    out = _Log()
    for line in json_lines(path):
        at = log_timestamp(line)
        event = line.get("event")
        if event == "batch_stored" and at is not None:
            seconds = line.get("seconds")
            out.batches.append((at, float(seconds) if isinstance(seconds, int | float) else None))
            chunks = line.get("chunks")
            out.chunks += chunks if isinstance(chunks, int) else 0
        elif event == "partitions_assigned" and at is not None:
            out.assigned.append(at)
            names = line.get("partitions")
            if isinstance(names, list):
                out.partitions = tuple(int(str(n).rsplit("/", 1)[-1]) for n in names)
        elif event == "ann_index_built":
            seconds = line.get("seconds")
            out.index_build_seconds += float(seconds) if isinstance(seconds, int | float) else 0.0
        elif event == "worker_stopped" and isinstance(steps := line.get("write_seconds"), dict):
            out.write_seconds = {str(k): float(v) for k, v in steps.items() if isinstance(v, int | float)}
        elif line.get("level") in ("error", "critical"):
            out.errors.append(str(line.get("event")))
    return out


def _own_rate(log: _Log) -> float:
    """One process's chunks/s from its first batch's start to its last batch's end."""
    start = min(end - (seconds or 0.0) for end, seconds in log.batches)
    end = max(end for end, _ in log.batches)
    return log.chunks / max(end - start, 1e-3)


def _log_paths(log_dir: Path, name: str, processes: int) -> list[Path]:
    log_dir.mkdir(parents=True, exist_ok=True)
    return [log_dir / f"{name}-{i}.log" for i in range(processes)]


def _vm_hwm(pid: int) -> int | None:
    """Peak resident set size of a live process in bytes (``VmHWM``), None once it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


class _StoredPoll:
    """Counts the schema's live documents; notes when the first appeared and when all had."""

    def __init__(self, database_url: str, schema: str, expected: int) -> None:
        self._url = database_url
        self._sql = f'SELECT count(*) FROM "{schema}".documents WHERE NOT deleted'
        self._chunks_sql = f'SELECT count(*) FROM "{schema}".chunks'
        self._expected = expected
        self._conn: asyncpg.Connection | None = None
        self.first_seen: float | None = None
        self.complete_at: float | None = None
        self.docs = 0

    async def tick(self) -> None:
        if self.complete_at is not None:
            return
        try:
            if self._conn is None:
                self._conn = await asyncpg.connect(self._url, timeout=5)
            self.docs = int(await self._conn.fetchval(self._sql, timeout=5))
        except asyncpg.UndefinedTableError:  # not migrated yet
            return
        now = time.time()
        if self.docs > 0 and self.first_seen is None:
            self.first_seen = now
        if self.docs >= self._expected:
            self.complete_at = now

    async def final(self) -> tuple[int, int]:
        """Live documents and chunks stored, read once more after the run."""
        if self._conn is None:
            self._conn = await asyncpg.connect(self._url, timeout=5)
        try:
            docs = int(await self._conn.fetchval(self._sql, timeout=30))
            chunks = int(await self._conn.fetchval(self._chunks_sql, timeout=30))
        except asyncpg.UndefinedTableError:
            return 0, 0
        return docs, chunks

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


async def spawn_worker(log: Path, env: Mapping[str, str], args: Sequence[str]) -> asyncio.subprocess.Process:
    """``ingest-worker ARGS`` with ``env`` over this process's environment, its output into ``log``."""
    with log.open("wb") as out:
        return await asyncio.create_subprocess_exec(
            *worker_command(),
            *args,
            env={**os.environ, **env},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )


async def stop_worker(process: asyncio.subprocess.Process, grace: float = 10.0) -> None:
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), grace)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


def _interval(
    parsed: Sequence[_Log], poll: _StoredPoll, *, exited: float, idle_seconds: float, spawned: float
) -> tuple[float, float, str]:
    """(start, end, how) of the work, from the logs where they tell, else from the poll."""
    batches = [b for p in parsed for b in p.batches]
    if batches and all(s is not None for _, s in batches):
        start, start_how = min(end - (s or 0.0) for end, s in batches), START_LOGS
    else:
        first_row = poll.first_seen or min((e for e, _ in batches), default=exited)
        assigned = [a for p in parsed for a in p.assigned if a <= first_row]
        if assigned:
            start, start_how = max(assigned), START_ASSIGNED
        else:
            start, start_how = first_row, START_FIRST_ROW
    if batches:
        end, end_how = max(e for e, _ in batches), END_LOGS
    elif poll.complete_at is not None:
        end, end_how = poll.complete_at, END_POLL
    else:
        end, end_how = exited - idle_seconds, END_EXIT
    build = max((p.index_build_seconds for p in parsed), default=0.0)
    if build > 0:  # the build runs after the idle wait: add its duration, not its timestamp
        end, end_how = end + build, end_how + ", plus the HNSW build's seconds (ann_index_built line)"
    return max(start, spawned), end, f"{start_how} -> {end_how}"


async def run_workers(
    name: str,
    *,
    env: Mapping[str, str],
    docs: int,
    database_url: str,
    log_dir: Path,
    processes: int = 1,
    idle_seconds: float = 2.0,
    args: Sequence[str] = (),
    within: float = 300.0,
    fresh: bool = True,
    cpu_sources: Mapping[str, PidSource] | None = None,
) -> WorkerRun:
    """Start ``processes`` workers at once with ``env``; wait (at most ``within`` seconds) until all exit.

    ``docs`` is how many records the run ingests; ``fresh`` says the schema starts empty, so the
    poll can tell when all of them are stored. ``cpu_sources`` name the other processes whose
    CPU time to count (the workers' own is counted as ``worker``).
    """
    schema = env["DATABASE_SCHEMA"]
    command = [*worker_command(), "run", "--stop-when-idle", f"{idle_seconds:g}", *args]
    logs = _log_paths(log_dir, name, processes)
    children: list[asyncio.subprocess.Process] = []
    peaks = [0] * processes
    poll = _StoredPoll(database_url, schema, docs if fresh else 1 << 62)
    cpu = CpuAccount({"worker": lambda: [c.pid for c in children], **(cpu_sources or {})})
    spawned = time.time()
    timed_out = False
    try:
        for path in logs:
            children.append(await spawn_worker(path, env, command[len(worker_command()) :]))
        deadline = time.monotonic() + within
        ticks = 0
        while any(c.returncode is None for c in children):
            if time.monotonic() > deadline:
                timed_out = True
                break
            for i, child in enumerate(children):
                if child.returncode is None:
                    peaks[i] = max(peaks[i], _vm_hwm(child.pid) or 0)
            cpu.tick()
            if fresh and ticks % COUNT_EVERY == 0:
                await poll.tick()
            ticks += 1
            await asyncio.sleep(POLL_SECONDS)
        exited = time.time()
    finally:
        await asyncio.gather(*(stop_worker(c) for c in children))
    try:
        if fresh:
            await poll.tick()
        stored, chunks = await poll.final()
    finally:
        await poll.close()

    parsed = [_parse_log(path) for path in logs]
    start, end, timing = _interval(parsed, poll, exited=exited, idle_seconds=idle_seconds, spawned=spawned)
    problems: list[str] = []
    if timed_out:
        problems.append(f"timed out after {within:.0f}s")
    codes = tuple(c.returncode for c in children)
    if any(code != 0 for code in codes) and not timed_out:
        problems.append(f"exit codes {list(codes)}")
    if stored < docs:
        problems.append(f"only {stored} of {docs} documents stored")
    errors = sorted({e for p in parsed for e in p.errors})
    if errors:
        problems.append("error log lines: " + ", ".join(errors[:5]))
    return WorkerRun(
        name=name,
        processes=processes,
        docs=docs,
        docs_stored=stored,
        chunks=chunks,
        seconds=max(end - start, 1e-3),
        timing=timing,
        wall_seconds=exited - spawned,
        join_seconds=max(0.0, start - spawned),
        peak_rss=tuple(peaks),
        exit_codes=codes,
        timed_out=timed_out,
        command=shlex.join(["ingest-worker", *command[len(worker_command()) :]]),
        settings={k: v for k, v in env.items() if not k.endswith(("URL", "SERVERS"))},
        cpu=cpu.summary(),
        cpu_measured=cpu.between(start, end),
        foreign=tuple(cpu.foreign()),
        assignments=tuple(p.partitions for p in parsed),
        process_rates=tuple(_own_rate(p) for p in parsed if p.batches and p.chunks),
        write_seconds={
            step: sum(p.write_seconds.get(step, 0.0) for p in parsed)
            for step in dict.fromkeys(k for p in parsed for k in p.write_seconds)
        },
        problems=tuple(problems),
    )
