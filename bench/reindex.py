"""Item 13: ``ingest-worker reindex start`` against this machine's ceiling, and ingestion while one runs.

Setup: a corpus SCALE times the base one (documents of their own, on ``bench_reindex_corpus``)
ingested (instant embeddings) into two schemas, ``bench_reindex`` and ``bench_reindex_alone``, as
a served index to rebuild (a reindex is a bulk job over a whole index: at the base corpus's size
its fixed costs weigh as they do not on a real one); a second topic, ``bench_during``, of as
many other documents (another seed), for ingestion to do during a reindex; the instant server
warmed with both corpora's chunks (it remembers a text's vector by text and dimensions, whatever
the model: the new generation's inputs are answered from memory as item 2's are).

(a) ``reindex start --model <model>-v2 --dimensions <the same> --chunk-size/--chunk-overlap <the
    served ones>`` on ``bench_reindex``, alone, timed from spawn to exit (the whole command:
    start-up, registration, the fill, the HNSW build, and closing); the fill and the
    build also by the lines it prints. Against the ceiling of item 1c measured just before each
    reindex: a binary COPY of the same chunk rows (the new generation's chunking and dimensions)
    into a table like the new generation's without its HNSW index, then the index built. PAIRS
    such pairs, each reindex ending with ``reindex drop`` so that the next starts from the same
    state; all of them count alike (the reindexes' chunks over their seconds against the
    ceilings' rows over theirs): one HNSW build can be a tenth faster or slower than the next.
(b) the ``bench_during`` topic ingested by one worker into ``bench_reindex_alone`` (nothing else
    running), then into ``bench_reindex`` while a ``reindex start`` runs there, spawned as the
    worker's partitions are assigned (its workers keep the new generation current too: each
    write marks its documents pending in it, and the worker's own filler takes pending documents
    as ``reindex start`` does). Ingestion's rate is the worker's batch_stored chunks over its
    measured interval (both schemas hold (a)'s corpus already, so the chunks table's count
    is not the run's); no goal, the ratio is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from bench.ceilings import Ceiling, chunk_rows, copy_ceiling
from bench.context import TOPIC, Bench
from bench.corpus import Published, make_documents
from bench.cpu import CpuAccount
from bench.report import Check, cpu_line, rate
from bench.runner import WorkerRun, json_lines, log_timestamp, stop_worker, worker_command
from worker.sql import generation_table

GOAL_REINDEX_OF_CEILING = 0.8  # of COPY + HNSW build of the same rows (item 1c's ceiling)

MODEL_SUFFIX = "-v2"  # the new generation's model: the stack's, renamed (the hash vectors are the same)
DIMENSIONS: int | None = None  # the new generation's dimensions; None: the served ones
VECTOR_TYPE: str | None = None  # the new generation's vector type; None: the served one
SCHEMA = "bench_reindex"  # (a), then (b) with a reindex
ALONE = "bench_reindex_alone"  # (b) without
TEMPLATE = "bench_template_reindex"  # migrated with the new generation's settings: the ceiling's table
DURING_TOPIC = "bench_during"
# The index (a) rebuilds: SCALE times the base corpus's documents, of their own (another prefix).
# A reindex is a bulk job over a whole index: at the base corpus's size (about 7,000 chunks) its
# fixed costs (the registration, each batch's round trips) weigh as they never do on a real one.
SCALE = 4
CORPUS_TOPIC = "bench_reindex_corpus"
DURING_SEED = 20240602  # other texts than the base corpus's (make_documents' default seed)
WITHIN = 300.0  # seconds a reindex may take
POLL_SECONDS = 0.2
PAIRS = 3  # (a)'s ceiling-then-reindex pairs (1 with --quick), all counted

FILLED = re.compile(r"filled ([\d,]+) documents \(([\d,]+) chunks\) in ([\d.]+) s")
INDEXED = re.compile(r"HNSW index ready in ([\d.]+) s")
GENERATION = re.compile(r"(?:registered|resuming) generation #(\d+)")
STARTED = re.compile(r"^reindex start: ")  # its first line: the interpreter is up, its imports done
# lines whose time is noted
MARKS = {"started": STARTED, "registered": GENERATION, "filled": FILLED, "indexed": INDEXED}


@dataclass(frozen=True)
class ReindexRun:
    """One ``reindex start``: timed from spawn to exit, and what it printed."""

    name: str
    command: str
    started: float  # time.time() at spawn
    wall_seconds: float  # spawn to exit
    generation: int | None
    fill_docs: int
    fill_chunks: int
    fill_seconds: float | None  # its own "filled ..." line (0.1 s resolution)
    index_seconds: float | None  # its own "HNSW index ready in ..." line
    chunks: int  # rows in the generation's table afterwards
    exit_code: int | None
    # when its "registered", "filled" and "HNSW index ready" lines came, in seconds from spawn
    marks: Mapping[str, float] = field(default_factory=dict)
    cpu: Mapping[str, float] = field(default_factory=dict)
    problems: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def ended(self) -> float:
        return self.started + self.wall_seconds

    @property
    def chunks_per_s(self) -> float:
        return self.chunks / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def work_seconds(self) -> float:
        """Its own work: from its first line (the interpreter up) to its index ready, i.e.
        registration, fill and build; the whole command when a line is missing."""
        m = self.marks
        if "started" in m and "indexed" in m:
            return m["indexed"] - m["started"]
        return self.wall_seconds

    @property
    def work_chunks_per_s(self) -> float:
        return self.chunks / self.work_seconds if self.work_seconds > 0 else 0.0

    @property
    def fill_chunks_per_s(self) -> float:
        return self.fill_chunks / self.fill_seconds if self.fill_seconds else 0.0

    def phases(self) -> dict[str, float] | None:
        """Seconds of each phase by the times its lines came: start-up and registration (spawn to
        "registered"), fill (to "filled"), HNSW build (to "HNSW index ready"), closing (to exit)."""
        m = self.marks
        if not all(k in m for k in MARKS):
            return None
        return {
            "start-up": m["started"],
            "registration": m["registered"] - m["started"],
            "fill": m["filled"] - m["registered"],
            "HNSW build": m["indexed"] - m["filled"],
            "closing": self.wall_seconds - m["indexed"],
        }

    def timeline(self) -> str:
        phases = self.phases()
        if phases is None:
            missing = ", ".join(sorted(set(MARKS) - set(self.marks)))
            return f"{self.wall_seconds:.2f} s wall (lines missing: {missing})"
        return f"{self.wall_seconds:.2f} s wall = " + " + ".join(f"{k} {v:.2f} s" for k, v in phases.items())

    def cpu_line(self) -> str:
        c = self.cpu
        return (
            f"reindex {c.get('reindex', 0):.1f}, postgres {c.get('postgres', 0):.1f} "
            f"({c.get('postgres busiest', 0):.1f}), embedding {c.get('embedding', 0):.1f}, "
            f"others {c.get('others', 0):.1f}"
        )


@dataclass(frozen=True)
class New:
    """The generation every reindex of this item builds."""

    model: str
    dimensions: int
    vector_type: str | None
    chunk_size: int
    chunk_overlap: int

    def args(self) -> list[str]:
        flags = ["--model", self.model, "--dimensions", str(self.dimensions)]
        flags += ["--chunk-size", str(self.chunk_size), "--chunk-overlap", str(self.chunk_overlap)]
        return flags + (["--vector-type", self.vector_type] if self.vector_type else [])


def new_generation(bench: Bench) -> New:
    env = bench.stack.env()
    return New(
        model=env["EMBEDDING_MODEL"] + MODEL_SUFFIX,
        dimensions=DIMENSIONS or int(env["EMBEDDING_DIMENSIONS"]),
        vector_type=VECTOR_TYPE,
        chunk_size=bench.plan.setting("CHUNK_SIZE", 1000),
        chunk_overlap=bench.plan.setting("CHUNK_OVERLAP", 100),
    )


def reindex_env(bench: Bench, schema: str) -> dict[str, str]:
    """The worker's settings (the served generation's), on ``schema``, instant embeddings."""
    env = bench.env("reindex", topic=TOPIC, embedding_url=bench.instant.url)
    env["DATABASE_SCHEMA"] = schema
    return env


async def run_reindex(bench: Bench, name: str, schema: str, new: New) -> ReindexRun:
    """``reindex start`` on ``schema``, timed to its exit; the time each of its lines came noted
    (its output is written to ``<logs>/<name>.log``)."""
    args = ["reindex", "start", *new.args()]
    pids: list[int] = []
    cpu = CpuAccount({"reindex": lambda: pids, **bench.cpu_sources()})
    print(f"- {name}: ingest-worker {' '.join(args)} on {schema} ...", flush=True)
    err, out = bytearray(), bytearray()
    marks: dict[str, float] = {}
    started_at, started = time.time(), time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        *worker_command(),
        *args,
        env={**os.environ, **reindex_env(bench, schema)},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    pids.append(process.pid)
    assert process.stdout is not None and process.stderr is not None
    readers = asyncio.gather(
        _read(process.stderr, err, marks, started), _read(process.stdout, out, marks, started)
    )
    waiter = asyncio.create_task(process.wait())
    problems: list[str] = []
    try:
        while not waiter.done():
            if time.perf_counter() - started > WITHIN:
                problems.append(f"timed out after {WITHIN:.0f} s")
                break
            await asyncio.wait({waiter}, timeout=POLL_SECONDS)
            if waiter.done():
                break
            cpu.tick()
        wall = time.perf_counter() - started
    finally:
        if not waiter.done():
            await stop_worker(process)
        await asyncio.gather(waiter, return_exceptions=True)
        await asyncio.gather(readers, return_exceptions=True)
    cpu.tick()
    log = bench.logs / f"{name}.log"
    _write(log, bytes(err) + b"\n-- stdout --\n" + bytes(out))
    output = (err + out).decode(errors="replace")
    found = GENERATION.search(output)
    filled = FILLED.search(output)
    indexed = INDEXED.search(output)
    gid = int(found.group(1)) if found else None
    chunks = await count_rows(bench, schema, generation_table(gid)) if gid is not None else 0
    if process.returncode != 0 and not problems:
        problems.append(f"exit code {process.returncode}")
    if b"is complete" not in out:
        problems.append(f"no `is complete` line (see {log})")
    run = ReindexRun(
        name=name,
        command="ingest-worker " + " ".join(args),
        started=started_at,
        wall_seconds=wall,
        generation=gid,
        fill_docs=int(filled.group(1).replace(",", "")) if filled else 0,
        fill_chunks=int(filled.group(2).replace(",", "")) if filled else 0,
        fill_seconds=float(filled.group(3)) if filled else None,
        index_seconds=float(indexed.group(1)) if indexed else None,
        chunks=chunks,
        exit_code=process.returncode,
        marks=dict(marks),
        cpu=cpu.summary(),
        problems=tuple(problems),
    )
    shown = f"  PROBLEMS: {'; '.join(run.problems)}" if run.problems else ""
    print(
        f"    generation #{gid}: {run.chunks} chunks, {rate(run.chunks_per_s, 'chunks/s')} over "
        f"{run.timeline()} (fill alone {rate(run.fill_chunks_per_s, 'chunks/s')} by its own line); "
        f"CPU s {run.cpu_line()}{shown}",
        flush=True,
    )
    return run


async def _read(
    stream: asyncio.StreamReader, into: bytearray, marks: dict[str, float], started: float
) -> None:
    """Everything ``stream`` gives into ``into``; when each line of MARKS came, in seconds from ``started``
    (stderr is line-buffered: a line comes as it is written; tqdm's updates end in a carriage return)."""
    pending = b""
    while chunk := await stream.read(65536):
        now = time.perf_counter() - started
        into += chunk
        *lines, pending = re.split(rb"[\r\n]", pending + chunk)
        for line in lines:
            text = line.decode(errors="replace")
            for mark, pattern in MARKS.items():
                if mark not in marks and pattern.search(text):
                    marks[mark] = now


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


async def reindex_command(bench: Bench, schema: str, *args: str, within: float = 60.0) -> str:
    """Another ``reindex`` action (``drop``, ``status``); its output; RuntimeError if it fails."""
    process = await asyncio.create_subprocess_exec(
        *worker_command(),
        "reindex",
        *args,
        env={**os.environ, **reindex_env(bench, schema)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), within)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    text = output.decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(f"ingest-worker reindex {' '.join(args)} failed: {text[-500:]}")
    return text


async def count_rows(bench: Bench, schema: str, table: str) -> int:
    conn = await asyncpg.connect(bench.database_url, timeout=10)
    try:
        return int(await conn.fetchval(f'SELECT count(*) FROM "{schema}"."{table}"', timeout=60))
    except asyncpg.UndefinedTableError:
        return 0
    finally:
        await conn.close()


async def publish_during(bench: Bench) -> tuple[Published, list[dict[str, object]]]:
    events = make_documents(bench.docs, seed=DURING_SEED, prefix="during")
    return await bench.publish_topic(DURING_TOPIC, events), events


async def publish_corpus(bench: Bench) -> tuple[Published, list[dict[str, object]]]:
    events = make_documents(SCALE * bench.docs, prefix="reindex")
    return await bench.publish_topic(CORPUS_TOPIC, events), events


@dataclass(frozen=True)
class Interval:
    """A worker's measured interval from its log (first batch's start to last batch stored)."""

    start: float
    end: float
    chunks: int  # of its batch_stored lines

    def overlap(self, start: float, end: float) -> float:
        return max(0.0, min(self.end, end) - max(self.start, start))


def batch_interval(log: Path) -> Interval | None:
    batches = []
    chunks = 0
    for line in json_lines(log):
        at = log_timestamp(line)
        seconds = line.get("seconds")
        if line.get("event") == "batch_stored" and at is not None and isinstance(seconds, int | float):
            batches.append((at - seconds, at))
            chunks += int(line.get("chunks") or 0)
    if not batches:
        return None
    return Interval(min(s for s, _ in batches), max(e for _, e in batches), chunks)


def ingest_note(run: WorkerRun, log: Path) -> str:
    """What ``run_note`` says, with the chunks this run stored (its schema held others before)."""
    stored = batch_interval(log)
    chunks = f"{stored.chunks} chunks (batch_stored lines)" if stored else "no batch_stored lines"
    problems = f" PROBLEMS: {'; '.join(run.problems)}." if run.problems else ""
    return (
        f"`{run.command}`, {run.docs} records -> {chunks} in {run.seconds:.2f} s measured "
        f"({run.wall_seconds:.1f} s wall, work began {run.join_seconds:.1f} s after spawn; "
        f"CPU s {cpu_line(run)}).{problems}"
    )


async def wait_for_event(log: Path, event: str, alive: asyncio.Task[WorkerRun], within: float) -> bool:
    """Until the worker's log has a line of ``event`` (True), or the worker is done (False)."""
    deadline = time.monotonic() + within
    while not alive.done() and time.monotonic() < deadline:
        if _logged(log, event):
            return True
        await asyncio.sleep(0.05)
    return False


def _logged(log: Path, event: str) -> bool:
    with contextlib.suppress(OSError):
        return f'"{event}"'.encode() in log.read_bytes()
    return False


# -- the item ----------------------------------------------------------------------------------


def per(amount: float, by: float) -> float:
    """``amount / by``, 0 where there is nothing to divide by (a run that failed: its check fails)."""
    return amount / by if by else 0.0


def pair_ratio(run: ReindexRun, ceiling: Ceiling) -> float:
    """A reindex's rate over its own work against the COPY + HNSW ceiling measured before it."""
    return per(run.work_chunks_per_s, ceiling.with_build().per_s)


def gap(run: ReindexRun, ceiling: Ceiling) -> str:
    """Where the reindex's seconds beyond the ceiling's went, phase by phase."""
    phases = run.phases()
    if phases is None:
        return ""
    extra = {
        "start-up": phases["start-up"],
        "registration": phases["registration"],
        "fill - COPY": phases["fill"] - ceiling.seconds,
        "its build - the ceiling's": phases["HNSW build"] - ceiling.build_seconds,
        "closing": phases["closing"],
    }
    spent = run.wall_seconds - ceiling.seconds - ceiling.build_seconds
    return (
        f"Beyond the ceiling's {ceiling.seconds + ceiling.build_seconds:.2f} s, the reindex took "
        f"{spent:+.2f} s: " + ", ".join(f"{k} {v:+.2f} s" for k, v in extra.items())
    )


async def reindex(bench: Bench) -> None:
    plan, report = bench.plan, bench.report
    new = new_generation(bench)
    during, during_events = await publish_during(bench)
    _, corpus_events = await publish_corpus(bench)
    await bench.warm_instant([*corpus_events, *during_events])
    served_dims = int(bench.stack.env()["EMBEDDING_DIMENSIONS"])
    if new.dimensions != served_dims:  # the new generation's vectors are other texts for the memo
        await bench.warm_instant(dimensions=new.dimensions)
    for schema in (SCHEMA, ALONE, TEMPLATE):
        await bench.drop_schema(schema)
    overrides = {"EMBEDDING_MODEL": new.model, "EMBEDDING_DIMENSIONS": str(new.dimensions)}
    if new.vector_type:
        overrides["VECTOR_TYPE"] = new.vector_type
    await bench.migrate(TEMPLATE, **overrides)
    rows = chunk_rows(
        corpus_events,
        chunk_size=new.chunk_size,
        chunk_overlap=new.chunk_overlap,
        model=new.model,
        dimensions=new.dimensions,
    )

    # The served index to rebuild: the corpus, in two schemas alike.
    async def served(name: str, schema: str) -> WorkerRun:
        return await bench.run(
            name,
            embedding_url=bench.instant.url,
            topic=CORPUS_TOPIC,
            docs=len(corpus_events),
            schema=schema,
            within=600.0,
        )

    base = await served("reindex_base", SCHEMA)
    alone_base = await served("reindex_alone_base", ALONE)

    # (a) reindex alone, each after the ceiling it is measured against.
    ceilings: list[Ceiling] = []
    runs: list[ReindexRun] = []
    for i in range(1, (PAIRS if plan.repeats > 1 else 1) + 1):
        await bench.checkpoint()
        await bench.wait_for_quiet()
        ceiling = await copy_ceiling(
            bench.database_url,
            TEMPLATE,
            rows,
            approximate_index=False,
            index_build_memory=plan.worker_settings.get("INDEX_BUILD_MEMORY", "512MB"),
        )
        ceilings.append(ceiling)
        print(
            f"    ceiling: COPY {rate(ceiling.per_s, 'rows/s')} ({ceiling.seconds:.2f} s) + HNSW build "
            f"{ceiling.build_seconds:.2f} s = {rate(ceiling.with_build().per_s, 'rows/s')}",
            flush=True,
        )
        await bench.checkpoint()
        await bench.wait_for_quiet()
        runs.append(await run_reindex(bench, f"reindex_{i}", SCHEMA, new))
        await reindex_command(bench, SCHEMA, "drop")
    # Every pair counts, alike: the reindexes' chunks over their seconds against the ceilings' rows
    # over theirs. Each HNSW build, the ceiling's as much as the reindex's, varies by a tenth or
    # more from one to the next on this machine: the best of each side, or the median pair, is
    # decided by one build's luck. The phases shown are of the median pair.
    work = per(sum(r.chunks for r in runs), sum(r.work_seconds for r in runs))
    whole = per(sum(r.chunks for r in runs), sum(r.wall_seconds for r in runs))
    filled = per(sum(r.fill_chunks for r in runs), sum(r.fill_seconds or 0.0 for r in runs))
    both_rate = per(sum(c.items for c in ceilings), sum(c.seconds + c.build_seconds for c in ceilings))
    copy_rate = per(sum(c.items for c in ceilings), sum(c.seconds for c in ceilings))
    ratio, whole_ratio, fill_ratio = per(work, both_rate), per(whole, both_rate), per(filled, copy_rate)
    pairs = sorted(zip(runs, ceilings, strict=True), key=lambda p: pair_ratio(*p))
    run, ceiling = pairs[len(pairs) // 2]
    each = "; ".join(
        f"{rate(r.work_chunks_per_s, 'chunks/s')} against {rate(c.with_build().per_s, 'rows/s')} = "
        f"{pair_ratio(r, c):.2f}"
        for r, c in zip(runs, ceilings, strict=True)
    )
    expected = f"the ceiling's {len(rows.rows)} rows" + (
        "" if run.chunks == len(rows.rows) else f" (**not** the {run.chunks} the reindex stored)"
    )
    report.add(
        Check(
            "13a. reindex, instant embeddings",
            f"{rate(work, 'chunks/s')} over registration, fill and index ({run.chunks} chunks a run); "
            f"{ratio:.2f} of the COPY + HNSW build ceiling ({rate(both_rate, 'rows/s')}); the whole "
            f"command, interpreter start-up and closing included, {rate(whole, 'chunks/s')} = "
            f"{whole_ratio:.2f} of it; the fill alone {rate(filled, 'chunks/s')}, {fill_ratio:.2f} of "
            f"the COPY alone ({rate(copy_rate, 'rows/s')})"
            + (
                f" (over {len(runs)} pairs, each a ceiling then a reindex; the pairs in order: {each})"
                if len(runs) > 1
                else ""
            ),
            f">= {GOAL_REINDEX_OF_CEILING}",
            all(r.ok for r in runs) and ratio >= GOAL_REINDEX_OF_CEILING,
            f"`{run.command}` (with the served generation's settings in the environment) on a schema "
            f"holding a corpus {SCALE} times the base one ({len(corpus_events)} other documents, "
            f"{base.chunks} chunks, ingested by a worker "
            f"first): generation #{run.generation} registered, {run.fill_docs} documents re-chunked "
            f"from their stored text into {run.chunks} chunks, embedded by the instant server (from "
            "memory: Bench.warm_instant), written by binary COPY into its own table without HNSW, "
            "then its HNSW index built (a plain CREATE INDEX: the generation is not served, its "
            f"fillers wait meanwhile); timed from spawn to exit: {run.timeline()} "
            "(phases by when its lines came on its stderr; the rate is over registration, fill and "
            "build: the ceiling's clock too starts with its process up, connected and its rows "
            "ready); CPU s spawn to exit: "
            f"{run.cpu_line()}. Each run followed by `reindex drop`, so the next starts alike. "
            "Ceiling (item 1c's, measured just before each run; the figures here are of the median "
            "pair): "
            f"copy_records_to_table (pgvector codec) of {expected} ({rows.docs} docs, the new "
            f"generation's chunking {new.chunk_size}/{new.chunk_overlap} and {new.dimensions} dimensions) "
            f"into a `LIKE chunks INCLUDING ALL` copy of a schema migrated with the new generation's "
            f"settings, its HNSW index dropped, in {ceiling.seconds:.2f} s, then the index built in "
            f"{ceiling.build_seconds:.2f} s (plain CREATE INDEX, no CONCURRENTLY); the machine kept "
            f"{ceiling.cores:.2f} cores busy during the COPY. {gap(run, ceiling)}"
            + ("" if run.ok else f". PROBLEMS: {'; '.join(run.problems)}"),
        )
    )

    # (b) ingestion without and with a reindex running in its schema.
    alone = await bench.run(
        "ingest_alone",
        embedding_url=bench.instant.url,
        topic=DURING_TOPIC,
        docs=during.records,
        schema=ALONE,
        fresh=False,
    )
    await bench.drop_schema(ALONE)
    name = "ingest_reindexing"
    log = bench.logs / f"{name}-0.log"
    log.unlink(missing_ok=True)
    worker = asyncio.create_task(
        bench.run(
            name,
            embedding_url=bench.instant.url,
            topic=DURING_TOPIC,
            docs=during.records,
            schema=SCHEMA,
            fresh=False,
        )
    )
    beside: ReindexRun | None = None
    try:
        if await wait_for_event(log, "partitions_assigned", worker, within=240.0):
            beside = await run_reindex(bench, "reindex_during", SCHEMA, new)
        with_reindex = await worker
    finally:
        if not worker.done():
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
    interval = batch_interval(log)
    without_rate, with_rate = alone.steady_chunks_per_s, with_reindex.steady_chunks_per_s
    ratio_b = with_rate / without_rate if without_rate else 0.0
    if beside is not None and interval is not None:
        overlap = interval.overlap(beside.started, beside.ended)
        span = interval.end - interval.start
        during_note = (
            f"the reindex (spawned when the worker's partitions were assigned) ran from "
            f"{beside.started - interval.start:+.1f} s to {beside.ended - interval.start:+.1f} s of the "
            f"worker's measured interval ({span:.2f} s), over {overlap / span:.0%} of it; it filled "
            f"{beside.fill_docs} documents ({beside.fill_chunks} chunks; its table held {beside.chunks} "
            f"at its end) at {rate(beside.chunks_per_s, 'chunks/s')} over {beside.timeline()}; CPU s "
            f"{beside.cpu_line()}" + (f"; PROBLEMS: {'; '.join(beside.problems)}" if beside.problems else "")
        )
    else:
        during_note = "**the reindex did not run** (the worker's partitions were never assigned)"
    report.add(
        Check(
            "13b. ingestion while a reindex runs, instant embeddings",
            f"{ratio_b:.2f} of the rate without ({rate(with_rate, 'chunks/s')} vs "
            f"{rate(without_rate, 'chunks/s')}; {rate(with_reindex.docs_per_s, 'docs/s')} vs "
            f"{rate(alone.docs_per_s, 'docs/s')})",
            note=f"`{DURING_TOPIC}`, {during.records} other documents (seed {DURING_SEED}), ingested by one "
            f"worker into a schema holding (a)'s corpus, once alone and once while `{new.model}` "
            "is being built there; chunks/s = the chunks of the worker's batch_stored lines over its "
            "measured interval (first batch's start to last batch stored). Without: "
            + ingest_note(alone, bench.logs / "ingest_alone-0.log")
            + f" With: {ingest_note(with_reindex, log)} Meanwhile {during_note}; with --stop-when-idle "
            "the worker also fills the new generation until nothing is pending before it exits (outside the "
            f"measured interval). The two base ingestions (empty schemas, as item 2): "
            f"{rate(base.chunks_per_s, 'chunks/s')} and {rate(alone_base.chunks_per_s, 'chunks/s')}",
        )
    )
    for schema in (SCHEMA, TEMPLATE):
        await bench.drop_schema(schema)
