"""SIGTERM and SIGINT, for every long-running command: the handlers only set events."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable


def on_stop_signals(handler: Callable[[signal.Signals], None]) -> None:
    """Call ``handler(signal)`` from the running loop on each SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handler, sig)
