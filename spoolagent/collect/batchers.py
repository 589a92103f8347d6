"""Batchers: one Batcher per running collector, the age flusher, and counters that add up over
a collector's runs.

A collector's batcher is made on its first lines and retired when it exits (its next run starts
from the newest committed token, with a fresh batcher); what a retired batcher counted is kept, so
``/metrics`` counters never step back when a collector restarts. ``put`` (the spool hand-off) and
``wait_spooled`` are plain callables wired by agent.py: this module never imports the spool.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from spoolagent.collect.batcher import Batcher, InvalidFn, PutFn

log = logging.getLogger(__name__)

# counters summed over a collector's runs and over collectors (``lines_pending`` is a level)
COUNTERS = ("lines_spooled", "lines_invalid", "lines_unprotected", "lines_discarded",
            "batches_spooled", "checkpoints", "lines_read")
_PROD_BAD_CHARS = re.compile(r"[^A-Za-z0-9._-]")


class Batchers:
    """The registry. Thread-safe: ``feed`` runs on the collectors' reader threads, ``retire`` on
    the supervisor's, ``flush_loop`` on its own thread, ``counters`` on the status server's."""

    def __init__(self, *, put: PutFn, on_invalid: InvalidFn, settings: Callable[[str], Mapping[str, Any]],
                 checkpointing: Callable[[str], bool], wait_spooled: Callable[[], None],
                 max_lines: int, max_bytes: int, max_wait_s: float, max_line_bytes: int) -> None:
        self._put = put
        self._on_invalid = on_invalid
        self._settings = settings
        self._checkpointing = checkpointing
        self._wait_spooled = wait_spooled
        self._max_lines, self._max_bytes, self._max_wait_s = max_lines, max_bytes, max_wait_s
        self._max_line_bytes = max_line_bytes
        self._live: dict[str, Batcher] = {}
        self._lock = threading.Lock()
        self._retired: dict[str, dict[str, int]] = {}  # per collector: what its ended runs counted
        self._pending = threading.Event()  # a batcher started a new batch: the flusher re-plans

    def get(self, name: str) -> Batcher:
        """The running collector's batcher, made on first use."""
        b = self._live.get(name)
        if b is None:
            with self._lock:
                b = self._live.get(name)
                if b is None:
                    b = self._live[name] = self._make(name)
        return b

    def _make(self, name: str) -> Batcher:
        settings = self._settings(name)
        raw_prod = None
        if settings.get("format", "protocol") == "raw":
            raw_prod = str(settings.get("prod") or _PROD_BAD_CHARS.sub("_", name)[:128])
        return Batcher(name, put=self._put, on_invalid=self._on_invalid, max_lines=self._max_lines,
                       max_bytes=self._max_bytes, max_wait_s=self._max_wait_s,
                       max_held_bytes=4 * self._max_bytes, max_line_bytes=self._max_line_bytes,
                       raw_prod=raw_prod, on_pending=self._pending.set,
                       # a token from an earlier run: hold lines until this run's first
                       checkpointing=self._checkpointing(name))

    def set_limits(self, *, max_lines: int, max_bytes: int, max_wait_s: float) -> None:
        """A reload changed [batch]: running batchers cut by these from now on, new ones are made
        with them, and the flusher re-plans with the new ``max_wait_s``. Thread-safe."""
        with self._lock:
            self._max_lines, self._max_bytes, self._max_wait_s = max_lines, max_bytes, max_wait_s
            for b in self._live.values():
                b.set_limits(max_lines=max_lines, max_bytes=max_bytes, max_wait_s=max_wait_s)
        self._pending.set()

    def feed(self, name: str, lines: list[bytes]) -> None:
        """The supervisor's ``on_lines``. Blocks while the spool is full."""
        self.get(name).feed(lines)

    def retire(self, name: str) -> None:
        """The collector exited: put its ready lines, wait until they are committed (its next run
        starts from the newest token), and keep what it counted. Blocks."""
        b = self._live.get(name)
        if b is None:
            return
        b.close()
        self._wait_spooled()
        with self._lock:  # one step for counters(): they never go backwards
            self._live.pop(name, None)
            mine = self._retired.setdefault(name, {})
            for k, v in b.stats().items():
                if k in COUNTERS:
                    mine[k] = mine.get(k, 0) + v

    def close_all(self) -> None:
        """The agent stops: every batcher puts what is ready (held lines are read again)."""
        with self._lock:
            live = list(self._live.values())
        for b in live:
            b.close()

    def counters(self) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        """(totals over every collector and run, per collector: every run plus the live level
        ``lines_pending``). Thread-safe."""
        totals = dict.fromkeys(COUNTERS, 0)
        with self._lock:
            per = {n: dict(v) for n, v in self._retired.items()}
            for name, b in self._live.items():
                mine = per.setdefault(name, {})
                for k, v in b.stats().items():
                    mine[k] = mine.get(k, 0) + v if k in COUNTERS else v
        for mine in per.values():
            for k in COUNTERS:
                totals[k] += mine.get(k, 0)
        return totals, per

    def wake(self) -> None:
        """Make the flusher look again now (the agent stops)."""
        self._pending.set()

    def flush_loop(self, stopping: threading.Event) -> None:
        """Put batches whose oldest line has waited ``max_wait_s``, until ``stopping``. Sleeps until
        the next one is due or a batcher starts a new batch (no polling while idle). Blocks."""
        while not stopping.is_set():
            self._pending.clear()
            now, next_due = time.monotonic(), None
            for b in list(self._live.values()):
                due = b.due_at()
                if due is None:
                    continue
                if due <= now:
                    try:
                        b.flush_due(now)
                    except Exception:
                        log.exception("flush failed collector=%s", b.collector)
                else:
                    next_due = due if next_due is None else min(next_due, due)
            # nothing pending: no timeout (a new batch, new limits or the stop set _pending)
            self._pending.wait(None if next_due is None else max(0.0, next_due - time.monotonic()))
