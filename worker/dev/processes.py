"""Starting, waiting for and stopping the local processes of the development stacks."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any


class StackError(RuntimeError):
    pass


# Below Linux's ephemeral range (32768-60999): a port picked there for a server started a moment
# later can meanwhile be taken by some client's outgoing connection, and the server fails to bind.
_SERVER_PORTS = range(20000, 32768)


def reachable(directory: Path) -> None:
    """Let every user enter ``directory`` and each of its parents: as root, PostgreSQL runs as
    another user, which must reach its data and its binaries."""
    for parent in (directory, *directory.parents):
        if parent.stat().st_mode & 0o005 != 0o005:
            parent.chmod(parent.stat().st_mode | 0o005)


def free_port() -> int:
    """A port nothing listens on now, outside the range outgoing connections take theirs from."""
    for _ in range(100):
        port = random.choice(_SERVER_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[Any], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StackError(f"{what} exited with status {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise StackError(f"{what} did not listen on port {port} within {timeout:.0f}s")


def stop_process(process: subprocess.Popen[Any] | None, timeout: float = 5.0) -> None:
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGCONT)  # in case a test froze it
        process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Freezable:
    """``freeze``/``thaw`` for a class holding a child ``process``: SIGSTOP plays a hung machine."""

    process: subprocess.Popen[Any] | None

    def freeze(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)
