"""`ingest-worker dev`: one stack per workdir, whatever was left behind by a `kill -9`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest

from tests.integration.helpers import one_line_error
from worker.settings import describe

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 120.0


def _environ() -> dict[str, str]:
    """This environment without any setting: dev's block must come from dev alone."""
    settings = {name for name, _, _ in describe()}
    return {key: value for key, value in os.environ.items() if key not in settings}


class Dev:
    """``ingest-worker dev`` in a process of its own, its stdout read line by line."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker", "dev", "--broker", "tansu", "--workdir", str(workdir), *args],
            cwd=ROOT,
            env=_environ(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.pid = self.process.pid
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def block(self) -> tuple[dict[str, str], str]:
        """The exported settings and the command line it prints once the stack is up."""
        exports: dict[str, str] = {}
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                line = self._lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"dev printed no settings within {START_TIMEOUT:.0f}s") from None
            if line is None:
                raise AssertionError(f"dev ended ({self.process.wait()}) before it printed its settings")
            if line.startswith("export "):
                key, _, value = line.removeprefix("export ").partition("=")
                exports[key] = value.strip("'")
            elif line.startswith("# then") and exports:
                return exports, line

    def stop(self) -> int:
        """SIGTERM, as Ctrl-C would: the stack stops and dev exits."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(60)
        finally:
            for stream in (self.process.stdout, self.process.stderr):
                if stream is not None:
                    stream.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Not under pytest's tmp_path: a concurrent pytest run may prune those directories.
    path = Path(tempfile.mkdtemp(prefix="ingest-test-dev-"))
    try:
        yield path / "dev"
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _postgres_answers(database_url: str) -> bool:
    async def ask() -> bool:
        conn = await asyncpg.connect(database_url, timeout=10)
        try:
            return bool(await conn.fetchval("SELECT 1") == 1)
        finally:
            await conn.close()

    return asyncio.run(ask())


def _listening(bootstrap: str) -> bool:
    host, _, port = bootstrap.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            return True
    except OSError:
        return False


def _second_dev(workdir: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "worker", "dev", "--broker", "tansu", "--workdir", str(workdir)]
    second = subprocess.Popen(
        command, cwd=ROOT, env=_environ(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = second.communicate(timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        second.send_signal(signal.SIGTERM)  # as a person would: it stops the stack it attached to
        second.communicate(timeout=60)
        raise AssertionError("a second dev on a running workdir did not exit: it ran a stack too") from None
    return subprocess.CompletedProcess(command, second.returncode, stdout, stderr)


def test_a_second_dev_on_a_running_workdir_exits_1_and_leaves_the_first_alone(workdir: Path) -> None:
    first = Dev(workdir, "--kafka-topic", "docs", "--kafka-dlq-topic", "docs-dead", "--health-port", "18089")
    try:
        exports, command = first.block()
        assert exports["KAFKA_TOPIC"] == "docs"
        assert exports["KAFKA_DLQ_TOPIC"] == "docs-dead"
        assert exports["HEALTH_PORT"] == "18089"
        assert command.endswith(f"{sys.executable} -m worker run"), command
        before = sorted(p.name for p in workdir.iterdir())

        second = _second_dev(workdir)

        assert second.returncode == 1
        assert f"already running (pid {first.pid})" in one_line_error(second)
        assert second.stdout == ""
        assert first.process.poll() is None
        assert _postgres_answers(exports["DATABASE_URL"])
        assert _listening(exports["KAFKA_BOOTSTRAP_SERVERS"])
        assert sorted(p.name for p in workdir.iterdir()) == before
        assert (workdir / "stack.pid").read_text().strip() == str(first.pid)

        demo = subprocess.run(  # make run, which starts from an empty workdir, on the same one
            [sys.executable, "-m", "worker.dev.demo", "--workdir", str(workdir)],
            cwd=ROOT,
            env=_environ(),
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT,
            check=False,
        )
        assert demo.returncode == 1, demo.stdout[-2000:] + demo.stderr[-2000:]
        assert f"already running (pid {first.pid})" in demo.stderr
        assert sorted(p.name for p in workdir.iterdir()) == before
        assert _postgres_answers(exports["DATABASE_URL"])
    finally:
        assert first.stop() == 0


def _kill(processes: list[psutil.Process]) -> None:
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(processes, timeout=30)


def test_what_a_killed_dev_leaves_behind_does_not_block_a_new_one(workdir: Path) -> None:
    first = Dev(workdir)
    first.block()
    postmaster = psutil.Process(int((workdir / "pgdata" / "postmaster.pid").read_text().split()[0]))
    leftovers = [
        *psutil.Process(first.pid).children(recursive=True),  # the broker, the embedding server
        postmaster,
        *postmaster.children(recursive=True),
    ]
    first.process.kill()  # kill -9: no clean-up of its own
    first.stop()
    _kill(leftovers)  # what cleaning up after it leaves: the files, not the processes
    assert (workdir / "stack.pid").read_text().strip() == str(first.pid)  # stale
    assert (workdir / "pgdata" / "postmaster.pid").exists()  # stale

    again = Dev(workdir)
    try:
        exports, _ = again.block()
        assert _postgres_answers(exports["DATABASE_URL"])
        assert (workdir / "stack.pid").read_text().strip() == str(again.pid)
    finally:
        assert again.stop() == 0
