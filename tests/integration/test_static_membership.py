"""Static membership (KIP-345, ``KAFKA_GROUP_INSTANCE_ID``) on Apache Kafka.

A member restarted within the session timeout gets its partitions back and the other member
keeps its own: no rebalance, so the other member logs no revocation. Without instance ids the
same restart makes the broker rebalance the group, which the control case shows.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import pytest

from tests.integration.helpers import (
    Env,
    Event,
    assert_stored_state,
    committed_offsets,
    expected_state,
    produce,
    spawn_worker,
    stored_documents,
)

pytestmark = pytest.mark.integration


async def wait_for(condition: object, what: str, within: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not condition():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"waited {within:.0f}s for {what}")
        await asyncio.sleep(0.2)


def assignment(log: Path) -> set[str]:
    """The partitions a worker holds now, from its own partitions_assigned / revoked log lines."""
    held: set[str] = set()
    for line in log.read_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "partitions_assigned":
            held |= set(event["partitions"])
        elif event.get("event") == "partitions_revoked":
            held -= set(event["partitions"])
    return held


@pytest.mark.parametrize("static", [True, False], ids=["static", "dynamic-control"])
async def test_a_member_restarted_within_the_session_timeout_causes_no_rebalance(
    env: Env, tmp_path: Path, static: bool
) -> None:
    if env.stack.kind == "tansu":
        pytest.skip("Tansu does not implement static membership")
    base = env.with_(LOG_LEVEL="info", KAFKA_SESSION_TIMEOUT_MS="30000", SHUTDOWN_GRACE_SECONDS="5")

    def member(name: str) -> Env:
        return base.with_(KAFKA_GROUP_INSTANCE_ID=f"{env.topic}-{name}") if static else base

    logs = {name: tmp_path / f"{name}.log" for name in ("a", "b")}
    workers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        workers["a"] = spawn_worker(member("a"), logs["a"])
        await wait_for(lambda: assignment(logs["a"]), "member a to be assigned partitions")
        workers["b"] = spawn_worker(member("b"), logs["b"])
        await wait_for(
            lambda: assignment(logs["a"]) and assignment(logs["b"]), "both members to hold partitions"
        )
        held_by_a = assignment(logs["a"])
        assert held_by_a | assignment(logs["b"]) == {f"{env.topic}/{p}" for p in range(3)}
        first: list[Event] = [(f"s-{i}", {"id": f"s-{i}", "text": f"before {i}. " * 20}) for i in range(30)]
        ends = await produce(env, first)
        b_lines_before = len(logs["b"].read_text().splitlines())

        workers["a"].send_signal(signal.SIGTERM)  # a static member leaves no group on stop
        assert workers["a"].wait(30) == 0, logs["a"].read_text()[-3000:]
        restarted = tmp_path / "a-again.log"
        workers["a"] = spawn_worker(member("a"), restarted)
        await wait_for(lambda: assignment(restarted), "the restarted member to be assigned partitions")

        later: list[Event] = [(f"t-{i}", {"id": f"t-{i}", "text": f"after {i}. " * 20}) for i in range(30)]
        ends.update(await produce(env, later))
        total = len(first) + len(later)

        async def all_stored() -> bool:
            return await stored_documents(env) == total

        deadline = asyncio.get_running_loop().time() + 90
        while not await all_stored():
            assert asyncio.get_running_loop().time() < deadline, "not everything was stored within 90 s"
            await asyncio.sleep(0.3)
        b_after = "\n".join(logs["b"].read_text().splitlines()[b_lines_before:])
        if static:
            assert assignment(restarted) == held_by_a, "the restarted member got other partitions"
            assert "partitions_revoked" not in b_after, b_after[-3000:]
            assert "partitions_assigned" not in b_after, b_after[-3000:]
        else:  # the control: a dynamic member's restart rebalances the whole group
            assert "partitions_revoked" in b_after
    finally:
        for worker in workers.values():
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in workers.values():
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
    await assert_stored_state(env, expected_state(first + later))
    committed = await committed_offsets(env, list(ends))
    assert all(committed[tp] == end for tp, end in ends.items())


async def test_two_processes_with_one_instance_id_are_told_instead_of_fencing_each_other(
    env: Env, tmp_path: Path
) -> None:
    if env.stack.kind == "tansu":
        pytest.skip("Tansu does not implement static membership")
    twin = env.with_(
        LOG_LEVEL="info", KAFKA_SESSION_TIMEOUT_MS="10000", KAFKA_GROUP_INSTANCE_ID=f"{env.topic}-twin"
    )
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    workers = [spawn_worker(twin, logs[0])]
    try:
        await wait_for(lambda: assignment(logs[0]), "the first process to be assigned partitions")
        workers.append(spawn_worker(twin, logs[1]))
        await wait_for(
            lambda: any(w.poll() is not None for w in workers), "a twin to stop by itself", within=90
        )
        await asyncio.sleep(3)  # the other may be stopping too; both must say why
        for worker, log in zip(workers, logs, strict=True):
            if worker.poll() is not None:
                assert worker.returncode == 2, log.read_text()[-3000:]
                text = log.read_text()
                assert "Traceback" not in text
                assert "KAFKA_GROUP_INSTANCE_ID: " in text and "uses instance id" in text, text[-3000:]
        survivors = [w for w in workers if w.poll() is None]
        if survivors:  # the one left is no longer fenced: it keeps its partitions and works
            ends = await produce(
                env, [("after-twin", {"id": "after-twin", "text": "stored by the survivor"})]
            )
            deadline = asyncio.get_running_loop().time() + 60
            while await stored_documents(env) < 1:
                assert asyncio.get_running_loop().time() < deadline, "the survivor stored nothing"
                await asyncio.sleep(0.3)
            assert survivors[0].poll() is None
            survivors[0].send_signal(signal.SIGTERM)
            assert survivors[0].wait(30) == 0
            assert await committed_offsets(env, list(ends)) == ends
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
