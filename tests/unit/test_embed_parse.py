"""parse_embeddings (the OpenAI answer) and dead_letter_headers (CONTRACT: Dead-letter records)."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

import numpy as np
import orjson
import pytest

from tests.contract import DLQ_HEADERS
from worker.dlq import DeadLetter, dead_letter_headers
from worker.embed import parse_embeddings
from worker.errors import EmbeddingProtocolError, InputRejected, RecordError, ValidationError
from worker.types import Record


def answer(*items: tuple[int, Any]) -> bytes:
    return orjson.dumps(
        {
            "object": "list",
            "model": "m",
            "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in items],
            "usage": {"prompt_tokens": 1, "total_tokens": 1},
        }
    )


def b64(values: list[float]) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


def as_lists(vectors: list[Any]) -> list[list[float]]:
    return [v.tolist() for v in vectors]


def test_float_lists() -> None:
    vectors = parse_embeddings(answer((0, [1.0, 2.0, 3.0]), (1, [-0.5, 0, 4])), 2, 3)
    assert as_lists(vectors) == [[1.0, 2.0, 3.0], [-0.5, 0.0, 4.0]]
    assert all(v.dtype == np.float32 for v in vectors)


def test_base64_little_endian_float32() -> None:
    vectors = parse_embeddings(answer((0, b64([0.25, -1.5])), (1, b64([3.0, 1e-3]))), 2, 2)
    assert as_lists(vectors) == [[0.25, -1.5], [3.0, np.float32(1e-3).item()]]
    assert all(v.dtype == np.float32 for v in vectors)


def test_base64_vectors_of_a_multiple_of_3_dimensions_are_decoded_together_in_index_order() -> None:
    rows = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)
    order = [3, 0, 4, 1, 2]
    vectors = parse_embeddings(answer(*((i, b64(rows[i].tolist())) for i in order)), 5, 6)
    assert as_lists(vectors) == rows.tolist()
    assert all(v.dtype == np.float32 and v.shape == (6,) for v in vectors)


@pytest.mark.parametrize(
    "bad",
    [
        b64([1.0] * 5),  # too short: alone it decodes to the wrong dimensions
        b64([1.0] * 6)[:12] + "!!!!" + b64([1.0] * 6)[16:],  # not base64: alone, leniently, 21 bytes
    ],
)
def test_one_vector_that_cannot_be_decoded_with_the_others_is_decoded_alone(bad: str) -> None:
    payload = answer((0, b64([2.0] * 6)), (1, bad))
    with pytest.raises(EmbeddingProtocolError, match=r"EMBEDDING_DIMENSIONS is 6|multiple of element size"):
        parse_embeddings(payload, 2, 6)


def test_answers_are_put_back_in_input_order_by_index() -> None:
    vectors = parse_embeddings(answer((2, [2.0]), (0, b64([0.0])), (1, [1.0])), 3, 1)
    assert as_lists(vectors) == [[0.0], [1.0], [2.0]]


def test_empty_request_empty_answer() -> None:
    assert parse_embeddings(answer(), 0, 4) == []


@pytest.mark.parametrize(
    "payload",
    [
        answer((0, [1.0, 2.0])),  # item 1 missing
        answer((1, [1.0, 2.0]), (1, [3.0, 4.0])),  # item 0 missing, 1 twice
        answer(),
    ],
)
def test_missing_index_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(EmbeddingProtocolError, match=r"index [01]"):
        parse_embeddings(payload, 2, 2)


@pytest.mark.parametrize(
    "payload",
    [answer((0, [1.0, 2.0, 3.0])), answer((0, b64([1.0]))), answer((0, []))],
)
def test_wrong_dimension_names_the_setting(payload: bytes) -> None:
    with pytest.raises(EmbeddingProtocolError, match="EMBEDDING_DIMENSIONS is 2"):
        parse_embeddings(payload, 1, 2)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"<html>502 Bad Gateway</html>",
        b"[]",
        b"{}",
        b'{"data": null}',
        b'{"data": [1, 2]}',
        b'{"data": ["x"]}',
        b'{"data": [{"index": 0}]}',
        b'{"data": [{"embedding": [1.0, 2.0]}]}',
        b'{"data": [{"index": "0", "embedding": [1.0, 2.0]}]}',
        b'{"data": [{"index": 0.0, "embedding": [1.0, 2.0]}]}',
        b'{"data": [{"index": 5, "embedding": [1.0, 2.0]}]}',  # more items than inputs
        b'{"data": [{"index": 0, "embedding": ["a", "b"]}]}',
        b'{"data": [{"index": 0, "embedding": {"x": 1}}]}',
        b'{"data": [{"index": 0, "embedding": [[1.0, 2.0]]}]}',  # nested
        b'{"data": [{"index": 0, "embedding": "not base64!"}]}',
        b'{"data": [{"index": 0, "embedding": "AAAA="}]}',  # bad padding
        b'{"data": [{"index": 0, "embedding": "AAA="}]}',  # 2 bytes: not whole float32s
    ],
)
def test_garbage_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(EmbeddingProtocolError):
        parse_embeddings(payload, 1, 2)


@pytest.mark.parametrize(
    "payload", [b'{"data": [{"index": 0, "embedding": 1.5}]}', b'{"data": [{"index": 0, "embedding": null}]}']
)
def test_scalar_embedding_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(EmbeddingProtocolError):
        parse_embeddings(payload, 1, 2)


def test_negative_index_is_a_protocol_error() -> None:
    with pytest.raises(EmbeddingProtocolError):
        parse_embeddings(answer((0, [1.0, 2.0]), (-1, [3.0, 4.0])), 2, 2)


# -- dead-letter headers --------------------------------------------------------------------


def letter(
    error: RecordError, headers: list[tuple[str, bytes]] | None = None, attempts: int = 1
) -> DeadLetter:
    return DeadLetter(
        Record("documents", 3, 1234567, b"doc-1", b'{"id": "doc-1"}', headers or []), error, attempts
    )


def test_every_contract_header_with_its_value() -> None:
    failed_at = dt.datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC)
    headers = dead_letter_headers(
        letter(ValidationError("`text` must be a string"), attempts=3), failed_at=failed_at
    )
    ours = {k: v for k, v in headers if k.startswith("dlq.")}
    assert set(ours) == DLQ_HEADERS
    assert len(headers) == len(DLQ_HEADERS), "each header exactly once"
    assert all(isinstance(v, bytes) for _, v in headers)
    assert {k: v.decode("utf-8") for k, v in ours.items()} == {
        "dlq.original.topic": "documents",
        "dlq.original.partition": "3",
        "dlq.original.offset": "1234567",
        "dlq.error.stage": "validate",
        "dlq.error.class": "ValidationError",
        "dlq.error.message": "`text` must be a string",
        "dlq.attempts": "3",
        "dlq.failed.at": "2025-01-02T03:04:05.678Z",
    }


def test_stage_and_class_follow_the_error() -> None:
    headers = dict(dead_letter_headers(letter(InputRejected("embedding API answered 400"))))
    assert headers["dlq.error.stage"] == b"embed"
    assert headers["dlq.error.class"] == b"InputRejected"


def test_failed_at_defaults_to_now_in_utc() -> None:
    before = dt.datetime.now(dt.UTC)
    stamp = dict(dead_letter_headers(letter(ValidationError("x"))))["dlq.failed.at"].decode()
    after = dt.datetime.now(dt.UTC)
    parsed = dt.datetime.fromisoformat(stamp)
    assert stamp.endswith("Z")
    assert parsed.utcoffset() == dt.timedelta(0)
    assert before - dt.timedelta(milliseconds=1) <= parsed <= after


def test_original_headers_are_kept_first_and_unchanged() -> None:
    original = [
        ("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        ("binary", b"\x00\xff\xfe"),
        ("dup", b"1"),
        ("dup", b"2"),
        ("dlq.replay.count", b"2"),
    ]
    headers = dead_letter_headers(letter(ValidationError("x"), original))
    assert headers[: len(original)] == original
    assert {k for k, _ in headers[len(original) :]} == DLQ_HEADERS


def test_a_second_failure_replaces_the_first_ones_headers() -> None:
    first = dead_letter_headers(
        letter(ValidationError("first")), failed_at=dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    )
    second = dead_letter_headers(letter(InputRejected("second"), [*first, ("dlq.replay.count", b"1")]))
    names = [k for k, _ in second]
    assert sorted(names) == sorted([*DLQ_HEADERS, "dlq.replay.count"]), "no header twice"
    values = dict(second)
    assert values["dlq.error.message"] == b"second"
    assert values["dlq.replay.count"] == b"1"


def test_message_is_utf8_and_bounded() -> None:
    message = "é😀" * 3000
    value = dict(dead_letter_headers(letter(ValidationError(message))))["dlq.error.message"]
    assert value.decode("utf-8") == message[:2000]
