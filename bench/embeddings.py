"""The local embedding server's admin API: faults (latency), counters, reset."""

from __future__ import annotations

from typing import Any

import aiohttp

TIMEOUT = aiohttp.ClientTimeout(total=10)


class EmbeddingAdmin:
    """``/admin/*`` of a ``worker.dev.embedserver`` given its ``.../v1`` URL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._base = url.removesuffix("/").removesuffix("/v1")

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession(timeout=TIMEOUT) as session,
            session.request(method, self._base + path, json=body) as response,
        ):
            response.raise_for_status()
            answer: dict[str, Any] = await response.json()
            return answer

    async def stats(self) -> dict[str, Any]:
        return await self._call("GET", "/admin/stats")

    async def reset(self) -> None:
        await self._call("POST", "/admin/reset")

    async def set_latency(self, milliseconds: float) -> None:
        await self._call("POST", "/admin/faults", {"latency_ms": float(milliseconds)})

    async def latency(self) -> float:
        return float((await self._call("GET", "/admin/faults"))["latency_ms"])
