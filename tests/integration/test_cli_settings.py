"""Each command's --help shows every setting it reads: a hidden setting is one it never reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka import TopicPartition

from tests.integration.helpers import Env, committed_offsets
from worker import cli
from worker.kafka import ensure_topic

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def settings_read(env: Env, tmp_path: Path, *args: str) -> set[str]:
    """The settings ``ingest-worker ARGS`` read while its command ran (it must succeed)."""
    out = tmp_path / f"read-{args[0]}.json"
    result = subprocess.run(
        [sys.executable, "-m", "tests.integration.trace_settings", *args],
        cwd=ROOT,
        env={**os.environ, **env.values, "TRACE_SETTINGS_TO": str(out)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return set(json.loads(out.read_text()))


async def test_every_setting_a_command_reads_is_one_its_help_shows(env: Env, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text('{"id": "doc-1", "text": "a short document about rotating credentials"}\n')
    await ensure_topic(env.settings, env.settings.dlq_topic, 1)  # replay refuses a missing one
    # A group's coordinator, which a fresh broker has only once some group asked for one.
    await committed_offsets(env, [TopicPartition(env.topic, 0)])
    for args in (
        ("migrate",),
        ("build-index",),
        ("produce", str(events)),
        ("search", "rotating credentials"),
        ("replay",),
    ):
        read = settings_read(env, tmp_path, *args)
        assert read, args  # the trace works: every command reads some
        assert read <= cli.USES[args[0]], f"{args[0]} reads {sorted(read - cli.USES[args[0]])}, hidden"
