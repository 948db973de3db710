"""Embedding ingestion worker: Kafka -> chunk -> embed -> PostgreSQL/pgvector."""

__version__ = "0.1.0"
