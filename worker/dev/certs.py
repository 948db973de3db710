"""Throwaway certificates for the local stack's TLS listeners: made on the spot, never committed.

A test CA signs a server certificate for Kafka (``localhost`` and ``127.0.0.1``), one for
PostgreSQL (``localhost`` only, so that ``127.0.0.1`` plays a host name the certificate does
not name) and a client certificate (CN ``ingest``, the name the broker maps to ``User:ingest``).
A second CA signs nothing the servers present: it plays a CA the client trusts by mistake.

Keys are ECDSA P-256 (made in microseconds, unlike RSA), written unencrypted in PKCS#8, which
Kafka's PEM key stores, PostgreSQL and Python's ``ssl`` all read.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLIENT_NAME = "ingest"
_VALID = datetime.timedelta(days=2)


@dataclass(frozen=True)
class Issued:
    """A certificate (``cert``, its chain up to the CA) and its key, as PEM files."""

    cert: Path
    key: Path

    @property
    def bundle(self) -> Path:
        """Key then chain in one file: what Kafka's ``ssl.keystore.type=PEM`` reads."""
        return self.cert.with_suffix(".keystore.pem")


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the CA every certificate below is signed by
    other_ca: Path  # a CA that signed none of them
    kafka: Issued
    postgres: Issued
    client: Issued


def make_certificates(directory: Path) -> Certificates:
    """Write a fresh CA, the servers' and the client's certificates into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = _authority("ingest test CA")
    _, other_cert = _authority("a CA nobody here uses")
    _write(directory / "ca.pem", _pem(ca_cert))
    _write(directory / "other-ca.pem", _pem(other_cert))
    server_usage = [ExtendedKeyUsageOID.SERVER_AUTH]
    kafka = _issue(directory, "kafka", ca_key, ca_cert, ["localhost", "127.0.0.1"], server_usage)
    postgres = _issue(directory, "postgres", ca_key, ca_cert, ["localhost"], server_usage)
    client = _issue(directory, CLIENT_NAME, ca_key, ca_cert, [], [ExtendedKeyUsageOID.CLIENT_AUTH])
    return Certificates(directory / "ca.pem", directory / "other-ca.pem", kafka, postgres, client)


def _authority(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALID)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(
    directory: Path,
    name: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: list[str],
    usage: list[x509.ObjectIdentifier],
) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALID)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    issued = Issued(directory / f"{name}.pem", directory / f"{name}.key")
    _write(issued.cert, _pem(cert) + _pem(ca_cert))
    _write(issued.key, key_pem, mode=0o600)
    _write(issued.bundle, key_pem + _pem(cert) + _pem(ca_cert), mode=0o600)
    return issued


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.write_bytes(data)
    path.chmod(mode)
