"""``python -m tests.integration.trace_settings ARGS``: ``ingest-worker ARGS``, writing the
settings its command read (a JSON list of variable names) to the file ``$TRACE_SETTINGS_TO``.

Only reads made while the command runs count: not those of loading and checking the settings,
nor main's own (the log level, the secrets to mask), which every command makes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from worker import cli
from worker.settings import Settings

FIELDS = {f.name for f in dataclasses.fields(Settings)}
read: set[str] = set()


def _traced(self: Settings, name: str) -> Any:
    if name in FIELDS:
        read.add(name.upper())
    return object.__getattribute__(self, name)


_run_async = cli._run_async


def _run_traced(coro: Coroutine[Any, Any, int]) -> int:
    Settings.__getattribute__ = _traced  # type: ignore[method-assign]
    try:
        return _run_async(coro)
    finally:
        del Settings.__getattribute__
        Path(os.environ["TRACE_SETTINGS_TO"]).write_text(json.dumps(sorted(read)))


cli._run_async = _run_traced

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
