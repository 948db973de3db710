"""The status page's figures (worker.status): rates between reads, from the registry."""

from __future__ import annotations

import pytest

from worker import status


def test_rates_are_taken_between_reads_over_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(status.time, "monotonic", lambda: clock[0])
    rates = status.Rates()
    assert rates.update({"n": 50.0}) == {"n": 0.0}  # one read: no rate yet
    clock[0] += 2
    assert rates.update({"n": 70.0}) == {"n": 10.0}
    clock[0] += 20  # past the window: the oldest reads are let go
    clock[0] += 2
    rates.update({"n": 70.0})
    clock[0] += 2
    assert rates.update({"n": 90.0}) == pytest.approx({"n": 20 / 2})  # since the previous read
    clock[0] += 3
    assert rates.update({"n": 120.0}) == pytest.approx({"n": 50 / 5})  # over the 5 s within the window


def test_a_dependency_down_shows_with_its_reason_and_the_worker_not_ready() -> None:
    from worker import metrics
    from worker.settings import Settings

    metrics.DEPENDENCY_UP.labels(dependency="embedding").set(0)
    metrics.DEPENDENCY_UP.labels(dependency="database").set(1)
    try:
        figures = status.status(
            status.Rates(),
            partitions=["docs/0"],
            down={"embedding": "the API refuses every request: 401"},
            settings=Settings.load({}),
        )
    finally:
        metrics.DEPENDENCY_UP.labels(dependency="embedding").set(1)
    assert figures["dependencies"]["embedding"] == "down: the API refuses every request: 401"
    assert figures["dependencies"]["database"] == "up"
    assert figures["ready"] is False
