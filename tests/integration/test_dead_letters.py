"""Dead letters too large for the dead-letter topic (issue 8): sent without their value, never
taken for an outage, and passed over by replay.

The dead-letter topic is created beforehand with a small ``max.message.bytes``, as a real
cluster's default (about 1 MB) is small next to a large document. The source topic takes
records of 2 MB, so that one letter is also over the producer's own ``max_request_size``.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.contract import DLQ_HEADERS
from tests.integration.helpers import (
    PARTITIONS,
    Env,
    Event,
    assert_stored_state,
    committed_offsets,
    encode,
    end_offsets,
    expected_state,
    fresh_env,
    run_worker,
)
from tests.integration.services import Services
from tests.integration.test_failures import cli
from tests.integration.test_operations import read_dead_letters

pytestmark = pytest.mark.integration

DLQ_MAX_MESSAGE_BYTES = 20_000
SOURCE_MAX_MESSAGE_BYTES = 2_500_000
HUGE = 1_350_000  # over MAX_TEXT_BYTES (1 MiB) and over the producer's max_request_size (~1.3 MB)

Raw = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


async def create_topic(env: Env, name: str, partitions: int, max_message_bytes: int) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=env.stack.bootstrap)
    await admin.start()
    try:
        config = {"max.message.bytes": str(max_message_bytes)}
        response = await admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1, topic_configs=config)]
        )
    finally:
        await admin.close()
    assert [code for _, code, *_ in response.topic_errors] == [0], response


@pytest.fixture
async def big_env(stack: Services) -> Env:
    """A source topic that takes 2 MB records, and a dead-letter topic that takes 20 kB."""
    env = fresh_env(stack)
    await create_topic(env, env.topic, PARTITIONS, SOURCE_MAX_MESSAGE_BYTES)
    await create_topic(env, env.settings.dlq_topic, 1, DLQ_MAX_MESSAGE_BYTES)
    return env


async def publish(env: Env, records: list[Raw]) -> tuple[dict[TopicPartition, int], list[Any]]:
    """Publish in order; each partition's end offset, and each record's metadata."""
    producer = AIOKafkaProducer(
        bootstrap_servers=env.stack.bootstrap,
        acks="all",
        enable_idempotence=env.stack.producer_idempotence,
        max_request_size=SOURCE_MAX_MESSAGE_BYTES,
    )
    await producer.start()
    ends: dict[TopicPartition, int] = {}
    sent = []
    try:
        for key, value, headers in records:
            meta = await producer.send_and_wait(env.topic, key=key, value=value, headers=headers or None)
            ends[meta.topic_partition] = max(ends.get(meta.topic_partition, 0), meta.offset + 1)
            sent.append(meta)
    finally:
        await producer.stop()
    return ends, sent


def good_events(n: int) -> list[Event]:
    return [(f"g-{i}", {"id": f"g-{i}", "text": f"good document {i} stays small. " * 8}) for i in range(n)]


async def test_dead_letters_too_large_for_their_topic_go_without_their_value_and_partitions_go_on(
    big_env: Env,
) -> None:
    env = big_env
    good = good_events(18)
    origin = [("origin", b"test-suite")]
    bad: dict[str, Raw] = {
        # not JSON, 60 kB: the broker refuses the whole letter (topic max 20 kB); without its value it fits
        "garbage": (b"big-garbage", b"<" * 60_000, origin),
        # over MAX_TEXT_BYTES: the producer itself refuses the letter (over its max_request_size)
        "huge": (
            b"huge-doc",
            json.dumps({"id": "huge-doc", "text": "x" * HUGE}).encode(),
            origin,
        ),
        # headers alone over the topic's limit: only key and original headers left out makes it fit
        "headers": (b"big-headers", b"{not json", [("bulky", b"h" * 30_000)]),
    }
    records: list[Raw] = [(k, v, []) for k, v in encode(good[:6])]
    records += [bad["garbage"], *[(k, v, []) for k, v in encode(good[6:12])], bad["huge"], bad["headers"]]
    records += [(k, v, []) for k, v in encode(good[12:])]
    ends, sent = await publish(env, records)
    where = {name: sent[records.index(raw)] for name, raw in bad.items()}

    await run_worker(env, within=120)  # before the fix: the first letter never left, this timed out

    await assert_stored_state(env, expected_state(good))
    assert await committed_offsets(env, list(ends)) == ends, "every partition committed to its end"
    letters = await read_dead_letters(env, expected=len(bad) + 1, within=3)
    assert len(letters) == len(bad), "exactly one dead letter per bad record"
    found = {
        (int(h["dlq.original.partition"]), int(h["dlq.original.offset"])): (m, h)
        for m in letters
        for h in [{k: v.decode() for k, v in m.headers}]  # type: ignore[attr-defined]
    }
    for name, (key, value, _) in bad.items():
        message, h = found[(where[name].partition, where[name].offset)]
        assert set(h) >= DLQ_HEADERS | {"dlq.value.omitted", "dlq.value.size"}, name
        assert h["dlq.original.topic"] == env.topic
        assert h["dlq.error.stage"] == ("validate" if name == "huge" else "decode"), h["dlq.error.message"]
        assert message.value == b"", f"{name}: the value is left out, sent empty (not null: no tombstone)"
        assert (h["dlq.value.omitted"], h["dlq.value.size"]) == ("true", str(len(value or b""))), name
        if name == "headers":
            assert message.key is None
            assert (h["dlq.key.omitted"], h["dlq.key.size"], h["dlq.headers.omitted"]) == (
                "true",
                str(len(key or b"")),
                "true",
            )
            assert "bulky" not in h
        else:
            assert message.key == key, f"{name}: the key is kept"
            assert h["origin"] == "test-suite", f"{name}: the original headers are kept"
            assert "dlq.key.omitted" not in h


async def test_replay_passes_over_a_letter_without_its_value_and_moves_the_rest(
    big_env: Env, faults: Any
) -> None:
    env = big_env
    faults(reject_marker="FIXED-LATER")
    good = good_events(4)
    rejected: Event = ("fixed", {"id": "fixed", "text": "FIXED-LATER: refused by the embedding API for now."})
    garbage: Raw = (b"big-garbage", b"<" * 60_000, [])
    ends, sent = await publish(env, [*[(k, v, []) for k, v in encode([*good, rejected])], garbage])
    await run_worker(env)
    assert len(await read_dead_letters(env, expected=2)) == 2

    faults(reject_marker=None)  # the embedding API's cause is fixed
    replayed = await asyncio.to_thread(cli, env, "replay")
    assert replayed.returncode == 0, replayed.stderr
    assert "moved 1," in replayed.stdout
    assert "passed over 1 dead letter whose value was left out" in replayed.stdout
    original = f"the original is {env.topic}/{sent[-1].partition}/{sent[-1].offset}"
    assert any(original in line for line in replayed.stdout.splitlines()), replayed.stdout

    after = await end_offsets(env)
    assert sum(after.values()) == sum(ends.values()) + 1, "only the letter with its value went back"
    await run_worker(env)
    await assert_stored_state(env, expected_state([*good, rejected]))
