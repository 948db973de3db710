"""``make bench``: every figure of the worker's performance, measured side by side in one run.

    .venv/bin/python -m bench            # the full run (about 5 minutes on 2 cores)
    .venv/bin/python -m bench --quick    # a smoke run of the harness itself (about 1 minute)
    .venv/bin/python -m bench --broker tansu   # on the embedded broker instead of Apache Kafka
    .venv/bin/python -m bench --only churn --out churn.md   # one item (and the setup it needs)

Starts the local stack (Apache Kafka where ``java`` and ``mvn`` are, else Tansu) plus a second
embedding server that answers after ``LATENCY_MS``, publishes a deterministic corpus, then measures:
the ceilings (plain consume+decode, plain binary COPY with and without the HNSW index), the real
worker with the instant and the slow embedding server, the naive baseline, the embedding inputs
saved when the stream is redelivered, scaling over processes, rebalance churn (a member joins, another
leaves), a latency x concurrency sweep, peak RSS against a 10x backlog, and a reindex (``reindex
start`` of a new generation against COPY + HNSW build of its rows, and ingestion while one runs).
Prints each figure with its goal; writes ``bench/RESULTS.md`` and ``bench/throughput.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import worker
from bench import churn, reindex
from bench.context import Bench, Plan
from bench.cpu import busy_cores, wait_for_quiet
from bench.items import ONLY, run_all, run_only
from bench.report import BUSY_MACHINE_CORES, Report, markdown, plot_throughput, summary, worker_revision
from worker.dev import apache_kafka
from worker.dev.processes import StackError
from worker.dev.stack import EmbeddingServer, embedded_stack

# -- What every worker run gets. Edit here: new settings (EMBEDDING_BATCH_CHARS, EMBEDDING_LINGER_MS,
# MAX_IN_FLIGHT_RECORDS, ...) go into this dict, new `run` flags (e.g. "--backfill") into WORKER_ARGS.
WORKER_SETTINGS: dict[str, str] = {
    "HEALTH_PORT": "0",
    "LOG_LEVEL": "info",  # the runner times the work by the log lines (batch_stored, partitions_assigned)
    "KAFKA_MAX_POLL_RECORDS": "500",
    "EMBEDDING_BATCH_SIZE": "64",
    "EMBEDDING_CONCURRENCY": "4",
    "CHUNK_SIZE": "1000",
    "CHUNK_OVERLAP": "100",
    "SHUTDOWN_GRACE_SECONDS": "10",
}
WORKER_ARGS: tuple[str, ...] = ()  # with "--backfill", item 2 compares against the COPY without HNSW
IDLE_SECONDS = 2.0  # `run --stop-when-idle`
# Texts the instant embedding server remembers (Bench.warm_instant): the base corpus's ~7,000 chunks
# fit, and item 13's corpus (4x) with its other documents; the 10x backlog's do not, and are
# computed as they come.
INSTANT_MEMO = 50_000
REPEATS = 2  # runs of items 2 and 3 and of each COPY ceiling; the best counts (1 with --quick)

PARTITIONS = 8
LATENCY_MS = 100.0  # the slow embedding server (items 3, 4 and 6)
SCALING_PROCESSES = (1, 2, 4)
# Small, so one process is bound by the latency (2 x 16 / 100 ms = 320 chunks/s) while even four stay
# below what PostgreSQL can index on this machine: the runs then measure scaling, not the database.
SCALING_SETTINGS = {"EMBEDDING_CONCURRENCY": "2", "EMBEDDING_BATCH_SIZE": "16"}
CHURN_DOCS = 5000  # item 8's topic: about 50 s of work for two members at 1-2 s per embedding request
QUICK_CHURN_DOCS = 3000
SWEEP_LATENCIES_MS = (0.0, 50.0, 100.0, 200.0)
SWEEP_CONCURRENCY = (2, 4, 16)
QUICK_SWEEP_LATENCIES_MS = (0.0, 100.0)
QUICK_SWEEP_CONCURRENCY = (2, 4)

QUIET_WAIT = 60.0  # seconds to wait at start for a busy machine to calm down
BROKERS = {
    "kafka": f"Apache Kafka {apache_kafka.kafka_version()} (one KRaft node, from Maven Central)",
    "tansu": "Tansu (the embedded broker, in memory)",
}

ROOT = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=None, help="documents in the base backlog [2000]")
    parser.add_argument("--quick", action="store_true", help="a fast smoke run of the harness (~1 minute)")
    parser.add_argument("--naive-sample", type=int, default=None, help="records the naive run does [100]")
    parser.add_argument("--backlog-factor", type=int, default=10, help="the large backlog, x base [10]")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the latency sweep")
    parser.add_argument(
        "--only", choices=ONLY, default=None, help="run one item (and the setup it needs), not the full bench"
    )
    parser.add_argument(
        "--churn-docs", type=int, default=None, help=f"documents of item 8's topic [{CHURN_DOCS}]"
    )
    parser.add_argument("--out", type=Path, default=None, help="results file [bench/RESULTS.md]")
    parser.add_argument("--plot", type=Path, default=None, help="plot file [bench/throughput.png]")
    parser.add_argument("--workdir", type=Path, default=Path(".run/bench"), help="worker logs [.run/bench]")
    parser.add_argument(
        "--broker",
        choices=("kafka", "tansu"),
        default="kafka" if apache_kafka.available() else "tansu",
        help="Apache Kafka (from Maven Central; the default where java and mvn are) or Tansu",
    )
    args = parser.parse_args(argv)
    if args.docs is None:
        args.docs = 200 if args.quick else 2000
    if args.naive_sample is None:
        args.naive_sample = 20 if args.quick else 100
    if args.churn_docs is None:
        args.churn_docs = QUICK_CHURN_DOCS if args.quick else CHURN_DOCS
    if min(args.docs, args.naive_sample, args.backlog_factor, args.churn_docs) < 1:
        parser.error("--docs, --naive-sample, --backlog-factor and --churn-docs must be at least 1")
    # A smoke run, or one item alone, must not overwrite the real results.
    partial = args.quick or args.only is not None
    name = f"RESULTS-{args.only}.md" if args.only else "RESULTS.md"
    args.out = args.out or (args.workdir / name if partial else ROOT / name)
    args.plot = args.plot or (args.workdir / "throughput.png" if args.quick else ROOT / "throughput.png")
    return args


def make_plan(args: argparse.Namespace) -> Plan:
    return Plan(
        worker_settings=WORKER_SETTINGS,
        worker_args=WORKER_ARGS,
        idle_seconds=IDLE_SECONDS,
        partitions=PARTITIONS,
        docs=args.docs,
        naive_sample=args.naive_sample,
        backlog_factor=args.backlog_factor,
        latency_ms=LATENCY_MS,
        scaling_processes=SCALING_PROCESSES,
        scaling_settings=SCALING_SETTINGS,
        sweep_latencies_ms=QUICK_SWEEP_LATENCIES_MS if args.quick else SWEEP_LATENCIES_MS,
        sweep_concurrency=QUICK_SWEEP_CONCURRENCY if args.quick else SWEEP_CONCURRENCY,
        repeats=1 if args.quick else REPEATS,
        churn_docs=args.churn_docs,
    )


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM as Ctrl-C: unwind, so every worker, server and the stack are stopped on the way out."""
    raise KeyboardInterrupt


