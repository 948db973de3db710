"""Split a document's text into overlapping chunks. Pure: no I/O.

Chunks are at most ``size`` characters and break at the last paragraph boundary in the
second half of the window, else the last sentence end, else the last whitespace, else hard.
Neighbours share about ``overlap`` characters, starting on a word. Every chunk is exactly
``text[char_start:char_end]`` (Python string indices) with no leading or trailing whitespace,
and every non-space character of the text lies in at least one chunk.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Final

# CJK full stops end a sentence with or without a space after them.
_SENTENCE_END: Final = re.compile(r"[.!?。！？…][\"'”’)\]]*(?=\s)|[。！？]")  # noqa: RUF001 - meant
_SPACE: Final = re.compile(r"\s")


@dataclass(frozen=True, slots=True)
class Chunk:
    index: int
    content: str
    char_start: int
    char_end: int
    digest: bytes = field(init=False, repr=False, compare=False)  # sha256 of the content: the dedup key

    def __post_init__(self) -> None:
        object.__setattr__(self, "digest", hashlib.sha256(self.content.encode()).digest())


def chunk_text(text: str, *, size: int, overlap: int) -> list[Chunk]:
    if overlap >= size // 2:
        raise ValueError("overlap must be less than half of size")
    n = len(text)
    chunks: list[Chunk] = []
    start = _skip_space(text, 0, n)
    while start < n:
        end = n if start + size >= n else _break_point(text, start, start + size)
        stop = end
        while stop > start and text[stop - 1].isspace():
            stop -= 1
        chunks.append(Chunk(len(chunks), text[start:stop], start, stop))
        if _skip_space(text, end, n) >= n:  # nothing but whitespace after it: the text is covered
            break
        start = _skip_space(text, _next_start(text, start, end, overlap), n)
    return chunks


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


def _next_start(text: str, start: int, end: int, overlap: int) -> int:
    """The next chunk starts ``overlap`` characters before ``end``, moved forward onto a word."""
    candidate = max(end - overlap, start + 1)
    if candidate >= end or text[candidate - 1].isspace():
        return candidate
    space = _SPACE.search(text, candidate, end)
    return end if space is None else space.start()


def _skip_space(text: str, i: int, n: int) -> int:
    while i < n and text[i].isspace():
        i += 1
    return i
