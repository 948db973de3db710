"""The values every stage passes along: a fetched record, its headers, an embedding vector.

Nothing here talks to Kafka, PostgreSQL or HTTP, so the pure core (decode, plan, chunk, the
in-flight window) can import it without an adapter. A partition is aiokafka's TopicPartition,
a plain named tuple of (topic, partition).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from aiokafka.structs import TopicPartition

__all__ = ["Headers", "Record", "TopicPartition", "Vector"]

Headers = Sequence[tuple[str, bytes]]
Vector = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Record:
    """One fetched Kafka record, and where it came from."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Headers = ()
    size: int = field(default=0, compare=False)

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)
