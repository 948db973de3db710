"""Log lines: library lines (aiokafka, asyncpg) once, not once per retry."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import orjson
import pytest

from worker import logs


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def lines() -> Iterator[io.BytesIO]:
    stream = io.BytesIO()
    logs.configure("info", stream=stream)
    yield stream
    logs.configure("info")


def written(stream: io.BytesIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in stream.getvalue().splitlines()]


def test_a_library_line_repeated_within_the_window_is_written_once_then_counted(lines: io.BytesIO) -> None:
    clock = Clock()
    logging.getLogger().handlers[:] = [logs._ToStructlog(window=60, clock=clock)]
    kafka = logging.getLogger("aiokafka.conn")
    for _ in range(5):
        kafka.error('Unable connect to "broker:9092": [Errno 111] Connection refused')
        clock.now += 1
    logging.getLogger("asyncpg").warning("another line")
    clock.now += 60
    kafka.error('Unable connect to "broker:9092": [Errno 111] Connection refused')
    got = [(e["logger"], e.get("repeated")) for e in written(lines)]
    assert got == [("aiokafka.conn", None), ("asyncpg", None), ("aiokafka.conn", 4)]


def test_while_start_up_reports_the_broker_itself_aiokafkas_connection_lines_are_left_out(
    lines: io.BytesIO,
) -> None:
    kafka = logging.getLogger("aiokafka")
    with logs.quiet_connection_errors():
        kafka.error('Unable connect to "broker:9092": [Errno 111] Connection refused')
        kafka.error("Unable to update metadata from [1]")
        kafka.error("Heartbeat failed for group g: something else")
    kafka.error('Unable connect to "broker:9092": [Errno 111] Connection refused')
    assert [e["message"] for e in written(lines)] == [
        "Heartbeat failed for group g: something else",
        'Unable connect to "broker:9092": [Errno 111] Connection refused',
    ]


def test_a_commit_refused_by_a_rebalance_is_a_warning_not_an_error(lines: io.BytesIO) -> None:
    coordinator = logging.getLogger("aiokafka.consumer.group_coordinator")
    coordinator.error(
        "OffsetCommit failed for group g due to group error ([Error 22] IllegalGenerationError: g), "
        "will rejoin"
    )
    coordinator.error("OffsetCommit failed for group g due to group error ([Error 30] InvalidGroupIdError)")
    assert [e["level"] for e in written(lines)] == ["warning", "error"]
