"""The command line's surface: help, version, which settings each command shows, secrets as flags."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from worker import cli, commands
from worker.settings import describe

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = [name for name, _, _ in describe()]
FLAGS = {name: "--" + name.lower().replace("_", "-") for name in SETTINGS}
COMMANDS = (
    "run",
    "migrate",
    "build-index",
    "produce",
    "replay",
    "search",
    "usage",
    "reindex",
    "verify",
    "dev",
)


def subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli._parser()
    [commands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(commands.choices)


def help_of(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exited:
        cli.main(list(argv))
    assert exited.value.code == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def shown_flags(text: str) -> set[str]:
    return set(re.findall(r"^\s+(--[a-z0-9-]+)", text, re.MULTILINE))


def ingest(*args: str, **environ: str) -> subprocess.CompletedProcess[str]:
    """``python -m worker ARGS`` with no setting in its environment but ``environ``."""
    clean = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        cwd=ROOT,
        env={**clean, **environ},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# -- ingest-worker --help, --version ----------------------------------------------------------


def test_top_level_help_is_plain_text_naming_every_command_with_its_purpose(
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = help_of(capsys, "--help")
    assert "``" not in text
    assert set(subparsers()) == set(COMMANDS)
    for command in COMMANDS:  # the name and its purpose on one line
        assert re.search(rf"^  {re.escape(command)} +[a-z]\w+ ", text, re.MULTILINE), command
    assert "environment variable" in text
    assert "--kafka-topic" in text  # the equal flag, by example


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    assert help_of(capsys, "--version") == f"ingest-worker {importlib.metadata.version(cli.DISTRIBUTION)}\n"


# -- help for every argument; each command's settings --------------------------------------------


def test_every_argument_of_every_command_has_help() -> None:
    parser = cli._parser()
    for name, sub in [("", parser), *subparsers().items()]:
        assert isinstance(sub, cli._Parser)
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = sub.hidden_help.get(action) if action.help == argparse.SUPPRESS else action.help
            assert text, f"ingest-worker {name}: {action.option_strings or action.dest} has no help"


def test_uses_names_real_settings_for_every_command() -> None:
    assert set(cli.USES) == set(COMMANDS)
    for command, names in cli.USES.items():
        assert names <= set(SETTINGS), (command, names - set(SETTINGS))
    assert cli.USES["run"] == set(SETTINGS)


@pytest.mark.parametrize(
    ("command", "shown", "hidden_prefixes"),
    [
        (
            "produce",
            {"KAFKA_BOOTSTRAP_SERVERS", "KAFKA_TOPIC", "KAFKA_SASL_PASSWORD"},
            ("DATABASE_", "EMBEDDING_"),
        ),
        ("replay", {"KAFKA_DLQ_TOPIC", "KAFKA_GROUP_ID", "KAFKA_SASL_PASSWORD"}, ("DATABASE_", "EMBEDDING_")),
        # search compares CHUNK_* with the generation the settings name (not refusing another)
        (
            "search",
            {"DATABASE_URL", "EMBEDDING_URL", "EMBEDDING_API_KEY", "CHUNK_SIZE"},
            ("KAFKA_", "HEALTH_"),
        ),
        ("migrate", {"DATABASE_URL", "VECTOR_TYPE", "EMBEDDING_DIMENSIONS"}, ("KAFKA_", "EMBEDDING_URL")),
        ("build-index", {"DATABASE_URL", "INDEX_BUILD_MEMORY"}, ("KAFKA_", "EMBEDDING_URL")),
        (
            "verify",
            {"DATABASE_URL", "EMBEDDING_DIMENSIONS", "EMBEDDING_MODEL", "KAFKA_TOPIC", "KAFKA_SASL_PASSWORD"},
            ("EMBEDDING_URL", "EMBEDDING_API_KEY", "CHUNK_", "KAFKA_GROUP"),
        ),
        ("reindex", {"DATABASE_URL", "EMBEDDING_URL", "EMBEDDING_API_KEY"}, ("KAFKA_", "HEALTH_")),
        ("dev", {"KAFKA_TOPIC", "HEALTH_PORT"}, ("DATABASE_", "EMBEDDING_", "KAFKA_BOOTSTRAP")),
    ],
)
def test_help_shows_the_settings_the_command_uses_and_help_all_shows_every_one(
    capsys: pytest.CaptureFixture[str], command: str, shown: set[str], hidden_prefixes: tuple[str, ...]
) -> None:
    text = help_of(capsys, command, "--help")
    flags = shown_flags(text)
    assert {FLAGS[name] for name in cli.USES[command]} <= flags
    assert {FLAGS[name] for name in shown} <= flags
    hidden = {FLAGS[name] for name in SETTINGS if name.startswith(hidden_prefixes)}
    assert hidden, hidden_prefixes
    assert not flags & hidden, sorted(flags & hidden)
    own = cli.OWN_FLAGS.get(command, frozenset())  # flags the command gives a meaning of its own
    assert not flags & {FLAGS[name] for name in set(SETTINGS) - cli.USES[command] - own}
    assert f"'ingest-worker {command} --help-all' shows the rest" in text.strip().splitlines()[-1]
    assert {FLAGS[name] for name in set(SETTINGS) - own} <= shown_flags(
        help_of(capsys, command, "--help-all")
    )


def test_run_help_shows_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_of(capsys, "run", "--help")
    assert {FLAGS[name] for name in SETTINGS} <= shown_flags(text)
    assert "--help-all" in text.strip().splitlines()[-1]


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "dev"])
def test_every_command_still_accepts_every_setting_flag(command: str) -> None:
    positional = {"produce": ["events.jsonl"], "search": ["query"]}.get(command, [])
    positional = {"reindex": ["status"]}.get(command, positional)
    argv = [command, *positional]
    # reindex's --vector-type and --chunk-* name the new generation's (the settings come from the
    # environment there); every other setting's flag is taken by every command.
    settings = [name for name in SETTINGS if name not in cli.OWN_FLAGS.get(command, ())]
    for name in settings:
        argv += [FLAGS[name], f"value-of-{name}"]
    args = cli._parser().parse_args(argv)
    for name in settings:
        assert getattr(args, name.lower()) == f"value-of-{name}"
    for name in cli.OWN_FLAGS.get(command, ()):
        assert not hasattr(args, name.lower())


def _no_stack(*_: object, **__: object) -> None:
    raise AssertionError("dev started a stack")


def test_dev_refuses_a_setting_it_does_not_honour_in_one_line_and_touches_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("worker.dev.stack.embedded_stack", _no_stack)
    workdir = tmp_path / "stack"
    code = cli.main(["dev", "--workdir", str(workdir), "--kafka-topic", "t", "--embedding-model", "m"])
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    [line] = err.splitlines()
    assert line.startswith("ingest-worker dev: error: --embedding-model")
    assert "--kafka-topic:" not in line  # honoured, so not refused
    assert not workdir.exists()


# -- secrets given as flags ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flag", "value", "variable", "secret"),
    [
        ("--embedding-api-key", "sk-flagsecret-0001", "EMBEDDING_API_KEY", "sk-flagsecret-0001"),
        ("--kafka-sasl-password", "sasl-flagsecret-2", "KAFKA_SASL_PASSWORD", "sasl-flagsecret-2"),
        ("--database-url", "postgresql://u:pg-flagsecret-3@db/x", "DATABASE_URL", "pg-flagsecret-3"),
        ("--database-url", "postgresql://u@db/x?password=pg-flagsecret-4", "DATABASE_URL", "pg-flagsecret-4"),
        ("--embedding-url", "https://u:api-flagsecret-5@llm/v1", "EMBEDDING_URL", "api-flagsecret-5"),
    ],
)
def test_a_secret_given_as_a_flag_is_warned_about_by_name_never_shown(
    flag: str, value: str, variable: str, secret: str
) -> None:
    result = ingest("produce", "/nonexistent/events.jsonl", flag, value)
    assert result.returncode == 2  # the command itself still runs (and fails on its missing file)
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, result.stderr
    assert warnings[0].startswith(f"ingest-worker: warning: {flag} ")
    assert f"set {variable} in the environment" in warnings[0]
    assert secret not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("args", "environ"),
    [
        (("--database-url", "postgresql://u@db/x"), {}),  # a URL without a password
        ((), {"EMBEDDING_API_KEY": "sk-envsecret-0005"}),  # the environment is where secrets go
        (("--kafka-sasl-username", "someone"), {}),
        (("--embedding-url", "https://llm.internal/v1"), {}),
    ],
)
def test_no_warning_without_a_secret_on_the_command_line(
    args: tuple[str, ...], environ: dict[str, str]
) -> None:
    result = ingest("produce", "/nonexistent/events.jsonl", *args, **environ)
    assert result.returncode == 2
    assert "warning" not in result.stderr, result.stderr
    assert "sk-envsecret-0005" not in result.stdout + result.stderr


# -- dev's printed command ---------------------------------------------------------------------


def test_dev_names_the_console_script_it_runs_as_by_its_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "bin" / "ingest-worker"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["bin/ingest-worker", "dev"])
    assert commands._self_command() == str(script)


def test_dev_run_as_a_module_names_this_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", [str(ROOT / "worker" / "__main__.py"), "dev"])
    assert commands._self_command() == f"{sys.executable} -m worker"
