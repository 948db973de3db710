"""What the benchmark prints and writes: checks with goals, the machine, RESULTS.md, the plot."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from bench.runner import WorkerRun


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the results: a figure, its goal and whether it was met (None: no goal)."""

    item: str
    figure: str
    goal: str = "-"
    passed: bool | None = None
    note: str = ""

    @property
    def verdict(self) -> str:
        return {True: "PASS", False: "FAIL", None: "-"}[self.passed]


@dataclass(frozen=True, slots=True)
class SweepPoint:
    latency_ms: float
    concurrency: int
    batch_size: int
    run: WorkerRun

    @property
    def bound(self) -> float | None:
        """Little's law: requests in flight x inputs per request / latency, in chunks/s."""
        if self.latency_ms <= 0:
            return None
        return self.concurrency * self.batch_size / (self.latency_ms / 1000)


@dataclass
class Report:
    command: str
    broker: str
    settings: Mapping[str, str]
    notes: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    sweep: list[SweepPoint] = field(default_factory=list)
    scaling: list[WorkerRun] = field(default_factory=list)
    runs: list[WorkerRun] = field(default_factory=list)
    copy_rows_per_s: float | None = None
    revision: str = ""
    background: tuple[float, float] = (0.0, 0.0)  # cores busy before the stack started and after it stopped
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    seconds: float = 0.0

    def ordered(self) -> list[Check]:
        """The checks by item number (they run in another order)."""
        return sorted(self.checks, key=_item_order)

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        print(f"  {check.item}: {check.figure}   goal {check.goal}   {check.verdict}", flush=True)
        if check.note:
            print(f"      {check.note}", flush=True)
        return check


def _item_order(check: Check) -> tuple[int, str]:
    """ "1b. ..." sorts as (1, "b"), "10. ..." after "9. ..."."""
    label = check.item.split(".")[0]
    digits = "".join(ch for ch in label if ch.isdigit())
    return int(digits or 0), label[len(digits) :]


def summary(report: Report) -> str:
    """The checks as an aligned text table, for the end of the run."""
    rows = [
        ("item", "figure", "goal", "result"),
        *((c.item, c.figure, c.goal, c.verdict) for c in report.ordered()),
    ]
    widths = [max(len(row[i]) for row in rows) for i in (0, 2, 3)]
    return "\n".join(
        f"{item:<{widths[0]}}  {goal:<{widths[1]}}  {verdict:<{widths[2]}}  {figure}"
        for item, figure, goal, verdict in rows
    )


def machine() -> dict[str, str]:
    cpu = "unknown"
    memory = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "nproc": str(cores),
        "memory": memory,
        "cpu": cpu,
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
    }


