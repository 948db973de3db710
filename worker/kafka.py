"""Kafka client options shared by the consumer, the dead-letter producer, `produce` and `replay`."""

from __future__ import annotations

from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError
from aiokafka.helpers import create_ssl_context

from worker.settings import Settings


def client_options(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol,
        "client_id": "ingest-worker",
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = create_ssl_context(cafile=settings.kafka_ssl_cafile or None)
    if settings.kafka_sasl_mechanism:
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = settings.kafka_sasl_password.reveal()
    return options


def make_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """acks=all always; idempotence by setting (real Kafka: on; the embedded Tansu broker lacks it)."""
    options = client_options(settings) | {
        "acks": "all",
        "enable_idempotence": settings.kafka_producer_idempotence,
        "linger_ms": 5,
        "max_request_size": max(1_048_576, settings.max_text_bytes + 256 * 1024),
    }
    return AIOKafkaProducer(**(options | overrides))


async def ensure_topic(settings: Settings, topic: str, partitions: int) -> bool:
    """Create ``topic`` if it does not exist. True when this call created it."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    await admin.start()
    try:
        existing = await admin.list_topics()
        if topic in existing:
            return False
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
        except TopicAlreadyExistsError:
            return False
        return True
    finally:
        await admin.close()
