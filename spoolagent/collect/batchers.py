"""Batchers: one Batcher per running collector, the age flusher, and counters that add up over
a collector's runs.

A collector's batcher is made on its first lines and retired when it exits (its next run starts
from the newest committed token, with a fresh batcher); what a retired batcher counted is kept, so
``/metrics`` counters never step back when a collector restarts. ``put`` (the spool hand-off) and
``wait_spooled`` are plain callables wired by agent.py: this module never imports the spool.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from spoolagent.collect.batcher import Batcher, InvalidFn, PutFn

log = logging.getLogger(__name__)

# the flusher puts a batch up to this much (at most 5 % of max_wait) before it is due, so that one
# wake-up per batch is enough when a collector's next batch starts as the last one is put
EARLY_S = 0.01

# counters summed over a collector's runs and over collectors (``lines_pending`` is a level)
COUNTERS = ("lines_spooled", "lines_invalid", "lines_unprotected", "lines_discarded",
            "batches_spooled", "checkpoints", "lines_read")
_PROD_BAD_CHARS = re.compile(r"[^A-Za-z0-9._-]")


class Batchers:
    """The registry. Thread-safe: ``feed`` runs on the collectors' reader threads, ``retire`` on
    the supervisor's, ``flush_loop`` on its own thread, ``counters`` on the status server's."""

    def __init__(self, *, put: PutFn, on_invalid: InvalidFn, settings: Callable[[str], Mapping[str, Any]],
                 checkpointing: Callable[[str], bool], wait_spooled: Callable[[], None],
                 max_lines: int, max_bytes: int, max_wait_s: float, max_line_bytes: int,
                 put_due: PutFn | None = None) -> None:
        """``put_due``: the flusher's ``put`` for batches cut by age (default ``put``): the spool
        writer commits them on the flusher's thread when it has nothing else to do."""
        self._put = put
        self._put_due = put_due or put
        self._on_invalid = on_invalid
        self._settings = settings
        self._checkpointing = checkpointing
        self._wait_spooled = wait_spooled
        self._max_lines, self._max_bytes, self._max_wait_s = max_lines, max_bytes, max_wait_s
        self._max_line_bytes = max_line_bytes
        self._live: dict[str, Batcher] = {}
        self._lock = threading.Lock()
        self._retired: dict[str, dict[str, int]] = {}  # per collector: what its ended runs counted
        self._pending = threading.Event()  # a batch is due before the flusher's wake-up: it re-plans
        # when the flusher wakes next (monotonic; inf: not until told), None while it scans: a
        # batcher wakes it only for a batch due before that (one wake-up per batch, not two); at
        # that wake-up it puts every batch due within EARLY_S, so a batch due in that window is
        # served by it
        self._plan_lock = threading.Lock()
        self._planned: float | None = None
        self._cadence = Cadence()

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
                       raw_prod=raw_prod, on_pending=self._due,
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

    def feed(self, name: str, run: bytes, lines: int) -> None:
        """The supervisor's ``on_lines``: ``lines`` lines joined in ``run`` (``Batcher.feed``).
        Blocks while the spool is full."""
        self.get(name).feed(run, lines)

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

    def _due(self, due: float) -> None:
        """A batcher's new batch must be put by ``due``: wake the flusher unless it wakes by then."""
        with self._plan_lock:
            wake = self._planned is None or due < self._planned
        if wake:
            self._pending.set()

    def flush_loop(self, stopping: threading.Event) -> None:
        """Put batches whose oldest line has waited ``max_wait_s``, until ``stopping``. Sleeps until
        the next one is due or a batcher starts a batch due earlier (no polling while idle). Blocks.

        After it put a batch, it sleeps until the next batch of a steady collector would be due
        (``Cadence``) rather than until a batcher tells it of one: that batch is then put with one
        wake-up of this thread instead of two (one when it starts, one when it is due). A batch is
        put up to ``EARLY_S`` (at most 5 % of ``max_wait_s``) before it is due, never after; with
        nothing due it sleeps without timeout.
        """
        while not stopping.is_set():
            with self._plan_lock:
                self._planned = None  # scanning: a batch that starts meanwhile wakes us again
            self._pending.clear()
            now, next_due, flushed = time.monotonic(), None, False
            early = min(EARLY_S, self._max_wait_s / 20)
            for b in list(self._live.values()):
                due = b.due_at()
                if due is None:
                    continue
                if due <= now + early:
                    try:
                        flushed = b.flush_due(now + early, put=self._put_due) or flushed
                    except Exception:
                        log.exception("flush failed collector=%s", b.collector)
                else:
                    next_due = due if next_due is None else min(next_due, due)
            next_due = self._cadence.plan(now, next_due, flushed, self._max_wait_s, early)
            wake_s = math.inf if next_due is None else next_due - early
            with self._plan_lock:
                # it wakes at wake_s and puts every batch due by wake_s + early: only a batch
                # due before wake_s must wake it
                self._planned = wake_s
            # nothing pending: no timeout (a new batch, new limits or the stop set _pending)
            self._pending.wait(None if next_due is None else max(0.0, wake_s - time.monotonic()))


class Cadence:
    """When the flusher plans to wake after a put, for the next batch of a steady collector.

    That batch starts when the collector's next output arrives, a little after the put (the tail
    prints every 50 ms: ~10 ms after it at 1,000 lines/s), and is due ``max_wait_s`` later. Planning
    for ``put + max_wait_s`` woke the flusher twice per batch (issue 17: at the guess, where the
    batch was not due yet, then at its due time). The guess adds the lag last seen between a put
    and the next batch's start, centred in the ``early`` window the wake-up serves. A wrong guess
    costs one wake-up, never a late put: a batch due before the planned wake-up wakes the flusher.
    Used by the flusher thread only.
    """

    def __init__(self) -> None:
        self.lag_s = 0.0  # last seen: from a put to the start of the next batch
        self._put_s: float | None = None  # the scan of the last put, until the next batch is seen

    def plan(self, now: float, next_due: float | None, flushed: bool, max_wait_s: float,
             early: float) -> float | None:
        """The due time to wake for (None: until told), given a scan at ``now`` that found
        ``next_due`` (the earliest batch not put) and put a batch or not (``flushed``)."""
        if flushed:
            self._put_s = now
            if next_due is None:
                return now + max_wait_s + self.lag_s + early / 2
            return next_due
        if next_due is not None and self._put_s is not None:
            self.lag_s = min(max(0.0, next_due - max_wait_s - self._put_s), max_wait_s / 2)
            self._put_s = None
        return next_due