def worker_revision() -> str:
    """The git commit of the ``worker`` package being measured, and whether it has local changes."""
    import worker

    where = Path(worker.__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(where), "log", "-1", "--format=%h (%cI)"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--", "."],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"{where} (not a git checkout)"
    return f"{where}, commit {commit}" + (" plus uncommitted changes" if dirty else "")


def rate(value: float, unit: str = "") -> str:
    number = f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"
    return f"{number} {unit}" if unit else number


def megabytes(value: int) -> str:
    return f"{value / 1_048_576:,.0f} MB"


def cpu_line(run: WorkerRun) -> str:
    """CPU seconds by part: worker, PostgreSQL (its busiest backend), embedding servers, others."""
    c = run.cpu
    return (
        f"worker {c.get('worker', 0):.1f}, postgres {c.get('postgres', 0):.1f} "
        f"({c.get('postgres busiest', 0):.1f}), embedding {c.get('embedding', 0):.1f}, "
        f"broker {c.get('broker', 0):.1f}, bench {c.get('bench', 0):.1f}, others {c.get('others', 0):.1f}"
    )


def measured_cpu_line(run: WorkerRun) -> str:
    """CPU seconds by part over the measured interval, and the cores the machine kept busy."""
    c = run.cpu_measured
    if not c or not run.timed:
        return "-"
    return (
        f"worker {c.get('worker', 0):.1f}, postgres {c.get('postgres', 0):.1f}, "
        f"embedding {c.get('embedding', 0):.1f}, broker {c.get('broker', 0):.1f}, "
        f"bench {c.get('bench', 0):.1f}, others {c.get('others', 0):.1f}; "
        f"{c.get('machine', 0) / run.seconds:.2f} cores busy"
    )


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return [line(header), "| " + " | ".join("---" for _ in header) + " |", *map(line, rows)]


BUSY_MACHINE_CORES = 0.25  # more than this busy with nothing of ours running: the figures suffer


def _background(report: Report) -> list[str]:
    before, after = report.background
    line = (
        f"Background load: {before:.2f} cores busy in the second before the benchmark started, "
        f"{after:.2f} after it ended (nothing of the benchmark running)."
    )
    if max(before, after) > BUSY_MACHINE_CORES:
        line += " **The machine was not idle: the figures below are lower than it can do.**"
    others = [r for r in report.runs if r.cpu.get("others", 0.0) > BUSY_MACHINE_CORES * r.wall_seconds]
    if others:
        names = ", ".join(
            r.name + (" (" + ", ".join(f"{n}: {s:.1f} s" for n, s in r.foreign) + ")" if r.foreign else "")
            for r in others
        )
        line += f" Runs where CPU use by others exceeded {BUSY_MACHINE_CORES} cores on average: {names}."
    return [line, ""]


def markdown(report: Report, plot: Path | None) -> str:
    info = machine()
    passed = sum(1 for c in report.checks if c.passed)
    judged = sum(1 for c in report.checks if c.passed is not None)
    out = [
        "# Benchmark results",
        "",
        f"Produced by `{report.command}` on {report.started:%Y-%m-%d %H:%M} UTC in "
        f"{report.seconds:.0f} s, on the local stack ({report.broker}, PostgreSQL 18 + pgvector, "
        "the local hash embedding server), everything on 127.0.0.1. "
        f"{passed} of {judged} goals met.",
        "",
        f"Machine: {info['nproc']} CPUs (`nproc`), {info['memory']} memory, {info['cpu']}; "
        f"{info['os']}, Python {info['python']}.",
        "",
        f"Worker measured: {report.revision}.",
        "",
        *_background(report),
        *[f"{note}\n" for note in report.notes],
        "## Results",
        "",
        *_table(
            ("item", "figure", "goal", "result"),
            [(c.item, c.figure, c.goal, c.verdict) for c in report.ordered()],
        ),
        "",
    ]
    notes = [f"- **{c.item}**: {c.note}" for c in report.ordered() if c.note]
    if notes:
        out += ["How each figure was measured:", "", *notes, ""]
    if report.sweep:
        out += [
            "## Throughput against embedding latency and concurrency (one process)",
            "",
            *_table(
                ("latency", "concurrency", "docs/s", "chunks/s", "Little's bound chunks/s", "of bound"),
                [
                    (
                        f"{p.latency_ms:g} ms",
                        str(p.concurrency),
                        rate(p.run.docs_per_s),
                        rate(p.run.chunks_per_s),
                        rate(p.bound) if p.bound else "-",
                        f"{p.run.chunks_per_s / p.bound:.2f}" if p.bound else "-",
                    )
                    for p in sorted(report.sweep, key=lambda p: (p.concurrency, p.latency_ms))
                ],
            ),
            "",
        ]
    if plot is not None:
        out += [f"![throughput]({plot.name})", ""]
    if report.runs:
        out += [
            "## Every worker run",
            "",
            *_table(
                (
                    "run",
                    "procs",
                    "docs",
                    "chunks",
                    "measured s",
                    "wall s",
                    "docs/s",
                    "chunks/s",
                    "peak RSS",
                    "CPU s, spawn to exit",
                    "CPU s, measured",
                ),
                [
                    (
                        r.name + ("" if r.ok else " (" + "; ".join(r.problems) + ")"),
                        str(r.processes),
                        f"{r.docs_stored}/{r.docs}",
                        str(r.chunks),
                        f"{r.seconds:.2f}" if r.timed else "not timed",
                        f"{r.wall_seconds:.1f}",
                        rate(r.docs_per_s) if r.timed else "-",
                        rate(r.chunks_per_s) if r.timed else "-",
                        " + ".join(megabytes(b) for b in r.peak_rss),
                        cpu_line(r),
                        measured_cpu_line(r),
                    )
                    for r in report.runs
                ],
            ),
            "",
            "Timing of the worker runs: "
            + "; ".join(sorted({r.timing for r in report.runs if r.timed}))
            + ". "
            "CPU seconds from /proc, spawn to exit: the worker processes, all PostgreSQL processes (in "
            "brackets its busiest backend: the one writing), both embedding servers, the broker, this "
            "harness, and `others` = the machine's busy time less all of those, i.e. kernel work and "
            "anything else running on the machine. CPU s, measured: the same over "
            "the measured interval alone, with the machine's cores busy on average.",
            "",
        ]
    out += ["## Settings", ""]
    out += [f"- `{key}={value}`" for key, value in report.settings.items()]
    out += [""]
    return "\n".join(out)


def plot_throughput(report: Report, path: Path, *, copy_rows_per_s: float | None) -> Path | None:
    """Chunks/s against embedding latency per concurrency, and against processes; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib is not installed: no plot; pip install matplotlib)")
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [2, 1]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for number, concurrency in enumerate(sorted({p.concurrency for p in report.sweep})):
        points = sorted((p for p in report.sweep if p.concurrency == concurrency), key=lambda p: p.latency_ms)
        color = colors[number % len(colors)]
        left.plot(
            [p.latency_ms for p in points],
            [p.run.chunks_per_s for p in points],
            "o-",
            color=color,
            label=f"worker, concurrency {concurrency}",
        )
        bounded = [p for p in points if p.bound]
        if bounded:
            left.plot(
                [p.latency_ms for p in bounded],
                [p.bound or 0.0 for p in bounded],
                "x:",
                color=color,
                label=f"Little's bound, concurrency {concurrency}",
            )
    if copy_rows_per_s:
        left.axhline(copy_rows_per_s, color="grey", linestyle="--", label="COPY ceiling (PK + HNSW)")
    measured = [p.run.chunks_per_s for p in report.sweep] + [copy_rows_per_s or 0.0]
    if report.sweep:  # the bounds of high concurrency run far above: keep the measured part readable
        left.set_ylim(min(measured) / 2, max(measured) * 4)
    left.set_xlabel("embedding latency per request (ms)")
    left.set_ylabel("chunks stored per second")
    left.set_yscale("log")
    left.set_title("one worker process")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    if report.scaling:
        processes = [r.processes for r in report.scaling]
        right.plot(processes, [r.chunks_per_s for r in report.scaling], "o-", label="worker")
        base = report.scaling[0].chunks_per_s / report.scaling[0].processes
        right.plot(processes, [base * n for n in processes], ":", color="grey", label="linear")
        right.set_xticks(processes)
        right.set_xlabel("worker processes in one group")
        right.set_ylabel("chunks stored per second")
        right.set_title("scaling (latency-bound embedding)")
        right.legend(fontsize=8)
        right.grid(alpha=0.3)
    figure.suptitle(f"worker throughput on {machine()['nproc']} CPUs (embedded stack)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
