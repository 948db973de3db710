"""decode_event against every rule of CONTRACT "Input events"."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from worker.decode import DocumentEvent, decode_event
from worker.errors import DecodeError, RecordError, ValidationError

MAX_TEXT = 1000


def decode(value: Any, key: bytes | None = b"doc-1", *, max_text_bytes: int = MAX_TEXT) -> DocumentEvent:
    raw = value if isinstance(value, bytes) or value is None else orjson.dumps(value)
    return decode_event(key, raw, max_text_bytes=max_text_bytes)


def refused(value: Any, key: bytes | None = b"doc-1", *, max_text_bytes: int = MAX_TEXT) -> RecordError:
    with pytest.raises(RecordError) as info:
        decode(value, key, max_text_bytes=max_text_bytes)
    return info.value


def assert_invalid(
    value: Any, key: bytes | None = b"doc-1", *, match: str, max_text_bytes: int = MAX_TEXT
) -> None:
    error = refused(value, key, max_text_bytes=max_text_bytes)
    assert type(error) is ValidationError, f"{type(error).__name__}: {error}"
    assert error.stage == "validate"
    assert match in str(error)


def assert_undecodable(value: Any, key: bytes | None = b"doc-1") -> None:
    error = refused(value, key)
    assert type(error) is DecodeError, f"{type(error).__name__}: {error}"
    assert error.stage == "decode"


# -- what is accepted --------------------------------------------------------------------


def test_full_upsert() -> None:
    event = decode(
        {
            "id": "doc-1",
            "op": "upsert",
            "text": "héllo 😀",
            "version": 7,
            "metadata": {"lang": "fr", "tags": [1, 2]},
            "tenant": "acme",
        }
    )
    assert event == DocumentEvent("doc-1", "upsert", "héllo 😀", 7, {"lang": "fr", "tags": [1, 2]}, "acme")


def test_minimal_upsert_defaults() -> None:
    assert decode({"id": "doc-1", "text": ""}) == DocumentEvent("doc-1", "upsert", "", None, None, None)


def test_without_key_the_id_names_the_document() -> None:
    assert decode({"id": "other", "text": "t"}, key=None).doc_id == "other"


def test_delete_needs_no_text_and_drops_any_given() -> None:
    assert decode({"id": "doc-1", "op": "delete", "version": 3}) == DocumentEvent(
        "doc-1", "delete", "", 3, None, None
    )
    assert decode({"id": "doc-1", "op": "delete", "text": 5}).text == ""


def test_tombstone_with_key_deletes_that_document() -> None:
    assert decode(None, key="dóc/1".encode()) == DocumentEvent("dóc/1", "delete", "", None, None, None)


@pytest.mark.parametrize("version", [0, 1, 2**63 - 1])
def test_version_bounds_accepted(version: int) -> None:
    assert decode({"id": "doc-1", "text": "t", "version": version}).version == version


def test_null_optionals_are_absent() -> None:
    event = decode({"id": "doc-1", "text": "t", "version": None, "metadata": None, "tenant": None})
    assert (event.version, event.metadata, event.tenant) == (None, None, None)


def test_id_of_exactly_512_bytes_is_accepted() -> None:
    doc_id = "é" * 256  # 512 bytes
    assert decode({"id": doc_id, "text": "t"}, key=doc_id.encode()).doc_id == doc_id


def test_text_of_exactly_max_bytes_is_accepted() -> None:
    text = "é" * (MAX_TEXT // 2)
    assert decode({"id": "doc-1", "text": text}).text == text


# -- decode stage --------------------------------------------------------------------------


def test_key_not_utf8_is_a_decode_error() -> None:
    assert_undecodable({"id": "doc-1", "text": "t"}, key=b"\xff\xfe")


def test_tombstone_with_key_not_utf8_is_a_decode_error() -> None:
    assert_undecodable(None, key=b"\xc3\x28")


@pytest.mark.parametrize("value", [b"", b"not json", b"{", b'{"id": "doc-1",}', b"NaN", b"{'id': 'doc-1'}"])
def test_not_json_is_a_decode_error(value: bytes) -> None:
    assert_undecodable(value)


@pytest.mark.parametrize(
    "value",
    [
        b'{"id": "doc-1", "text": "\xff"}',  # a lone continuation byte
        b'{"id": "doc-1", "text": "\xc0\xaf"}',  # an overlong encoding of "/"
        b'{"id": "doc-1", "text": "\xed\xa0\x80"}',  # an encoded surrogate (CESU-8)
        '{"id": "doc-1", "text": "é"}'.encode("latin-1"),
    ],
)
def test_value_not_utf8_is_a_decode_error(value: bytes) -> None:
    assert_undecodable(value)


# -- validate stage ------------------------------------------------------------------------


def test_tombstone_without_key_is_invalid() -> None:
    assert_invalid(None, key=None, match="tombstone")


@pytest.mark.parametrize(
    ("value", "kind"),
    [([], "list"), ("doc", "str"), (42, "int"), (1.5, "float"), (None, "NoneType"), (True, "bool")],
)
def test_json_that_is_not_an_object_is_invalid(value: Any, kind: str) -> None:
    assert_invalid(orjson.dumps(value), match=kind)


@pytest.mark.parametrize(
    "payload",
    [
        {"text": "t"},
        {"id": "", "text": "t"},
        {"id": None, "text": "t"},
        {"id": 5, "text": "t"},
        {"id": ["doc-1"], "text": "t"},
    ],
)
def test_missing_empty_or_non_string_id_is_invalid(payload: dict[str, Any]) -> None:
    assert_invalid(payload, key=None, match="`id`")


def test_id_over_512_bytes_is_invalid_counting_bytes_not_characters() -> None:
    doc_id = "é" * 257  # 257 characters, 514 bytes
    assert_invalid({"id": doc_id, "text": "t"}, key=doc_id.encode(), match="512 bytes")
    assert_invalid({"id": "x" * 513, "text": "t"}, key=None, match="512 bytes")


def test_id_differing_from_key_is_invalid() -> None:
    assert_invalid({"id": "doc-2", "text": "t"}, key=b"doc-1", match="key")


@pytest.mark.parametrize("op", ["UPSERT", "insert", "", None, 1, ["delete"]])
def test_unknown_op_is_invalid(op: Any) -> None:
    assert_invalid({"id": "doc-1", "op": op, "text": "t"}, match="`op`")


@pytest.mark.parametrize("version", [-1, 1.0, 2.5, True, False, "3", [3], {"v": 3}, 2**63, 2**64 - 1])
def test_bad_version_is_invalid(version: Any) -> None:
    assert_invalid({"id": "doc-1", "text": "t", "version": version}, match="`version`")


def test_version_beyond_64_bits_is_refused() -> None:
    # orjson reads integers past 64 bits as floats: still a `version` error, never accepted.
    assert_invalid(b'{"id": "doc-1", "text": "t", "version": 100000000000000000000000}', match="`version`")


@pytest.mark.parametrize("metadata", [[], "m", 1, True])
def test_metadata_not_an_object_is_invalid(metadata: Any) -> None:
    assert_invalid({"id": "doc-1", "text": "t", "metadata": metadata}, match="`metadata`")


@pytest.mark.parametrize("tenant", [1, ["acme"], {"name": "acme"}, False])
def test_tenant_not_a_string_is_invalid(tenant: Any) -> None:
    assert_invalid({"id": "doc-1", "text": "t", "tenant": tenant}, match="`tenant`")


@pytest.mark.parametrize(
    "payload", [{"id": "doc-1"}, {"id": "doc-1", "op": "upsert"}, {"id": "doc-1", "text": None}]
)
def test_upsert_without_text_is_invalid(payload: dict[str, Any]) -> None:
    assert_invalid(payload, match="`text`")


@pytest.mark.parametrize("text", [1, ["t"], {"t": 1}, True])
def test_text_not_a_string_is_invalid(text: Any) -> None:
    assert_invalid({"id": "doc-1", "text": text}, match="`text`")


def test_text_over_max_bytes_is_invalid_counting_bytes() -> None:
    assert_invalid({"id": "doc-1", "text": "x" * (MAX_TEXT + 1)}, match="MAX_TEXT_BYTES")
    # 501 characters but 1002 bytes.
    assert_invalid({"id": "doc-1", "text": "é" * (MAX_TEXT // 2 + 1)}, match="MAX_TEXT_BYTES")


def test_record_far_over_max_bytes_is_refused_before_parsing() -> None:
    value = b'{"id": "doc-1", "text": "' + b"x" * (MAX_TEXT + 70 * 1024) + b'"'  # not even valid JSON
    assert_invalid(value, match="MAX_TEXT_BYTES")


@pytest.mark.parametrize(
    ("payload", "key"), [({"id": "doc-1", "text": "a\x00b"}, b"doc-1"), ({"id": "d\x00c", "text": "t"}, None)]
)
def test_nul_in_text_or_id_is_invalid(payload: dict[str, Any], key: bytes | None) -> None:
    assert_invalid(payload, key=key, match="NUL")


@pytest.mark.parametrize(
    "extra",
    [
        {"metadata": {"title": "a\x00b"}},
        {"metadata": {"k\x00": 1}},
        {"metadata": {"nested": [1, {"deep": ["x", "\x00"]}]}},
        {"tenant": "acme\x00"},
    ],
    ids=["metadata-value", "metadata-key", "metadata-nested", "tenant"],
)
def test_nul_in_metadata_or_tenant_is_invalid(extra: dict[str, Any]) -> None:
    # PostgreSQL's jsonb and text refuse NUL: caught here, before embeddings are bought for it.
    assert_invalid({"id": "doc-1", "text": "t", **extra}, match="NUL")


def test_metadata_without_nul_is_kept_whole() -> None:
    metadata = {"title": "x", "tags": ["a", "b"], "n": 1, "nested": {"ok": None}}
    event = decode_event(
        b"doc-1", orjson.dumps({"id": "doc-1", "text": "t", "metadata": metadata}), max_text_bytes=MAX_TEXT
    )
    assert event.metadata == metadata


@pytest.mark.parametrize("key", [b"", b"a\x00b", b"k" * 513], ids=["empty", "nul", "513-bytes"])
def test_tombstone_key_obeys_the_id_rules(key: bytes) -> None:
    # The key becomes the document id, so it must be a valid one (a NUL id fails the whole batch in Postgres).
    assert_invalid(None, key=key, match="")
