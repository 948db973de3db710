"""`produce`: a bad line publishes nothing from a file, and every stop says how far it got."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.helpers import Env, cli, end_offsets, one_line_error

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


async def test_ctrl_c_while_reading_standard_input_says_how_many_went_out(env: Env) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "produce",
        "-",
        stdin=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin", **env.values},
    )
    assert process.stdin is not None
    try:
        process.stdin.write("".join(f"{line(f'i-{n}')}\n" for n in range(50)).encode())
        await process.stdin.drain()  # ...and the pipe stays open, as a person typing or a slow upstream
        deadline = asyncio.get_running_loop().time() + 30
        while await published(env) < 50:
            assert asyncio.get_running_loop().time() < deadline, "the 50 lines never went out"
            await asyncio.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, raw = await asyncio.wait_for(process.communicate(), 30)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    stderr = raw.decode()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert "interrupted; published 50 (through line 50)" in stderr, stderr
    assert await published(env) == 50
