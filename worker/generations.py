"""Generations of the index: each a model, dimensions, vector type and chunking, with its own
chunks table and HNSW index. One is served (the ``chunks`` view and ``search`` give it); another
may be building (``reindex start``) or kept (the one served before a switch, for ``rollback``).

    registered (building): every live document pending in it
      -> filled by `reindex start` and by running workers (worker.fill), who also keep it current:
         each write marks the documents it changed pending in every generation it did not write
      -> served by `reindex switch` (in one transaction, the view replaced) -> kept -> dropped

The registry is the ``generations`` table; the documents a generation is behind on are rows of
``generation_pending``. A write key-share locks the registry's rows first (sql.LIVE_GENERATIONS_SQL),
which orders it against a registration, a switch and a drop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import asyncpg

from worker.errors import ConfigError
from worker.settings import Settings
from worker.sql import Statements, generation_table

State = Literal["building", "served", "kept"]


@dataclass(frozen=True, slots=True)
class Generation:
    id: int
    model: str
    dimensions: int
    vector_type: str
    chunk_size: int
    chunk_overlap: int
    chunk_unit: str
    state: State

    @classmethod
    def of_row(cls, row: asyncpg.Record) -> Generation:
        return cls(
            id=row["id"],
            model=row["model"],
            dimensions=row["dimensions"],
            vector_type=row["vector_type"],
            chunk_size=row["chunk_size"],
            chunk_overlap=row["chunk_overlap"],
            chunk_unit=row["chunk_unit"],
            state=row["state"],
        )

    @property
    def table(self) -> str:
        return generation_table(self.id)

    @property
    def chunking(self) -> tuple[int, int, str]:
        return (self.chunk_size, self.chunk_overlap, self.chunk_unit)

    def describe(self) -> str:
        unit = "" if self.chunk_unit == "chars" else f" {self.chunk_unit}"
        return (
            f"#{self.id} ({self.model}, {self.vector_type}({self.dimensions}), "
            f"chunks of {self.chunk_size}/{self.chunk_overlap}{unit})"
        )

    def statements(self, schema: str) -> Statements:
        return Statements.of(schema, self.vector_type, self.table, self.dimensions)

    def settings(self, settings: Settings) -> Settings:
        """``settings`` with this generation's model, dimensions, vector type and chunking."""
        if (settings.embedding_model, settings.embedding_dimensions, settings.vector_type) == (
            self.model,
            self.dimensions,
            self.vector_type,
        ) and self.chunking == (settings.chunk_size, settings.chunk_overlap, settings.chunk_unit):
            return settings
        return dataclasses.replace(
            settings,
            embedding_model=self.model,
            embedding_dimensions=self.dimensions,
            vector_type=self.vector_type,  # type: ignore[arg-type]
            chunk_size=self.chunk_size,
            chunk_overlap=self.chunk_overlap,
            chunk_unit=self.chunk_unit,  # type: ignore[arg-type]
        )


def of_settings(settings: Settings, *, id: int = 0, state: State = "building") -> Generation:
    return Generation(
        id=id,
        model=settings.embedding_model,
        dimensions=settings.embedding_dimensions,
        vector_type=settings.vector_type,
        chunk_size=settings.chunk_size,
        chunk_overlap=settings.chunk_overlap,
        chunk_unit=settings.chunk_unit,
        state=state,
    )


def served(generations: Sequence[Generation]) -> Generation:
    return next(g for g in generations if g.state == "served")


def not_served(generations: Sequence[Generation]) -> Generation | None:
    return next((g for g in generations if g.state != "served"), None)


async def read(conn: asyncpg.Connection | asyncpg.Pool, sql: Statements) -> list[Generation]:
    return [Generation.of_row(row) for row in await conn.fetch(sql.generations)]


async def register(conn: asyncpg.Connection, sql: Statements, generation: Generation) -> Generation:
    """Record ``generation`` (as it is, in its state) under the next number; it, numbered."""
    g = generation
    gid = await conn.fetchval(
        sql.register_generation,
        g.model,
        g.dimensions,
        g.vector_type,
        g.chunk_size,
        g.chunk_overlap,
        g.chunk_unit,
        g.state,
    )
    return dataclasses.replace(g, id=gid)


def check_settings(
    settings: Settings, generations: Sequence[Generation], *, chunking: bool = True
) -> Generation:
    """The live generation ``settings`` name (model, dimensions, vector type); ConfigError naming
    the setting, and saying which generation is served, when they name none, or (``chunking``:
    for what writes chunks) name one with another chunking."""
    serving = served(generations)
    wanted = of_settings(settings)
    same_model = [g for g in generations if g.model == wanted.model]
    for g in same_model:
        if (g.dimensions, g.vector_type) == (wanted.dimensions, wanted.vector_type):
            if chunking and g.chunking != wanted.chunking:
                raise ConfigError(
                    "CHUNK_SIZE",
                    f"generation {g.describe()} chunks otherwise than CHUNK_SIZE={wanted.chunk_size}, "
                    f"CHUNK_OVERLAP={wanted.chunk_overlap}, CHUNK_UNIT={wanted.chunk_unit}; set them to its "
                    "chunking, or change the chunking with `ingest-worker reindex start`",
                )
            return g
    setting = "EMBEDDING_MODEL"
    if same_model:
        dims = {g.dimensions for g in same_model}
        setting = "VECTOR_TYPE" if wanted.dimensions in dims else "EMBEDDING_DIMENSIONS"
    raise ConfigError(
        setting,
        f"{wanted.model} with {wanted.vector_type}({wanted.dimensions}) names no generation of the "
        f"index in {settings.database_schema}: generation {serving.describe()} is served"
        + (f", {other.describe()} {other.state}" if (other := not_served(generations)) else "")
        + "; set EMBEDDING_MODEL, EMBEDDING_DIMENSIONS and VECTOR_TYPE to one of them, or build a "
        "new one with `ingest-worker reindex start`",
    )
