"""The Worker end to end through small fakes of its own Protocols: no Kafka, no Postgres, no HTTP."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import orjson
import pytest
import structlog
import structlog.testing

from tests.unit.fakes import (
    MARKER,
    P0,
    P1,
    TEXT_A1,
    TEXT_A2,
    TEXT_B,
    TEXT_C,
    TEXT_F,
    FakeDeadLetters,
    FakeEmbedder,
    FakeStore,
    chunk_contents,
    delete,
    doc_of,
    expected_chunks,
    log_of,
    make_settings,
    pipeline_of,
    rig,
    run_or_stop,
    tombstone,
    until,
    upsert,
    versioned,
)
from worker.embed import KNOWN_GOOD_INPUT
from worker.errors import (
    EmbeddingProtocolError,
)
from worker.plan import DocState
from worker.retry import ShuttingDown
from worker.store import sha256

# -- the happy path -------------------------------------------------------------------------


async def test_ingests_every_partition_and_commits_every_offset() -> None:
    r = rig(
        log_of(
            {
                0: [
                    upsert("a", TEXT_A1, 1),
                    upsert("b", TEXT_B),
                    upsert("a", TEXT_A2, 2),
                    upsert("c", TEXT_C, 1),
                    upsert("a", "a late, stale redelivery of version one", 1),
                ],
                1: [
                    delete("d", 5),  # never seen: kept as a tombstone
                    upsert("e", "Echo lives briefly."),
                    upsert("d", "an older upsert must not bring d back", 3),
                    tombstone("e"),
                    upsert("f", TEXT_F, 0, metadata={"lang": "en"}, tenant="acme"),
                ],
            }
        ),
        max_records=2,  # several fetches, each mixing both partitions
    )
    await r.run()

    assert r.store.documents == {
        "a": DocState(2, False),
        "b": DocState(None, False),
        "c": DocState(1, False),
        "d": DocState(5, True),
        "e": DocState(None, True),
        "f": DocState(0, False),
    }
    assert r.store.chunks == {
        "a": expected_chunks(TEXT_A2),
        "b": expected_chunks(TEXT_B),
        "c": expected_chunks(TEXT_C),
        "f": expected_chunks(TEXT_F),
    }
    assert len(r.store.chunks["a"]) > 1
    assert (r.store.metadata["f"], r.store.tenants["f"]) == ({"lang": "en"}, "acme")
    assert r.dead.letters == []
    r.assert_all_committed()
    assert r.source.started and r.source.stopped
    assert r.source.pauses == [], "a window of 4000 records is never full here"
    assert len(r.source.delivered) == 10, "nothing delivered twice"
    assert r.worker.records_done == 10
    assert "stale redelivery" not in " ".join(r.embedder.embedded())
    assert "bring d back" not in " ".join(r.embedder.embedded())


async def test_events_waiting_behind_a_running_job_are_folded_so_only_their_winner_is_embedded() -> None:
    # One fetch: the first event of `a` starts a job at once; the two behind it wait and fold.
    r = rig(log_of({0: [upsert("a", TEXT_A1, 1), upsert("a", TEXT_A2, 2), upsert("a", "stale", 1)]}))
    await r.run()
    assert r.store.documents == {"a": DocState(2, False)}
    assert r.store.chunks == {"a": expected_chunks(TEXT_A2)}
    assert r.embedder.embedded() == set(chunk_contents(TEXT_A1)) | set(chunk_contents(TEXT_A2))
    assert all(n == 1 for n in r.embedder.inputs().values())
    r.assert_all_committed()


async def test_redelivery_of_unchanged_documents_changes_nothing_and_embeds_nothing() -> None:
    entries = [upsert("a", TEXT_A1, 1), upsert("b", TEXT_B), delete("c", 2)]
    records = log_of({0: entries})
    first = rig(records)
    await first.run()
    assert first.embedder.calls
    writes_before = first.store.writes

    again = rig(records, store=first.store)
    await again.run()
    assert first.store.documents == {
        "a": DocState(1, False),
        "b": DocState(None, False),
        "c": DocState(2, True),
    }
    assert first.store.chunks == {"a": expected_chunks(TEXT_A1), "b": expected_chunks(TEXT_B)}
    assert again.embedder.calls == [], "unchanged content is never embedded again"
    # Every event is at or before its document's stored one: already applied, nothing written.
    assert first.store.writes == writes_before
    assert again.dead.letters == []
    again.assert_all_committed()

    # `b` published again (a new event, no version) applies and is written: from stored vectors.
    republished = rig(log_of({0: [*entries, upsert("b", TEXT_B)]}), store=first.store)
    await republished.run()
    assert first.store.writes > writes_before
    assert republished.embedder.calls == []
    assert {sha256(t) for t in chunk_contents(TEXT_B)} <= {h for hs in first.store.lookups for h in hs}
    assert first.store.chunks == {"a": expected_chunks(TEXT_A1), "b": expected_chunks(TEXT_B)}


async def test_documents_with_empty_or_blank_text_are_stored_without_chunks_and_nothing_blank_is_sent() -> (
    None
):
    r = rig(
        log_of(
            {
                0: [upsert("empty", ""), upsert("c", TEXT_C), upsert("blank", " \n\t\u3000\u00a0\r\n ")],
                1: [upsert("b", TEXT_B, 1), upsert("b", "   ", 2)],  # a later blank version drops the chunks
            }
        )
    )
    await r.run()
    assert r.store.documents == {
        "empty": DocState(None, False),
        "blank": DocState(None, False),
        "c": DocState(None, False),
        "b": DocState(2, False),
    }
    assert r.store.chunks == {"empty": [], "blank": [], "c": expected_chunks(TEXT_C), "b": []}
    assert r.dead.letters == []
    assert r.embedder.inputs(), "the other documents were embedded"
    assert all(text.strip() for text in r.embedder.inputs()), "no empty or whitespace-only input was sent"
    r.assert_all_committed()


# -- records that can never succeed ---------------------------------------------------------


async def test_bad_records_are_dead_lettered_with_their_stage_and_the_rest_stored() -> None:
    traceparent = [("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]
    records = log_of(
        {
            1: [
                upsert("g1", TEXT_C),
                (b"\xff\xfe", b'{"id": "x", "text": "t"}'),  # key not UTF-8
                (b"j", b"{not json"),
                (b"m", orjson.dumps({"id": "m"})),  # upsert without text
                (b"k", orjson.dumps({"id": "other", "text": "t"})),  # id != key
                upsert("g2", TEXT_B),
                (None, None),  # tombstone without a key
            ]
        },
        headers={(1, 2): traceparent},
    )
    r = rig(records)
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logged:
        await r.run()

    assert set(r.store.documents) == {"g1", "g2"}
    assert r.store.chunks == {"g1": expected_chunks(TEXT_C), "g2": expected_chunks(TEXT_B)}
    traces = {e["offset"]: e.get("trace_id") for e in logged if e["event"] == "record_dead_lettered"}
    assert traces[102] == "4bf92f3577b34da6a3ce929d0e0e4736", "the W3C trace id, bound to its log line"
    assert traces[103] is None
    by_offset = {d.record.offset: d for d in r.dead.letters}
    assert len(by_offset) == len(r.dead.letters) == 5
    assert {o - 100: (d.error.stage, type(d.error).__name__) for o, d in by_offset.items()} == {
        1: ("decode", "DecodeError"),
        2: ("decode", "DecodeError"),
        3: ("validate", "ValidationError"),
        4: ("validate", "ValidationError"),
        6: ("validate", "ValidationError"),
    }
    for d in r.dead.letters:
        assert d.record == next(rec for rec in records if rec.offset == d.record.offset), "the record, whole"
    assert tuple(by_offset[102].record.headers) == tuple(traceparent)
    r.assert_all_committed()
    # No offset was marked stored before its dead letter was acknowledged (or its document written).
    r.assert_marks_never_passed_unfinished()


async def test_rejected_document_is_dead_lettered_and_the_others_in_its_request_stored() -> None:
    poisoned = f"Papa version two is fine here. But this part says {MARKER} so the API refuses it. The end."
    store = FakeStore()
    store.put("p", "Papa version one, stored earlier.", 1)
    r = rig(
        log_of(
            {0: [upsert("a", TEXT_A2, 1), upsert("p", poisoned, 2), upsert("b", TEXT_B), upsert("c", TEXT_F)]}
        ),
        store=store,
    )
    await r.run()

    [letter] = r.dead.letters
    assert (letter.record.offset, letter.error.stage, type(letter.error).__name__) == (
        1,
        "embed",
        "InputRejected",
    )
    assert letter.record.value == upsert("p", poisoned, 2)[1]
    assert r.store.documents["p"] == DocState(1, False), "the stored version is left as it was"
    assert r.store.chunks["p"] == expected_chunks("Papa version one, stored earlier.")
    for doc_id, text in [("a", TEXT_A2), ("b", TEXT_B), ("c", TEXT_F)]:
        assert r.store.chunks[doc_id] == expected_chunks(text)
    [poison_chunk] = [c for c in chunk_contents(poisoned) if MARKER in c]
    # The refused request also carried other documents' chunks...
    first = next(call for call in r.embedder.calls if poison_chunk in call)
    assert set(first) - set(chunk_contents(poisoned)), "the poisoned chunk shared its request"
    # ...and splitting it narrowed the refusal down to a request of the offending chunk alone.
    assert [poison_chunk] in r.embedder.calls
    assert len(r.source.delivered) == 4, "handled in place: no redelivery"
    r.assert_all_committed()


# -- outages --------------------------------------------------------------------------------


async def test_transient_embedding_outage_is_retried_without_dead_letters() -> None:
    r = rig(log_of({0: [upsert("a", TEXT_A2, 1), upsert("b", TEXT_B)]}), embedder=FakeEmbedder(failures=2))
    await r.run()
    assert r.dead.letters == []
    assert r.store.chunks == {"a": expected_chunks(TEXT_A2), "b": expected_chunks(TEXT_B)}
    assert r.embedder.failures == 0
    assert r.source.pauses == [], "two failures are retried, not an outage"
    r.assert_all_committed()


async def test_embedding_outage_beyond_the_retry_budget_is_waited_out_and_nothing_committed_early() -> None:
    r = rig(
        log_of({0: [upsert("a", TEXT_C, 1)], 1: [upsert("b", TEXT_B)]}),
        embedder=FakeEmbedder(failures=3),  # more than the 2 attempts a request is given
        settings=make_settings(EMBEDDING_MAX_ATTEMPTS="2"),
    )
    await r.run()
    assert r.dead.letters == []
    assert r.store.chunks == {"a": expected_chunks(TEXT_C), "b": expected_chunks(TEXT_B)}
    kinds = [kind for kind, _ in r.journal]
    assert r.embedder.failures == 0
    assert kinds.index("write") > max(i for i, k in enumerate(kinds) if k == "embed_failed")
    assert len(r.source.delivered) == 2, "held in place, never redelivered"
    r.assert_marks_never_passed_unfinished()
    r.assert_all_committed()


async def test_an_embedding_outage_is_reported_and_pauses_fetching_until_it_is_over() -> None:
    r = rig(
        log_of({0: [upsert("a", TEXT_C, 1), upsert("b", TEXT_B, 1)]}),
        max_records=1,
        embedder=FakeEmbedder(failures=3),  # opens its circuit breaker (threshold 2), and the probe fails too
        settings=make_settings(EMBEDDING_MAX_ATTEMPTS="2"),
    )
    seen: list[dict[str, str]] = []
    r.embedder.on_call = lambda: seen.append(r.worker.down())
    await r.run()
    assert len(seen) >= 3
    assert seen[0] == {}, "up before the first failure"
    down = [d for d in seen if d]
    assert down, "the outage was reported while it lasted"
    assert all(set(d) == {"embedding"} and "EmbeddingUnavailable" in d["embedding"] for d in down), down
    assert r.worker.down() == {}, "and is over"
    assert r.source.pauses, "fetching paused while the embedding API was down"
    assert len(r.source.resumes) == len(r.source.pauses)
    assert r.dead.letters == []
    r.assert_all_committed()


async def test_dead_letter_topic_outage_holds_the_commit_until_the_letters_are_acknowledged() -> None:
    r = rig(
        log_of({0: [upsert("a", TEXT_C, 1), (b"x", b"garbage"), upsert("b", TEXT_B)]}),
        dead=FakeDeadLetters(failures=2),  # enough to open its circuit breaker (threshold 2)
        settings=make_settings(EMBEDDING_MAX_ATTEMPTS="2"),
    )
    await r.run()
    assert [(d.record.offset, d.error.stage) for d in r.dead.letters] == [(1, "decode")]
    assert r.store.chunks == {"a": expected_chunks(TEXT_C), "b": expected_chunks(TEXT_B)}
    assert r.dead.failures == 0
    assert any(kind == "mark" and detail == {0: 1} for kind, detail in r.journal), (
        "offset 0 was stored and committed while offset 1 waited for the dead-letter topic"
    )
    r.assert_marks_never_passed_unfinished()
    r.assert_all_committed()


async def test_database_outage_is_waited_out_without_dead_letters() -> None:
    r = rig(
        log_of({0: [upsert("a", TEXT_C, 1), upsert("b", TEXT_B)]}),
        store=FakeStore(failures=2),  # enough to open its circuit breaker (threshold 2)
        settings=make_settings(EMBEDDING_MAX_ATTEMPTS="2"),
    )
    await r.run()
    assert r.dead.letters == []
    assert r.store.chunks == {"a": expected_chunks(TEXT_C), "b": expected_chunks(TEXT_B)}
    assert r.store.failures == 0
    assert r.embedder.inputs() == Counter(chunk_contents(TEXT_C) + chunk_contents(TEXT_B))
    r.assert_marks_never_passed_unfinished()
    r.assert_all_committed()


async def test_a_database_outage_while_writing_keeps_the_vectors() -> None:
    store = FakeStore()
    r = rig(
        log_of({0: [upsert("a", TEXT_C, 1), upsert("b", TEXT_B)]}),
        store=store,
        settings=make_settings(EMBEDDING_MAX_ATTEMPTS="2"),
    )
    r.embedder.on_call = lambda: setattr(store, "failures", 2)  # down from the first embedding on
    await r.run()
    assert r.dead.letters == []
    assert r.store.chunks == {"a": expected_chunks(TEXT_C), "b": expected_chunks(TEXT_B)}
    assert ("db_failed", "write") in r.journal
    assert r.embedder.inputs() == Counter(chunk_contents(TEXT_C) + chunk_contents(TEXT_B)), (
        "the vectors were kept through the outage, not bought again"
    )
    r.assert_marks_never_passed_unfinished()
    r.assert_all_committed()


# -- documents that moved between planning and writing ---------------------------------------


@pytest.mark.parametrize(
    ("moved_to", "expected"),
    [
        pytest.param(DocState(3, False), DocState(3, False), id="newer-version-wins"),
        pytest.param(DocState(1, True), DocState(2, False), id="older-delete-is-overtaken"),
    ],
)
async def test_moved_document_is_replanned_and_the_rest_of_its_batch_written(
    moved_to: DocState, expected: DocState
) -> None:
    interloper_text = "Another worker wrote this version of a."

    def other_worker(store: FakeStore) -> None:
        store.documents["a"] = moved_to
        store.chunks.pop("a", None)
        if not moved_to.deleted:
            store.chunks["a"] = expected_chunks(interloper_text)

    store = FakeStore(interfere=other_worker)
    store.put("a", TEXT_A1, 1)
    r = rig(log_of({0: [upsert("a", TEXT_A2, 2), upsert("b", TEXT_B, 1)]}), store=store)
    await r.run()

    assert ("moved", ["a"]) in r.journal
    assert sum("a" in ids for ids in r.store.reads) == 2, "a was planned again"
    assert [rec.offset for rec in r.source.delivered] == [0, 1], "re-planned in place, not redelivered"
    assert r.store.documents == {"a": expected, "b": DocState(1, False)}
    text = interloper_text if expected == moved_to else TEXT_A2
    assert r.store.chunks == {"a": expected_chunks(text), "b": expected_chunks(TEXT_B)}
    assert r.dead.letters == []
    r.assert_all_committed()


async def test_stale_read_replans_the_whole_batch() -> None:
    r = rig(log_of({0: [upsert("a", TEXT_A2, 2), upsert("b", TEXT_B, 1)]}), store=FakeStore(stale_once=True))
    await r.run()
    [stale] = [ids for kind, ids in r.journal if kind == "stale"]
    for doc_id in stale:
        assert sum(doc_id in ids for ids in r.store.reads) == 2, f"{doc_id} was planned again"
    assert r.store.documents == {"a": DocState(2, False), "b": DocState(1, False)}
    assert r.store.chunks == {"a": expected_chunks(TEXT_A2), "b": expected_chunks(TEXT_B)}
    assert r.embedder.inputs() == Counter(chunk_contents(TEXT_A2) + chunk_contents(TEXT_B)), (
        "planning again kept the vectors: none was bought twice"
    )
    assert len(r.source.delivered) == 2
    assert r.dead.letters == []
    r.assert_all_committed()


# -- the pipeline: watermarks, ordering, backpressure ----------------------------------------


async def test_watermark_holds_at_a_slow_record_while_later_ones_finish() -> None:
    release = asyncio.Event()
    embedder = FakeEmbedder()
    embedder.hold["slow"] = release
    r = rig(
        log_of(
            {
                0: [upsert("a", "a is slow to embed", 1)]
                + [upsert(d, f"{d} is quick to embed", 1) for d in "bcd"],
                1: [upsert("e", "e is quick too", 1)],
            }
        ),
        embedder=embedder,
        settings=make_settings(EMBEDDING_BATCH_SIZE="1"),  # a request per chunk: `a` alone is held
        stop_when_idle=None,
    )
    running = asyncio.create_task(r.worker.run())
    await until(lambda: {"b", "c", "d", "e"} <= set(r.store.documents))
    marks_before = sum(kind == "mark" for kind, _ in r.journal)
    await until(lambda: sum(kind == "mark" for kind, _ in r.journal) >= marks_before + 2)
    # b, c, d (offsets 1-3) are stored; a (offset 0) is not, so partition 0 commits nothing past 0.
    assert "a" not in r.store.documents
    assert r.source.committed[P0] == 0
    assert r.source.committed[P1] == 101, "the other partition is not held back"
    release.set()
    await until(lambda: r.source.committed.get(P0) == 4)
    r.worker.stop()
    await asyncio.wait_for(running, 2)
    assert set(r.store.documents) == set("abcde")
    r.assert_marks_never_passed_unfinished()
    r.assert_all_committed()


async def test_one_document_never_has_two_jobs_at_once_and_its_events_apply_in_order() -> None:
    entries: list[tuple[bytes, bytes]] = []
    for version in range(1, 7):
        for doc_id in ("a", "b", "c"):
            entries.append(upsert(doc_id, versioned(doc_id, version), version))
    # Versionless events: only their order says which wins.
    entries += [
        upsert("x", versioned("x", 1)),
        delete("x"),
        upsert("x", versioned("x", 2)),
        upsert("x", versioned("x", 3)),
    ]
    store = FakeStore(write_delay=0.003)
    r = rig(
        log_of({0: entries}),
        max_records=2,
        store=store,
        embedder=FakeEmbedder(delay=0.004),
        settings=make_settings(EMBEDDING_BATCH_SIZE="2"),
    )
    await r.run()

    assert r.embedder.overlaps == [], "two versions of one document were embedded at once"
    assert r.store.overlaps == [], "one document was in two write transactions at once"
    assert r.store.documents == {d: DocState(6, False) for d in "abc"} | {"x": DocState(None, False)}
    assert r.store.chunks["x"] == expected_chunks(versioned("x", 3))
    for doc_id in "abc":
        assert r.store.chunks[doc_id] == expected_chunks(versioned(doc_id, 6))
    # Each document's texts were embedded in the order of its events, each at most once.
    for doc_id in "abcx":
        order = [t for call in r.embedder.calls for t in call if doc_of(t) == doc_id]
        versions = [int(t.split()[-1]) for t in order]
        assert versions == sorted(set(versions)), (doc_id, versions)
    r.assert_all_committed()
    assert r.worker.records_done == len(entries)


async def test_events_of_a_document_arriving_during_its_job_fold_into_one_job() -> None:
    embedder = FakeEmbedder()
    r = rig(
        log_of({0: [upsert("a", versioned("a", v), v) for v in range(1, 5)] + [upsert("b", TEXT_C, 1)]}),
        max_records=1,  # one event per fetch: v2..v4 arrive while v1 is being embedded
        embedder=embedder,
    )
    embedder.hold[versioned("a", 1)] = r.source.exhausted
    await r.run()
    assert r.embedder.inputs() == Counter([versioned("a", 1), versioned("a", 4), *chunk_contents(TEXT_C)])
    assert r.store.documents == {"a": DocState(4, False), "b": DocState(1, False)}
    assert r.store.chunks["a"] == expected_chunks(versioned("a", 4))
    r.assert_all_committed()
    assert r.worker.records_done == 5


async def test_a_full_window_pauses_the_source_and_a_drained_one_resumes_it() -> None:
    window, fetch = 5, 3  # a fetch can overshoot the window
    r = rig(
        log_of({0: [upsert(f"d{i}", versioned(f"d{i}", 1), 1) for i in range(18)]}),
        max_records=fetch,
        embedder=FakeEmbedder(delay=0.01),
        settings=make_settings(MAX_IN_FLIGHT_RECORDS=str(window)),
    )
    await r.run()

    assert len(r.source.pauses) >= 2, "the window filled more than once"
    kinds = [kind for kind, _ in r.journal if kind in ("pause", "resume")]
    assert kinds == ["pause", "resume"] * len(r.source.pauses), (
        "pause and resume alternate, resumed at the end"
    )
    assert all(n is not None and n >= window for n in r.source.pauses)
    assert all(n is not None and n < window // 2 for n in r.source.resumes)
    assert r.source.fetched_while_paused > 0, "the fetch loop kept polling while paused"
    assert max(r.source.in_flight_after_fetch) <= window + fetch, "past the window by more than one fetch"
    assert max(r.source.in_flight_after_fetch) > window, "the last fetch before a pause overshot it"
    assert set(r.store.documents) == {f"d{i}" for i in range(18)}
    r.assert_all_committed()


async def test_a_window_of_one_record_still_makes_progress() -> None:
    r = rig(
        log_of({0: [upsert(f"d{i}", versioned(f"d{i}", 1), 1) for i in range(3)]}),
        max_records=1,
        settings=make_settings(MAX_IN_FLIGHT_RECORDS="1"),
    )
    await run_or_stop(r, limit=0.25)
    assert set(r.store.documents) == {"d0", "d1", "d2"}
    r.assert_all_committed()


# -- embeddings paid for once -----------------------------------------------------------------


async def test_identical_chunk_text_in_two_documents_of_a_batch_is_embedded_once() -> None:
    r = rig(log_of({0: [upsert("x", TEXT_A2, 1), upsert("y", TEXT_A2, 1), upsert("z", TEXT_C, 1)]}))
    await r.run()
    assert r.embedder.inputs() == Counter(chunk_contents(TEXT_A2) + chunk_contents(TEXT_C))
    assert r.store.chunks == {
        "x": expected_chunks(TEXT_A2),
        "y": expected_chunks(TEXT_A2),
        "z": expected_chunks(TEXT_C),
    }
    r.assert_all_committed()


async def test_a_changed_document_embeds_only_its_new_chunks() -> None:
    longer = TEXT_A2 + " A new last sentence was added to the end."
    store = FakeStore()
    store.put("a", TEXT_A2, 1)
    r = rig(log_of({0: [upsert("a", longer, 2)]}), store=store)
    await r.run()
    new = set(chunk_contents(longer)) - set(chunk_contents(TEXT_A2))
    assert new, "the edit changes some chunks"
    assert set(chunk_contents(longer)) & set(chunk_contents(TEXT_A2)), "and leaves others as they were"
    assert r.embedder.inputs() == Counter(new)
    assert r.store.chunks == {"a": expected_chunks(longer)}
    r.assert_all_committed()


async def test_embeddings_of_another_model_are_not_reused() -> None:
    store = FakeStore()
    store.put("a", TEXT_A2, 1)
    store.chunk_model["a"] = "some-older-model"
    r = rig(log_of({0: [upsert("b", TEXT_A2, 1)]}), store=store)
    await r.run()
    assert r.embedder.inputs() == Counter(chunk_contents(TEXT_A2))
    r.assert_all_committed()


# Issue 8, item 7: one purchase per content while it is in flight. ``x`` is requested first (its
# request held on "Alpha"); documents sharing its chunks come in later fetches, from the other
# partition, so they are planned in prepare batches of their own.
TEXT_X = TEXT_A2
TEXT_Y = TEXT_A2 + " Yankee adds a sentence of its own."
TEXT_Z = TEXT_A2 + " Zulu ends it in yet another way."


def sent(embedder: FakeEmbedder, word: str) -> bool:
    return any(word in text for text in embedder.inputs())


async def test_a_chunk_being_embedded_or_embedded_and_not_yet_stored_is_not_bought_again() -> None:
    answer_x, write = asyncio.Event(), asyncio.Event()
    embedder = FakeEmbedder()
    embedder.hold["Alpha"] = answer_x
    store = FakeStore(write_gate=write)
    r = rig(
        log_of({0: [upsert("x", TEXT_X, 1)], 1: [upsert("y", TEXT_Y, 1), upsert("z", TEXT_Z, 1)]}),
        store=store,
        embedder=embedder,
    )
    # y comes once x's request is out; z once x's vectors are there and x is being written.
    r.source.ready = lambda rec: (
        rec.partition == 0 or (embedder.entered.is_set() and (rec.key == b"y" or "x" in store.writing))
    )
    running = asyncio.create_task(r.run())
    await until(lambda: sent(embedder, "Yankee"))  # y is planned: it shares x's chunks or buys them
    answer_x.set()
    await until(lambda: sent(embedder, "Zulu"))
    write.set()
    await running
    assert set(chunk_contents(TEXT_X)) <= set(chunk_contents(TEXT_Y)) & set(chunk_contents(TEXT_Z))
    wanted = {*chunk_contents(TEXT_X), *chunk_contents(TEXT_Y), *chunk_contents(TEXT_Z)}
    assert r.embedder.inputs() == Counter(wanted), "a chunk was bought twice"
    assert r.store.chunks == {d: expected_chunks(t) for d, t in [("x", TEXT_X), ("y", TEXT_Y), ("z", TEXT_Z)]}
    r.assert_all_committed()


async def test_documents_sharing_a_rejected_chunk_each_get_its_rejection_and_the_rest_is_bought_once() -> (
    None
):
    poisoned_x = f"Alpha two is the current text. Papa says {MARKER} to all. Xray ends it."
    poisoned_y = f"Alpha two is the current text. Papa says {MARKER} to all. Yankee differs."
    clean_z = "Alpha two is the current text. Zulu is fine."
    [poison] = [c for c in chunk_contents(poisoned_x) if MARKER in c]
    assert poison in chunk_contents(poisoned_y)
    answer_x = asyncio.Event()
    embedder = FakeEmbedder()
    embedder.hold["Xray"] = answer_x
    r = rig(
        log_of({0: [upsert("x", poisoned_x, 1)], 1: [upsert("y", poisoned_y, 1), upsert("z", clean_z, 1)]}),
        embedder=embedder,
    )
    r.source.ready = lambda rec: rec.partition == 0 or embedder.entered.is_set()
    running = asyncio.create_task(r.run())
    await until(lambda: sent(embedder, "Yankee") and sent(embedder, "Zulu"))
    answer_x.set()
    await running
    assert sorted((d.record.key, d.error.stage, type(d.error).__name__) for d in r.dead.letters) == [
        (b"x", "embed", "InputRejected"),
        (b"y", "embed", "InputRejected"),
    ]
    assert r.store.chunks == {"z": expected_chunks(clean_z)}, "z shared x's good chunk and was stored"
    # Besides the documents' chunks: the one known-good input that told "this input" from "every input".
    assert r.embedder.bought() == Counter(
        {*chunk_contents(poisoned_x), *chunk_contents(poisoned_y), *chunk_contents(clean_z), KNOWN_GOOD_INPUT}
        - {poison}
    )
    assert r.embedder.calls.count([poison]) == 1, "the rejected chunk was isolated once, for x and y"
    r.assert_all_committed()


async def test_a_document_waiting_through_an_outage_for_a_shared_chunk_is_not_dead_lettered() -> None:
    answer_x = asyncio.Event()
    embedder = FakeEmbedder()
    embedder.hold["Alpha"] = answer_x
    r = rig(
        log_of({0: [upsert("x", TEXT_X, 1)], 1: [upsert("y", TEXT_Y, 1)]}),
        embedder=embedder,
        settings=make_settings(EMBEDDING_MAX_ATTEMPTS="2"),
    )
    r.source.ready = lambda rec: rec.partition == 0 or embedder.entered.is_set()
    running = asyncio.create_task(r.run())
    await until(lambda: sent(embedder, "Yankee"))
    embedder.failures = 3  # x's request fails both its attempts and the probe: the breaker opens
    answer_x.set()
    await running
    assert embedder.failures == 0 and ("embed_failed", len(chunk_contents(TEXT_X))) in r.journal
    assert r.dead.letters == []
    bought = r.embedder.bought()
    del bought["health check"]  # the probe that found the API up again
    assert bought == Counter({*chunk_contents(TEXT_X), *chunk_contents(TEXT_Y)})
    assert r.store.chunks == {"x": expected_chunks(TEXT_X), "y": expected_chunks(TEXT_Y)}
    r.assert_all_committed()


@pytest.mark.parametrize("cause", ["hung", "outage"])
async def test_closing_the_pipeline_while_documents_wait_for_a_shared_chunk_leaves_nothing_pending(
    cause: str,
) -> None:
    stop = asyncio.Event()
    store, dead = FakeStore(), FakeDeadLetters()
    embedder = FakeEmbedder(failures=10**6 if cause == "outage" else 0)
    embedder.hold["Alpha"] = asyncio.Event()  # never set: x's request never answers
    if cause == "outage":
        embedder.hold.clear()  # it fails instead, again and again: the breaker opens, requests wait
    x, y = log_of({0: [upsert("x", TEXT_X, 1)], 1: [upsert("y", TEXT_Y, 1)]})
    async with pipeline_of(store, embedder, dead, stop=stop) as pipeline:
        pipeline.admit(x)
        await until(lambda: bool(embedder.calls))
        pipeline.admit(y)
        await until(lambda: any(p.holders == 2 for p in pipeline.purchases))
        held = list(pipeline.purchases)
        stop.set()  # as the Worker does: stop, drain for the grace period, close
        if cause == "outage":  # every wait for the API races the stop: the requests end at once
            await until(lambda: all(p.vector.done() for p in held))
            # sent ones end with the stop; the rest, never sent and held by nobody now, are withdrawn
            assert all(p.vector.cancelled() or isinstance(p.vector.exception(), ShuttingDown) for p in held)
        await asyncio.sleep(0.1)
        assert not pipeline.idle
        await asyncio.wait_for(pipeline.close(), 1)
        assert all(p.holders == 0 for p in pipeline.purchases), "the pipeline let go of everything"
        if cause == "hung":
            kept = list(pipeline.purchases)
            assert kept and not any(p.vector.done() for p in kept), "sent (paid for): kept waiting"
    # the process's embedding stage finishes (the Worker: once it has left the group)
    assert all(p.vector.done() for p in held), "a future left pending"
    assert len(pipeline.purchases) == 0
    assert dead.letters == [], "a document waiting for a request that never answered is not its fault"
    assert store.documents == {}


async def test_every_purchase_leaves_once_its_documents_are_stored_or_dead_lettered() -> None:
    stop = asyncio.Event()
    store, dead, embedder = FakeStore(stale_once=True), FakeDeadLetters(), FakeEmbedder()
    poisoned = f"Alpha two is the current text. Papa says {MARKER} to all. Xray ends it."
    records = log_of(
        {
            0: [upsert("x", TEXT_X, 1), upsert("p", poisoned, 1)],
            1: [upsert("y", TEXT_Y, 1), upsert("q", poisoned, 1)],
        }
    )
    async with pipeline_of(store, embedder, dead, stop=stop) as pipeline:
        for record in records:
            pipeline.admit(record)
        await until(lambda: pipeline.idle)
        assert len(pipeline.purchases) == 0
    assert sorted(d.record.key for d in dead.letters) == [b"p", b"q"]
    assert set(store.documents) == {"x", "y"}
    assert any(kind == "stale" for kind, _ in store.journal), "a write was planned again"
    assert all(n == 1 for n in embedder.bought().values()), "re-planning bought a vector again"


async def test_writers_take_their_share_of_a_draining_backlog_so_they_finish_together() -> None:
    stop, gate = asyncio.Event(), asyncio.Event()
    store, dead, embedder = FakeStore(write_gate=gate), FakeDeadLetters(), FakeEmbedder()
    docs = 150
    records = log_of({0: [upsert(f"d{i:03}", f"Document {i} says hello.", 1) for i in range(docs)]})
    async with pipeline_of(store, embedder, dead, stop=stop, WRITE_BATCH_DOCUMENTS="64") as pipeline:
        for record in records:
            pipeline.admit(record)
        # both writers hold a batch at the gate; everything else is embedded and waiting for them
        await until(lambda: len(embedder.bought()) == docs and len(store.writing) >= 2)
        await asyncio.sleep(0.05)
        gate.set()
        await until(lambda: pipeline.idle)
    sizes = [len(batch) for kind, batch in store.journal if kind == "write"]
    assert sum(sizes) == docs and max(sizes) <= 64
    # Once one writer has claimed a full batch, the other claims half of what is left (43), and so
    # on down: one full batch at most (taking as much as each can, they wrote [64, 64, 22]).
    assert sizes.count(64) <= 1, sizes


async def test_a_write_batch_setting_below_the_smallest_share_is_still_the_most_a_writer_takes() -> None:
    stop, gate = asyncio.Event(), asyncio.Event()
    store, dead, embedder = FakeStore(write_gate=gate), FakeDeadLetters(), FakeEmbedder()
    records = log_of({0: [upsert(f"d{i:03}", f"Document {i} says hello.", 1) for i in range(40)]})
    async with pipeline_of(store, embedder, dead, stop=stop, WRITE_BATCH_DOCUMENTS="4") as pipeline:
        for record in records:
            pipeline.admit(record)
        await until(lambda: len(embedder.bought()) == 40 and len(store.writing) >= 2)
        gate.set()
        await until(lambda: pipeline.idle)
    sizes = [len(batch) for kind, batch in store.journal if kind == "write"]
    assert sum(sizes) == 40 and max(sizes) <= 4, sizes


# -- bugs stop the worker ----------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["read_states", "write"])
async def test_a_crashing_stage_makes_run_raise_after_committing_only_what_is_stored(stage: str) -> None:
    r = rig(
        log_of(
            {
                0: [
                    upsert("a", TEXT_C, 1),
                    upsert("b", TEXT_B, 1),
                    upsert("boom", TEXT_C, 1),
                    upsert("c", TEXT_F, 1),
                ]
            }
        ),
        store=FakeStore(crash_on=stage),
        settings=make_settings(SHUTDOWN_GRACE_SECONDS="0.1"),
        stop_when_idle=None,
    )
    # The records from `boom` on arrive once a and b are stored.
    r.source.ready = lambda rec: rec.offset < 2 or {"a", "b"} <= set(r.store.documents)
    with pytest.raises(RuntimeError, match=f"a bug in {stage}"):
        await r.run(limit=2)
    assert "boom" not in r.store.documents
    assert r.source.committed == {P0: 2}
    r.assert_marks_never_passed_unfinished()
    assert r.dead.letters == []
    assert r.source.stopped


async def test_a_non_retriable_embedding_error_stops_the_worker() -> None:
    r = rig(
        log_of({0: [upsert("a", TEXT_C, 1)]}),
        embedder=FakeEmbedder(error=EmbeddingProtocolError("embedding API returned vectors of shape (3,)")),
        settings=make_settings(SHUTDOWN_GRACE_SECONDS="0.1"),
    )
    with pytest.raises(EmbeddingProtocolError, match="shape"):
        await run_or_stop(r, limit=2)
    assert r.source.committed.get(P0, 0) == 0
    assert r.store.documents == {}
    assert r.dead.letters == [], "a misconfiguration is not the record's fault"


# -- rebalancing and stopping ----------------------------------------------------------------


async def test_a_revoke_stores_what_is_ready_and_does_not_wait_for_the_embedding_api() -> None:
    revoked = False
    answer = asyncio.Event()
    embedder = FakeEmbedder()
    embedder.hold["Alpha"] = answer  # d1's request is in flight until the test answers it
    r = rig(
        log_of({0: [upsert("d0", TEXT_C, 1), upsert("d1", TEXT_A2, 1), upsert("d2", TEXT_B, 1)]}),
        embedder=embedder,
        stop_when_idle=0.05,
    )
    # d0 first; d1 once d0 is stored; d2 only for the next assignment.
    r.source.ready = lambda rec: rec.offset == 0 or (rec.offset == 1 and "d0" in r.store.documents) or revoked
    running = asyncio.create_task(r.worker.run())
    await until(lambda: any("Alpha" in t for call in embedder.calls for t in call))
    assert r.source.callbacks is not None
    on_revoked, on_assigned = r.source.callbacks
    await asyncio.wait_for(on_revoked({P0}), 0.5)  # with d1's request unanswered
    assert set(r.store.documents) == {"d0"}, "what was ready is stored"
    assert r.source.committed == {P0: 1}, "and committed before the partition went"
    answer.set()  # the answer arrives after its document was abandoned: it is paid for, and kept
    await until(lambda: {sha256(c) for c in chunk_contents(TEXT_A2)} <= set(r.store.ledger.vectors))
    revoked = True
    r.source.position[P0] = r.source.committed[P0]  # as Kafka does: fetched again from the commit
    await on_assigned({P0})
    await asyncio.wait_for(running, 3)
    assert set(r.store.documents) == {"d0", "d1", "d2"}
    assert r.store.chunks["d1"] == expected_chunks(TEXT_A2)
    assert all(n == 1 for n in embedder.bought().values()), "nothing paid for was bought again"
    r.assert_all_committed()


async def test_a_rebalance_keeps_the_work_in_flight_of_the_partitions_it_gives_back() -> None:
    answer = asyncio.Event()
    embedder = FakeEmbedder()
    embedder.hold["Alpha"] = answer
    r = rig(log_of({0: [upsert("a", TEXT_A2, 1), upsert("c", TEXT_C, 1)]}), embedder=embedder)
    r.source.ready = lambda rec: rec.offset == 0 or bool(embedder.active)  # c once a is sent
    running = asyncio.create_task(r.worker.run())
    await until(lambda: "c" in r.store.documents and bool(embedder.active))
    assert r.source.callbacks is not None
    on_revoked, on_assigned = r.source.callbacks
    await asyncio.wait_for(on_revoked({P0}), 0.5)
    assert r.source.committed == {P0: 0}, "a, still being embedded, holds the partition's commit"
    with structlog.testing.capture_logs() as logged:
        await on_assigned({P0})  # the sticky assignor gave P0 back
    answer.set()
    await asyncio.wait_for(running, 3)
    [kept] = [e for e in logged if e["event"] == "work_kept"]
    assert (kept["records"], kept["partitions"], kept["dropped"]) == (1, 1, 0)
    assert ("resume_from", {0: 2}) in r.journal, "fetched on from where it had got to"
    assert [rec.offset for rec in r.source.delivered] == [0, 1], "nothing fetched twice"
    assert r.embedder.inputs() == Counter(chunk_contents(TEXT_A2) + chunk_contents(TEXT_C))
    assert set(r.store.documents) == {"a", "c"}
    r.assert_all_committed()


async def test_a_rebalance_drops_the_work_of_a_partition_it_loses_and_goes_on_with_the_rest() -> None:
    answer = asyncio.Event()
    embedder = FakeEmbedder()
    embedder.hold["Alpha"] = embedder.hold["Bravo"] = answer
    r = rig(log_of({0: [upsert("a", TEXT_A2, 1)], 1: [upsert("b", TEXT_B, 1)]}), embedder=embedder)
    r.source.ready = lambda rec: rec.partition == 0 or bool(embedder.active)  # b once a is sent
    running = asyncio.create_task(r.worker.run())
    await until(lambda: len(embedder.calls) == 2)
    assert r.source.callbacks is not None
    on_revoked, on_assigned = r.source.callbacks
    await asyncio.wait_for(on_revoked({P0, P1}), 0.5)
    r.source.assigned = {P0}  # another member joined and took P1
    with structlog.testing.capture_logs() as logged:
        await on_assigned({P0})
    answer.set()
    await asyncio.wait_for(running, 3)
    [kept] = [e for e in logged if e["event"] == "work_kept"]
    assert (kept["partitions"], kept["dropped"]) == (1, 1)
    assert set(r.store.documents) == {"a"}, "b is the new owner's to store"
    assert r.source.committed[P0] == 1
    assert r.source.committed.get(P1, 100) == 100, "and P1 committed here no further than b"
    assert r.worker.records_done == 1
    assert {sha256(c) for c in chunk_contents(TEXT_B)} <= set(r.store.ledger.vectors), "b's were paid: kept"


async def test_records_handed_out_while_an_assignment_is_handled_are_fetched_again_not_lost() -> None:
    answer = asyncio.Event()
    embedder = FakeEmbedder()
    embedder.hold["Alpha"] = answer
    r = rig(
        log_of({0: [upsert("a", TEXT_A2, 1), upsert("c", TEXT_C, 1)]}),
        embedder=embedder,
        settings=make_settings(SHUTDOWN_GRACE_SECONDS="0"),  # a revoke cannot settle: nothing is kept
    )
    handled = False
    r.source.ready = lambda rec: rec.offset == 0 or r.source.rebalancing or handled
    running = asyncio.create_task(r.worker.run())
    await until(lambda: bool(embedder.active))  # a is being embedded
    assert r.source.callbacks is not None
    on_revoked, on_assigned = r.source.callbacks
    r.source.rebalancing = True
    await on_revoked({P0})
    await until(lambda: r.source.position[P0] == 2)  # c handed out while the assignment is handled
    await on_assigned({P0})
    r.source.rebalancing, handled = False, True
    answer.set()
    await asyncio.wait_for(running, 3)
    assert set(r.store.documents) == {"a", "c"}, "c was fetched again from the commit"
    r.assert_all_committed()


async def test_an_assignment_that_fails_stops_the_worker_rather_than_leave_positions_unset() -> None:
    r = rig(log_of({0: [upsert("a", TEXT_C, 1)]}), stop_when_idle=None)

    async def broken(starts: object) -> int:
        raise RuntimeError("a bug in claim")

    r.store.claim = broken  # type: ignore[method-assign,assignment]
    running = asyncio.create_task(r.worker.run())
    await until(lambda: r.source.callbacks is not None)
    _, on_assigned = r.source.callbacks  # type: ignore[misc]
    with structlog.testing.capture_logs() as logged:
        await on_assigned({P0})
    with pytest.raises(RuntimeError, match="a bug in claim"):
        await asyncio.wait_for(running, 3)
    assert [e["event"] for e in logged if e["event"] == "assignment_failed"] == ["assignment_failed"]


async def test_stop_during_an_embedding_outage_ends_run_within_the_grace_period() -> None:
    grace = 0.1
    r = rig(
        log_of({0: [upsert("a", TEXT_C, 1), upsert("b", TEXT_B)]}),
        embedder=FakeEmbedder(failures=10**6),
        settings=make_settings(SHUTDOWN_GRACE_SECONDS=str(grace)),
        stop_when_idle=None,
    )
    running = asyncio.create_task(r.worker.run())
    await asyncio.wait_for(r.embedder.entered.wait(), 2)
    stopped_at = time.monotonic()
    r.worker.stop()
    await asyncio.wait_for(running, 2)
    assert time.monotonic() - stopped_at < grace + 0.3
    assert r.source.committed.get(P0, 0) == 0, "nothing stored, nothing committed past the start"
    assert r.store.documents == {}
    assert r.dead.letters == []
    assert r.source.stopped


@pytest.mark.parametrize("down", ["database", "dead_letters"])
async def test_stop_during_a_database_or_dead_letter_outage_ends_run_without_an_error(down: str) -> None:
    r = rig(
        log_of({0: [upsert("a", TEXT_C, 1), (b"x", b"garbage")]}),
        store=FakeStore(failures=10**6 if down == "database" else 0),
        dead=FakeDeadLetters(failures=10**6 if down == "dead_letters" else 0),
        settings=make_settings(SHUTDOWN_GRACE_SECONDS="0.1"),
        stop_when_idle=None,
    )
    running = asyncio.create_task(r.worker.run())
    await until(lambda: any(kind in ("db_failed", "dlq_failed") for kind, _ in r.journal))
    r.worker.stop()
    await asyncio.wait_for(running, 2)
    assert r.worker.failure is None
    if down == "database":
        assert r.source.committed.get(P0, 0) == 0, "nothing stored, nothing committed"
    else:
        assert r.source.committed.get(P0, 0) <= 1, "committed past a record whose dead letter was not sent"
        assert r.dead.letters == []


async def test_stop_stores_what_is_ready_fetches_nothing_more_and_keeps_what_it_paid_for() -> None:
    r = rig(
        log_of({0: [upsert("d0", TEXT_C, 1), *(upsert(f"d{i}", TEXT_B, 1) for i in range(1, 6))]}),
        embedder=FakeEmbedder(delay=0.1),
        stop_when_idle=None,  # only stop() ends this run
    )
    # d0 is stored before stop(), d1 is being embedded at stop(); the rest would be there for any
    # fetch after it.
    r.source.ready = lambda rec: rec.offset == 0 or (rec.offset == 1 and "d0" in r.store.documents)
    running = asyncio.create_task(r.worker.run())
    await until(lambda: "d0" in r.store.documents and len(r.embedder.calls) == 2)
    r.worker.stop()
    await asyncio.wait_for(running, 2)
    # (a fetch the loop asked for just before stop() may start just after it: it hands out nothing)
    assert [rec.offset for rec in r.source.delivered] == [0, 1], "nothing fetched after stop()"
    assert set(r.store.documents) == {"d0"}
    assert r.source.committed == {P0: 1}, "what was stored is committed; d1 is left to the next owner"
    assert r.source.stopped
    kept = {sha256(c) for c in chunk_contents(TEXT_B)}
    assert kept <= set(r.store.ledger.vectors), "d1's request was answered after stop(): paid, and kept"


async def test_done_and_remaining_always_add_up_to_the_records_and_done_never_falls_on_stop() -> None:
    r = rig(
        log_of({0: [upsert(f"d{i}", f"{TEXT_C} {i}", 1) for i in range(40)]}),
        max_records=5,
        embedder=FakeEmbedder(delay=0.02),
        stop_when_idle=None,
    )
    seen: list[tuple[int, int | None]] = []

    async def sample() -> None:
        while True:
            seen.append((r.worker.records_done, r.worker.remaining()))
            await asyncio.sleep(0.001)

    sampling = asyncio.create_task(sample())
    running = asyncio.create_task(r.worker.run())
    await until(lambda: r.worker.records_done >= 10, limit=5)
    r.worker.stop()
    await asyncio.wait_for(running, 5)
    sampling.cancel()
    done = [d for d, _ in seen]
    assert done == sorted(done), "the count of records done never falls, not while draining on stop"
    assert max(done) > 10, "records finished while draining count"
    assert {d + rest for d, rest in seen if rest is not None} == {40}, "done + remaining is every record"


async def test_stop_abandons_a_hung_request_after_the_grace_period() -> None:
    grace = 0.1
    r = rig(
        log_of({0: [upsert("a", TEXT_C, 1)]}),
        embedder=FakeEmbedder(hang=True),
        settings=make_settings(SHUTDOWN_GRACE_SECONDS=str(grace)),
        stop_when_idle=None,
    )
    running = asyncio.create_task(r.worker.run())
    await asyncio.wait_for(r.embedder.entered.wait(), 2)
    stopped_at = time.monotonic()
    r.worker.stop()
    await asyncio.wait_for(running, grace + 0.7)
    assert time.monotonic() - stopped_at >= grace - 0.05, "the request was given its grace period"
    assert r.source.committed.get(P0, 0) == 0, "nothing stored, nothing committed past the start"
    assert r.store.documents == {}
    assert r.embedder.active == [], "the hung request was cancelled"
    assert r.source.stopped


# -- the database's own record of how far it got ------------------------------------------------


async def test_an_assignment_rewinds_a_partition_to_where_a_restored_database_got() -> None:
    r = rig(log_of({0: [upsert(f"d{i}", versioned(f"d{i}", 1), 1) for i in range(6)]}), stop_when_idle=None)
    running = asyncio.create_task(r.worker.run())
    await until(lambda: r.source.committed.get(P0) == 6)
    assert r.store.offsets == {P0: 6}, "the database recorded how far it got"
    assert r.source.callbacks is not None
    on_revoked, on_assigned = r.source.callbacks
    await on_revoked({P0})
    # Restored from a backup taken after d0 and d1: the rest is gone from the database.
    for doc_id in ("d2", "d3", "d4", "d5"):
        r.store.documents.pop(doc_id)
        r.store.chunks.pop(doc_id)
    r.store.offsets[P0] = 2
    with structlog.testing.capture_logs() as logged:
        await on_assigned({P0})
    await until(lambda: set(r.store.documents) == {f"d{i}" for i in range(6)})
    r.worker.stop()
    await asyncio.wait_for(running, 3)
    rewound = [e for e in logged if e["event"] == "rewound_to_database"]
    assert [(e["partition"], e["committed"], e["database"]) for e in rewound] == [(0, 6, 2)]
    assert ("rewind", {0: 2}) in r.journal
    assert r.source.committed == {P0: 6}, "no commit went backwards"


async def test_a_partition_whose_last_records_were_dead_lettered_is_not_rewound_on_reassignment() -> None:
    records = log_of({0: [upsert("a", TEXT_C), (b"bad", b"{not json"), (b"worse", b"[1]")]})
    r = rig(records, stop_when_idle=None)
    r.source.ready = lambda rec: rec.offset == 0 or "a" in r.store.documents  # the poison after the write
    running = asyncio.create_task(r.worker.run())
    await until(lambda: r.source.committed.get(P0) == 3)
    assert r.source.callbacks is not None
    on_revoked, on_assigned = r.source.callbacks
    await on_revoked({P0})
    await on_assigned({P0})
    r.worker.stop()
    await asyncio.wait_for(running, 3)
    assert not [j for j in r.journal if j[0] == "rewind"], "nothing to re-read"
    assert len(r.dead.letters) == 2, "no dead letter sent twice"


async def test_a_database_further_behind_than_the_topic_holds_is_reported_as_lost_records() -> None:
    r = rig(log_of({1: [upsert(f"d{i}", versioned(f"d{i}", 1), 1) for i in range(4)]}), stop_when_idle=None)
    running = asyncio.create_task(r.worker.run())
    await until(lambda: r.source.committed.get(P1) == 104)
    assert r.source.callbacks is not None
    on_revoked, on_assigned = r.source.callbacks
    await on_revoked({P1})
    r.store.offsets[P1] = 60  # a backup older than the topic's retention (the log starts at 100)
    with structlog.testing.capture_logs() as logged:
        await on_assigned({P1})
    r.worker.stop()
    await asyncio.wait_for(running, 3)
    [lost] = [e for e in logged if e["event"] == "database_behind_retention"]
    assert (lost["database"], lost["resumed"], lost["lost"], lost["log_level"]) == (60, 100, 40, "error")


async def test_a_member_whose_partitions_were_claimed_by_another_writes_nothing_more() -> None:
    release = asyncio.Event()
    embedder = FakeEmbedder()
    embedder.hold["doc"] = release  # the worker is "frozen" with these documents in flight
    records = log_of({0: [upsert(f"z{i}", versioned(f"z{i}", 1)) for i in range(3)]})
    r = rig(records, embedder=embedder, stop_when_idle=None)
    running = asyncio.create_task(r.worker.run())
    await until(lambda: r.source.callbacks is not None)
    _, on_assigned = r.source.callbacks  # type: ignore[misc]
    await on_assigned({P0})
    await asyncio.wait_for(embedder.entered.wait(), 2)
    await r.store.claim({P0: 0})  # meanwhile the group gave P0 to another member, which claimed it
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logged:
        release.set()
        await until(lambda: any(e["event"] == "partitions_lost" for e in logged))
    r.worker.stop()
    await asyncio.wait_for(running, 3)
    assert r.store.documents == {}, "nothing written over the new owner's rows"
    assert r.source.committed.get(P0, 0) == 0, "no offset committed past what was abandoned"
    assert r.source.paused, "and nothing more fetched until the group assigns partitions again"
    assert [e["event"] for e in logged if e["event"] in ("write_fenced", "partitions_lost")][:2] == [
        "write_fenced",
        "partitions_lost",
    ]
    # The lines logged during a write carry its documents' trace ids (made: these have no traceparent).
    fenced = next(e for e in logged if e["event"] == "write_fenced")
    assert len(fenced["trace_ids"]) == fenced["documents"] and all(len(t) == 32 for t in fenced["trace_ids"])


async def test_a_full_redelivery_keeps_a_document_recreated_after_its_tombstone() -> None:
    # Found by `verify --topic`: the tombstone, redelivered, deleted the document at the version of
    # the upsert after it, which then could not bring it back (equal version over a deleted one).
    records = log_of({0: [tombstone("x"), upsert("x", "Recreated after its tombstone.", 3)]})
    first = rig(records)
    await first.run()
    assert first.store.documents["x"] == DocState(3, False)
    again = rig(records, store=first.store)
    await again.run()
    assert first.store.documents["x"] == DocState(3, False), "the redelivery changed nothing"
    assert again.embedder.calls == []
    again.assert_all_committed()
