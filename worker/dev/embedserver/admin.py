"""A client of the embedding server's ``/admin/*``: set faults, read counters, reset them.

Blocking (urllib) and short: tests call it from plain functions and fixtures, the bench
between its measurements.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any


class EmbeddingAdmin:
    """``/admin/*`` of a ``worker.dev.embedserver`` given its ``.../v1`` URL."""

    def __init__(self, url: str, *, timeout: float = 10.0) -> None:
        self.url = url
        self._base = url.removesuffix("/").removesuffix("/v1")
        self._timeout = timeout

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self._base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=self._timeout) as response:
            return json.loads(response.read() or b"null")

    def stats(self, *, texts: bool = False) -> dict[str, Any]:
        """Counters since start or the last reset (``inputs``: texts embedded;
        ``empty_input_refusals``, ``blank_inputs``; ``extra_fields``: field -> JSON value ->
        requests); with ``texts``, how often each text (by hash) was embedded."""
        answer: dict[str, Any] = self.call("GET", "/admin/stats?texts=1" if texts else "/admin/stats")
        return answer

    def reset(self) -> None:
        self.call("POST", "/admin/reset")

    def set_faults(self, **values: Any) -> None:
        self.call("POST", "/admin/faults", values)

    def clear_faults(self) -> None:
        self.call("DELETE", "/admin/faults")

    def faults(self) -> dict[str, Any]:
        answer: dict[str, Any] = self.call("GET", "/admin/faults")
        return answer
