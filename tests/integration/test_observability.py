"""What an operator sees of a running worker (issue 15), on the real broker and PostgreSQL: every
operations metric exported and moving, tracemalloc's top allocations on /debug/memory, and an
event loop that stays responsive while near-limit documents go through."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.helpers import (
    Env,
    Event,
    assert_stored_state,
    expected_state,
    produce,
    produce_raw,
    spawn_worker,
)
from worker.dev.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
SCRAPE_EVERY = 0.25  # seconds between scrapes of /metrics (/healthz is asked every 0.05 s)
WORDS = ["tomato", "basil", "kafka", "offset", "vector", "chunk", "garden", "partition", "cake", "index"]


def words(seed: int, count: int) -> str:
    return " ".join(np.random.default_rng(seed).choice(WORDS, size=count))


def series(text: str) -> dict[str, float]:
    """Each sample of a /metrics page by name and labels: ``name{a="1",b="2"}``."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


async def watch(port: int, worker: Any, within: float, *, memory: bool = False) -> dict[str, Any]:
    """Until the worker exits: the largest value each series reached, the last page, /healthz's
    answer times, and (``memory``) one /debug/memory answer."""
    peaks: dict[str, float] = {}
    last: dict[str, float] = {}
    answers: list[float] = []
    memory_page: dict[str, Any] | None = None
    deadline = time.monotonic() + within
    scraped = 0.0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        while worker.poll() is None and time.monotonic() < deadline:
            try:
                asked = time.perf_counter()
                async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
                    await response.read()
                answers.append(time.perf_counter() - asked)
                if time.monotonic() - scraped >= SCRAPE_EVERY:
                    scraped = time.monotonic()
                    async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                        last = series(await response.text())
                if memory and memory_page is None and last.get("ingest_commits_total", 0) > 0:
                    async with http.get(f"http://127.0.0.1:{port}/debug/memory?top=5") as response:
                        assert response.status == 200, await response.text()
                        memory_page = await response.json()
            except aiohttp.ClientConnectionError:  # not listening yet, or gone
                pass
            for name, value in last.items():
                peaks[name] = max(peaks.get(name, value), value)
            await asyncio.sleep(0.05)
    return {"peaks": peaks, "last": last, "answers": answers, "memory": memory_page}


async def test_every_operations_metric_is_exported_and_moves(env: Env, faults: Any, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:10]
    port = free_port()
    events: list[Event] = [
        (f"d{n}", {"id": f"d{n}", "version": 1, "text": f"{tag} document {n}. {words(n, 250)}"})
        for n in range(80)
    ]
    await produce(env, events)
    faults(slow_marker=tag, slow_ms=60)  # requests in flight and inputs queued, long enough to see
    run_env = env.with_(
        HEALTH_PORT=str(port), DEBUG_ENDPOINTS="true", EMBEDDING_CONCURRENCY="2", EMBEDDING_BATCH_SIZE="8"
    )
    worker = spawn_worker(run_env, tmp_path / "worker.log", "--stop-when-idle", "2")
    try:
        seen = await watch(port, worker, 120, memory=True)
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait()
    assert worker.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]
    peaks = seen["peaks"]
    moved = {
        "ingest_commits_total": 1,
        'ingest_rebalances_total{event="assigned"}': 1,
        "ingest_fetched_records_total": len(events),
        "ingest_fetched_bytes_total": len(events) * 1500,
        "ingest_event_loop_lag_seconds_count": 10,
        'ingest_database_connections{state="in_use"}': 1,
        "ingest_embedding_requests_in_flight": 1,
        'ingest_queue_depth{stage="embedding"}': 1,
        "ingest_in_flight_bytes": 1,
        "ingest_backlog_bytes": 1,
        'ingest_write_step_seconds_count{step="generations"}': 1,
        "ingest_chunks_written_total": len(events),
        "ingest_embedding_request_seconds_count": 1,
    }
    low = {name: peaks.get(name) for name, least in moved.items() if peaks.get(name, 0) < least}
    assert not low, f"not moving (largest value seen): {low}"
    for name in (
        'ingest_queue_depth{stage="decoded"}',
        'ingest_queue_depth{stage="embedded"}',
        'ingest_queue_depth{stage="dead_letters"}',
        'ingest_database_connections{state="idle"}',
        'ingest_rebalances_total{event="revoked"}',
    ):
        assert name in peaks, f"{name} is not exported"
    memory = seen["memory"]
    assert memory is not None and memory["traced_bytes"] > 0, memory
    top = memory["top"]  # "file:line" ("<frozen abc>:123" for frozen modules)
    assert len(top) == 5 and all(t["bytes"] > 0 and re.fullmatch(r".+:\d+", t["where"]) for t in top), memory
    await assert_stored_state(env, expected_state(events))


async def test_debug_endpoints_are_off_unless_asked_for(env: Env, tmp_path: Path) -> None:
    port = free_port()
    await produce(env, [("d0", {"id": "d0", "version": 1, "text": "one document"})])
    worker = spawn_worker(env.with_(HEALTH_PORT=str(port)), tmp_path / "worker.log", "--stop-when-idle", "3")
    statuses: set[int] = set()
    try:
        async with aiohttp.ClientSession() as http:
            while worker.poll() is None and not statuses:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/debug/memory") as response:
                        statuses.add(response.status)
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
    finally:
        worker.wait(60)
    assert statuses == {404}


