"""Which broker answers end start-up at once (and naming what), and which are outages to wait out."""

from __future__ import annotations

import pytest
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    KafkaTimeoutError,
    NodeNotReadyError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    UnknownError,
)

from worker.errors import ConfigError
from worker.kafka import BrokerError, ProducerRefused, TopicRefused, refusal
from worker.settings import Settings

SASL = Settings.load(
    {
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": "ingest",
        "KAFKA_SASL_PASSWORD": "hunter2",
    }
)


def test_a_refused_password_names_the_setting_and_the_user_but_not_the_password() -> None:
    error = refusal(SaslAuthenticationFailed("Authentication failed during authentication"), SASL)
    assert isinstance(error, ConfigError)
    assert error.setting == "KAFKA_SASL_PASSWORD"
    assert "KAFKA_SASL_USERNAME=ingest" in str(error) and "SCRAM-SHA-512" in str(error)
    assert "hunter2" not in str(error)


@pytest.mark.parametrize("answer", [ClusterAuthorizationFailedError(), UnknownError()])
def test_a_producer_refused_idempotence_names_the_setting_and_the_answer(answer: Exception) -> None:
    error = refusal(ProducerRefused(answer), Settings.load({}))
    assert isinstance(error, ConfigError)
    assert error.setting == "KAFKA_PRODUCER_IDEMPOTENCE"
    assert type(answer).__name__ in str(error)
    assert "KAFKA_PRODUCER_IDEMPOTENCE=false" in str(error)


@pytest.mark.parametrize("outage", [KafkaConnectionError(), NodeNotReadyError(), KafkaTimeoutError()])
def test_a_producer_that_found_nobody_is_an_outage(outage: Exception) -> None:
    assert refusal(ProducerRefused(outage), Settings.load({})) is None
    assert refusal(outage, Settings.load({})) is None


def test_without_idempotence_an_odd_producer_answer_is_not_blamed_on_it() -> None:
    relaxed = Settings.load({"KAFKA_PRODUCER_IDEMPOTENCE": "false"})
    assert refusal(ProducerRefused(UnknownError()), relaxed) is None


def test_a_topic_that_may_not_be_created_ends_start_up() -> None:
    error = refusal(TopicRefused("documents.dlq", TopicAuthorizationFailedError()), Settings.load({}))
    assert isinstance(error, BrokerError)
    assert "'documents.dlq' does not exist and cannot be created" in str(error)


def test_a_group_the_user_may_not_join_names_the_group_setting() -> None:
    error = refusal(GroupAuthorizationFailedError(), Settings.load({"KAFKA_GROUP_ID": "ingest-prod"}))
    assert isinstance(error, ConfigError)
    assert error.setting == "KAFKA_GROUP_ID"
    assert "ingest-prod" in str(error)
