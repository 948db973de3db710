"""chunk_text: the CONTRACT's chunk invariants as properties, and where it prefers to break."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.chunk import Chunk, chunk_text

PROPERTIES = settings(max_examples=300, deadline=None, database=None)

# Pieces that stress the breaking rules: words, sentence ends (Latin and CJK), paragraph breaks,
# runs of blank lines, CJK without spaces, emoji (astral code points), one very long word, and
# whitespace that is not a plain space.
_PIECES = st.one_of(
    st.sampled_from(["word", "alpha", "beta", "é", "naïve", "Straße", "ünïcödé"]),
    st.sampled_from([" ", "  ", "\t", "\n", "\n\n", "\n\n\n\n\n", " \n \n ", "\u3000", "\u00a0", "\r\n"]),
    st.sampled_from([". ", "! ", "? ", '." ', "…", "。", "\uff01", "\uff1f", "...", "!)"]),
    st.sampled_from(["漢字仮名交じり文", "今日は晴れです", "中文没有空格的句子", "한국어"]),
    st.sampled_from(["😀", "👩‍👩‍👧‍👦", "🇺🇳", "🙂🙃"]),
    st.integers(1, 120).map(lambda n: "x" * n),
    st.text(max_size=8),
)
TEXTS = st.one_of(
    st.lists(_PIECES, max_size=80).map("".join),
    st.text(max_size=400),
    st.text(alphabet=st.sampled_from(" \n\t\u3000"), max_size=50),  # whitespace only
)


@st.composite
def sizes(draw: st.DrawFn) -> tuple[int, int]:
    size = draw(st.integers(16, 120))
    overlap = draw(st.integers(0, size // 2 - 1))
    return size, overlap


def check_invariants(text: str, chunks: list[Chunk], size: int, overlap: int) -> None:
    assert [c.index for c in chunks] == list(range(len(chunks)))
    for c in chunks:
        assert c.content == text[c.char_start : c.char_end]
        assert 0 < len(c.content) <= size
        assert c.content == c.content.strip(), "no leading or trailing whitespace"
    for before, after in pairwise(chunks):
        assert after.char_start > before.char_start, "starts strictly increase"
        assert after.char_end > before.char_end, "each chunk reaches past the one before"
        assert before.char_end - after.char_start <= overlap, "neighbours share at most `overlap` characters"
    covered = [False] * len(text)
    for c in chunks:
        covered[c.char_start : c.char_end] = [True] * (c.char_end - c.char_start)
    missed = [i for i, ch in enumerate(text) if not ch.isspace() and not covered[i]]
    assert not missed, f"non-space characters outside every chunk at {missed[:5]}"


def test_a_break_with_only_whitespace_after_it_ends_the_text() -> None:
    # Found by the property below: the overlap went back into the last chunk, whose remainder was
    # only spaces, and the text ended on a chunk inside the one before.
    text = "漢字仮名交じり文漢字仮名交じり文 .  "
    chunks = chunk_text(text, size=19, overlap=1)
    check_invariants(text, chunks, 19, 1)
    assert [c.content for c in chunks] == [text.strip()]


@PROPERTIES
@given(text=TEXTS, size_overlap=sizes())
def test_chunks_hold_every_invariant(text: str, size_overlap: tuple[int, int]) -> None:
    size, overlap = size_overlap
    chunks = chunk_text(text, size=size, overlap=overlap)
    check_invariants(text, chunks, size, overlap)
    assert chunk_text(text, size=size, overlap=overlap) == chunks, "deterministic"
    assert bool(chunks) == bool(text.strip()), "no chunks exactly when the text is blank"


@PROPERTIES
@given(
    text=st.lists(st.sampled_from(["漢", "字", "😀", "é", "x", "-"]), min_size=1, max_size=300).map("".join),
    size_overlap=sizes(),
)
def test_text_without_any_boundary_is_cut_into_full_windows(text: str, size_overlap: tuple[int, int]) -> None:
    size, overlap = size_overlap
    chunks = chunk_text(text, size=size, overlap=overlap)
    # No space to start an overlap on and nothing to break at: consecutive windows of `size`.
    assert [(c.char_start, c.char_end) for c in chunks] == [
        (start, min(start + size, len(text))) for start in range(0, len(text), size)
    ]


@pytest.mark.parametrize("text", ["", " ", "\n\n\n", " \t\r\n\u3000\u00a0 \x0b\x0c"])
def test_blank_text_has_no_chunks(text: str) -> None:
    assert chunk_text(text, size=16, overlap=0) == []


def test_short_text_is_one_stripped_chunk() -> None:
    assert chunk_text("\n\n  Hello, world.  \n", size=100, overlap=10) == [Chunk(0, "Hello, world.", 4, 17)]


def test_paragraph_break_wins_over_a_later_sentence_end() -> None:
    text = "Alpha beta gamma delta eps.\n\nZeta eta. Theta iota kappa lambda mu nu xi omicron"
    # Window [0, 40): a paragraph break at 27..29 and a sentence end at 38 both lie in its second half.
    first = chunk_text(text, size=40, overlap=0)[0]
    assert first.content == "Alpha beta gamma delta eps."
    assert (first.char_start, first.char_end) == (0, 27)


def test_sentence_end_wins_over_a_later_space() -> None:
    text = "Alpha beta gamma delta. Epsilon zeta eta theta iota kappa lambda mu nu"
    assert [c.content for c in chunk_text(text, size=40, overlap=0)] == [
        "Alpha beta gamma delta.",
        "Epsilon zeta eta theta iota kappa",
        "lambda mu nu",
    ]


def test_paragraph_break_in_the_first_half_is_not_used() -> None:
    text = "Alpha beta gamma.\n\nDelta epsilon. Zeta eta theta iota kappa lambda mu"
    # The paragraph break at 17 would make a chunk under half the window: the sentence end at 33 wins.
    assert chunk_text(text, size=40, overlap=0)[0].content == "Alpha beta gamma.\n\nDelta epsilon."


def test_cjk_sentence_ends_break_without_spaces() -> None:
    text = "今日は晴れです。明日は雨が降るでしょう。明後日は曇りです。"
    assert [c.content for c in chunk_text(text, size=20, overlap=0)] == [
        "今日は晴れです。明日は雨が降るでしょう。",
        "明後日は曇りです。",
    ]


def test_breaks_at_the_last_space_when_no_sentence_ends() -> None:
    text = "Alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu"
    assert [c.content for c in chunk_text(text, size=40, overlap=0)] == [
        "Alpha beta gamma delta epsilon zeta eta",
        "theta iota kappa lambda mu nu",
    ]


def test_a_word_longer_than_the_window_is_cut_hard() -> None:
    chunks = chunk_text("x" * 50, size=20, overlap=5)
    assert [(c.char_start, c.char_end) for c in chunks] == [(0, 20), (20, 40), (40, 50)]


def test_overlap_starts_on_a_word() -> None:
    text = "one two three four five six seven eight nine ten eleven twelve"
    chunks = chunk_text(text, size=20, overlap=6)
    assert [c.content for c in chunks[:3]] == [
        "one two three four",
        "four five six seven",
        "seven eight nine",
    ]
    for c in chunks[1:]:
        assert text[c.char_start - 1] == " ", "a later chunk starts at the beginning of a word"


@pytest.mark.parametrize(("size", "overlap"), [(16, 8), (16, 9), (100, 50), (101, 50)])
def test_overlap_of_half_the_size_or_more_is_refused(size: int, overlap: int) -> None:
    with pytest.raises(ValueError, match="overlap"):
        chunk_text("some text", size=size, overlap=overlap)
