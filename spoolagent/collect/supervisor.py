"""The collector supervisor, tcollector-compatible: discovery, scheduling, reload and stop.

Owns ``collectors_dir/<interval>/<program>``: which collectors exist (:func:`discover`), their
named states (:class:`CollectorState`), when each runs (interval 0: long-running, respawned with
exponential backoff; interval N: started every N s and terminated when it overruns), picking up
new, changed and removed files and new settings, and stopping everything. How a single process is
spawned and its pipes read lives in ``spoolagent.collect.process`` and ``spoolagent.collect.pipes``;
the agent wires the supervisor to the batchers with plain callables.

Threads: :meth:`Supervisor.start` starts one thread, ``collectors-supervisor``. It is the only
thread that spawns, signals, reaps and changes a collector's state, and it lives until
:meth:`Supervisor.stop` has seen every collector die and every reader finish. That matters: the
children's parent-death signal is bound to the thread that forked them. Each run has a stdout
reader thread (hands lines to ``on_lines``, then calls ``on_exit``) and a stderr reader thread.

Conventions (tcollector's; discovery rules in ``spoolagent.collect.discovery``): a ``.py`` file runs
under the agent's interpreter, anything else is exec'd directly (a script without a shebang fails
with ENOEXEC: FAILED until the file changes); exit code 13 means "do not restart me" (EXITED until
the file or its settings change). Processes a collector's main process leaves behind in its group
when it exits get SIGTERM, then SIGKILL after the grace period.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from spoolagent import protocol
from spoolagent.collect.discovery import check_dir, discover, is_ignored_name, scan
from spoolagent.collect.pipes import Counters, StderrLimiter
from spoolagent.collect.process import CollectorNotExecutable, Run, spawn
from spoolagent.collect.reconcile import apply_scan, copy_settings
from spoolagent.collect.states import (
    After,
    Backoff,
    Collector,
    CollectorInfo,
    CollectorState,
    change_state,
    fail_all,
    info,
)
from spoolagent.errors import CollectorFailed

__all__ = ["CollectorInfo", "CollectorState", "Supervisor", "check_dir", "discover",
           "is_ignored_name"]

log = logging.getLogger(__name__)

_POLL_S = 0.25  # exit detection without a pidfd, for a process that exits while something else holds its stdout


class Supervisor:
    """Runs the collectors of ``collectors_dir`` and hands their stdout lines to ``on_lines``.

    Callbacks run on the collector's stdout reader thread, in order: ``on_lines(name, run, n)``
    (``n`` complete lines joined in ``run``, each ending in a newline; may block: reading stops
    and the collector is slowed through its pipe), ``on_overlong(name, size, head)`` and, once
    per run after its last line and its exit, ``on_exit(name, returncode)`` (-N: killed by
    signal N).
    ``checkpoint_for(name)`` runs on the supervisor thread before every spawn, after the previous
    run's on_exit returned. While ``stopping`` is set nothing new is spawned.
    Raises CollectorFailed if ``collectors_dir`` is not a readable directory.
    """

    def __init__(self, collectors_dir: Path, *, settings: Mapping[str, Mapping[str, Any]],
                 on_lines: Callable[[str, bytes, int], None],
                 on_overlong: Callable[[str, int, bytes], None],
                 on_exit: Callable[[str, int], None],
                 checkpoint_for: Callable[[str], str],
                 stopping: threading.Event,
                 max_line_bytes: int = 1 << 20, stop_grace_s: float = 5.0,
                 rescan_s: float = 5.0, backoff_initial_s: float = 1.0,
                 backoff_max_s: float = 60.0, backoff_reset_s: float = 60.0,
                 overlong_head_bytes: int = 1024, stderr_lines_per_s: float = 10.0,
                 stderr_burst: int = 100) -> None:
        check_dir(collectors_dir)
        self.collectors_dir = collectors_dir.absolute()
        self._settings = copy_settings(settings)
        self._on_lines = on_lines
        self._on_overlong = on_overlong
        self._on_exit = on_exit
        self._checkpoint_for = checkpoint_for
        self._stopping = stopping
        self.max_line_bytes = max_line_bytes
        self.stop_grace_s = stop_grace_s
        self.rescan_s = rescan_s
        self._backoff = Backoff(backoff_initial_s, backoff_max_s, backoff_reset_s)
        self.overlong_head_bytes = overlong_head_bytes
        self.stderr_lines_per_s = stderr_lines_per_s
        self.stderr_burst = stderr_burst
        self._counters = Counters("restarts_total", "spawn_failures_total",
                                  "overlong_lines_total", "lines_read_total", "bytes_read_total",
                                  "overruns_total", "stderr_lines_suppressed_total",
                                  "callback_errors_total")
        self._lock = threading.Lock()  # guards _collectors, _settings, _reload_pending
        self._collectors: dict[str, Collector] = {}
        self._reload_pending = True
        self._wake = threading.Event()
        self._stop_requested = threading.Event()
        self._hurry = False  # a plain flag: hurry() runs in signal handlers
        self._stop_deadline = 0.0  # monotonic: SIGKILL for whatever still runs
        self._thread: threading.Thread | None = None
        self._dir_error = ""
        self._dups: list[Path] = []

    # -- public ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the supervisor thread; non-blocking. A second call, or one after stop(), does
        nothing."""
        if self._thread is not None or self._stop_requested.is_set():
            return
        self._thread = threading.Thread(target=self._main, name="collectors-supervisor",
                                        daemon=True)
        self._thread.start()

    def reload(self, settings: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        """Rescan ``collectors_dir`` and, if given, take new settings (a collector whose settings
        changed is restarted; ``enabled = false`` stops it). Non-blocking, thread-safe: the
        supervisor thread applies it moments later. Not for use inside a signal handler."""
        with self._lock:
            if settings is not None:
                self._settings = copy_settings(settings)
            self._reload_pending = True
        self._wake.set()

    def stop(self, grace_s: float | None = None, *, fast: bool = False,
             drain_timeout_s: float | None = None) -> None:
        """SIGTERM every collector's process group, SIGKILL what is left after ``grace_s``
        (default ``stop_grace_s``), then wait until the readers handed over everything the
        collectors printed and ``on_exit`` ran for each. Blocks; thread-safe; idempotent.
        A second call (say, on a second SIGTERM), or ``fast=True``, skips the grace period.
        With ``drain_timeout_s`` it returns after that long even if a blocked ``on_lines`` holds
        a reader up (logged as an error: those lines are not handed over)."""
        if fast or self._stop_requested.is_set():
            self._hurry = True
        if not self._stop_requested.is_set():
            grace_s = self.stop_grace_s if grace_s is None else grace_s
            self._stop_deadline = time.monotonic() + grace_s
            self._stop_requested.set()
        self._wake.set()
        thread = self._thread
        if thread is None:
            with self._lock:
                for c in self._collectors.values():
                    change_state(c, CollectorState.STOPPED)
            return
        thread.join(drain_timeout_s)
        if thread.is_alive():
            log.error("collectors still handing over lines after drain_timeout_s=%s; giving up",
                      drain_timeout_s)

    def hurry(self) -> None:
        """Skip what is left of the grace period of a stop in progress (or of the next stop).
        Safe in a signal handler: it only sets a flag, which the supervisor thread acts on within
        a quarter of a second; it never blocks."""
        self._hurry = True

    def collectors(self) -> list[CollectorInfo]:
        """A snapshot of every known collector, by name. Thread-safe, non-blocking."""
        with self._lock:
            return [info(c) for _, c in sorted(self._collectors.items())]

    def stats(self) -> dict[str, int]:
        """Counters since start: restarts_total, spawn_failures_total, overlong_lines_total,
        lines_read_total, bytes_read_total, overruns_total, stderr_lines_suppressed_total,
        callback_errors_total. Thread-safe."""
        return self._counters.snapshot()

    # -- supervisor thread ----------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self._loop()
        except Exception:
            log.exception("collector supervisor failed; killing all collectors")
            with self._lock:
                for c in self._collectors.values():
                    if c.run is not None:
                        c.run.abandon()
                fail_all(list(self._collectors.values()))

    def _loop(self) -> None:
        next_scan = 0.0
        while True:
            self._wake.clear()  # before looking: a wake-up from now on ends the wait below
            now = time.monotonic()
            stopping = self._stop_requested.is_set()
            with self._lock:
                if not stopping and (self._reload_pending or now >= next_scan):
                    self._reload_pending = False
                    next_scan = now + self.rescan_s
                    self._rescan(now)
                self._reap(now)
                self._finish(now)
                if stopping:
                    if self._stop_all(now):
                        return
                    due = []
                else:
                    self._check_overruns(now)
                    due = [] if self._stopping.is_set() else self._due(now)
                self._enforce_kills(now)
            for c in due:
                self._start_run(c)
            self._wake.wait(self._timeout(time.monotonic(), next_scan))

    def _rescan(self, now: float) -> None:
        try:
            found, dups = scan(self.collectors_dir)
        except CollectorFailed as exc:
            if str(exc) != self._dir_error:
                log.warning("collector rescan failed err=%s (keeping what runs)", exc)
                self._dir_error = str(exc)
            return
        self._dir_error = ""
        if dups != self._dups:
            for p in dups:
                log.warning("collector skipped: duplicate name path=%s", p)
            self._dups = dups
        apply_scan(self._collectors, found, self._settings, now, backoff=self._backoff,
                   terminate=self._terminate)

    def _terminate(self, c: Collector, now: float, grace_s: float | None = None) -> bool:
        grace_s = self.stop_grace_s if grace_s is None else grace_s
        if c.run is not None and c.run.terminate(now, grace_s):
            change_state(c, CollectorState.STOPPING)
            return True
        return False

    def _reap(self, now: float) -> None:
        for c in self._collectors.values():
            if c.run is not None and c.run.reap(now, self.stop_grace_s):
                c.last_exit = c.run.returncode

    def _enforce_kills(self, now: float) -> None:
        hurry = self._hurry and self._stop_requested.is_set()
        for c in self._collectors.values():
            if c.run is not None:
                c.run.kill_if_due(now, hurry)

    def _finish(self, now: float) -> None:
        for name, c in list(self._collectors.items()):
            run = c.run
            if run is None or not run.finished.is_set():
                continue
            c.run = None
            rc = run.returncode if run.returncode is not None else -1
            after, c.after_run = c.after_run, After.NOTHING
            if after is After.REMOVE:
                del self._collectors[name]
            elif self._stop_requested.is_set():
                change_state(c, CollectorState.STOPPED)
            elif after is After.DISABLE or not c.enabled:
                change_state(c, CollectorState.DISABLED)
            elif after is After.RESTART:
                change_state(c, CollectorState.WAITING, next_start=now)
                self._backoff.reset(c)
            elif rc == protocol.EXIT_DO_NOT_RESTART:
                change_state(c, CollectorState.EXITED)
                log.info("collector exited name=%s rc=13 (not restarted)", name)
            elif c.interval_s == 0:
                up_s = (run.exited_mono or now) - run.started_mono
                delay_s = self._backoff.next_delay(c, up_s)
                change_state(c, CollectorState.BACKOFF, next_start=now + delay_s)
                c.respawn = True
                (log.warning if rc != 0 else log.info)(
                    "collector exited name=%s rc=%d up_s=%.1f respawn_in_s=%.1f",
                    name, rc, up_s, delay_s)
            else:
                change_state(c, CollectorState.WAITING)
                if rc != 0 and not run.term_sent:
                    log.warning("collector failed name=%s rc=%d", name, rc)

    def _check_overruns(self, now: float) -> None:
        for c in self._collectors.values():
            run = c.run
            if (c.interval_s == 0 or run is None or run.exited.is_set() or run.term_sent
                    or now < c.next_start):
                continue
            log.warning("collector overran its interval name=%s interval_s=%d pid=%d; SIGTERM",
                        c.name, c.interval_s, run.pid)
            c.overruns += 1
            self._counters.add("overruns_total")
            self._terminate(c, now)

    def _due(self, now: float) -> list[Collector]:
        due = [c for c in self._collectors.values()
               if c.run is None and c.enabled and c.next_start <= now
               and c.state in (CollectorState.WAITING, CollectorState.BACKOFF)]
        for c in due:
            change_state(c, CollectorState.STARTING)
        return due

    def _stop_all(self, now: float) -> bool:
        """Terminate every run; True once none is left."""
        left = False
        for c in self._collectors.values():
            if c.run is None:
                if c.state not in (CollectorState.EXITED, CollectorState.FAILED,
                                   CollectorState.DISABLED):
                    change_state(c, CollectorState.STOPPED)
                continue
            left = True
            change_state(c, CollectorState.STOPPING)
            if not self._terminate(c, now, max(self._stop_deadline - now, 0.0)):
                # already terminating (an overrun, a change): the stop deadline still applies
                if c.run.kill_at is not None and c.run.kill_at > self._stop_deadline:
                    c.run.kill_at = self._stop_deadline
        return not left

    def _timeout(self, now: float, next_scan: float) -> float:
        t = next_scan - now
        spawning = not self._stopping.is_set() and not self._stop_requested.is_set()
        with self._lock:
            for c in self._collectors.values():
                run = c.run
                if run is None:
                    if spawning and c.state in (CollectorState.WAITING, CollectorState.BACKOFF):
                        t = min(t, c.next_start - now)
                    continue
                if not run.exited.is_set():
                    if not run.exit_watched:
                        # stdout closes a moment before the exit can be reaped: poll fast then
                        recent_eof = run.eof.is_set() and now - run.eof_mono < 1.0
                        t = min(t, 0.005 if recent_eof else _POLL_S)
                    if c.interval_s and not run.term_sent:
                        t = min(t, c.next_start - now)
                if run.kill_at is not None:
                    t = min(t, run.kill_at - now)
        return max(t, 0.0)

    def _start_run(self, c: Collector) -> None:
        """Spawn one run of ``c``; called on the supervisor thread without the lock held (the
        callbacks and the spawn may take a while), the only thread that changes ``c``."""
        if self._stop_requested.is_set():
            with self._lock:
                change_state(c, CollectorState.STOPPED)
            return
        argv = [sys.executable, str(c.path)] if c.path.suffix == ".py" else [str(c.path)]
        try:
            # a checkpoint_for that fails must not take the supervisor down: retry later
            token = self._checkpoint_for(c.name)
            env = dict(os.environ)
            env[protocol.ENV_CONFIG] = c.config_json
            env[protocol.ENV_CHECKPOINT] = token or ""
            proc = spawn(argv, env)
        except Exception as exc:
            with self._lock:
                self._spawn_failed(c, exc, time.monotonic())
            return
        name = c.name
        run = Run(name, proc, on_lines=lambda lines, n: self._on_lines(name, lines, n),
                  on_overlong=lambda size, head: self._on_overlong(name, size, head),
                  on_exit=lambda rc: self._on_exit(name, rc), wake=self._wake.set,
                  max_line_bytes=self.max_line_bytes, head_bytes=self.overlong_head_bytes,
                  counters=self._counters,
                  stderr_limiter=StderrLimiter(self.stderr_lines_per_s, self.stderr_burst))
        with self._lock:
            c.run = run
            change_state(c, CollectorState.RUNNING)
            c.runs += 1
            c.last_start_s = time.time()
            if c.interval_s:
                # keep to the schedule (no drift by the spawn time) unless far behind it
                due_at = c.next_start + c.interval_s
                c.next_start = due_at if due_at > run.started_mono else (
                    run.started_mono + c.interval_s)
            if c.respawn:
                c.restarts += 1
                self._counters.add("restarts_total")
                c.respawn = False
        (log.debug if c.interval_s and c.runs > 1 else log.info)(
            "collector started name=%s pid=%d interval_s=%d run=%d", c.name, run.pid,
            c.interval_s, c.runs)

    def _spawn_failed(self, c: Collector, exc: Exception, now: float) -> None:
        self._counters.add("spawn_failures_total")
        if isinstance(exc, CollectorNotExecutable):
            change_state(c, CollectorState.FAILED)
            log.error("collector cannot run name=%s err=%s (until the file changes)", c.name, exc)
            return
        if c.interval_s:
            change_state(c, CollectorState.WAITING, next_start=now + c.interval_s)
        else:
            change_state(c, CollectorState.BACKOFF, next_start=now + self._backoff.next_delay(c))
        if isinstance(exc, CollectorFailed):
            log.warning("collector spawn failed name=%s err=%s retry_in_s=%.1f", c.name, exc,
                        c.next_start - now)
        else:
            log.error("collector spawn failed name=%s retry_in_s=%.1f", c.name,
                      c.next_start - now, exc_info=exc)
