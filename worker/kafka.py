"""Kafka client options shared by the consumer, the dead-letter producer, `produce` and `replay`."""

from __future__ import annotations

import asyncio
import ssl
import struct
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import create_conn
from aiokafka.errors import (
    AuthenticationFailedError,
    AuthenticationMethodNotSupported,
    BrokerResponseError,
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    IllegalSaslStateError,
    InvalidReplicationFactorError,
    InvalidTopicError,
    KafkaError,
    NoError,
    PolicyViolationError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    UnsupportedSaslMechanismError,
    UnsupportedVersionError,
    for_code,
)
from aiokafka.helpers import create_ssl_context
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.structs import TopicPartition

from worker.errors import ConfigError, WorkerError
from worker.retry import wait_within
from worker.settings import Settings

_AUTHENTICATION = (
    AuthenticationFailedError,
    AuthenticationMethodNotSupported,
    SaslAuthenticationFailed,
)
_TOPIC_REFUSED = (
    InvalidReplicationFactorError,
    InvalidTopicError,
    PolicyViolationError,
    TopicAuthorizationFailedError,
)


class BrokerError(WorkerError):
    """A broker failure that ends the command: one line, exit 1 (a refusal no retry changes, or
    an error the command has no way to wait out)."""


class ProducerRefused(KafkaError):  # type: ignore[misc]
    """A producer did not start: carries the broker's answer while keeping KafkaError's handling."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


def client_options(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol,
        "client_id": "ingest-worker",
    }
    if settings.kafka_security_protocol in ("SSL", "SASL_SSL"):
        options["ssl_context"] = ssl_context(settings)
    if settings.kafka_sasl_mechanism:
        options["sasl_mechanism"] = settings.kafka_sasl_mechanism
        options["sasl_plain_username"] = settings.kafka_sasl_username
        options["sasl_plain_password"] = settings.kafka_sasl_password.reveal()
    return options


def ssl_context(settings: Settings) -> ssl.SSLContext:
    """The TLS context of every Kafka client: the CA to trust, and the client certificate where one
    is given. A file TLS cannot use is a ConfigError naming its setting."""
    try:
        context: ssl.SSLContext = create_ssl_context(cafile=settings.kafka_ssl_cafile or None)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError("KAFKA_SSL_CAFILE", f"holds no CA certificate TLS can use ({exc})") from None
    if settings.kafka_ssl_certfile:
        try:
            context.load_cert_chain(settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile or None)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                "KAFKA_SSL_CERTFILE",
                f"{settings.kafka_ssl_certfile} and KAFKA_SSL_KEYFILE are not a PEM certificate and "
                f"its unencrypted key ({exc})",
            ) from None
    return context


def make_producer(settings: Settings, **overrides: Any) -> AIOKafkaProducer:
    """acks=all always; idempotence by setting (real Kafka: on; the embedded Tansu broker lacks it)."""
    options = client_options(settings) | {
        "acks": "all",
        "enable_idempotence": settings.kafka_producer_idempotence,
        "linger_ms": 5,
        "max_request_size": max(1_048_576, settings.max_text_bytes + 256 * 1024),
    }
    return AIOKafkaProducer(**(options | overrides))


async def start_producer(producer: AIOKafkaProducer) -> None:
    """``producer.start()``, its failure marked so that :func:`refusal` can tell it apart.

    The producer stays open: start-up retries start it again after an outage (a closed producer
    cannot be), and its owner stops it either way.
    """
    try:
        await producer.start()
    except KafkaError as exc:
        raise ProducerRefused(exc) from exc


async def existing_partitions(
    admin: AIOKafkaAdminClient, topics: Sequence[str]
) -> tuple[list[TopicPartition], list[str]]:
    """Every partition of those of ``topics`` that exist, and the names of those that do not: asked,
    never created (as a broker that creates topics on first use would do for a consumer)."""
    known = await admin.list_topics()
    missing = [t for t in topics if t not in known]
    present = [t for t in topics if t in known]
    described = await admin.describe_topics(present) if present else []
    partitions = sorted(
        TopicPartition(d["topic"], p["partition"]) for d in described for p in d["partitions"]
    )
    return partitions, missing


async def ensure_topic(settings: Settings, topic: str, partitions: int) -> bool:
    """Create ``topic`` if it does not exist, with the broker's replication factor. True if created."""
    admin = AIOKafkaAdminClient(**client_options(settings))
    try:
        await admin.start()
        existing = await admin.list_topics()
        if topic in existing:
            return False
        # -1: the broker's default.replication.factor (KIP-464), not 1 on a replicated cluster.
        # (aiokafka's NewTopic takes -1 only beside an explicit, here empty, replica assignment.)
        new = NewTopic(topic, num_partitions=partitions, replication_factor=-1, replica_assignments={})
        response = await admin.create_topics([new])
        for _name, code, *message in response.topic_errors:  # aiokafka returns them, it raises none
            error = for_code(code)
            if error is TopicAlreadyExistsError:
                return False
            if error is not NoError:
                exc = error(message[0] if message and message[0] else "")
                raise TopicRefused(topic, exc) if isinstance(exc, _TOPIC_REFUSED) else exc
        return True
    finally:
        await admin.close()


