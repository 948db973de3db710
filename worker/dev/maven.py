"""What the local stacks take from Maven Central: a pom's artifacts copied into a folder once.

Each pom beside its module (``kafka/pom.xml``, ``postgres/pom.xml``) names what to fetch and a
version property; ``mvn dependency:copy-dependencies`` copies the artifacts into its ``lib``
folder (ignored by git; Maven's own cache makes later copies local), once per version, one
process at a time.
"""

from __future__ import annotations

import fcntl
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from worker.dev.processes import StackError


def pom_property(pom: Path, name: str) -> str:
    """A ``<properties>`` value of ``pom`` (a version)."""
    found = re.search(rf"<{re.escape(name)}>([^<]+)</{re.escape(name)}>", pom.read_text())
    if found is None:  # pragma: no cover - the poms are ours
        raise StackError(f"{pom} names no {name}")
    return found.group(1)


def fetched(lib: Path, version: str) -> bool:
    return _marker(lib, version).exists()


def _marker(lib: Path, version: str) -> Path:
    """The file saying ``lib`` holds ``version``'s artifacts."""
    return lib / f".fetched-{version}"


def fetch_once(
    pom: Path,
    lib: Path,
    version: str,
    what: str,
    *,
    then: Callable[[], None] = lambda: None,
    timeout: float = 900,
) -> None:
    """Copy ``pom``'s artifacts into ``lib`` unless ``version`` is there already, then ``then()``
    (unpacking, say); StackError naming ``what`` when Maven is missing or fails."""
    lib.mkdir(parents=True, exist_ok=True)
    with open(pom.parent / ".fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if fetched(lib, version):
            return
        mvn = shutil.which("mvn")
        if mvn is None:
            raise StackError(f"{what} is not fetched yet and `mvn` is not on PATH")
        for stale in lib.glob("*.jar"):
            stale.unlink()
        result = subprocess.run(
            [mvn, "-q", "-B", "-f", str(pom), "dependency:copy-dependencies", f"-DoutputDirectory={lib}"],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            tail = (result.stdout + result.stderr).strip().splitlines()[-5:]
            raise StackError(f"fetching {what} with Maven failed: " + " | ".join(tail))
        then()
        _marker(lib, version).touch()
