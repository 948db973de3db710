"""``ingest-worker produce FILE|-``: JSON-lines events to the topic, keyed by their ``id``.

A file is checked whole first, with the worker's own decoder, so that a bad line publishes
nothing; standard input is checked line by line as it streams. Every stop (the end, a bad line,
the broker, Ctrl-C) says how far it got: ``published N of M (through line K)``.
"""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from aiokafka.errors import KafkaConnectionError, KafkaError

from worker import logs
from worker.decode import decode_event
from worker.errors import RecordError, describe
from worker.kafka import bootstrap_error, make_producer, refusal, start_producer
from worker.settings import Settings

BOM = b"\xef\xbb\xbf"
ACK_EVERY = 1000  # sends awaited together


class BadLine(Exception):
    def __init__(self, number: int, reason: str) -> None:
        super().__init__(f"line {number}: {reason}")
        self.number = number


@dataclass
class Progress:
    total: int | None  # events in the file; None for standard input
    sent: int = 0  # acknowledged by the broker, every one of them at or before `through`
    through: int = 0  # the last line number of that unbroken acknowledged run
    pending: list[tuple[int, asyncio.Future[Any]]] = field(default_factory=list)

    def settle(self) -> None:
        """Count the pending sends the broker acknowledged, in order, up to the first that is not."""
        for number, future in self.pending:
            if not future.done() or future.cancelled() or future.exception() is not None:
                break
            self.sent += 1
            self.through = number
        self.pending.clear()

    def line(self) -> str:
        of = "" if self.total is None else f" of {self.total}"
        return f"published {self.sent}{of} (through line {self.through})"


def events(stream: BinaryIO, *, max_text_bytes: int) -> Iterator[tuple[int, bytes, bytes]]:
    """(line number, key, value) of each non-blank line; BadLine for one the worker would refuse."""
    for number, line in enumerate(stream, 1):
        if (event := _event(number, line, max_text_bytes)) is not None:
            yield event


async def _streamed(stream: BinaryIO, *, max_text_bytes: int) -> AsyncIterator[tuple[int, bytes, bytes]]:
    """:func:`events` of a pipe or terminal, read without blocking the event loop: the producer
    sends what came while the next line is awaited (a slow upstream, a person typing), and
    Ctrl-C finds every line before it sent."""
    if stat.S_ISREG(os.fstat(stream.fileno()).st_mode):  # a file given as `< file`: never waits
        for each in events(stream, max_text_bytes=max_text_bytes):
            yield each
        return
    limit = 4 * max_text_bytes + (1 << 20)  # JSON escapes and metadata around the text
    reader = asyncio.StreamReader(limit=limit)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stream)
    try:
        number = 0
        while True:
            number += 1
            try:
                line = await reader.readline()
            except ValueError:
                raise BadLine(number, f"longer than {limit} bytes") from None
            if not line:
                return
            if (event := _event(number, line, max_text_bytes)) is not None:
                yield event
    finally:
        transport.close()


def _event(number: int, line: bytes, max_text_bytes: int) -> tuple[int, bytes, bytes] | None:
    body = (line.removeprefix(BOM) if number == 1 else line).strip()
    if not body:
        return None
    try:
        event = decode_event(None, body, max_text_bytes=max_text_bytes)
    except RecordError as exc:
        raise BadLine(number, str(exc)) from exc
    return number, event.doc_id.encode("utf-8", "surrogatepass"), body


async def produce(settings: Settings, source: str) -> int:
    topic = settings.kafka_topic[0]
    path = Path(source)
    if source != "-" and (not path.exists() or path.is_dir()):  # noqa: ASYNC240 - before any I/O
        print(f"ingest-worker produce: error: {source} is not a file to read", file=sys.stderr)
        return 2
    total = None
    if source != "-":
        try:
            with path.open("rb") as whole:  # noqa: ASYNC230 - a check before anything is sent
                total = sum(1 for _ in events(whole, max_text_bytes=settings.max_text_bytes))
        except BadLine as exc:
            print(f"ingest-worker produce: error: {exc}; nothing published", file=sys.stderr)
            return 1
    progress = Progress(total)
    producer = make_producer(settings)
    try:
        with logs.quiet_connection_errors():  # the line below names the broker and why
            await start_producer(producer)
        stream = sys.stdin.buffer if source == "-" else path.open("rb")  # noqa: ASYNC230
        with stream:
            async for number, key, value in _streamed(stream, max_text_bytes=settings.max_text_bytes):
                progress.pending.append((number, await producer.send(topic, key=key, value=value)))
                if len(progress.pending) >= ACK_EVERY:
                    await asyncio.gather(*(f for _, f in progress.pending))
                    progress.settle()
            await asyncio.gather(*(f for _, f in progress.pending))
            progress.settle()
    except BadLine as exc:  # from standard input, after the lines before it went out
        await _stop(producer, progress)
        print(f"ingest-worker produce: error: {exc}; {progress.line()}", file=sys.stderr)
        return 1
    except KafkaError as exc:
        await _stop(producer, progress)
        refused = refusal(exc, settings)
        if refused is not None:
            raise refused from exc
        where = settings.kafka_bootstrap_servers
        if isinstance(getattr(exc, "cause", exc), KafkaConnectionError):  # aiokafka hides why
            exc = await bootstrap_error(settings) or exc
        why = describe(exc, 1000)
        print(f"ingest-worker produce: cannot publish to {where}: {why}; {progress.line()}", file=sys.stderr)
        return 1
    except (asyncio.CancelledError, KeyboardInterrupt):  # Ctrl-C
        await _stop(producer, progress)
        print(f"ingest-worker produce: interrupted; {progress.line()}", file=sys.stderr)
        raise
    await _stop(producer, progress)
    print(f"published {progress.sent} event{'' if progress.sent == 1 else 's'} to {topic}")
    return 0


async def _stop(producer: Any, progress: Progress) -> None:
    """Flush what was sent (so the count is what the broker holds), then count it."""
    await producer.stop()
    progress.settle()
