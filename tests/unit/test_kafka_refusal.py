"""Which broker answers end start-up at once (and naming what), and which are outages to wait out."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    IllegalSaslStateError,
    KafkaConnectionError,
    KafkaTimeoutError,
    NodeNotReadyError,
    SaslAuthenticationFailed,
    TopicAuthorizationFailedError,
    UnknownError,
    UnsupportedSaslMechanismError,
)

from worker.dev.certs import make_certificates
from worker.errors import ConfigError
from worker.kafka import BrokerError, ProducerRefused, TopicRefused, client_options, refusal
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


def _verification_error(message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(
        1, f"[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: {message}"
    )
    error.verify_message = message
    return error


def _alert(reason: str) -> ssl.SSLError:
    error = ssl.SSLError(1, f"[SSL: {reason}] tlsv13 alert")
    error.reason = reason
    return error


def test_an_untrusted_broker_certificate_names_the_ca_setting() -> None:
    refused = refusal(_verification_error("self-signed certificate in certificate chain"), SASL)
    assert isinstance(refused, ConfigError) and refused.setting == "KAFKA_SSL_CAFILE"
    assert "self-signed certificate in certificate chain" in str(refused)


def test_a_broker_that_wants_a_client_certificate_says_which_settings_give_one() -> None:
    refused = refusal(_alert("TLSV13_ALERT_CERTIFICATE_REQUIRED"), SASL)
    assert isinstance(refused, ConfigError) and refused.setting == "KAFKA_SSL_CERTFILE"
    assert "KAFKA_SSL_CERTFILE and KAFKA_SSL_KEYFILE" in str(refused)


def test_a_client_certificate_the_broker_refuses_is_named(tmp_path: Path) -> None:
    cert = tmp_path / "client.pem"
    cert.write_text("not read here")
    settings = Settings.load({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CERTFILE": str(cert)})
    refused = refusal(_alert("TLSV1_ALERT_UNKNOWN_CA"), settings)
    assert isinstance(refused, ConfigError) and refused.setting == "KAFKA_SSL_CERTFILE"
    assert f"refused the client certificate {cert}" in str(refused)


def test_tls_spoken_to_a_listener_that_does_not_is_blamed_on_the_protocol() -> None:
    refused = refusal(_alert("WRONG_VERSION_NUMBER"), SASL)
    assert isinstance(refused, ConfigError) and refused.setting == "KAFKA_SECURITY_PROTOCOL"


def test_client_certificate_files_tls_cannot_use_name_the_setting(tmp_path: Path) -> None:
    cert = tmp_path / "client.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    settings = Settings.load({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CERTFILE": str(cert)})
    with pytest.raises(ConfigError) as info:
        client_options(settings)
    assert info.value.setting == "KAFKA_SSL_CERTFILE"


def test_client_options_carry_the_client_certificate(tmp_path: Path) -> None:
    made = make_certificates(tmp_path)
    settings = Settings.load(
        {
            "KAFKA_SECURITY_PROTOCOL": "SSL",
            "KAFKA_SSL_CAFILE": str(made.ca),
            "KAFKA_SSL_CERTFILE": str(made.client.cert),
            "KAFKA_SSL_KEYFILE": str(made.client.key),
        }
    )
    context = client_options(settings)["ssl_context"]
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert [c["subject"] for c in context.get_ca_certs()] == [((("commonName", "ingest test CA"),),)]


def test_a_mechanism_the_listener_does_not_take_names_the_mechanism_setting() -> None:
    refused = refusal(UnsupportedSaslMechanismError("not enabled"), SASL)
    assert isinstance(refused, ConfigError) and refused.setting == "KAFKA_SASL_MECHANISM"
    assert "SCRAM-SHA-512" in str(refused)


def test_sasl_to_a_listener_without_it_names_the_protocol_setting() -> None:
    refused = refusal(IllegalSaslStateError("no SASL here"), SASL)
    assert isinstance(refused, ConfigError) and refused.setting == "KAFKA_SECURITY_PROTOCOL"


def test_a_ca_file_that_holds_no_certificate_names_the_setting(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    settings = Settings.load(
        {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "PLAIN", "KAFKA_SSL_CAFILE": str(ca)}
    )
    with pytest.raises(ConfigError) as info:
        client_options(settings)
    assert info.value.setting == "KAFKA_SSL_CAFILE"
