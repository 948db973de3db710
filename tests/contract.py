"""Names the public contract (../shared/CONTRACT.md) fixes, written out here rather than taken
from the code, so that a test comparing the two can fail."""

from __future__ import annotations

# CONTRACT, Dead-letter records: the headers every dead letter carries.
DLQ_HEADERS = frozenset(
    {
        "dlq.original.topic",
        "dlq.original.partition",
        "dlq.original.offset",
        "dlq.error.stage",
        "dlq.error.class",
        "dlq.error.message",
        "dlq.attempts",
        "dlq.failed.at",
    }
)