async def test_the_loop_stays_responsive_while_near_limit_documents_go_through(
    env: Env, tmp_path: Path
) -> None:
    # Issue 15, tried as a new user would: twelve ~900 KB documents among 1,500 small ones (here 600:
    # the bench's item 14 takes the 1,500). The
    # chunking, hashing and encoding of each large one happen off the loop; /healthz answered in
    # 13 ms at p99 and 53 ms at worst then. Guarded generously here (the figures go to the bench).
    port = free_port()
    small: list[Event] = [(f"s{n}", {"id": f"s{n}", "version": 1, "text": words(n, 60)}) for n in range(600)]
    big: list[Event] = [
        (f"big{n}", {"id": f"big{n}", "version": 1, "text": words(10_000 + n, 900_000 // 7)})
        for n in range(12)
    ]
    events = small[:]
    for n, event in enumerate(big):  # spread among the small ones
        events.insert((n + 1) * len(small) // (len(big) + 1), event)
    assert all(850_000 < len(str(e[1]["text"])) < 1_000_000 for e in big if e[1] is not None)
    await produce(env, events)
    chunking = {"CHUNK_SIZE": "2000", "CHUNK_OVERLAP": "100"}
    worker = spawn_worker(
        env.with_(HEALTH_PORT=str(port), **chunking), tmp_path / "worker.log", "--stop-when-idle", "2"
    )
    try:
        seen = await watch(port, worker, 240)
    finally:
        if worker.poll() is None:
            worker.kill()
        worker.wait()
    assert worker.returncode == 0, (tmp_path / "worker.log").read_text()[-3000:]
    answers = sorted(seen["answers"])
    assert len(answers) > 20, answers
    assert answers[-1] < 1.0, f"/healthz took {answers[-1]:.3f} s at worst"
    last = seen["last"]
    count = last["ingest_event_loop_lag_seconds_count"]
    within = last['ingest_event_loop_lag_seconds_bucket{le="0.25"}']
    assert within >= 0.99 * count, f"{count - within:.0f} of {count:.0f} wake-ups came more than 250 ms late"
    await assert_stored_state(env, expected_state(events), chunking=(2000, 100))


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("no chromium: `make browser` installs Debian's")
    return found


def headless(*args: str) -> subprocess.CompletedProcess[str]:
    """Headless Chromium (as root it needs --no-sandbox), its own profile each time."""
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [
                chromium(),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                "--virtual-time-budget=5000",
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )


async def test_the_status_page_shows_what_metrics_say(
    env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    port = free_port()
    events: list[Event] = [
        (f"d{n}", {"id": f"d{n}", "version": 1, "text": f"document {n}. {words(n, 200)}"}) for n in range(60)
    ]
    bad = [(b"broken", b"{not json")]  # one dead letter, for the page to count
    await produce(env, events)
    await produce_raw(env, bad)
    worker = spawn_worker(env.with_(HEALTH_PORT=str(port)), tmp_path / "worker.log")  # runs until stopped
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:

            async def settled() -> dict[str, float]:
                """/metrics once everything is stored, committed and dead-lettered (it stays so)."""
                for _ in range(600):
                    try:
                        async with http.get(f"{url}/metrics") as response:
                            found = series(await response.text())
                        lags = [v for k, v in found.items() if k.startswith("ingest_consumer_lag{")]
                        stored = found.get("ingest_chunks_written_total", 0) > 0
                        if stored and lags and not any(lags) and found.get("ingest_in_flight_records") == 0:
                            return found
                    except aiohttp.ClientConnectionError:
                        pass
                    await asyncio.sleep(0.2)
                raise AssertionError(
                    "the worker never settled: " + (tmp_path / "worker.log").read_text()[-2000:]
                )

            metrics_page = await settled()
            dom = await asyncio.to_thread(headless, "--dump-dom", f"{url}/")
            assert dom.returncode == 0, dom.stderr[-2000:]
            screenshot = ROOT / ".run" / "screenshots" / "status-page.png"
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            shot = await asyncio.to_thread(
                headless, f"--screenshot={screenshot}", "--window-size=1280,1000", f"{url}/"
            )
            assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    finally:
        worker.terminate()
        worker.wait(60)
    shown = dict(re.findall(r'data-key="([^"]+)" data-value="([^"]*)"', dom.stdout))
    assert 'data-loaded="true"' in dom.stdout, dom.stdout[-2000:]
    assert float(shown["totals.chunks_written"]) == metrics_page["ingest_chunks_written_total"]
    assert (
        float(shown["totals.dead_letters"])
        == 1
        == sum(v for k, v in metrics_page.items() if k.startswith("ingest_dead_letters_total{"))
    )
    assert (
        float(shown["totals.records"])
        == sum(v for k, v in metrics_page.items() if k.startswith("ingest_records_total{"))
        == len(events) + len(bad)
    )
    lags = {
        k.split("partition=")[1].split('"')[1]: v
        for k, v in metrics_page.items()
        if k.startswith("ingest_consumer_lag{")
    }
    assert {k.split("/")[-1] for k in shown if k.startswith("lag.")} == set(lags)
    assert all(float(shown[f"lag.{env.topic}/{p}"]) == v for p, v in lags.items())
    assert float(shown["embedding.concurrency_limit"]) == round(
        metrics_page["ingest_embedding_concurrency_limit"], 2
    )
    assert float(shown["in_flight.records"]) == metrics_page["ingest_in_flight_records"] == 0
    assert shown["dependencies.database"] == shown["dependencies.embedding"] == "up"
    assert ">ready<" in dom.stdout  # partitions assigned, nothing down
    with capsys.disabled():
        print(f"\nstatus page screenshot: {screenshot}")
