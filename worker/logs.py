"""structlog set up once: one JSON object per line on stdout, context from contextvars."""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog
from structlog.tracebacks import ExceptionDictTransformer

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure(level: str = "info", *, stream: object = None, secrets: tuple[str, ...] = ()) -> None:
    """JSON lines on ``stream``; any of ``secrets`` found in a log line is masked, whatever its source."""
    processors: list[Any] = [structlog.contextvars.merge_contextvars]
    hidden = tuple(secret for secret in secrets if len(secret) >= 4)
    if hidden:
        processors.append(_Redact(hidden))
    structlog.configure(
        processors=[
            *processors,
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


class _Redact:
    def __init__(self, secrets: tuple[str, ...]) -> None:
        self._secrets = secrets

    def __call__(self, _: object, __: str, event: dict[str, Any]) -> dict[str, Any]:
        return {key: self._clean(value) for key, value in event.items()}

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            for secret in self._secrets:
                value = value.replace(secret, "**********")
            return value
        if isinstance(value, dict):
            return {k: self._clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(v) for v in value]
        return value


class _ToStructlog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        log = structlog.get_logger()
        log.log(record.levelno, "library_log", logger=record.name, message=record.getMessage()[:2000])


def trace_id_from(headers: object) -> str | None:
    """The trace id of a W3C ``traceparent`` header (version-traceid-parentid-flags), if any."""
    for key, value in headers or ():  # type: ignore[attr-defined]
        if key == "traceparent" and value:
            parts = bytes(value).decode("ascii", "replace").split("-")
            if len(parts) == 4 and len(parts[1]) == 32:
                return parts[1]
    return None
