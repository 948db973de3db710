"""Which database answers to a login end start-up at once (naming the setting), and which are outages."""

from __future__ import annotations

import ssl
from pathlib import Path

import asyncpg
import pytest

from worker.schema import login_refused
from worker.settings import Settings

PLAIN = Settings.load({"DATABASE_URL": "postgresql://ingest@db:5432/search?sslmode=verify-full"})


def with_password_file(tmp_path: Path) -> Settings:
    (tmp_path / "password").write_text("pw\n")
    return Settings.load(
        {
            "DATABASE_URL": "postgresql://ingest@db/search",
            "DATABASE_PASSWORD_FILE": str(tmp_path / "password"),
        }
    )


def test_an_untrusted_server_certificate_names_the_url() -> None:
    error = ssl.SSLCertVerificationError(1, "certificate verify failed")
    error.verify_message = "Hostname mismatch, certificate is not valid for 'db'."
    refused = login_refused(error, PLAIN)
    assert refused is not None and refused.setting == "DATABASE_URL"
    assert "Hostname mismatch" in str(refused)


def test_a_wrong_password_names_the_file_it_came_from(tmp_path: Path) -> None:
    error = asyncpg.exceptions.InvalidPasswordError('password authentication failed for user "ingest"')
    refused = login_refused(error, with_password_file(tmp_path))
    assert refused is not None and refused.setting == "DATABASE_PASSWORD_FILE"
    refused = login_refused(error, PLAIN)
    assert refused is not None and refused.setting == "DATABASE_URL"


def test_a_login_pg_hba_refuses_names_the_url_even_with_a_password_file(tmp_path: Path) -> None:
    error = asyncpg.exceptions.InvalidAuthorizationSpecificationError(
        'no pg_hba.conf entry for host "10.0.0.1"'
    )
    refused = login_refused(error, with_password_file(tmp_path))
    assert refused is not None and refused.setting == "DATABASE_URL"


@pytest.mark.parametrize(
    "outage",
    [
        ConnectionRefusedError(111, "Connection refused"),
        TimeoutError(),
        asyncpg.CannotConnectNowError("starting"),
    ],
)
def test_a_server_not_there_is_an_outage(outage: Exception) -> None:
    assert login_refused(outage, PLAIN) is None