class TopicRefused(KafkaError):  # type: ignore[misc]
    """The broker would not create a topic that does not exist."""

    def __init__(self, topic: str, cause: BaseException) -> None:
        super().__init__(f"{topic!r}: {cause}")
        self.topic = topic
        self.cause = cause


async def bootstrap_error(settings: Settings) -> BaseException | None:
    """Why the first bootstrap server does not serve us: aiokafka logs it but raises only
    "Unable to bootstrap", which hides a refused password behind what looks like an outage."""
    host, _, port = settings.kafka_bootstrap_servers.split(",")[0].strip().rpartition(":")
    options = client_options(settings)
    options.pop("bootstrap_servers")
    host = host.strip("[]")
    try:
        conn = await create_conn(host, int(port), request_timeout_ms=10_000, **options)
    except (OSError, KafkaError, TimeoutError, ValueError) as exc:
        if isinstance(exc, ssl.SSLError) or not isinstance(exc, ConnectionError | KafkaError):
            return exc  # TLS's own answer, or nobody there: nothing more to learn
        tls = "ssl_context" in options
        if tls and isinstance(exc, KafkaError):
            # A broker that wants a client certificate completes TLS 1.3's handshake, then closes
            # with an alert that aiokafka reports as "connection closed": read the alert itself.
            alert = await _tls_alert(host, int(port), options["ssl_context"])
            if alert is not None:
                return alert
        # A connection the broker closes at once: a listener of another protocol?
        if tls and await _answers_plaintext(host, int(port)):
            return ProtocolMismatch(f"{host}:{port} answers without TLS")
        if not tls and await _speaks_tls(host, int(port)):
            return ProtocolMismatch(f"{host}:{port} speaks TLS")
        return exc
    try:
        if not settings.kafka_sasl_mechanism:  # a SASL listener answers ApiVersions, then closes
            await conn.send(MetadataRequest([]))
    except KafkaError:
        return ProtocolMismatch(f"{host}:{port} closed the connection at the first request: it expects SASL")
    finally:
        conn.close()
    return None


class ProtocolMismatch(Exception):
    """The listener speaks another security protocol than KAFKA_SECURITY_PROTOCOL."""


async def _ask_api_versions(host: str, port: int, context: ssl.SSLContext | None, within: float) -> bytes:
    """The first 8 bytes (size, correlation id) of the listener's answer to ApiVersions, sent over
    TLS with ``context`` (None: without). OSError (ssl.SSLError: TLS's own answer), TimeoutError
    or IncompleteReadError when there is none."""
    writer = None
    try:
        reader, writer = await wait_within(
            asyncio.open_connection(host, port, ssl=context, server_hostname=host if context else None),
            within,
        )
        writer.write(struct.pack(">i", len(_API_VERSIONS)) + _API_VERSIONS)
        return await wait_within(reader.readexactly(8), within)
    finally:
        if writer is not None:
            writer.close()


async def _answers_plaintext(host: str, port: int) -> bool:
    """The listener answers an ApiVersions request sent without TLS."""
    try:
        size, correlation = struct.unpack(">ii", await _ask_api_versions(host, port, None, 5))
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    return bool(size > 4 and correlation == 1)


