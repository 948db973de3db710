"""Item 14: the event loop's lag while near-limit documents go through.

Twelve documents of about 900 KB (just under MAX_TEXT_BYTES' 1 MiB) spread among 1,500 small ones
(1-4 kB), on their own topic, ingested by one worker with instant embeddings. Everything the
worker does runs on one event loop, so the chunking, hashing and encoding of a large document
must happen off it: the worker's own LoopMonitor (worker.loop_health) measures how late the loop
wakes a sleeper every 0.1 s, and its ``event_loop`` line at exit gives the lag's p50, p99 and worst.
No goal: the figures are reported (issue 15 asks for them; /healthz answered in 13 ms at p99 and
53 ms at worst when a user first tried such a stream).
"""

from __future__ import annotations

import random

from bench.context import Bench
from bench.corpus import make_documents
from bench.report import Check, rate
from bench.runner import json_lines

TOPIC = "bench_near_limit"
BIG = 12
BIG_CHARS = 900_000
SMALL = 1500
SEED = 20240603


def near_limit_documents() -> list[dict[str, object]]:
    """SMALL ordinary documents with BIG of about BIG_CHARS spread among them."""
    small = make_documents(SMALL, seed=SEED, prefix="small")
    rng = random.Random(SEED)
    pool = [str(e["text"]) for e in small]
    events = list(small)
    for n in range(BIG):
        parts: list[str] = []
        size = 0
        while size < BIG_CHARS:
            parts.append(pool[rng.randrange(len(pool))])
            size += len(parts[-1]) + 2
        text = "\n\n".join(parts)[:BIG_CHARS]
        big = {"id": f"big/{n:03d}", "text": text, "version": 1, "metadata": {"size": "near-limit"}}
        events.insert((n + 1) * len(small) // (BIG + 1), big)
    return events


async def loop_lag(bench: Bench) -> None:
    report = bench.report
    events = near_limit_documents()
    published = await bench.publish_topic(TOPIC, events)
    run = await bench.run("loop_lag", embedding_url=bench.instant.url, topic=TOPIC, docs=published.records)
    summary = next(
        (line for line in json_lines(bench.logs / "loop_lag-0.log") if line.get("event") == "event_loop"),
        None,
    )
    if summary is None or not summary.get("wakeups"):
        figure = "**no `event_loop` line in the worker's log**"
    else:
        figure = (
            f"lag p50 {summary['p50_ms']:.1f} ms, p99 {summary['p99_ms']:.1f} ms, worst "
            f"{summary['max_ms']:.1f} ms over {summary['wakeups']:,} wake-ups"
        )
    report.add(
        Check(
            "14. event loop lag, near-limit documents, instant embeddings",
            figure,
            note=f"`{TOPIC}`: {SMALL} documents of 1-4 kB with {BIG} of {BIG_CHARS:,} characters spread "
            f"among them ({published.payload_bytes / 1e6:.1f} MB), one worker, instant embeddings; its "
            "LoopMonitor asks to be woken every 0.1 s and notes how much later it is (the "
            f"`event_loop` line at exit); the run: {run.docs} records, {rate(run.chunks_per_s, 'chunks/s')}",
        )
    )
    await bench.drop_schema("bench_loop_lag")
