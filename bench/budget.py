"""Item 12: workers sharing one provider budget they are not told.

The slow embedding server (answers after ``LATENCY_MS``) is given a provider's rate limit,
``BUDGET_TPM`` tokens a minute in buckets of ``WINDOW`` seconds (worker.dev.embedserver.budget:
429 with Retry-After and OpenAI's x-ratelimit-* headers on every answer). For 1, 2 and 4 workers
in one group on the base topic, each with its default settings (but ``BATCH_SIZE`` inputs a
request) and nothing told of the budget,
the run lasts ``RUN_SECONDS``; then SIGTERM. Measured from the server's own counters:

- budget used: tokens answered from ``WARM_SECONDS`` (the buckets' first fill is a burst no
  steady rate can show) to the end, over what the budget made available in that time (its
  refill, and what its token bucket held at the start less what it held at the end);
- throttled: the requests answered 429, over all answered, in the whole run.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from bench.context import TOPIC, Bench
from bench.report import Check, rate
from bench.runner import spawn_worker, stop_worker

BUDGET_TPM = 600_000  # 10,000 tokens a second: a small fraction of what the workers could send
WINDOW = 5.0  # seconds of the limit the buckets hold
LATENCY_MS = 100.0
# Inputs per request: about 2,000 tokens of the base topic's chunks, so that a bucket holds some 25
# requests. A provider's minute-long bucket holds hundreds; with the default 64 (16,000 tokens) the
# 5 s bucket would hold 3, and 4 workers' first requests at once would overflow it before any
# answer said what is left.
BATCH_SIZE = 8
RUN_SECONDS = 30.0
WARM_SECONDS = 2 * WINDOW
REPLICAS = (1, 2, 4)
GOAL_USED = 0.95
GOAL_THROTTLED = 0.01


@dataclass(frozen=True, slots=True)
class BudgetRun:
    replicas: int
    tokens: int  # answered between WARM_SECONDS and the end
    seconds: float  # that span
    drained: float  # what the token bucket held at its start less what it held at its end
    requests: int  # answered, in the whole run
    throttled: int  # answered 429, in the whole run
    exit_codes: tuple[int | None, ...]

    @property
    def used(self) -> float:
        """Of what the budget made available in the span: its refill, and what the bucket gave up."""
        return self.tokens / (BUDGET_TPM / 60 * self.seconds + self.drained)

    @property
    def throttled_share(self) -> float:
        return self.throttled / self.requests if self.requests else 0.0


async def budget(bench: Bench) -> list[BudgetRun]:
    """Item 12: each number of replicas in turn, against a fresh (full) budget."""
    runs: list[BudgetRun] = []
    try:
        for replicas in REPLICAS:
            runs.append(await _run(bench, replicas))
    finally:
        bench.slow.set_faults(budget_tpm=0, budget_window=60.0, latency_ms=float(bench.plan.latency_ms))
    _check(bench, runs)
    return runs


async def _run(bench: Bench, replicas: int) -> BudgetRun:
    name = f"budget{replicas}"
    print(f"- budget: {replicas} worker(s), {RUN_SECONDS:g} s, {BUDGET_TPM:,} tokens/min ...", flush=True)
    await bench.wait_for_quiet()
    bench.slow.set_faults(budget_tpm=0, latency_ms=LATENCY_MS)  # a new budget starts full:
    bench.slow.set_faults(budget_tpm=BUDGET_TPM, budget_window=WINDOW)  # off, then on
    bench.slow.reset()
    env = bench.env(
        name,
        topic=TOPIC,
        embedding_url=bench.slow.url,
        SHUTDOWN_GRACE_SECONDS="2",
        EMBEDDING_BATCH_SIZE=str(BATCH_SIZE),
    )
    bench.logs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    processes = []
    for i in range(replicas):
        processes.append(await spawn_worker(bench.logs / f"{name}-{i}.log", env, ("run",)))
    try:
        await asyncio.sleep(WARM_SECONDS)
        first, first_at = bench.slow.stats(), time.monotonic()
        await asyncio.sleep(max(0.0, RUN_SECONDS - (time.monotonic() - started)))
        last, last_at = bench.slow.stats(), time.monotonic()
    finally:
        await asyncio.gather(*(stop_worker(p) for p in processes))
    await bench.drop_schema(f"bench_{name}")
    run = BudgetRun(
        replicas,
        int(last["tokens"]) - int(first["tokens"]),
        last_at - first_at,
        float(first["budget"]["tokens"]) - float(last["budget"]["tokens"]),
        sum(_statuses(last).values()),
        _statuses(last).get(429, 0),
        tuple(p.returncode for p in processes),
    )
    print(
        f"    {run.used:.0%} of the budget used, {run.throttled_share:.1%} of {run.requests} requests "
        f"answered 429; exit codes {list(run.exit_codes)}",
        flush=True,
    )
    return run


def _statuses(stats: dict[str, Any]) -> dict[int, int]:
    return {int(status): int(count) for status, count in stats["status_counts"].items()}


def _check(bench: Bench, runs: list[BudgetRun]) -> None:
    ok = all(
        r.used >= GOAL_USED and r.throttled_share < GOAL_THROTTLED and set(r.exit_codes) == {0} for r in runs
    )
    bench.report.add(
        Check(
            "12. a provider's budget shared by 1, 2 and 4 workers",
            "; ".join(
                f"{r.replicas}: {r.used:.0%} used, {r.throttled_share:.1%} of {r.requests} requests 429"
                for r in runs
            ),
            f">= {GOAL_USED:.0%} used, < {GOAL_THROTTLED:.0%} answered 429",
            ok,
            f"the slow embedding server ({LATENCY_MS:g} ms) with a budget of {BUDGET_TPM:,} tokens a "
            f"minute ({rate(BUDGET_TPM / 60, 'tokens/s')}) in buckets of {WINDOW:g} s, which the workers "
            f"are not told; requests of {BATCH_SIZE} inputs; each run {RUN_SECONDS:g} s, then SIGTERM; "
            "used = tokens answered from "
            f"{WARM_SECONDS:g} s to the end over what the budget made available then (its rate times the "
            "span, and what its bucket gave up; the buckets' first fill is a burst); 429 share over the "
            "whole run; the server's own counters (/admin/stats)",
        )
    )