async def _speaks_tls(host: str, port: int) -> bool:
    """The listener completes a TLS handshake (its certificate not checked: only the protocol)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        _, writer = await wait_within(
            asyncio.open_connection(host, port, ssl=context, server_hostname=host), 5
        )
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


# ApiVersions v0, correlation id 1, client id "ingest-worker": a request every broker answers.
_API_VERSIONS = struct.pack(">hhih", 18, 0, 1, 13) + b"ingest-worker"


async def _tls_alert(host: str, port: int, context: ssl.SSLContext) -> ssl.SSLError | None:
    """The TLS alert a broker closes our connection with (e.g. certificate required), if any."""
    try:
        await _ask_api_versions(host, port, context, 10)
    except ssl.SSLError as exc:
        return exc
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return None
    return None


def refusal(exc: BaseException, settings: Settings) -> WorkerError | None:
    """The broker's answer as an error no retry will change, naming what to fix; None for an outage."""
    cause = getattr(exc, "cause", exc)
    if isinstance(cause, ssl.SSLError):
        return _tls_refusal(cause, settings)
    if isinstance(cause, ProtocolMismatch):
        return ConfigError(
            "KAFKA_SECURITY_PROTOCOL",
            f"is {settings.kafka_security_protocol}, but the listener at {cause}: is "
            "KAFKA_BOOTSTRAP_SERVERS the listener for this protocol?",
        )
    if isinstance(cause, IllegalSaslStateError):  # the listener takes no SASL handshake at all
        return ConfigError(
            "KAFKA_SECURITY_PROTOCOL",
            f"is {settings.kafka_security_protocol}, but the listener at KAFKA_BOOTSTRAP_SERVERS="
            f"{settings.kafka_bootstrap_servers} takes no SASL (the broker answered {type(cause).__name__})",
        )
    if isinstance(cause, UnsupportedSaslMechanismError):
        return ConfigError(
            "KAFKA_SASL_MECHANISM",
            f"the listener at KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers} does not take "
            f"{settings.kafka_sasl_mechanism} (the broker answered {type(cause).__name__})",
        )
    answer = f"the broker answered {type(cause).__name__}: {cause}".rstrip(": ")
    if isinstance(cause, _AUTHENTICATION):
        user = settings.kafka_sasl_username or "(none)"
        return ConfigError(
            "KAFKA_SASL_PASSWORD",
            f"authentication as KAFKA_SASL_USERNAME={user} with {settings.kafka_sasl_mechanism or 'no'} "
            f"mechanism was refused ({answer})",
        )
    if isinstance(exc, TopicRefused):
        return BrokerError(
            f"topic {exc.topic!r} does not exist and cannot be created ({answer}): "
            "create it, or let this user create topics"
        )
    if isinstance(cause, GroupAuthorizationFailedError):
        return ConfigError(
            "KAFKA_GROUP_ID", f"this user may not use group {settings.kafka_group_id!r} ({answer})"
        )
    if isinstance(cause, TopicAuthorizationFailedError):
        return ConfigError("KAFKA_TOPIC", f"this user may not read or write these topics ({answer})")
    idempotence_refused = (
        ClusterAuthorizationFailedError,
        TransactionalIdAuthorizationFailed,
        UnsupportedVersionError,
    )
    # A broker's own answer (an error code) that no retry changes; not a timeout or a lost connection.
    answered = isinstance(cause, BrokerResponseError) and not cause.retriable
    refused_outright = isinstance(cause, idempotence_refused) or answered
    if isinstance(exc, ProducerRefused) and settings.kafka_producer_idempotence and refused_outright:
        return ConfigError(
            "KAFKA_PRODUCER_IDEMPOTENCE",
            f"the broker refused an idempotent producer ({answer}); grant this user IdempotentWrite "
            "(or Write on a topic), or set KAFKA_PRODUCER_IDEMPOTENCE=false",
        )
    if isinstance(cause, ClusterAuthorizationFailedError):
        return BrokerError(f"this user may not do what the worker needs ({answer})")
    return None


# Alerts a broker sends when it does not take our certificate (or wants one we did not send).
_CERTIFICATE_REFUSED = (
    "CERTIFICATE_REQUIRED",
    "BAD_CERTIFICATE",
    "UNKNOWN_CA",
    "CERTIFICATE_UNKNOWN",
    "CERTIFICATE_EXPIRED",
    "CERTIFICATE_REVOKED",
    "UNSUPPORTED_CERTIFICATE",
    "HANDSHAKE_FAILURE",
)


def _tls_refusal(exc: ssl.SSLError, settings: Settings) -> ConfigError:
    """A TLS failure as the setting to fix: no retry makes a certificate trusted."""
    where = f"KAFKA_BOOTSTRAP_SERVERS={settings.kafka_bootstrap_servers}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        ca = settings.kafka_ssl_cafile or "the system's CAs (KAFKA_SSL_CAFILE is not set)"
        return ConfigError(
            "KAFKA_SSL_CAFILE",
            f"the broker's certificate at {where} is not trusted by {ca}: {exc.verify_message}",
        )
    reason = exc.reason or str(exc)
    if any(alert in reason for alert in _CERTIFICATE_REFUSED):
        if not settings.kafka_ssl_certfile:
            return ConfigError(
                "KAFKA_SSL_CERTFILE",
                f"the broker at {where} requires a client certificate ({reason}): set "
                "KAFKA_SSL_CERTFILE and KAFKA_SSL_KEYFILE",
            )
        return ConfigError(
            "KAFKA_SSL_CERTFILE",
            f"the broker at {where} refused the client certificate {settings.kafka_ssl_certfile} "
            f"({reason}): is it signed by a CA the broker trusts?",
        )
    return ConfigError(
        "KAFKA_SECURITY_PROTOCOL",
        f"TLS with the broker at {where} failed ({reason}): does that listener speak "
        f"{settings.kafka_security_protocol}?",
    )
