"""The version rule (worker/plan.py) and plan(): folding a batch must equal applying it event by event."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.decode import DocumentEvent, Op
from worker.plan import DocState, apply, plan
from worker.types import Record

LIVE, DELETED = False, True


def event(doc_id: str, version: int | None, op: Op = "upsert", text: str = "") -> DocumentEvent:
    return DocumentEvent(doc_id, op, text if op == "upsert" else "", version, None, None)


def sequential(events: Sequence[DocumentEvent], stored: Mapping[str, DocState]) -> dict[str, DocState]:
    """The CONTRACT read literally: apply each event in partition order, one at a time.

    An event changes nothing when its version is below the stored one, or equals it over a deleted
    document; otherwise it sets `deleted` from its op and the version (keeping the stored one when
    it has none).
    """
    state = dict(stored)
    for e in events:
        current = state.get(e.doc_id)
        stored_version = current.version if current is not None else None
        if (
            current is not None
            and e.version is not None
            and stored_version is not None
            and (e.version < stored_version or (e.version == stored_version and current.deleted))
        ):
            continue
        state[e.doc_id] = DocState(e.version if e.version is not None else stored_version, e.op == "delete")
    return state


# -- apply: one event over one state --------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "e", "expected"),
    [
        pytest.param(None, event("a", 3), DocState(3, LIVE), id="new-versioned"),
        pytest.param(None, event("a", None), DocState(None, LIVE), id="new-unversioned"),
        pytest.param(None, event("a", 3, "delete"), DocState(3, DELETED), id="delete-unseen-keeps-tombstone"),
        pytest.param(DocState(5, LIVE), event("a", 4), None, id="lower-version-ignored"),
        pytest.param(DocState(5, DELETED), event("a", 4), None, id="lower-version-over-deleted-ignored"),
        pytest.param(DocState(5, LIVE), event("a", 4, "delete"), None, id="lower-version-delete-ignored"),
        pytest.param(DocState(5, DELETED), event("a", 5), None, id="equal-version-over-deleted-ignored"),
        pytest.param(
            DocState(5, DELETED), event("a", 5, "delete"), None, id="equal-delete-over-deleted-ignored"
        ),
        pytest.param(
            DocState(5, LIVE), event("a", 5), DocState(5, LIVE), id="equal-version-over-live-applies"
        ),
        pytest.param(
            DocState(5, LIVE), event("a", 5, "delete"), DocState(5, DELETED), id="equal-delete-over-live"
        ),
        pytest.param(DocState(5, DELETED), event("a", 6), DocState(6, LIVE), id="higher-version-revives"),
        pytest.param(DocState(5, LIVE), event("a", None), DocState(5, LIVE), id="unversioned-keeps-version"),
        pytest.param(
            DocState(5, DELETED), event("a", None), DocState(5, LIVE), id="unversioned-over-deleted"
        ),
        pytest.param(
            DocState(5, LIVE), event("a", None, "delete"), DocState(5, DELETED), id="unversioned-delete"
        ),
        pytest.param(DocState(None, LIVE), event("a", 0), DocState(0, LIVE), id="versioned-over-unversioned"),
        pytest.param(
            DocState(None, DELETED), event("a", 0), DocState(0, LIVE), id="versioned-over-unversioned-del"
        ),
    ],
)
def test_version_rule(state: DocState | None, e: DocumentEvent, expected: DocState | None) -> None:
    assert apply(state, e) == expected


# -- plan: a batch over what is stored ------------------------------------------------------


def logged(events: Sequence[DocumentEvent]) -> list[tuple[Record, DocumentEvent]]:
    """Events as records of one partition, in order, past anything stored."""
    return [(Record("docs", 0, 1000 + i, None, None), e) for i, e in enumerate(events)]


def test_stale_event_changes_nothing() -> None:
    assert plan(logged([event("a", 1)]), {"a": DocState(2, LIVE)}) == []


def test_equal_version_over_deleted_changes_nothing() -> None:
    assert plan(logged([event("a", 2, text="back")]), {"a": DocState(2, DELETED)}) == []


def test_equal_version_over_live_is_written_again() -> None:
    [change] = plan(logged([event("a", 2, text="same")]), {"a": DocState(2, LIVE)})
    assert change.event.text == "same"
    assert (change.before, change.after) == (DocState(2, LIVE), DocState(2, LIVE))


def test_unversioned_event_applies_and_keeps_the_stored_version() -> None:
    [change] = plan(logged([event("a", None, text="new")]), {"a": DocState(9, LIVE)})
    assert change.after == DocState(9, LIVE)


def test_the_last_applying_event_of_a_document_wins() -> None:
    v1, v3, v2 = event("a", 1, text="one"), event("a", 3, text="three"), event("a", 2, text="two")
    [change] = plan(logged([v1, v3, v2]), {})
    assert change.event is v3, "v2 arrives after v3 and is stale"
    assert (change.before, change.after) == (None, DocState(3, LIVE))


def test_delete_then_redelivered_upsert_of_the_same_version_stays_deleted() -> None:
    delete, upsert = event("a", 2, "delete"), event("a", 2, text="zombie")
    [change] = plan(logged([delete, upsert]), {"a": DocState(1, LIVE)})
    assert change.event is delete
    assert change.after == DocState(2, DELETED)


def test_unversioned_event_after_a_versioned_one_in_the_batch_wins_and_keeps_its_version() -> None:
    versioned, unversioned = event("a", 5, text="five"), event("a", None, text="later")
    [change] = plan(logged([versioned, unversioned]), {"a": DocState(4, LIVE)})
    assert change.event is unversioned
    assert (change.before, change.after) == (DocState(4, LIVE), DocState(5, LIVE))


def test_changes_are_sorted_by_id_and_carry_what_was_stored() -> None:
    stored = {"b": DocState(1, LIVE), "c": DocState(7, LIVE)}
    changes = plan(logged([event("c", 8), event("a", 1), event("c", 6), event("b", None, "delete")]), stored)
    assert [c.event.doc_id for c in changes] == ["a", "b", "c"]
    assert [c.before for c in changes] == [None, DocState(1, LIVE), DocState(7, LIVE)]
    assert [c.after for c in changes] == [DocState(1, LIVE), DocState(1, DELETED), DocState(8, LIVE)]


def test_empty_batch_plans_nothing() -> None:
    assert plan(logged([]), {"a": DocState(1, LIVE)}) == []


# -- plan agrees with sequential application ------------------------------------------------

IDS = st.sampled_from(["a", "b", "c", "d"])
VERSIONS = st.none() | st.integers(0, 4)
EVENTS = st.lists(
    st.builds(event, IDS, VERSIONS, st.sampled_from(["upsert", "delete"]), st.text(max_size=3)), max_size=25
)
STORED = st.dictionaries(IDS, st.builds(DocState, VERSIONS, st.booleans()), max_size=4)


@settings(max_examples=500, deadline=None, database=None)
@given(events=EVENTS, stored=STORED)
def test_plan_equals_applying_events_one_by_one(
    events: list[DocumentEvent], stored: dict[str, DocState]
) -> None:
    changes = plan(logged(events), stored)

    folded = dict(stored)
    for change in changes:
        folded[change.event.doc_id] = change.after
    assert folded == sequential(events, stored)

    ids = [c.event.doc_id for c in changes]
    assert ids == sorted(set(ids)), "one change per document, by id"
    for change in changes:
        doc_id = change.event.doc_id
        assert change.before == stored.get(doc_id)
        # The winner is the document's last event that changed something when applied in order.
        applying = [e for i, e in enumerate(events) if e.doc_id == doc_id and _applies(events[:i], stored, e)]
        assert applying, "a document with no applying event must not be planned"
        assert change.event is applying[-1]
    untouched = {e.doc_id for e in events} - set(ids)
    for doc_id in untouched:
        assert sequential(events, stored).get(doc_id) == stored.get(doc_id)


def _applies(before: Sequence[DocumentEvent], stored: Mapping[str, DocState], e: DocumentEvent) -> bool:
    """Whether ``e`` applies after ``before``: unless the rule ignores it (unchanged state counts)."""
    current = sequential(before, stored).get(e.doc_id)
    if current is None or current.version is None or e.version is None:
        return True
    return not (e.version < current.version or (e.version == current.version and current.deleted))
