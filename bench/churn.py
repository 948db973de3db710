"""Item 8: rebalance churn. A member joins mid-stream, then the first member leaves.

Each variant runs on a fresh schema and its own group over one dedicated topic, with the slow
embedding server answering after ``LATENCY_MS + uniform(0, JITTER_MS)``: member A starts alone;
once it has stored ``JOIN_AFTER_BATCHES`` batches, member B starts; ``LEAVE_AFTER_SECONDS`` after
B's first stored batch, A leaves by SIGTERM (variant "SIGTERM") or ``kill -9`` (variant
"kill -9"); B finishes the topic and exits on idle. Nothing else starts. Measured from the
members' JSON logs, the embedding server's counters and the schema afterwards (see ``_checks``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.context import Bench
from bench.corpus import make_documents, publish
from bench.report import Check
from bench.runner import json_lines, log_timestamp, spawn_worker, stop_worker
from worker.chunk import chunk_text

TOPIC = "bench_churn"
PARTITIONS = 6
LATENCY_MS = 1000.0  # the embedding server answers after 1-2 s ...
JITTER_MS = 1000.0  # ... uniformly spread
SESSION_TIMEOUT_MS = 10_000  # so a killed member is evicted within the run (45 s by default)
# `run --stop-when-idle`: longer than a killed A takes to be evicted (the session timeout plus a
# heartbeat) and than a SIGTERM'd A may take to leave (SHUTDOWN_GRACE_SECONDS, 10 s in the bench),
# so B, done with its own partitions, never leaves the group before A's come back to it.
IDLE_SECONDS = SESSION_TIMEOUT_MS / 1000 + 3
JOIN_AFTER_BATCHES = 3  # B starts once A has stored this many batches
LEAVE_AFTER_SECONDS = 8.0  # A leaves this long after B's first stored batch
WITHIN = 300.0  # seconds a variant may take at most

GOAL_GAP_OVER_JOIN = 2.0  # the longest stretch storing nothing <= the broker's join time + this
GOAL_EXIT_SECONDS = 2.0  # SIGTERM to exit
GOAL_INPUTS_PER_CHUNK = 1.02

VARIANTS = (("SIGTERM", "churn_sigterm", signal.SIGTERM), ("kill -9", "churn_kill", signal.SIGKILL))


@dataclass(frozen=True, slots=True)
class LogLine:
    at: float
    event: str
    fields: Mapping[str, Any]


def read_log(path: Path) -> list[LogLine]:
    """The JSON log lines that carry an event and a timestamp, in file order."""
    out: list[LogLine] = []
    with contextlib.suppress(FileNotFoundError):
        for line in json_lines(path):
            at = log_timestamp(line)
            if at is not None and isinstance(line.get("event"), str):
                out.append(LogLine(at, line["event"], line))
    return out


@dataclass
class Member:
    label: str
    log: Path
    process: asyncio.subprocess.Process
    spawned: float

    def lines(self, event: str | None = None) -> list[LogLine]:
        return [line for line in read_log(self.log) if event is None or line.event == event]


@dataclass(frozen=True, slots=True)
class Rebalance:
    """One rebalance as the logs show it. Its join time is the broker's part: from the last
    ``partitions_revoked`` line of the members that stay (the last of them has let go and sends
    its JoinGroup; a member joining for the first time revokes nothing and has sent its JoinGroup
    at start) to the last ``partitions_assigned`` line that follows (every member has its share)."""

    name: str
    trigger: float  # B spawned, or A signalled
    revoked: float | None
    assigned: float | None

    @property
    def join_seconds(self) -> float | None:
        if self.assigned is None:
            return None
        return self.assigned - (self.revoked if self.revoked is not None else self.trigger)

    @property
    def window(self) -> tuple[float, float] | None:
        if self.assigned is None:
            return None
        return (self.revoked if self.revoked is not None else self.trigger), self.assigned


@dataclass
class ChurnRun:
    variant: str
    name: str
    docs: int
    chunks_expected: int
    distinct_expected: int
    started: float = 0.0
    docs_stored: int = 0
    chunks: int = 0
    distinct: int = 0
    inputs: int = 0
    abandoned: int = 0  # requests the members gave up on before their answer (the server's 499s)
    exit_seconds: float | None = None  # SIGTERM to exit
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    batches: list[tuple[float, str]] = field(default_factory=list)  # (stored at, member), by time
    rebalances: list[Rebalance] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def gaps(self) -> list[tuple[float, float]]:
        """(start, end) of each stretch between consecutive stored batches, of all members."""
        ends = sorted(at for at, _ in self.batches)
        return list(itertools.pairwise(ends))

    def allowance(self, gap: tuple[float, float]) -> tuple[float, list[Rebalance]]:
        """The goal for one gap: the join times of the rebalances it overlaps, plus 2 s."""
        inside = [r for r in self.rebalances if r.window and r.window[0] < gap[1] and r.window[1] > gap[0]]
        return sum(r.join_seconds or 0.0 for r in inside) + GOAL_GAP_OVER_JOIN, inside

    def at(self, moment: float) -> str:
        return f"t+{moment - self.started:.1f}s"

    @property
    def span(self) -> float:
        """First stored batch to the last."""
        return self.batches[-1][0] - self.batches[0][0] if self.batches else 0.0

    @property
    def ratio(self) -> float:
        return self.inputs / self.distinct if self.distinct else float("inf")


# -- the scenario ------------------------------------------------------------------------------


async def _publish(bench: Bench, docs: int) -> list[dict[str, Any]]:
    print(f"- publishing {docs} documents to `{TOPIC}` ({PARTITIONS} partitions) ...", flush=True)
    admin = AIOKafkaAdminClient(bootstrap_servers=bench.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(TOPIC, PARTITIONS, replication_factor=1)])
    finally:
        await admin.close()
    events = make_documents(docs, prefix="churn")
    published = await publish(bench.bootstrap, TOPIC, events, partitions=PARTITIONS)
    print(f"    {published.payload_bytes / 1e6:.1f} MB in {published.seconds:.1f}s", flush=True)
    return events


async def _spawn(label: str, path: Path, env: Mapping[str, str]) -> Member:
    process = await spawn_worker(path, env, ("run", "--stop-when-idle", f"{IDLE_SECONDS:g}"))
    return Member(label, path, process, time.time())


async def _until(what: str, condition: Callable[[], bool], members: Sequence[Member], within: float) -> None:
    """Poll ``condition`` every 0.1 s; fail if it takes longer than ``within`` or a member exits."""
    deadline = time.monotonic() + within
    while not condition():
        exited = [m.label for m in members if m.process.returncode is not None]
        if exited:
            raise RuntimeError(f"churn: member {', '.join(exited)} exited before {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"churn: no {what} within {within:.0f}s")
        await asyncio.sleep(0.1)


async def _final_state(bench: Bench, run: ChurnRun, schema: str) -> None:
    conn = await asyncpg.connect(bench.database_url, timeout=10)
    try:
        run.docs_stored = int(
            await conn.fetchval(f"SELECT count(*) FROM {schema}.documents WHERE NOT deleted")
        )
        run.chunks = int(await conn.fetchval(f"SELECT count(*) FROM {schema}.chunks"))
        run.distinct = int(await conn.fetchval(f"SELECT count(DISTINCT content_sha256) FROM {schema}.chunks"))
    finally:
        await conn.close()
    for what, got, want in (
        ("documents", run.docs_stored, run.docs),
        ("chunks", run.chunks, run.chunks_expected),
        ("distinct chunk contents", run.distinct, run.distinct_expected),
    ):
        if got != want:
            run.problems.append(f"{got} {what} stored, {want} expected")


def _rebalance(name: str, trigger: float, members: Sequence[Member]) -> Rebalance:
    revokes: list[float] = []
    assigns: list[float] = []
    for member in members:  # each member's first assignment after the trigger, and its revoke before it
        revoke: float | None = None
        for line in member.lines():
            if line.at < trigger:
                continue
            if line.event == "partitions_revoked":
                revoke = line.at
            elif line.event == "partitions_assigned":
                assigns.append(line.at)
                revokes += [] if revoke is None else [revoke]
                break
    complete = len(assigns) == len(members)
    return Rebalance(name, trigger, max(revokes, default=None), max(assigns) if complete else None)


async def _variant(bench: Bench, variant: str, name: str, leave: signal.Signals, run: ChurnRun) -> None:
    schema = f"bench_{name}"
    await bench.drop_schema(schema)
    await bench.migrate(schema)
    await bench.wait_for_quiet()
    env = bench.env(
        name, topic=TOPIC, embedding_url=bench.slow.url, KAFKA_SESSION_TIMEOUT_MS=str(SESSION_TIMEOUT_MS)
    )
    bench.logs.mkdir(parents=True, exist_ok=True)
    print(f"- churn, {variant}: {run.docs} records, A then B, then A leaves by {variant} ...", flush=True)
    bench.slow.reset()
    a = await _spawn("A", bench.logs / f"{name}-A.log", env)
    members = [a]
    run.started = a.spawned
    try:
        await _until(
            f"{JOIN_AFTER_BATCHES} batches stored by A",
            lambda: len(a.lines("batch_stored")) >= JOIN_AFTER_BATCHES,
            members,
            120,
        )
        b = await _spawn("B", bench.logs / f"{name}-B.log", env)
        members.append(b)
        await _until("batch stored by B", lambda: bool(b.lines("batch_stored")), members, 120)
        await asyncio.sleep(LEAVE_AFTER_SECONDS)
        if a.process.returncode is not None:
            raise RuntimeError(f"churn: A exited ({a.process.returncode}) before it was to leave")
        left = time.time()
        signalled = time.monotonic()
        a.process.send_signal(leave)
        await asyncio.wait_for(a.process.wait(), 60)
        if leave == signal.SIGTERM:
            run.exit_seconds = time.monotonic() - signalled
        try:
            await asyncio.wait_for(b.process.wait(), WITHIN)
        except TimeoutError:
            run.problems.append(f"B did not exit within {WITHIN:.0f}s")
    finally:
        await asyncio.gather(*(stop_worker(m.process) for m in members))
    run.exit_codes = {m.label: m.process.returncode for m in members}
    stats = bench.slow.stats()
    run.inputs = int(stats["inputs"])
    run.abandoned = int(stats["status_counts"].get("499", 0))
    await _final_state(bench, run, schema)
    await bench.drop_schema(schema)
    expected = {"A": 0 if leave == signal.SIGTERM else -signal.SIGKILL, "B": 0}
    if run.exit_codes != expected:
        run.problems.append(f"exit codes {run.exit_codes}")
    for member in members:
        errors = sorted(
            {line.event for line in member.lines() if line.fields.get("level") in ("error", "critical")}
        )
        if errors:
            run.problems.append(f"error log lines of {member.label}: {', '.join(errors[:5])}")
        run.batches += [(line.at, member.label) for line in member.lines("batch_stored")]
    run.batches.sort()
    run.rebalances = [
        _rebalance("B joins", b.spawned, members),
        _rebalance(f"A leaves ({variant})", left, [b]),
    ]
    longest = max(run.gaps(), key=lambda g: g[1] - g[0], default=(0.0, 0.0))
    exited = "" if run.exit_seconds is None else f", SIGTERM to exit {run.exit_seconds:.2f}s"
    print(
        f"    {len(run.batches)} batches; longest gap {longest[1] - longest[0]:.2f}s at {run.at(longest[0])}"
        f"{exited}; {run.inputs} inputs for {run.distinct} distinct chunks ({run.ratio:.3f})"
        + (f"  PROBLEMS: {'; '.join(run.problems)}" if run.problems else ""),
        flush=True,
    )


# -- the checks --------------------------------------------------------------------------------


def _expected(events: Sequence[dict[str, Any]], bench: Bench) -> tuple[int, int]:
    """Chunks the topic makes, and how many distinct contents they have."""
    size, overlap = bench.plan.setting("CHUNK_SIZE", 1000), bench.plan.setting("CHUNK_OVERLAP", 100)
    chunks = [c for e in events for c in chunk_text(e["text"], size=size, overlap=overlap)]
    return len(chunks), len({c.digest for c in chunks})


def _timeline(run: ChurnRun) -> str:
    parts = []
    for r in run.rebalances:
        if r.window is None:
            parts.append(f"{r.name} at {run.at(r.trigger)}: not seen complete in the logs")
            continue
        around = [g for g in run.gaps() if g[1] > r.trigger and g[0] < r.window[1]]
        gap = max((g[1] - g[0] for g in around), default=0.0)
        revoked = f"last revoke {run.at(r.revoked)}, " if r.revoked is not None else ""
        parts.append(
            f"{r.name} at {run.at(r.trigger)}: {revoked}last assignment {run.at(r.window[1])} "
            f"({r.window[1] - r.trigger:.1f}s after the trigger), join {r.join_seconds:.2f}s, longest gap "
            f"from the trigger to the assignment {gap:.2f}s"
        )
    return "; ".join(parts)


def _checks(bench: Bench, labels: Iterator[str], run: ChurnRun) -> None:
    report = bench.report
    state = (
        f"{run.docs} documents stored in {run.span:.1f}s from the first batch to the last; final state: "
        f"{run.docs_stored}/{run.docs} documents, {run.chunks}/{run.chunks_expected} chunks, "
        f"{run.distinct}/{run.distinct_expected} distinct contents; exit codes {run.exit_codes}"
        + (f". PROBLEMS: {'; '.join(run.problems)}" if run.problems else "")
    )
    longest = max(run.gaps(), key=lambda g: g[1] - g[0], default=(0.0, 0.0))
    allowed, inside = run.allowance(longest)
    over = [g for g in run.gaps() if g[1] - g[0] > run.allowance(g)[0]]
    joins = ", ".join(f"{r.name} {r.join_seconds:.2f}s" for r in inside) or "none"
    took = ", ".join(f"{r.name} {r.window[1] - r.trigger:.1f}s" for r in run.rebalances if r.window)
    report.add(
        Check(
            f"{next(labels)}. churn, {run.variant}: longest stretch storing nothing",
            f"{longest[1] - longest[0]:.2f} s at {run.at(longest[0])}; allowed {allowed:.2f} s "
            f"(join time of the rebalances within it: {joins}); trigger to last assignment: {took}",
            f"<= join + {GOAL_GAP_OVER_JOIN:g} s",
            run.ok and not over,
            "the largest gap between consecutive `batch_stored` lines of both members merged (first to "
            "last stored batch); join time of a rebalance = from the last `partitions_revoked` line of "
            "the members that stay to the last `partitions_assigned` line after it (a first-time member "
            "revokes nothing); goal for a gap = the join times of the rebalances it overlaps + "
            f"{GOAL_GAP_OVER_JOIN:g} s, checked for every gap ({len(over)} over); times from A's spawn. "
            + _timeline(run)
            + f". {len(run.batches)} batches; "
            + state,
        )
    )
    if run.exit_seconds is not None:
        report.add(
            Check(
                f"{next(labels)}. churn, {run.variant}: SIGTERM to exit",
                f"{run.exit_seconds:.2f} s",
                f"< {GOAL_EXIT_SECONDS:g} s",
                run.ok and run.exit_seconds < GOAL_EXIT_SECONDS,
                "time.monotonic() from send_signal(SIGTERM) to A's process exit (asyncio wait), "
                f"SHUTDOWN_GRACE_SECONDS={bench.plan.worker_settings.get('SHUTDOWN_GRACE_SECONDS', '30')}",
            )
        )
    report.add(
        Check(
            f"{next(labels)}. churn, {run.variant}: embedding inputs per distinct chunk stored",
            f"{run.ratio:.3f} ({run.inputs} inputs / {run.distinct} distinct chunks)",
            f"<= {GOAL_INPUTS_PER_CHUNK}",
            run.ok and run.ratio <= GOAL_INPUTS_PER_CHUNK,
            "`inputs` of the embedding server's /admin/stats (reset before A started; it counts the "
            "inputs of answered requests) over `count(DISTINCT content_sha256)` of the variant's chunks "
            f"table at the end; besides, {run.abandoned} requests were given up by a member before their "
            "answer (the server counts them as 499, their inputs not as bought); " + state,
        )
    )


async def churn(bench: Bench) -> list[ChurnRun]:
    """Item 8: both variants; the slow server's faults are put back afterwards."""
    docs = bench.plan.churn_docs
    bench.report.notes.append(
        f"Item 8 (rebalance churn): {docs} documents, so that two members have about 50 s of work at 1-2 s "
        "per embedding request (measured here: one member stores about 50 docs/s, 4 requests of 64 "
        "inputs in flight); the whole variant, with one member alone at the start and at the end, "
        "takes longer."
    )
    events = await _publish(bench, docs)
    chunks, distinct = _expected(events, bench)
    runs: list[ChurnRun] = []
    bench.slow.set_faults(latency_ms=LATENCY_MS, latency_jitter_ms=JITTER_MS)
    try:
        labels = (f"8{letter}" for letter in "abcdefgh")  # 8a-8c SIGTERM, 8d-8e kill -9
        for variant, name, leave in VARIANTS:
            run = ChurnRun(variant, name, docs, chunks, distinct)
            await _variant(bench, variant, name, leave, run)
            _checks(bench, labels, run)
            runs.append(run)
    finally:
        bench.slow.set_faults(latency_ms=float(bench.plan.latency_ms), latency_jitter_ms=0.0)
    return runs
