"""README and the public contract stay in step with the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from worker.cli import _parser
from worker.settings import describe

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = ROOT.parent / "shared" / "CONTRACT.md"


def test_every_setting_is_in_the_readme_table_with_its_default() -> None:
    readme = (ROOT / "README.md").read_text()
    for name, default, _ in describe():
        row = re.search(rf"^\| `{name}` \| ([^|]*) \|", readme, re.MULTILINE)
        assert row is not None, f"{name} is missing from the README's settings table"
        if default and name != "KAFKA_DLQ_TOPIC":
            assert f"`{default}`" in row.group(1), f"README shows another default for {name}"


def test_every_readme_setting_exists() -> None:
    readme = (ROOT / "README.md").read_text()
    known = {name for name, _, _ in describe()}
    listed = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", readme, re.MULTILINE))
    assert listed <= known, f"README lists settings the code lacks: {sorted(listed - known)}"


def test_contract_settings_and_commands_exist() -> None:
    if not CONTRACT.exists():  # the contract lives beside the repository, in shared/
        pytest.skip("shared/CONTRACT.md is not beside this checkout")
    contract = CONTRACT.read_text()
    known = {name for name, _, _ in describe()}
    named = set(re.findall(r"`((?:KAFKA|DATABASE|EMBEDDING|HEALTH)_[A-Z_]+)`", contract))
    assert named <= known, f"CONTRACT names settings the code lacks: {sorted(named - known)}"
    commands = set(_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    for command in ("run", "migrate", "produce", "replay", "search", "reindex", "verify", "dev"):
        assert command in commands


def test_every_metric_is_in_the_readme_table_with_its_type() -> None:
    from prometheus_client.metrics import MetricWrapperBase

    from worker import metrics

    readme = (ROOT / "README.md").read_text()
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            name = metric._name + ("_total" if metric._type == "counter" else "")
            row = re.search(rf"^\| `{name}` \| (\w+) \|", readme, re.MULTILINE)
            assert row is not None, f"{name} is missing from the README's metrics table"
            assert row.group(1) == metric._type, f"README shows another type for {name}"
