"""What every bundled collector does the same way: report on stderr, and stop on a signal
without losing the wake-up (a self-pipe the main loop selects on)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable


def err(collector: str, msg: str) -> None:
    """One line on stderr, prefixed with the collector's name (the agent logs it, rate-limited)."""
    sys.stderr.write(f"{collector}: {msg}\n")
    sys.stderr.flush()


def stop_on_signals(on_stop: Callable[[], None], *, nonblocking_read: bool = False) -> int:
    """Call ``on_stop`` on SIGTERM/SIGINT (a handler that only sets a flag) and return the read
    end of a pipe that becomes readable when a signal arrives, for the main loop's select."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    if nonblocking_read:
        os.set_blocking(wake_r, False)
    signal.set_wakeup_fd(wake_w)

    def _stop(_signum: int, _frame: object) -> None:
        on_stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return wake_r
