"""Kafka record -> validated :class:`DocumentEvent` (CONTRACT: Input events).

Validation lives here, at the edge; everything past this module trusts its input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson

from worker.errors import DecodeError, ValidationError

MAX_ID_BYTES: Final = 512
MAX_VERSION: Final = 2**63 - 1  # stored as bigint

Op = Literal["upsert", "delete"]


@dataclass(frozen=True, slots=True)
class DocumentEvent:
    doc_id: str
    op: Op
    text: str
    version: int | None
    metadata: dict[str, Any] | None
    tenant: str | None


def decode_event(key: bytes | None, value: bytes | None, *, max_text_bytes: int) -> DocumentEvent:
    """Decode and validate one record. Raises DecodeError or ValidationError with the reason."""
    key_id = _decode_key(key)
    if value is None:
        if key_id is None:
            raise ValidationError("tombstone without a key: no document to delete")
        _check_id(key_id, "the key of a tombstone")
        return DocumentEvent(key_id, "delete", "", None, None, None)
    if len(value) > max_text_bytes + 64 * 1024:
        raise ValidationError(f"record value is {len(value)} bytes, over MAX_TEXT_BYTES={max_text_bytes}")
    try:
        payload = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"value is not valid UTF-8 JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise ValidationError(f"value must be a JSON object, got {type(payload).__name__}")

    doc_id = payload.get("id")
    if not isinstance(doc_id, str):
        raise ValidationError("`id` must be a non-empty string")
    _check_id(doc_id, "`id`")
    if key_id is not None and key_id != doc_id:
        raise ValidationError("`id` does not equal the record key")

    op = payload.get("op", "upsert")
    if op not in ("upsert", "delete"):
        raise ValidationError(f"`op` must be 'upsert' or 'delete', got {op!r:.40}")

    version = payload.get("version")
    if version is not None and (isinstance(version, bool) or not isinstance(version, int)):
        raise ValidationError("`version` must be an integer")
    if version is not None and not 0 <= version <= MAX_VERSION:
        raise ValidationError("`version` must be between 0 and 2^63-1")

    metadata = payload.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise ValidationError("`metadata` must be a JSON object")
    if metadata is not None and _holds_nul(metadata):  # nor can jsonb (refused only at store)
        raise ValidationError("`metadata` must not contain NUL characters (\\u0000)")

    tenant = payload.get("tenant")
    if tenant is not None and not isinstance(tenant, str):
        raise ValidationError("`tenant` must be a string")
    if tenant is not None and "\x00" in tenant:
        raise ValidationError("`tenant` must not contain NUL characters")

    text = payload.get("text")
    if op == "delete":
        text = ""
    elif not isinstance(text, str):
        raise ValidationError("`text` must be a string for an upsert")
    elif len(text) > max_text_bytes or len(text.encode("utf-8", "surrogatepass")) > max_text_bytes:
        raise ValidationError(f"`text` is over MAX_TEXT_BYTES={max_text_bytes}")
    if "\x00" in text:  # PostgreSQL text cannot hold NUL
        raise ValidationError("`text` must not contain NUL characters")
    return DocumentEvent(doc_id, op, text, version, metadata, tenant)


def _holds_nul(value: Any) -> bool:
    """A NUL in any key or string of a decoded JSON value (PostgreSQL text and jsonb refuse it)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _check_id(doc_id: str, what: str) -> None:
    if not doc_id:
        raise ValidationError(f"{what} must be a non-empty string")
    if len(doc_id.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise ValidationError(f"{what} is longer than {MAX_ID_BYTES} bytes")
    if "\x00" in doc_id:  # PostgreSQL text cannot hold NUL
        raise ValidationError(f"{what} must not contain NUL characters")


def _decode_key(key: bytes | None) -> str | None:
    if key is None:
        return None
    try:
        return key.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError("record key is not valid UTF-8") from exc
