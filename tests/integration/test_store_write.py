"""The batch write on the real PostgreSQL (worker.store.Store.write): new documents' chunks are
copied straight into the table, stored documents' go through the merge, and a new document that
another writer stores between the lock read and the copy is planned again, not overwritten.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client import REGISTRY

from tests.integration.helpers import Env, connect
from worker.chunk import chunk_text
from worker.decode import DocumentEvent
from worker.errors import StaleRead
from worker.plan import Change, DocState
from worker.store import DocumentWrite, Store, sha256
from worker.types import Record

pytestmark = pytest.mark.integration

FIRST = "The first sentence stays. The second one stays as well. " * 12
EDITED = FIRST[: len(FIRST) // 2] + "Here the text was edited and it ends sooner."


def write_of(env: Env, doc_id: str, text: str, before: DocState | None, version: int) -> DocumentWrite:
    settings = env.settings
    chunks = chunk_text(text, size=settings.chunk_size, overlap=settings.chunk_overlap)
    event = DocumentEvent(doc_id, "upsert", text, version, None, None)
    record = Record(env.topic, 0, version, doc_id.encode(), b"{}")
    vectors = [_vector(env, c.content) for c in chunks]
    return DocumentWrite(Change(event, before, DocState(version, False)), record, chunks, vectors)


def contents(env: Env, text: str) -> list[str]:
    settings = env.settings
    return [c.content for c in chunk_text(text, size=settings.chunk_size, overlap=settings.chunk_overlap)]


def _vector(env: Env, text: str) -> np.ndarray:
    seed = int.from_bytes(sha256(text)[:4], "little")
    return np.random.default_rng(seed).random(env.settings.embedding_dimensions, dtype=np.float32)


def steps() -> dict[str, float]:
    return {
        step: REGISTRY.get_sample_value("ingest_write_step_seconds_count", {"step": step}) or 0.0
        for step in ("copy_new", "stage", "merge", "trim")
    }


async def stored_chunks(env: Env, doc_id: str) -> list[tuple[int, str, str]]:
    conn = await connect(env)
    try:
        rows = await conn.fetch(
            # the served generation's table: a row's xmin (`chunks` is a view, which has none)
            f"SELECT chunk_index, content, xmin::text AS xmin FROM {env.schema}.chunks_g1 "
            "WHERE doc_id = $1 ORDER BY chunk_index",
            doc_id,
        )
    finally:
        await conn.close()
    return [(r["chunk_index"], r["content"], r["xmin"]) for r in rows]


async def test_new_documents_are_copied_in_and_stored_ones_merged_leaving_unchanged_chunks_alone(
    env: Env,
) -> None:
    await Store(env.settings).migrate(ann_index=True)
    async with Store(env.settings) as store:
        await store.check()  # writes the served generation's table, as the worker's store does
        before = steps()
        assert await store.write([write_of(env, "a", FIRST, None, 1)]) == set()
        after_new = steps()
        assert after_new["copy_new"] == before["copy_new"] + 1
        assert (after_new["stage"], after_new["merge"], after_new["trim"]) == (
            before["stage"],
            before["merge"],
            before["trim"],
        ), "a new document has nothing to merge or trim"
        first = await stored_chunks(env, "a")
        assert [c for _, c, _ in first] == contents(env, FIRST)

        assert await store.write([write_of(env, "a", EDITED, DocState(1, False), 2)]) == set()
        after_merge = steps()
        assert after_merge["copy_new"] == after_new["copy_new"], "a stored document is merged"
        assert after_merge["merge"] == after_new["merge"] + 1
        edited = await stored_chunks(env, "a")
    assert [c for _, c, _ in edited] == contents(env, EDITED), "changed chunks replaced, the surplus trimmed"
    unchanged = [i for i, (_, content, _) in enumerate(edited) if i < len(first) and first[i][1] == content]
    assert unchanged, "the edit keeps the first chunk"
    assert all(edited[i][2] == first[i][2] for i in unchanged), "an unchanged chunk is not rewritten"


async def test_a_new_document_another_writer_stores_meanwhile_is_planned_again_not_overwritten(
    env: Env,
) -> None:
    await Store(env.settings).migrate(ann_index=True)
    other = await connect(env)
    try:
        async with Store(env.settings) as store:
            await store.check()  # writes the served generation's table, as the worker's store does
            # The other writer has inserted the document and its chunks, not yet committed: the
            # lock read finds no row, so this write copies the chunks straight in, once it may.
            tx = other.transaction()
            await tx.start()
            await other.execute(
                f"INSERT INTO {env.schema}.documents (id, version, chunk_count) VALUES ('n', 7, 1)"
            )
            await other.execute(
                f"INSERT INTO {env.schema}.chunks (doc_id, chunk_index, content, embedding, char_start, "
                "char_end, model, content_sha256) VALUES ('n', 0, 'theirs', $1::text::vector, 0, 6, $2, $3)",
                str(_vector(env, "theirs").tolist()),
                env.settings.embedding_model,
                sha256("theirs"),
            )
            ours = asyncio.create_task(store.write([write_of(env, "n", FIRST, None, 3)]))
            await asyncio.sleep(0.5)
            assert not ours.done(), "waits for the other writer's row"
            await tx.commit()
            with pytest.raises(StaleRead):
                await asyncio.wait_for(ours, 30)
    finally:
        await other.close()
    assert [content for _, content, _ in await stored_chunks(env, "n")] == ["theirs"]
