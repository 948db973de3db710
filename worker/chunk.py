"""Split a document's text into overlapping chunks. Pure: no I/O.

Chunks are at most ``size`` units (characters, or tokens given ``units``) and break at the
last paragraph boundary in the second half of the window, else the last sentence end, else the
last whitespace, else hard. Neighbours share about ``overlap`` units, starting on a word. A
chunk that ``fits`` refuses (over the embedding model's input limit) is made smaller the same
way, halving its window until it fits: never cut short, never sent to fail. Every chunk is
exactly ``text[char_start:char_end]`` (Python string indices) with no leading or trailing
whitespace, and every non-space character of the text lies in at least one chunk.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Protocol

from worker.errors import ChunkError

if TYPE_CHECKING:
    from worker.settings import Settings
    from worker.tokens import TokenCounter

# CJK full stops end a sentence with or without a space after them.
_SENTENCE_END: Final = re.compile(r"[.!?。！？…][\"'”’)\]]*(?=\s)|[。！？]")  # noqa: RUF001 - meant
_SPACE: Final = re.compile(r"\s")
MAX_CHUNKS_PER_DOCUMENT: Final = 10_000


@dataclass(frozen=True, slots=True)
class Chunk:
    index: int
    content: str
    char_start: int
    char_end: int
    digest: bytes = field(init=False, repr=False, compare=False)  # sha256 of the content: the dedup key

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", hashlib.sha256(self.content.encode()).digest())


class Units(Protocol):
    """Where a window of ``size`` units from ``start`` ends; where ``count`` units before ``end`` start."""

    def end(self, start: int, size: int) -> int: ...
    def back(self, end: int, count: int) -> int: ...


class Characters:
    def __init__(self, length: int) -> None:
        self._length = length

    def end(self, start: int, size: int) -> int:
        return min(start + size, self._length)

    def back(self, end: int, count: int) -> int:
        return end - count


def chunk_text(
    text: str,
    *,
    size: int,
    overlap: int,
    units: Units | None = None,
    fits: Callable[[str], bool] | None = None,
) -> list[Chunk]:
    if overlap >= size // 2:
        raise ValueError("overlap must be less than half of size")
    n = len(text)
    units = units or Characters(n)
    chunks: list[Chunk] = []
    start = _skip_space(text, 0, n)
    while start < n:
        end, stop, made_smaller = _window(text, start, units.end(start, size), fits)
        if chunks and stop <= chunks[-1].char_end:  # made smaller inside the one before: start after it
            start = _skip_space(text, chunks[-1].char_end, n)
            continue
        chunks.append(Chunk(len(chunks), text[start:stop], start, stop))
        if _skip_space(text, end, n) >= n:  # nothing but whitespace after it: the text is covered
            break
        following = max(units.back(end, overlap), start + 1)
        if made_smaller:  # share at most half of it, so that the next one starts well after
            following = max(following, start + (end - start) // 2)
        start = _skip_space(text, _next_start(text, start, end, following), n)
    return chunks


def _window(
    text: str, start: int, hard_end: int, fits: Callable[[str], bool] | None
) -> tuple[int, int, bool]:
    """Where a chunk from ``start`` ends (``end``, and ``stop`` without its trailing whitespace),
    halving the window until ``fits`` takes it; and whether it had to."""
    end = len(text) if hard_end >= len(text) else _break_point(text, start, hard_end)
    stop = _trim(text, start, end)
    made_smaller = False
    while fits is not None and stop - start > 1 and not fits(text[start:stop]):
        end = _break_point(text, start, start + max((stop - start) // 2, 1))
        stop = _trim(text, start, end)
        made_smaller = True
    return end, stop, made_smaller


def _trim(text: str, start: int, end: int) -> int:
    while end > start and text[end - 1].isspace():
        end -= 1
    return end


def _break_point(text: str, start: int, hard_end: int) -> int:
    """Where a chunk starting at ``start`` should end, at most ``hard_end``."""
    low = start + (hard_end - start) // 2
    paragraph = text.rfind("\n\n", low, hard_end)
    if paragraph != -1:
        return paragraph + 2
    last_sentence = None
    for last_sentence in _SENTENCE_END.finditer(text, low, hard_end):  # noqa: B007 - want the last
        pass
    if last_sentence is not None:
        return last_sentence.end()
    for space in range(hard_end, low, -1):
        if text[space - 1].isspace():
            return space
    return hard_end


def _next_start(text: str, start: int, end: int, candidate: int) -> int:
    """The next chunk starts at ``candidate``, moved forward onto a word."""
    if candidate >= end or text[candidate - 1].isspace():
        return candidate
    space = _SPACE.search(text, candidate, end)
    return end if space is None else space.start()


def _skip_space(text: str, i: int, n: int) -> int:
    while i < n and text[i].isspace():
        i += 1
    return i


def chunk_document(text: str, settings: Settings, tokens: TokenCounter) -> list[Chunk]:
    """A document's chunks as the settings (a generation's) say: CHUNK_SIZE and CHUNK_OVERLAP
    in CHUNK_UNIT, no chunk over EMBEDDING_MAX_INPUT_TOKENS. ChunkError past
    MAX_CHUNKS_PER_DOCUMENT."""
    chunks = chunk_text(
        text,
        size=settings.chunk_size,
        overlap=settings.chunk_overlap,
        units=tokens.units(text) if settings.chunk_unit == "tokens" else None,
        fits=lambda chunk: tokens.within(chunk, settings.embedding_max_input_tokens),
    )
    if len(chunks) > MAX_CHUNKS_PER_DOCUMENT:
        raise ChunkError(f"document yields {len(chunks)} chunks, more than {MAX_CHUNKS_PER_DOCUMENT}")
    return chunks
