"""`make run`: the demo publishes the corpus, ingests it, searches it and stops its own stack."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.services import chosen

pytestmark = pytest.mark.integration


def _processes_under(path: Path) -> list[str]:
    """Command lines of live processes that name ``path`` (the stack's broker, Postgres, servers)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in text:
            found.append(text[:200])
    return found


@pytest.mark.smoke
def test_make_run_demo_ingests_searches_and_stops_its_stack(tmp_path: Path) -> None:
    broker = "kafka" if chosen() == "kafka" else "tansu"
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "worker.dev.demo", "--broker", broker, "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    stored = re.search(r"stored (\d+) documents as (\d+) chunks", result.stdout)
    assert stored is not None, result.stdout
    documents, chunks = int(stored.group(1)), int(stored.group(2))
    corpus_lines = (Path(__file__).parents[2] / "worker" / "dev" / "corpus.jsonl").read_text().splitlines()
    assert documents == len([line for line in corpus_lines if line.strip()])
    assert chunks > documents
    searches = result.stdout.split('== search "')[1:]
    assert len(searches) == 3
    for block in searches:
        assert [line.split(".")[0].strip() for line in block.splitlines() if re.match(r"\s*\d\. ", line)] == [
            "1",
            "2",
            "3",
        ]
    assert _processes_under(workdir) == []
