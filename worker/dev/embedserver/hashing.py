"""Hash embeddings: signed feature hashing of words, word bigrams and in-word character 3-grams."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

Vectors = npt.NDArray[np.float32]


_WORD = re.compile(r"\w+")
_UNIGRAM_WEIGHT = 1.0
_BIGRAM_WEIGHT = 0.6
_TRIGRAM_WEIGHT = 0.35
_SALT_UNIGRAM = np.uint64(0x243F6A8885A308D3)
_SALT_BIGRAM = np.uint64(0x13198A2E03707344)
_SALT_TRIGRAM = np.uint64(0xA4093822299F31D0)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_SPACE = 0x20
_word_hashes: dict[str, int] = {}
_WORD_CACHE_LIMIT = 1_000_000


def _mix(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """splitmix64's finaliser; array arithmetic wraps modulo 2**64 as intended."""
    x = x ^ (x >> np.uint64(30))
    x = x * _MIX1
    x = x ^ (x >> np.uint64(27))
    x = x * _MIX2
    return x ^ (x >> np.uint64(31))


def _word_hash(word: str) -> int:
    cached = _word_hashes.get(word)
    if cached is None:
        if len(_word_hashes) >= _WORD_CACHE_LIMIT:
            _word_hashes.clear()
        digest = hashlib.blake2b(word.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        cached = _word_hashes[word] = int.from_bytes(digest, "little")
    return cached


def _fallback(dimensions: int) -> Vectors:
    return np.full(dimensions, 1.0 / math.sqrt(dimensions), dtype=np.float32)


def hash_embedding(text: str, dimensions: int) -> Vectors:
    """A deterministic, L2-normalised float32 vector with lexical similarity.

    Features (lower-cased): word unigrams, word bigrams and character 3-grams of each word
    padded with spaces, hashed with blake2b/splitmix64 (never Python's salted ``hash``) to a
    bucket and a sign. Bucket sums are damped with ``log1p`` so frequent words don't dominate.
    """
    if dimensions < 1:
        raise ValueError("dimensions must be at least 1")
    words = _WORD.findall(text.lower())
    if not words:
        if not text.strip():
            return _fallback(dimensions)
        words = text.split()
    hashes = np.fromiter((_word_hash(w) for w in words), dtype=np.uint64, count=len(words))
    joined = " " + " ".join(words) + " "
    points = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
    # Code points fit in 21 bits, so three of them pack into one 64-bit integer exactly.
    middle = points[1:-1]
    trigrams = (points[:-2] << np.uint64(42)) | (middle << np.uint64(21)) | points[2:]
    trigrams = trigrams[middle != _SPACE]
    features = np.concatenate(
        (
            _mix(hashes ^ _SALT_UNIGRAM),
            _mix(hashes[:-1] * _GOLDEN + hashes[1:] + _SALT_BIGRAM),
            _mix(trigrams ^ _SALT_TRIGRAM),
        )
    )
    weights = np.concatenate(
        (
            np.full(len(hashes), _UNIGRAM_WEIGHT),
            np.full(len(hashes) - 1, _BIGRAM_WEIGHT),
            np.full(len(trigrams), _TRIGRAM_WEIGHT),
        )
    )
    signed = np.where((features & np.uint64(1)).astype(bool), -weights, weights)
    buckets = ((features >> np.uint64(1)) % np.uint64(dimensions)).astype(np.intp)
    summed = np.bincount(buckets, weights=signed, minlength=dimensions)
    damped = np.sign(summed) * np.log1p(np.abs(summed))
    norm = float(np.linalg.norm(damped))
    if norm == 0.0 or not math.isfinite(norm):
        return _fallback(dimensions)
    return (damped / norm).astype(np.float32)


def embed_texts(texts: Sequence[str], dimensions: int) -> Vectors:
    """Hash embeddings of several texts as one ``(len(texts), dimensions)`` array."""
    out = np.empty((len(texts), dimensions), dtype=np.float32)
    for row, text in enumerate(texts):
        out[row] = hash_embedding(text, dimensions)
    return out
