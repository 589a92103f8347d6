"""What every bundled collector does the same way: report on stderr, stop on a signal without
losing the wake-up (a self-pipe the main loop selects on), take its own children down with it,
and write its stdout once per wake-up."""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

from spoolagent import protocol

_PR_SET_PDEATHSIG = 1


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


def die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` for a collector's own child (journald's ``journalctl -f``): the kernel
    SIGKILLs the child when the collector dies, even by SIGKILL alone (the OOM killer, the agent's
    parent-death signal), instead of leaving it under pid 1 until its next write fails. None
    where prctl is not available. Safe as a preexec_fn: the collectors are single-threaded, and
    libc is resolved here, before the fork."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def _preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the collector died before prctl took effect
            os._exit(1)

    return _preexec


# writev takes at most IOV_MAX (1024 on Linux) buffers; more are joined first
_WRITEV_MAX = 512


class Output:
    """A collector's stdout, written once per wake-up: what it prints waits here until ``flush``
    (the main loop's, before it sleeps), or until ``flush_bytes`` wait (a busy file: the agent
    works on them meanwhile). A pass's records and the checkpoint after them then go in one write,
    and the agent's reader wakes once for them, not twice (issue 17). The buffers are written as
    they are (``writev``), not joined first. Not thread-safe."""

    def __init__(self, fd: int, flush_bytes: int = 64 * 1024) -> None:
        self.fd = fd
        self.flush_bytes = flush_bytes
        self._parts: list[bytes | memoryview] = []
        self._waiting = 0

    def write(self, data: bytes | memoryview) -> None:
        """Queue ``data`` after what waits; may write (and block on a full pipe). ``data`` must
        not change until then (a view of bytes that nothing else writes to)."""
        self._parts.append(data)
        self._waiting += len(data)
        if self._waiting >= self.flush_bytes:
            self.flush()

    def flush(self) -> None:
        """Write what waits, in order. Blocks while the pipe is full; raises BrokenPipeError once
        the agent is gone."""
        parts, total = self._parts, self._waiting
        if not parts:
            return
        self._parts, self._waiting = [], 0
        if len(parts) == 1:
            written = os.write(self.fd, parts[0])
        elif len(parts) <= _WRITEV_MAX:
            written = os.writev(self.fd, parts)
        else:
            written = 0
        if written < total:  # the pipe was nearly full, or a signal came part way
            protocol.write_all(self.fd, b"".join(parts)[written:])
