"""The benchmark corpus: deterministic documents recombined from the shipped sample, and publishing it.

Each document is 1-4 kB of text: the paragraphs of one sample document (its title leads),
followed by paragraphs drawn from others, cut at a paragraph (else word) boundary. The same seed
and count always give the same documents; ids are unique per prefix.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer, TopicPartition

MIN_CHARS = 1000
MAX_CHARS = 4000
TENANTS = ("acme", "globex", "initech", "umbrella")
SEND_WINDOW = 2000  # records in flight while publishing


@dataclass(frozen=True, slots=True)
class Published:
    topic: str
    records: int
    payload_bytes: int
    ends: dict[TopicPartition, int]  # next offset of each partition, as the broker acknowledged
    seconds: float


def _sample() -> list[dict[str, Any]]:
    path = resources.files("worker.dev").joinpath("corpus.jsonl")
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def _fit(paragraphs: Sequence[str], target: int) -> str:
    """Join paragraphs up to ``target`` characters, cutting the last one at a word boundary."""
    out: list[str] = []
    length = 0
    for paragraph in paragraphs:
        room = target - length - (2 if out else 0)
        if room <= 0:
            break
        if len(paragraph) > room:
            cut = paragraph.rfind(" ", 0, room)
            if cut < room // 2:
                cut = room
            paragraph = paragraph[:cut].rstrip()
        out.append(paragraph)
        length += len(paragraph) + (2 if len(out) > 1 else 0)
    return "\n\n".join(out)


def make_documents(count: int, *, seed: int = 20240601, prefix: str = "bench") -> list[dict[str, Any]]:
    """``count`` upsert events with unique ids ``{prefix}/{n:07d}``, 1-4 kB of text each."""
    rng = random.Random(seed)
    sample = _sample()
    pool = [p.strip() for doc in sample for p in doc["text"].split("\n\n") if len(p.strip()) >= 40]
    events: list[dict[str, Any]] = []
    for n in range(count):
        lead = sample[rng.randrange(len(sample))]
        target = rng.randint(MIN_CHARS, MAX_CHARS)
        paragraphs = [p.strip() for p in lead["text"].split("\n\n") if p.strip()]
        while sum(len(p) + 2 for p in paragraphs) < target + 200:
            paragraphs.append(pool[rng.randrange(len(pool))])
        text = _fit(paragraphs, target)
        for _ in range(10):  # cut at a word just short of the minimum: pad with a little more prose
            if len(text) >= MIN_CHARS:
                break
            text = _fit([text, *(pool[rng.randrange(len(pool))] for _ in range(8))], MIN_CHARS + 200)
        title = (lead.get("metadata") or {}).get("title", lead["id"])
        events.append(
            {
                "id": f"{prefix}/{n:07d}",
                "text": text,
                "version": 1,
                "metadata": {"title": title, "source": lead["id"], "lang": "en"},
                "tenant": TENANTS[n % len(TENANTS)],
            }
        )
    return events


async def publish(
    bootstrap: str,
    topic: str,
    events: Sequence[dict[str, Any]],
    *,
    partitions: int,
    idempotence: bool = False,
    within: float = 300.0,
) -> Published:
    """Publish keyed by id, ``SEND_WINDOW`` records in flight; ends come from the acknowledgements.

    Each document has one event, so it may go to any partition: they are dealt round-robin, so
    every partition holds the same share and the scaling item measures the worker, not how the
    key hash happened to spread 2,000 ids over 8 partitions (up to 53/47 for two processes).
    (The embedded broker answers ListOffsets wrongly, so the producer's own answers are the truth.)
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks="all",
        enable_idempotence=idempotence,
        linger_ms=10,
        max_batch_size=512 * 1024,
        max_request_size=8 * 1024 * 1024,
    )
    await producer.start()
    ends: dict[TopicPartition, int] = {}
    started = time.perf_counter()
    try:
        async with asyncio.timeout(within):
            size = await _send_all(producer, topic, events, ends, partitions)
    finally:
        await producer.stop()
    return Published(topic, len(events), size, ends, time.perf_counter() - started)


async def _send_all(
    producer: AIOKafkaProducer,
    topic: str,
    events: Sequence[dict[str, Any]],
    ends: dict[TopicPartition, int],
    partitions: int,
) -> int:
    """Send in windows of ``SEND_WINDOW``; note each partition's next offset; return the bytes sent."""
    size = 0
    for first in range(0, len(events), SEND_WINDOW):
        futures = []
        for index, event in enumerate(events[first : first + SEND_WINDOW], first):
            value = orjson.dumps(event)
            size += len(value)
            partition = index % partitions
            futures.append(
                await producer.send(topic, key=event["id"].encode(), value=value, partition=partition)
            )
        for meta in await asyncio.gather(*futures):
            tp = TopicPartition(topic, meta.partition)
            ends[tp] = max(ends.get(tp, 0), meta.offset + 1)
    return size
