"""Reading a collector's pipes: stdout into runs of complete lines, stderr into the log.

Owns cutting stdout into lines (chunks of 256 KiB cut at their last newline, never a Python object
per line), the over-long line rule, and rate-limited stderr logging.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

READ_CHUNK_BYTES = 256 * 1024


class Counters:
    """Thread-safe integer counters."""

    def __init__(self, *names: str) -> None:
        self._lock = threading.Lock()
        self._values = dict.fromkeys(names, 0)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._values[name] = self._values.get(name, 0) + n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._values)


def pump_stdout(fd: int, name: str, *, max_line_bytes: int, head_bytes: int,
                on_lines: Callable[[bytes, int], None],
                on_overlong: Callable[[int, bytes], None],
                counters: Counters, read_bytes: int = READ_CHUNK_BYTES) -> None:
    """Read ``fd`` to EOF in chunks of ``read_bytes`` and hand over complete lines, in order, as
    runs: ``on_lines(run, n)`` where ``run`` is ``n`` lines joined, each ending in a newline, none
    over ``max_line_bytes``. A run is cut out of a chunk whole (find, rfind and one count), never
    split into a Python object per line.

    Blocks; runs in the collector's reader thread. ``on_lines`` may block, and then nothing is read:
    the pipe fills and the collector waits in write(), which is the back-pressure we want.
    A line over ``max_line_bytes`` is never buffered whole: its size and first ``head_bytes`` go
    to ``on_overlong`` and the rest is skipped up to the next newline. An unterminated last line
    is handed over at EOF (with a newline). Callback exceptions are logged and reading goes on.
    """
    parts: list[bytes] = []  # the current unterminated line, in pieces (joined once, on "\n")
    parts_len = 0
    skipping = -1  # >= 0 while inside an over-long line: its length so far
    head = b""
    while True:
        chunk = os.read(fd, read_bytes)
        if not chunk:
            break
        counters.add("bytes_read_total", len(chunk))
        if skipping >= 0:
            nl = chunk.find(b"\n")
            if nl < 0:
                skipping += len(chunk)
                continue
            _deliver_overlong(name, on_overlong, counters, skipping + nl, head)
            skipping = -1
            chunk = chunk[nl + 1:]
        last = chunk.rfind(b"\n")
        if last < 0:
            if chunk:
                parts.append(chunk)
                parts_len += len(chunk)
            if parts_len > max_line_bytes:
                head = b"".join(parts)[:head_bytes]
                skipping, parts, parts_len = parts_len, [], 0
            continue
        first = chunk.find(b"\n")
        start = 0
        if parts_len + first > max_line_bytes:  # the line that ends first is over-long
            line_head = b"".join([*parts, chunk[:min(first, head_bytes)]])[:head_bytes]
            _deliver_overlong(name, on_overlong, counters, parts_len + first, line_head)
            parts, parts_len, start = [], 0, first + 1
        if start <= last:
            if last - first - 1 > max_line_bytes:
                # a line after the first may be over-long too (max_line_bytes < read_bytes): per line
                _deliver_checked(name, b"".join([*parts, chunk[start:last]]).split(b"\n"),
                                 max_line_bytes, head_bytes, on_lines, on_overlong, counters)
            elif parts:
                run = b"".join([*parts, memoryview(chunk)[:last + 1]])
                _deliver(name, on_lines, counters, run, run.count(b"\n"))
            else:
                run = chunk if start == 0 and last == len(chunk) - 1 else chunk[start:last + 1]
                _deliver(name, on_lines, counters, run, run.count(b"\n"))
        parts, parts_len = [], 0
        tail = chunk[last + 1:]
        if len(tail) > max_line_bytes:
            skipping, head = len(tail), tail[:head_bytes]
        elif tail:
            parts, parts_len = [tail], len(tail)
    if skipping >= 0:
        _deliver_overlong(name, on_overlong, counters, skipping, head)
    elif parts:
        _deliver(name, on_lines, counters, b"".join([*parts, b"\n"]), 1)


def _deliver_checked(name: str, lines: list[bytes], max_line_bytes: int, head_bytes: int,
                     on_lines: Callable[[bytes, int], None],
                     on_overlong: Callable[[int, bytes], None], counters: Counters) -> None:
    good: list[bytes] = []
    for line in lines:
        if len(line) <= max_line_bytes:
            good.append(line)
            continue
        if good:  # keep the order: the lines before the over-long one go first
            _deliver(name, on_lines, counters, b"\n".join([*good, b""]), len(good))
            good = []
        _deliver_overlong(name, on_overlong, counters, len(line), line[:head_bytes])
    if good:
        _deliver(name, on_lines, counters, b"\n".join([*good, b""]), len(good))


def _deliver(name: str, on_lines: Callable[[bytes, int], None], counters: Counters,
             run: bytes, n: int) -> None:
    counters.add("lines_read_total", n)
    try:
        on_lines(run, n)
    except Exception:
        # a reader that died would leave the collector blocked on a full pipe forever
        counters.add("callback_errors_total")
        log.exception("on_lines failed name=%s lines=%d (lost)", name, n)


def _deliver_overlong(name: str, on_overlong: Callable[[int, bytes], None], counters: Counters,
                      size: int, head: bytes) -> None:
    counters.add("overlong_lines_total")
    try:
        on_overlong(size, head)
    except Exception:
        counters.add("callback_errors_total")
        log.exception("on_overlong failed name=%s size=%d", name, size)


class StderrLimiter:
    """A token bucket for one collector's stderr lines: ``rate_per_s`` with bursts of ``burst``."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = time.monotonic()
        self.suppressed = 0

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate_per_s)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.suppressed += 1
        return False


def pump_stderr(fd: int, name: str, limiter: StderrLimiter, counters: Counters,
                max_log_bytes: int = 2048) -> None:
    """Read ``fd`` to EOF and log each line at INFO with the collector's name, rate-limited:
    lines over the limit are counted and summarised in one line. Blocks; never raises on data."""
    pending = b""
    skipping = False  # inside a line whose head was logged already
    while True:
        chunk = os.read(fd, READ_CHUNK_BYTES)
        if not chunk:
            break
        if skipping:
            nl = chunk.find(b"\n")
            if nl < 0:
                continue
            skipping, chunk = False, chunk[nl + 1:]
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        for line in lines:
            _log_stderr(name, line, limiter, counters, max_log_bytes)
        if len(pending) > max_log_bytes:  # bound the buffer: log the head now, skip the rest
            _log_stderr(name, pending, limiter, counters, max_log_bytes, cut=True)
            pending, skipping = b"", True
    if pending:
        _log_stderr(name, pending, limiter, counters, max_log_bytes)
    if limiter.suppressed:
        counters.add("stderr_lines_suppressed_total", limiter.suppressed)
        log.info("collector stderr suppressed name=%s lines=%d", name, limiter.suppressed)
        limiter.suppressed = 0


def _log_stderr(name: str, line: bytes, limiter: StderrLimiter, counters: Counters,
                max_log_bytes: int, cut: bool = False) -> None:
    if not limiter.allow():
        return
    if limiter.suppressed:
        counters.add("stderr_lines_suppressed_total", limiter.suppressed)
        log.info("collector stderr suppressed name=%s lines=%d", name, limiter.suppressed)
        limiter.suppressed = 0
    text = line[:max_log_bytes].rstrip(b"\r").decode("utf-8", "backslashreplace")
    if cut or len(line) > max_log_bytes:
        text += "...(truncated)"
    log.info("collector stderr name=%s line=%s", name, text)
