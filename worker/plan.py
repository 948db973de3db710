"""Which event of a batch wins for each document, given what is stored. Pure: no I/O.

The CONTRACT's rule, applied as if every event arrived one by one in partition order: an event
whose version is lower than the stored one changes nothing, nor does an equal version over a
deleted document (so a late redelivery cannot bring a deleted document back); an event without
a version applies and keeps the stored version. Only each document's last applying event is
written, so Postgres touches each row once per batch and no superseded version is embedded.
An event at or before the stored one's offset (a redelivery) is already applied: it is skipped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from worker.decode import DocumentEvent
from worker.types import Record


@dataclass(frozen=True, slots=True)
class DocState:
    version: int | None
    deleted: bool
    # Where the stored state's event was read: (topic, partition, offset). Not part of the state.
    source: tuple[str, int, int] | None = field(default=None, compare=False)

    def has_applied(self, topic: str, partition: int, offset: int) -> bool:
        """Whether the event at this position is already in the stored state: a document's
        events are applied in partition order, so every one up to the stored event's offset has
        been (or was superseded). Applying such a redelivered event again would not be the
        CONTRACT's sequence: a tombstone redelivered before the upsert that recreated the
        document would delete it at that upsert's version, and the upsert could not undo that."""
        return self.source is not None and self.source[:2] == (topic, partition) and offset <= self.source[2]


@dataclass(frozen=True, slots=True)
class Change:
    """The winning event for one document and the state it leaves behind."""

    event: DocumentEvent
    before: DocState | None
    after: DocState


def apply(state: DocState | None, event: DocumentEvent) -> DocState | None:
    """The state after ``event``, or None when the event changes nothing."""
    if state is not None and state.version is not None and event.version is not None:
        if event.version < state.version:
            return None
        if event.version == state.version and state.deleted:
            return None
    version = event.version if event.version is not None else (state.version if state else None)
    return DocState(version, deleted=event.op == "delete")


def plan(events: Iterable[tuple[Record, DocumentEvent]], stored: Mapping[str, DocState]) -> list[Change]:
    """Fold ``events`` (in partition order) over ``stored``; one Change per changed document, by id."""
    state: dict[str, DocState | None] = {}
    winner: dict[str, DocumentEvent] = {}
    for record, event in events:
        saved = stored.get(event.doc_id)
        if saved is not None and saved.has_applied(record.topic, record.partition, record.offset):
            continue
        current = state[event.doc_id] if event.doc_id in state else stored.get(event.doc_id)
        after = apply(current, event)
        if after is not None:
            state[event.doc_id] = after
            winner[event.doc_id] = event
    changes = []
    for doc_id in sorted(winner):
        after = state[doc_id]
        assert after is not None
        changes.append(Change(winner[doc_id], stored.get(doc_id), after))
    return changes
