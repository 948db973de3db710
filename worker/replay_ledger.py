"""What a replay run commits, so that letters it leaves in place stay reachable.

The group's committed offset on a partition stops at the first letter a run leaves in place;
the letters it handled beyond that are named in the commit's metadata (as runs of offsets), so
the next run passes over them. A broker keeps 4,096 characters of metadata by default
(``offset.metadata.max.bytes``): a run that would need more stops that partition there.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

LEDGER_PREFIX = "replay-done-v1:"
LEDGER_BUDGET = 3_000  # characters of commit metadata, within the broker's 4,096


class Ranges:
    """Ascending offsets kept as runs, small enough for a commit's metadata."""

    def __init__(self, runs: list[tuple[int, int]] | None = None) -> None:
        self.runs = runs or []  # (first, end) with end exclusive, ascending, disjoint

    def __contains__(self, offset: int) -> bool:
        i = bisect.bisect_right(self.runs, (offset, float("inf"))) - 1
        return i >= 0 and self.runs[i][0] <= offset < self.runs[i][1]

    def add(self, offset: int) -> None:
        """Add an offset above every one held."""
        if self.runs and self.runs[-1][1] == offset:
            self.runs[-1] = (self.runs[-1][0], offset + 1)
        else:
            self.runs.append((offset, offset + 1))

    def from_(self, base: int) -> Ranges:
        return Ranges([(max(first, base), end) for first, end in self.runs if end > base])

    def encode(self, base: int) -> str:
        """``gap:length`` per run, each gap counted from the end of the one before (or ``base``)."""
        parts, previous = [], base
        for first, end in self.runs:
            parts.append(f"{first - previous}:{end - first}")
            previous = end
        return LEDGER_PREFIX + ",".join(parts) if parts else ""

    @classmethod
    def decode(cls, text: str, base: int) -> Ranges:
        if not text.startswith(LEDGER_PREFIX):
            return cls()  # none, or another tool's metadata
        runs, previous = [], base
        try:
            for part in filter(None, text[len(LEDGER_PREFIX) :].split(",")):
                gap, length = (int(n) for n in part.split(":"))
                runs.append((previous + gap, previous + gap + length))
                previous += gap + length
        except ValueError:
            return cls()
        return cls(runs)


@dataclass
class Ledger:
    """One partition's progress in this run: what to commit so that nothing left is lost."""

    start: int  # where the group stood when the run began
    before: Ranges  # handled by earlier runs, at or after ``start``
    done: Ranges = field(default_factory=Ranges)
    first_left: int | None = None
    position: int | None = None  # one past the last offset read
    budget: int = LEDGER_BUDGET  # characters of metadata the broker keeps (0: it keeps none)

    def commit(self) -> tuple[int, str] | None:
        if self.position is None:
            return None
        offset = self.position if self.first_left is None else self.first_left
        return offset, self.done.from_(offset).encode(offset)

    def fits(self, offset: int) -> bool:
        """Whether marking ``offset`` handled keeps the commit within the broker's metadata limit."""
        if self.first_left is None:
            return True  # nothing left in place: the commit moves past it, no metadata
        trial = Ranges(list(self.done.runs))
        trial.add(offset)
        return len(trial.from_(self.first_left).encode(self.first_left)) <= self.budget

    def mark(self, offset: int, handled: bool) -> None:
        if handled:
            self.done.add(offset)
        elif self.first_left is None:
            self.first_left = offset
        self.position = offset + 1
