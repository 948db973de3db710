"""`verify`: clean on what a worker stored from a mixed stream; each kind of damage, planted by
hand, found by its check and named by document; a database down or not migrated in one line."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.integration.helpers import (
    Env,
    Event,
    assert_stored_state,
    cli,
    connect,
    expected_state,
    one_line_error,
    produce,
    produce_raw,
    run_worker,
)
from tests.integration.test_end_to_end import LOREM, mixed_stream
from worker.verify import STORED_CHECKS, TOPIC_CHECKS

pytestmark = pytest.mark.integration


async def filled(env: Env) -> None:
    """What a worker stores from the mixed stream: inserts, newer and stale versions, deletes by
    tombstone and by op, unversioned documents, non-ASCII text, multi-chunk documents, and a
    document of nothing but (Unicode) whitespace, stored without chunks."""
    events = [*mixed_stream(), ("blank", {"id": "blank", "text": " \n\u3000\xa0\t "})]
    await produce(env, events)
    await run_worker(env)
    await assert_stored_state(env, expected_state(events))


def verified(env: Env, *args: str) -> tuple[int, dict[str, Any]]:
    result = cli(env, "verify", "--json", *args)
    assert result.returncode in (0, 1), result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def failing(report: dict[str, Any]) -> dict[str, list[str]]:
    return {name: check["examples"] for name, check in report["checks"].items() if check["problems"]}


async def test_verify_is_clean_on_what_a_worker_stored(env: Env) -> None:
    await filled(env)
    started = time.perf_counter()
    plain = cli(env, "verify")
    seconds = time.perf_counter() - started
    assert plain.returncode == 0, plain.stdout + plain.stderr
    lines = plain.stdout.splitlines()
    assert [line.split()[0] for line in lines[: len(STORED_CHECKS)]] == list(STORED_CHECKS)
    assert all(line.split()[-1] == "ok" for line in lines[: len(STORED_CHECKS)]), plain.stdout
    assert lines[-1].startswith(f"clean: {len(STORED_CHECKS)} checks passed"), plain.stdout
    print(f"verify on the mixed stream's database: {seconds:.2f}s (process included)")

    code, report = verified(env)
    assert (code, report["clean"], failing(report)) == (0, True, {})
    assert set(report["checks"]) == set(STORED_CHECKS)

    with_topic = cli(env, "verify", "--topic")
    assert with_topic.returncode == 0, with_topic.stdout + with_topic.stderr
    assert f"topic {env.topic}: 3 partitions read to their end offsets" in with_topic.stdout
    code, report = verified(env, "--topic", env.topic)
    assert (code, report["clean"], failing(report)) == (0, True, {})
    assert set(report["checks"]) == set(STORED_CHECKS) | set(TOPIC_CHECKS)


async def _fk(env: Env) -> str:
    conn = await connect(env)
    try:
        return str(
            await conn.fetchval(
                "SELECT conname FROM pg_constraint WHERE conrelid = $1::regclass AND contype = 'f'",
                f"{env.schema}.chunks_g1",
            )
        )
    finally:
        await conn.close()


# Each kind of damage: the statements that plant it ({s}: the schema), whether verify reads the
# topic, and the checks that must fail, each naming its document.
DAMAGE: dict[str, tuple[list[str], bool, dict[str, str]]] = {
    "missing chunk": (
        ["DELETE FROM {s}.chunks WHERE doc_id = 'doc-8' AND chunk_index = 1"],
        False,
        {"chunks_contiguous": "doc-8"},
    ),
    # The text is kept: no chunk count to compare with (a generation's own), so the last chunk must
    # reach the text's end.
    "missing last chunk": (
        [
            "DELETE FROM {s}.chunks WHERE doc_id = 'doc-8' AND chunk_index = "
            "(SELECT max(chunk_index) FROM {s}.chunks WHERE doc_id = 'doc-8')"
        ],
        False,
        {"chunks_contiguous": "doc-8"},
    ),
    "content not matching its hash": (
        ["UPDATE {s}.chunks SET content_sha256 = sha256('x') WHERE doc_id = 'doc-10' AND chunk_index = 0"],
        False,
        {"chunk_hashes": "doc-10"},
    ),
    "offsets not matching the text": (
        [
            "UPDATE {s}.chunks SET char_start = char_start + 1, char_end = char_end + 1 "
            "WHERE doc_id = 'intl-2' AND chunk_index = 0"
        ],
        False,
        {"chunk_offsets": "intl-2"},
    ),
    "document hash not matching its text": (
        ["UPDATE {s}.documents SET content_sha256 = sha256('x') WHERE id = 'doc-11'"],
        False,
        {"document_hashes": "doc-11"},
    ),
    # The column's typmod refuses another dimension: the column loses it (its HNSW index, which
    # needs it, goes first), then one row is cut to 100 dimensions.
    "wrong embedding dimension": (
        [
            "DROP INDEX {s}.chunks_g1_embedding_hnsw_idx",
            "DROP VIEW {s}.chunks",  # a column a view shows cannot change type
            "ALTER TABLE {s}.chunks_g1 ALTER COLUMN embedding TYPE vector USING embedding::vector",
            "CREATE VIEW {s}.chunks AS SELECT * FROM {s}.chunks_g1",
            "UPDATE {s}.chunks SET embedding = ((embedding::real[])[1:100])::vector WHERE doc_id = 'doc-13'",
        ],
        False,
        {"embedding_dimensions": "doc-13"},
    ),
    "another model's chunks": (
        ["UPDATE {s}.chunks SET model = 'other-model' WHERE doc_id = 'doc-14' AND chunk_index = 0"],
        False,
        {"embedding_model": "doc-14"},
    ),
    "orphan chunk": (
        [
            "ALTER TABLE {s}.chunks_g1 DROP CONSTRAINT {fk}",
            "INSERT INTO {s}.chunks SELECT 'nobody', chunk_index, content, embedding, char_start, char_end, "
            "model, content_sha256 FROM {s}.chunks WHERE doc_id = 'doc-8'",
        ],
        False,
        {"unknown_documents": "nobody"},
    ),
    "chunks of a deleted document": (
        [
            "UPDATE {s}.documents SET deleted = true, chunk_count = 0, text = NULL, content_sha256 = NULL "
            "WHERE id = 'doc-16'"
        ],
        False,
        {"deleted_documents": "doc-16"},
    ),
    "a live document without its chunks": (
        [  # and chunk_count 0 too: its text alone says it should have chunks
            "DELETE FROM {s}.chunks WHERE doc_id = 'doc-17'",
            "UPDATE {s}.documents SET chunk_count = 0 WHERE id = 'doc-17'",
        ],
        False,
        {"unchunked_documents": "doc-17"},
    ),
    "a stored version older than the topic's": (
        ["UPDATE {s}.documents SET version = 1 WHERE id = 'doc-0'"],
        True,
        {"topic_version": "doc-0"},
    ),
    # The text (and its hash) of version 1 under version 2's row and chunks.
    "a stored text older than the topic's": (
        [
            "UPDATE {s}.documents SET text = $1, content_sha256 = sha256(convert_to($1, 'UTF8')) "
            "WHERE id = 'doc-3'"
        ],
        True,
        # Its chunks are another text's: not at their offsets, nor reaching the end of this one.
        {"topic_text": "doc-3", "chunk_offsets": "doc-3", "chunks_contiguous": "doc-3"},
    ),
    "a live document the topic deleted": (
        ["UPDATE {s}.documents SET deleted = false WHERE id = 'doc-1'"],
        True,
        {"topic_deleted": "doc-1"},
    ),
    "a document the database lost": (
        ["DELETE FROM {s}.documents WHERE id = 'doc-19'"],
        True,
        {"topic_missing": "doc-19"},
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
async def test_verify_finds_planted_damage_and_names_the_document(env: Env, damage: str) -> None:
    statements, topic, wanted = DAMAGE[damage]
    await filled(env)
    fk = await _fk(env)
    conn = await connect(env)
    try:
        for statement in statements:
            sql = statement.format(s=env.schema, fk=fk)
            if "$1" in sql:
                await conn.execute(sql, LOREM * 4 + " document number 3.")
            else:
                await conn.execute(sql)
    finally:
        await conn.close()
    code, report = verified(env, *(["--topic"] if topic else []))
    assert code == 1
    assert not report["clean"]
    found = failing(report)
    assert set(found) == set(wanted), found
    for name, doc_id in wanted.items():
        assert doc_id in found[name], (name, found[name])
    plain = cli(env, "verify", *(["--topic"] if topic else []))
    assert plain.returncode == 1
    for name, doc_id in wanted.items():
        [line] = [line for line in plain.stdout.splitlines() if line.startswith(name + " ")]
        assert "problem" in line and doc_id in line, line
    assert plain.stdout.splitlines()[-1].startswith(f"not clean: {len(wanted)} of ")


async def test_verify_says_the_database_is_behind_a_newer_event(env: Env) -> None:
    """A newer event published and not yet stored: the database is behind, not damaged."""
    await filled(env)
    await produce(env, [("doc-6", {"id": "doc-6", "text": "Version three, not stored yet.", "version": 3})])
    code, report = verified(env, "--topic")
    assert code == 1
    assert failing(report) == {"topic_behind": ["doc-6"]}
    await run_worker(env)
    code, report = verified(env, "--topic")
    assert (code, failing(report)) == (0, {})


async def test_verify_counts_undecodable_records_and_does_not_fail_on_them(env: Env) -> None:
    await filled(env)
    await produce_raw(env, [(b"bad-1", b"{not json"), (b"bad-2", b'{"id": "other", "text": "x"}')])
    await run_worker(env)
    result = cli(env, "verify", "--topic")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(2 undecodable: the dead-letter topic's)" in result.stdout


async def test_verify_on_a_database_down_or_a_schema_not_migrated_says_so_in_one_line(env: Env) -> None:
    down = cli(env, "verify", extra={"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"})
    assert down.returncode == 1
    assert "DatabaseUnavailable" in one_line_error(down)
    conn = await connect(env)
    try:
        await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    finally:
        await conn.close()
    unmigrated = cli(env, "verify")
    assert unmigrated.returncode == 1
    line = one_line_error(unmigrated)
    assert env.schema in line and "migrate" in line, line
    assert cli(env, "migrate").returncode == 0
    missing = cli(env, "verify", "--topic", "no-such-topic")
    assert missing.returncode == 2
    assert "no-such-topic" in one_line_error(missing)


async def test_verify_on_a_schema_without_documents_text_checks_the_rest(env: Env) -> None:
    """A schema migrated before documents kept their text: the checks against it are left out,
    and said to be; the others still find what they find."""
    assert cli(env, "migrate").returncode == 0
    conn = await connect(env)
    try:
        await conn.execute(f"ALTER TABLE {env.schema}.documents DROP COLUMN text")
        events: list[Event] = [
            (f"d{i}", {"id": f"d{i}", "text": f"Text of document {i}. " * 30}) for i in range(6)
        ]
        await produce(env, events)
        ran = cli(env, "run", "--no-migrate", "--stop-when-idle", "2")
        assert ran.returncode == 0, ran.stderr[-2000:]
        clean = cli(env, "verify", "--topic")
        assert clean.returncode == 0, clean.stdout + clean.stderr
        assert "documents has no text column" in clean.stdout
        await conn.execute(f"UPDATE {env.schema}.chunks SET char_end = char_end + 1 WHERE doc_id = 'd4'")
    finally:
        await conn.close()
    code, report = verified(env, "--topic")
    assert (code, failing(report)) == (1, {"chunk_offsets": ["d4"]})


async def test_a_redelivery_keeps_a_document_recreated_after_its_tombstone(env: Env) -> None:
    # Found by verify: redelivered, the versionless tombstone deleted the document at its stored
    # version 3, and the upsert of version 3 after it was refused as equal over a deleted document.
    # A redelivered event at or before the stored event's offset is now known as applied.
    events: list[Event] = [
        ("back", None),
        ("back", {"id": "back", "text": "Recreated after its tombstone.", "version": 3}),
    ]
    await produce(env, events)
    await run_worker(env)
    code, report = verified(env, "--topic")
    assert (code, failing(report)) == (0, {})  # the first delivery is right
    again = env.with_(KAFKA_GROUP_ID=env.values["KAFKA_GROUP_ID"] + "-again")  # a full redelivery
    await run_worker(again)
    code, report = verified(env, "--topic")
    assert (code, failing(report)) == (0, {}), failing(report)  # topic_deleted: ["back"]
