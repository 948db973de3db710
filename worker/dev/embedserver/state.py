"""Faults to inject, counters, and the state the HTTP handlers share."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import math
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson

from worker.dev.embedserver.backends import Backend, HashBackend
from worker.dev.embedserver.budget import Budget

DEFAULT_DIMENSIONS = 384


class FaultError(ValueError):
    """An ``/admin/faults`` update names an unknown fault or gives a value of the wrong type."""


@dataclass(frozen=True)
class Faults:
    rate_429: float = 0.0
    retry_after: float = 1.0
    rate_500: float = 0.0
    rate_503: float = 0.0
    outage: bool = False
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0  # each request waits latency_ms + uniform(0, latency_jitter_ms)
    slow_rate: float = 0.0
    slow_ms: float = 0.0
    reject_marker: str | None = None
    slow_marker: str | None = None  # requests holding an input with it are delayed by slow_ms
    echo_key: bool = False  # error messages repeat the bearer token, as some providers do
    # The bearer token every request must carry from now on, whatever --api-key said (null: that
    # one): a provider's key rotated, or revoked, under a running client.
    api_key: str | None = None
    refuse_dimensions: bool = False  # 400 for every request that sends `dimensions` (ada-002 does)
    # 413 for a request of more inputs, as text-embeddings-inference answers past its
    # --max-client-batch-size (32 by default); 0: only OpenAI's own limit (http.MAX_INPUTS)
    max_inputs: int = 0
    shuffle: bool = False
    seed: int = 0
    # A provider's rate limits (budget.py): tokens and requests per minute, 0 for none; the
    # buckets hold budget_window seconds' worth (60: the whole minute).
    budget_tpm: float = 0.0
    budget_rpm: float = 0.0
    budget_window: float = 60.0
    # OpenAI's limits on one request, in cl100k_base tokens (0: none): past either it answers 400.
    max_input_tokens: float = 8191
    max_request_tokens: float = 300_000

    _PROBABILITIES: ClassVar[frozenset[str]] = frozenset({"rate_429", "rate_500", "rate_503", "slow_rate"})

    def merged(self, updates: Mapping[str, object]) -> Faults:
        """These faults with ``updates`` applied, each checked for name, type and range."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        clean: dict[str, Any] = {}
        for key, value in updates.items():
            if key not in fields:
                raise FaultError(f"unknown fault {key!r}; known: {', '.join(sorted(fields))}")
            clean[key] = _check_fault(key, value, self._PROBABILITIES)
        return dataclasses.replace(self, **clean)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_fault(key: str, value: object, probabilities: frozenset[str]) -> object:
    if key in {"outage", "shuffle", "echo_key", "refuse_dimensions"}:
        if not isinstance(value, bool):
            raise FaultError(f"fault {key!r} must be true or false")
        return value
    if key == "seed":
        if isinstance(value, bool) or not isinstance(value, int):
            raise FaultError("fault 'seed' must be an integer")
        return value
    if key == "max_inputs":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise FaultError("fault 'max_inputs' must be an integer, 0 or more")
        return value
    if key in {"reject_marker", "slow_marker", "api_key"}:
        if value is not None and (not isinstance(value, str) or not value):
            raise FaultError(f"fault {key!r} must be a non-empty string or null")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FaultError(f"fault {key!r} must be a number")
    if value < 0 or (key in probabilities and value > 1) or (key == "budget_window" and value <= 0):
        raise FaultError(f"fault {key!r} is out of range")
    return float(value)


@dataclass
class Stats:
    """Counters of the embeddings endpoints (admin calls are not counted); inputs only on 200.

    A request the client gave up on before its answer counts as status 499 (no inputs)."""

    requests: int = 0
    inputs: int = 0
    tokens: int = 0  # usage.prompt_tokens of the answered requests
    status_counts: collections.Counter[int] = field(default_factory=collections.Counter)
    by_text: collections.Counter[str] = field(default_factory=collections.Counter)
    empty_input_refusals: int = 0  # requests refused (400) for an empty-string input
    blank_inputs: int = 0  # whitespace-only inputs answered (OpenAI takes them): worth nothing
    # Each field a request's body had besides those the worker sets (model, input, dimensions,
    # encoding_format): its values, as JSON, each with the number of requests that sent it.
    extra_fields: dict[str, collections.Counter[str]] = field(default_factory=dict)

    def saw_extra(self, fields: Mapping[str, object]) -> None:
        for name, value in fields.items():
            shown = orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
            self.extra_fields.setdefault(name, collections.Counter())[shown] += 1

    def as_dict(self, *, texts: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "requests": self.requests,
            "inputs": self.inputs,
            "tokens": self.tokens,
            "unique_inputs": len(self.by_text),
            "status_counts": {str(k): v for k, v in sorted(self.status_counts.items())},
            "empty_input_refusals": self.empty_input_refusals,
            "blank_inputs": self.blank_inputs,
            "extra_fields": {name: dict(values) for name, values in sorted(self.extra_fields.items())},
        }
        if texts:
            out["inputs_by_text_hash"] = dict(self.by_text)
        return out


class Memo:
    """The vectors of the last ``size`` distinct (text, dimensions) asked for: a second request
    for a text is answered without computing it again. The oldest goes first once full; 0
    remembers nothing."""

    def __init__(self, size: int = 0) -> None:
        self.size = size
        self._vectors: dict[tuple[str, int], Any] = {}

    def get(self, text: str, dimensions: int) -> Any | None:
        return self._vectors.get((text, dimensions)) if self.size else None

    def put(self, text: str, dimensions: int, vector: Any) -> None:
        if not self.size:
            return
        if len(self._vectors) >= self.size:
            del self._vectors[next(iter(self._vectors))]
        self._vectors[(text, dimensions)] = vector

    def __len__(self) -> int:
        return len(self._vectors)


@dataclass
class ServerState:
    """Everything the server holds: backend, defaults, faults (replaced whole) and counters."""

    backend: Backend = field(default_factory=HashBackend)
    dimensions: int = DEFAULT_DIMENSIONS
    api_key: str | None = None
    faults: Faults = field(default_factory=Faults)
    stats: Stats = field(default_factory=Stats)
    initial_faults: Faults | None = None
    memo: Memo = field(default_factory=Memo)
    rng: random.Random = field(init=False)
    budget: Budget | None = field(init=False)

    def __post_init__(self) -> None:
        if self.initial_faults is None:
            self.initial_faults = self.faults
        self.rng = random.Random(self.faults.seed)
        self.budget = self._budget_of(self.faults)

    def set_faults(self, faults: Faults, *, reseed: bool) -> None:
        if reseed or faults.seed != self.faults.seed:
            self.rng.seed(faults.seed)
        limits = ("budget_tpm", "budget_rpm", "budget_window")
        if any(getattr(faults, k) != getattr(self.faults, k) for k in limits):
            self.budget = self._budget_of(faults)  # a new budget starts full
        self.faults = faults

    @staticmethod
    def _budget_of(faults: Faults) -> Budget | None:
        return Budget.of(faults.budget_tpm, faults.budget_rpm, faults.budget_window, time.monotonic())


def text_hash(text: str) -> str:
    """The key of ``inputs_by_text_hash``: blake2b-64 of the UTF-8 text, in hex."""
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()
