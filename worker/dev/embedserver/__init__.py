"""A local OpenAI-compatible embedding server with fault injection, for development and tests.

hashing.py   hash embeddings (the default backend: lexical, deterministic, fast)
backends.py  hash, or all-MiniLM-L6-v2 with the minilm extra
state.py     faults to inject (latency, 429/5xx, outages, rejections, a batch-size limit) and counters
http.py      POST /v1/embeddings, GET /v1/models, and /admin/* to set faults and read counters
admin.py     a client of /admin/*, for tests and the bench
__main__.py  `python -m worker.dev.embedserver`
"""

from worker.dev.embedserver.admin import EmbeddingAdmin
from worker.dev.embedserver.backends import (
    HASH_MAX_DIMENSIONS,
    Backend,
    BackendUnavailableError,
    HashBackend,
    MiniLMBackend,
    load_backend,
)
from worker.dev.embedserver.hashing import Vectors, embed_texts, hash_embedding
from worker.dev.embedserver.http import MAX_INPUTS, build_app, start_server
from worker.dev.embedserver.state import (
    DEFAULT_DIMENSIONS,
    FaultError,
    Faults,
    Memo,
    ServerState,
    Stats,
    text_hash,
)

__all__ = [
    "DEFAULT_DIMENSIONS",
    "HASH_MAX_DIMENSIONS",
    "MAX_INPUTS",
    "Backend",
    "BackendUnavailableError",
    "EmbeddingAdmin",
    "FaultError",
    "Faults",
    "HashBackend",
    "Memo",
    "MiniLMBackend",
    "ServerState",
    "Stats",
    "Vectors",
    "build_app",
    "embed_texts",
    "hash_embedding",
    "load_backend",
    "start_server",
    "text_hash",
]
