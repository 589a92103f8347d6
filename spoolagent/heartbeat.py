"""Who is shipping: the agent's identity headers and the idle heartbeat (docs/protocol.md).

``Identity.headers()`` gives the headers every request carries: ``Spoolagent-Id``,
``Spoolagent-Version``, ``Spoolagent-Host`` and ``Spoolagent-Spool`` (a compact summary of the
spool: lines and bytes waiting, the oldest batch's age, dead letters). The summary is read from the
spool at most once a second, however many requests go out.

``Heartbeat.run()`` (a thread) sends ``PUT /v1/heartbeat`` when no request went to the receiver for
``interval_s``: a deadline wait on the ``stopping`` event, recomputed from the last request, so an
agent that ships wakes this thread once per interval and an idle one sends one heartbeat per
interval. Imports only ``spoolagent.errors``; the agent wires the spool and the sender in as
callables.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping

from spoolagent.errors import ReceiverUnavailable, SpoolAgentError

log = logging.getLogger(__name__)

SUMMARY_MAX_AGE_S = 1.0


def spool_summary(stats: Mapping[str, object]) -> str:
    """``lines=N, bytes=N, oldest-s=S, dead=N`` from ``Spool.stats()`` (an RFC 8941 dictionary of
    numbers). lines: ready and in flight; dead: failed (dead-letter) batches; oldest-s: 0 when
    nothing waits."""
    def num(key: str) -> int:
        value = stats.get(key)
        return int(value) if isinstance(value, int | float) else 0

    oldest = stats.get("oldest_age_s")
    oldest_s = float(oldest) if isinstance(oldest, int | float) else 0.0
    return (f"lines={num('ready_lines') + num('inflight_lines')}, bytes={num('bytes')}, "
            f"oldest-s={oldest_s:.3f}, dead={num('failed_batches')}")


class Identity:
    """The identity headers, with the spool summary cached for ``SUMMARY_MAX_AGE_S``. Thread-safe;
    ``headers()`` blocks at most on one spool stats query a second."""

    def __init__(self, agent_id: str, version: str, spool_stats: Callable[[], Mapping[str, object]]) -> None:
        self._static = {"Spoolagent-Id": agent_id, "Spoolagent-Version": version,
                        "Spoolagent-Host": socket.gethostname()}
        self._spool_stats = spool_stats
        self._lock = threading.Lock()
        self._summary: str | None = None
        self._read_at = 0.0

    def headers(self) -> dict[str, str]:
        now = time.monotonic()
        with self._lock:
            if self._summary is None or now - self._read_at >= SUMMARY_MAX_AGE_S:
                self._read_at = now
                try:
                    self._summary = spool_summary(self._spool_stats())
                except SpoolAgentError as exc:  # closing, or a failing disk: keep the last one
                    log.debug("spool summary unavailable err=%s", exc)
            summary = self._summary
        out = dict(self._static)
        if summary is not None:
            out["Spoolagent-Spool"] = summary
        return out


class Heartbeat:
    """Sends a heartbeat when nothing went to the receiver for ``interval_s``. ``run`` blocks
    until ``stopping`` is set; call it on a thread of its own."""

    def __init__(self, *, interval_s: float, beat: Callable[[], int],
                 last_request_s: Callable[[], float | None], stopping: threading.Event) -> None:
        self._interval_s = interval_s
        self._beat = beat
        self._last_request_s = last_request_s
        self._stopping = stopping
        self.sent = 0
        self.failed = 0

    def run(self) -> None:
        started = time.monotonic()
        warned_status: int | None = None
        while not self._stopping.is_set():
            last = self._last_request_s()
            due = (started if last is None else last) + self._interval_s
            wait_s = due - time.monotonic()
            if wait_s > 0:
                # a deadline, not a poll: the next wake-up is when a heartbeat could be due
                self._stopping.wait(wait_s)
                continue
            try:
                status = self._beat()
            except ReceiverUnavailable as exc:
                self.failed += 1
                # the batches' own retries report a receiver that is down; one line here is enough
                log.debug("heartbeat failed err=%s", exc)
                started = time.monotonic()  # never a busy loop, whatever last_request_s says
                continue
            except Exception:  # the top of a thread: keep beating
                log.exception("heartbeat failed")
                self.failed += 1
                started = time.monotonic()
                continue
            started = time.monotonic()
            if 200 <= status < 300:
                self.sent += 1
                warned_status = None
            else:
                self.failed += 1
                if status != warned_status:
                    warned_status = status
                    log.warning("heartbeat refused status=%d (a receiver without heartbeats answers "
                                "404 or 405; batches are not affected)", status)
