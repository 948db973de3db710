"""`produce`: a bad line publishes nothing from a file, and every stop says how far it got."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import Env, cli, end_offsets, one_line_error

pytestmark = pytest.mark.integration


def line(doc_id: str) -> str:
    return json.dumps({"id": doc_id, "text": f"text of {doc_id}"})


async def published(env: Env) -> int:
    return sum((await end_offsets(env)).values())


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ("{not json", "not valid UTF-8 JSON"),
        ('{"id": "s", "text": "\\ud800"}', "not valid UTF-8 JSON"),  # a lone surrogate
        ('{"id": "t", "text": 7}', "`text` must be a string"),
    ],
    ids=["not-json", "lone-surrogate", "wrong-type"],
)
async def test_a_bad_line_in_a_file_publishes_nothing_and_names_the_line(
    env: Env, tmp_path: Path, bad: str, reason: str
) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join([line("a"), line("b"), "", bad, line("c")]) + "\n")
    result = cli(env, "produce", str(events))
    assert result.returncode == 1, result.stderr
    message = one_line_error(result)
    assert "line 4:" in message and reason in message and "nothing published" in message, message
    assert await published(env) == 0


async def test_a_byte_order_mark_is_accepted(env: Env, tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_bytes(b"\xef\xbb\xbf" + f"{line('a')}\n{line('b')}\n".encode())
    result = cli(env, "produce", str(events))
    assert result.returncode == 0, result.stderr
    assert "published 2 events" in result.stdout
    assert await published(env) == 2


async def test_standard_input_stops_at_a_bad_line_and_says_how_far_it_got(env: Env) -> None:
    lines = [line("a"), line("b"), "{broken", line("c")]
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "worker", "produce", "-"],
        input="\n".join(lines) + "\n",
        env={"PATH": "/usr/bin:/bin", **env.values},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    message = one_line_error(result)
    assert "line 3:" in message and "published 2 (through line 2)" in message, message
    assert await published(env) == 2