def _measure_this_checkout() -> None:
    """Worker processes import the ``worker`` package this harness imported (and reports as
    measured), not the checkout the venv's editable install points at: from a git worktree
    that is another one."""
    root = str(Path(worker.__file__).resolve().parent.parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _measure_this_checkout()
    signal.signal(signal.SIGTERM, _interrupt)
    plan = make_plan(args)
    command = shlex.join([".venv/bin/python", "-m", "bench", *(sys.argv[1:] if argv is None else argv)])
    report = Report(
        command=command,
        broker=BROKERS[args.broker],
        settings={
            **WORKER_SETTINGS,
            "run flags": shlex.join(["--stop-when-idle", f"{IDLE_SECONDS:g}", *WORKER_ARGS]),
            "documents (base backlog)": f"{args.docs}, {args.backlog_factor}x for the large backlog",
            "topic partitions": str(PARTITIONS),
            "slow embedding server": f"answers after {LATENCY_MS:g} ms",
            "scaling": f"{', '.join(map(str, SCALING_PROCESSES))} processes with {SCALING_SETTINGS}",
            "repeats": f"{plan.repeats} (items 2, 3 and the COPY ceilings: the best counts)",
            "sweep": f"latencies {plan.sweep_latencies_ms} ms x concurrency {plan.sweep_concurrency}",
            "churn (item 8)": f"{args.churn_docs} documents on {churn.PARTITIONS} partitions, "
            f"embeddings after {churn.LATENCY_MS:g} ms + uniform(0, {churn.JITTER_MS:g}) ms, "
            f"KAFKA_SESSION_TIMEOUT_MS={churn.SESSION_TIMEOUT_MS}, --stop-when-idle {churn.IDLE_SECONDS:g}; "
            f"B joins once A has stored {churn.JOIN_AFTER_BATCHES} batches, A leaves "
            f"{churn.LEAVE_AFTER_SECONDS:g} s after B's first",
            "reindex (item 13)": f"`reindex start --model <stack model>{reindex.MODEL_SUFFIX}` "
            f"(dimensions {reindex.DIMENSIONS or 'the served ones'}, vector type "
            f"{reindex.VECTOR_TYPE or 'the served one'}, the served chunking) of a corpus "
            f"{reindex.SCALE} times the base one, "
            f"instant embeddings; ingestion during it: {reindex.DURING_TOPIC}, as many other documents",
        },
    )
    if args.only is not None:
        report.settings = {
            k: v
            for k, v in report.settings.items()
            if not k.startswith(("documents", "topic", "scaling", "repeats", "sweep"))
        }
        report.notes.append(f"Only item {args.only} (`--only {args.only}`): not a full run.")
    if args.quick:
        report.notes.append(
            "A `--quick` smoke run: it checks the harness; its samples are too small to judge the goals."
        )
    logs = args.workdir / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    started = time.perf_counter()
    before = busy_cores()
    if before > BUSY_MACHINE_CORES:
        print(f"== the machine is busy ({before:.2f} cores): waiting up to {QUIET_WAIT:.0f}s", flush=True)
        before = wait_for_quiet(BUSY_MACHINE_CORES, QUIET_WAIT)
    report.revision = worker_revision()
    print(f"== {command}: worker {report.revision}", flush=True)
    print(f"== machine busy {before:.2f} cores before; starting the stack on {report.broker}", flush=True)
    slow = EmbeddingServer(("--latency-ms", f"{LATENCY_MS:g}"))
    try:
        # Kafka's own default initial rebalance delay (the test broker sets it to 0): processes started
        # together join one generation, as they do on a production broker.
        kafka_properties: dict[str, object] = {"group.initial.rebalance.delay.ms": 3000}
        memo = ("--memo", str(INSTANT_MEMO))  # the instant server answers the corpus from memory
        with embedded_stack(broker=args.broker, kafka_properties=kafka_properties, embed_args=memo) as stack:
            slow.start()
            bench = Bench(plan, stack, slow, report, logs)
            budget = bench.quiet_budget
            if args.only is not None:
                asyncio.run(run_only(bench, args.only))
            else:
                asyncio.run(run_all(bench, with_sweep=args.sweep))
            if bench.quiet_budget < budget - 1:
                report.notes.append(
                    f"Before worker runs the harness waited {budget - bench.quiet_budget:.0f} s in all "
                    "for other jobs on the machine to finish."
                )
    except (StackError, RuntimeError, OSError, TimeoutError, subprocess.SubprocessError) as exc:
        print(f"bench: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    finally:
        slow.stop()
    report.seconds = time.perf_counter() - started
    after = busy_cores()
    report.background = (before, after)
    report.notes.append(f"The workers' JSON logs of the last run are in `{logs}`.")
    plot = None if args.only else plot_throughput(report, args.plot, copy_rows_per_s=report.copy_rows_per_s)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(report, plot))
    failed = [c.item for c in report.ordered() if c.passed is False]
    print(f"\n{summary(report)}\n")
    print(f"== done in {report.seconds:.0f} s: {args.out}" + (f", plot {plot}" if plot else ""))
    print(f"== {len(failed)} goal(s) not met" + (f": {', '.join(failed)}" if failed else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
