"""structlog set up once: one JSON object per line on stdout, context from contextvars."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

import orjson
import structlog
from structlog.tracebacks import ExceptionDictTransformer

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: str = "info", *, stream: object = None, secrets: tuple[str, ...] = ()) -> None:
    """JSON lines on ``stream``; any of ``secrets`` found in a log line is masked, whatever its source."""
    _hidden[:] = []
    for secret in secrets:
        hide(secret)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            _redact,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.BytesLoggerFactory(stream or sys.stdout.buffer),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    # aiokafka and asyncpg log through the standard library: keep their warnings, as JSON lines too.
    root = logging.getLogger()
    root.handlers[:] = [_ToStructlog()]
    root.setLevel(logging.WARNING)


# aiokafka's lines for a broker it cannot reach: the worker's own start-up line names the cause.
_CONNECTION = re.compile(
    r"Unable (to )?connect|Unable to bootstrap|Unable to update metadata|Connection .* closed"
)
_quiet = 0
# aiokafka's lines for a commit refused because the group is rebalancing: a routine part of a
# member joining or leaving, which the worker handles (commit_refused; what was not committed is
# processed again, idempotently). Written as warnings, so that an error means something.
_REBALANCING = re.compile(
    r"(OffsetCommit|Heartbeat) failed .*(IllegalGeneration|RebalanceInProgress|UnknownMemberId)"
)


@contextlib.contextmanager
def quiet_connection_errors() -> Iterator[None]:
    """While start-up waits for the broker and says so itself, leave aiokafka's lines about the
    same unreachable broker out, so that each attempt is reported once."""
    global _quiet
    _quiet += 1
    try:
        yield
    finally:
        _quiet -= 1


_hidden: list[str] = []  # the secrets masked in every line


def hide(secret: str) -> None:
    """Mask ``secret`` in every line from now on (a key read again from its file, say). Values
    shorter than 4 characters are not masked: they would mask ordinary text."""
    if len(secret) >= 4 and secret not in _hidden:
        _hidden.append(secret)


def _redact(_: object, __: str, event: MutableMapping[str, Any]) -> Mapping[str, Any]:
    if not _hidden:
        return event
    return {key: _clean(value) for key, value in event.items()}


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        for secret in _hidden:
            value = value.replace(secret, "**********")
        return value
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class _ToStructlog(logging.Handler):
    """Library lines as JSON lines; one line repeated within ``window`` seconds (a client retrying
    an unreachable broker) is written once, and the next one after it says how often it came."""

    def __init__(self, window: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._window, self._clock = window, clock
        self._seen: dict[tuple[str, str], tuple[float, int]] = {}  # -> (written at, repeats since)

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()[:2000]
        if _quiet and record.name.startswith("aiokafka") and _CONNECTION.search(message):
            return
        key, now = (record.name, message), self._clock()
        written, repeats = self._seen.get(key, (None, 0))
        if written is not None and now - written < self._window:
            self._seen[key] = (written, repeats + 1)
            return
        if len(self._seen) > 1000:
            self._seen.clear()
        self._seen[key] = (now, 0)
        extra = {"repeated": repeats} if repeats else {}
        level = record.levelno
        if record.name.startswith("aiokafka") and _REBALANCING.search(message):
            level = min(level, logging.WARNING)
        structlog.get_logger().log(level, "library_log", logger=record.name, message=message, **extra)


def traceparent(headers: object) -> tuple[str, str] | None:
    """The trace id and parent span id of a W3C ``traceparent`` header
    (version-traceid-parentid-flags), if any."""
    for key, value in headers or ():  # type: ignore[attr-defined]
        if key == "traceparent" and value:
            parts = bytes(value).decode("ascii", "replace").split("-")
            if len(parts) == 4 and len(parts[1]) == 32:
                return parts[1], parts[2]
    return None


def trace_id_from(headers: object) -> str | None:
    """The trace id of a W3C ``traceparent`` header, if any."""
    found = traceparent(headers)
    return found[0] if found is not None else None
