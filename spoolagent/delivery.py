"""The sender's bookkeeping: where batches go and how that is going.

Owns the receivers list and which one is current (failover after ``failover_after`` failures in a
row, a reload replacing the list), the sender's state (``SenderState``, including the pause on a
401/403/404/405), its counters, and the summarised logging of a receiver that keeps failing (one
WARNING when failing starts, one line per period, one INFO on recovery).

No I/O but log lines, no httpx: ``sender.py`` does the requests and the retries and tells a
``Delivery`` what each attempt got. Thread-safe: every method takes the one lock, so two threads
failing at once log once and fail over once.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from spoolagent.errors import ReceiverUnavailable

log = logging.getLogger("spoolagent.sender")  # the operator reads these as the sender's


class SenderState(enum.Enum):
    """What the sender is doing; ``state()["state"]`` carries the value."""

    IDLE = "idle"          # nothing in flight
    SENDING = "sending"    # at least one request in flight, none waiting to retry
    BACKOFF = "backoff"    # at least one send waits before retrying a failed attempt
    UNAUTHORIZED = "unauthorized"    # the receiver answered 401/403: fix the token, SIGHUP
    MISCONFIGURED = "misconfigured"  # the receiver answered 404/405: fix the URL, SIGHUP
    STOPPED = "stopped"    # closed


@dataclass
class Call:
    """The retry context of one ``Sender.send()``: which receiver the last attempt went to and
    why it failed."""

    batch_id: str
    attempts: int = 0
    url_index: int = 0
    url: str = ""
    on_failure: Callable[[str], None] | None = None  # told each failed attempt (not rejections)
    generation: int = 0  # of the receivers list the last attempt used (set_urls bumps it)
    last_error: str = ""
    retry_after_s: float | None = None


class Delivery:
    """The receivers, the current one, the state and the counters of one ``Sender``.

    ``closed`` is the sender's: once set, ``start`` refuses and ``state()`` says stopped.
    """

    def __init__(self, urls: tuple[str, ...], *, closed: threading.Event, failover_after: int,
                 log_summary_every_s: float) -> None:
        self._urls = urls
        self._closed = closed
        self._failover_after = max(1, failover_after)
        self._log_summary_every_s = log_summary_every_s
        self._lock = threading.Lock()
        self._current = 0                # index into _urls, shared by all threads
        self._generation = 0             # bumped when a reload replaces _urls
        self._refused: SenderState | None = None  # the last answer was a 401/403/404/405
        self._consecutive_failures = 0   # against _urls[_current]
        self._sending = 0
        self._backing_off = 0
        self._retry_delay_s = 0.0
        self._last_success_s: float | None = None
        self._last_error: str | None = None
        self._last_error_s: float | None = None
        # failure log summary: one WARNING when failing starts, then one line per period
        self._failing_since: float | None = None
        self._failed_attempts = 0
        self._failed_since_summary = 0
        self._last_summary = 0.0
        self._stats = {"batches_sent": 0, "batches_duplicate": 0, "batches_retried": 0,
                       "batches_failed": 0, "lines_sent": 0, "bytes_sent": 0,
                       "requests_total": 0, "reconnects": 0, "failovers": 0}

    # -- where batches go ------------------------------------------------------------------

    def urls(self) -> tuple[str, ...]:
        with self._lock:
            return self._urls

    def current_url(self) -> str:
        with self._lock:
            return self._urls[self._current]

    def set_urls(self, urls: tuple[str, ...]) -> bool:
        """Replace the receivers list (a reload); False if it is the same list. The next attempt
        starts at its first receiver, with the failure count and the pause reset."""
        with self._lock:
            if urls == self._urls:
                return False
            self._urls = urls
            self._generation += 1
            self._current = 0
            self._consecutive_failures = 0
            self._refused = None
            return True

    def moved_on(self, call: Call) -> bool:
        """The sender failed over (or a reload replaced the list) since ``call``'s last attempt."""
        with self._lock:
            return not self._is_current(call)

    # -- what the attempts got --------------------------------------------------------------

    def start(self, call: Call) -> str:
        """An attempt of ``call`` begins: its receiver URL. Raises ReceiverUnavailable once the
        sender is closed. Pair with ``finish``."""
        with self._lock:
            if self._closed.is_set():
                raise ReceiverUnavailable("sender is closed")
            call.url_index, call.generation = self._current, self._generation
            call.url = self._urls[self._current]
            self._sending += 1
            return call.url

    def finish(self) -> None:
        with self._lock:
            self._sending -= 1

    def count(self, name: str) -> None:
        """Add one to the counter ``name`` (``requests_total``, ``reconnects``)."""
        with self._lock:
            self._stats[name] += 1

    @contextmanager
    def backing_off(self, delay_s: float) -> Iterator[None]:
        """A send waits ``delay_s`` before its next attempt (a retried attempt)."""
        with self._lock:
            self._stats["batches_retried"] += 1
            self._backing_off += 1
            self._retry_delay_s = delay_s
        try:
            yield
        finally:
            with self._lock:
                self._backing_off -= 1

    def failed(self, call: Call, message: str, refused: SenderState | None = None) -> None:
        """An attempt of ``call`` got no usable answer (``refused``: a 401/403/404/405): log it
        (summarised), pause on a refusal, fail over after ``failover_after`` in a row."""
        url = call.url
        now = time.monotonic()
        with self._lock:
            self._last_error = f"{url}: {message}"
            self._last_error_s = time.time()
            if self._is_current(call):
                if refused is not None and refused != self._refused:
                    log.error("sender paused state=%s receiver=%s err=%s: every batch would get "
                              "this answer, so batches stay in the spool and are retried with "
                              "backoff; fix [sender] %s and reload (SIGHUP)", refused.value, url,
                              message, "token_file" if refused is SenderState.UNAUTHORIZED
                              else "receivers")
                self._refused = refused
            self._failed_attempts += 1
            if self._failing_since is None:
                self._failing_since = now
                self._last_summary = now
                self._failed_since_summary = 0
                log.warning("send failed batch=%s receiver=%s attempt=%d err=%s",
                            call.batch_id, url, call.attempts, message)
            else:
                self._failed_since_summary += 1
                if now - self._last_summary >= self._log_summary_every_s:
                    log.warning("send still failing receiver=%s failed_attempts=%d "
                                "failing_for_s=%.0f err=%s", url, self._failed_since_summary,
                                now - self._failing_since, message)
                    self._last_summary = now
                    self._failed_since_summary = 0
            if not self._is_current(call):
                return  # a late failure against a receiver we already left
            self._consecutive_failures += 1
            if self._consecutive_failures >= self._failover_after and len(self._urls) > 1:
                self._current = (call.url_index + 1) % len(self._urls)
                self._consecutive_failures = 0
                self._stats["failovers"] += 1
                log.warning("receiver failover from=%s to=%s after_failures=%d err=%s",
                            url, self._urls[self._current], self._failover_after, message)

    def succeeded(self, call: Call, lines: int, size: int, duplicate: bool) -> None:
        """The receiver accepted ``call``'s batch (2xx)."""
        with self._lock:
            self._answered(call)
            self._last_success_s = time.time()
            self._stats["batches_sent"] += 1
            self._stats["batches_duplicate"] += int(duplicate)
            self._stats["lines_sent"] += lines
            self._stats["bytes_sent"] += size

    def rejected(self, call: Call, status: int, message: str) -> None:
        """The receiver rejected ``call``'s batch (a 4xx about the batch: dead-lettered)."""
        with self._lock:
            self._answered(call)
            self._last_error = f"{call.url}: batch={call.batch_id} rejected: {message}"
            self._last_error_s = time.time()
            self._stats["batches_failed"] += 1
        log.error("send rejected batch=%s receiver=%s status=%d err=%s",
                  call.batch_id, call.url, status, message)

    # -- how it is going --------------------------------------------------------------------

    def state(self) -> dict[str, object]:
        """A JSON-ready snapshot for /status. Never blocks on the network."""
        with self._lock:
            if self._closed.is_set():
                state = SenderState.STOPPED
            elif self._refused is not None:
                state = self._refused
            elif self._backing_off:
                state = SenderState.BACKOFF
            elif self._sending:
                state = SenderState.SENDING
            else:
                state = SenderState.IDLE
            return {
                "receiver": self._urls[self._current],
                "state": state.value,
                "last_success_s": self._last_success_s,
                "last_error": self._last_error,
                "last_error_s": self._last_error_s,
                "retry_delay_s": self._retry_delay_s if self._backing_off else 0.0,
                "consecutive_failures": self._consecutive_failures,
            }

    def stats(self) -> dict[str, int]:
        with self._lock:
            return dict(self._stats)

    # -- under the lock ----------------------------------------------------------------------

    def _is_current(self, call: Call) -> bool:
        """The last attempt went to the current receiver."""
        return call.generation == self._generation and call.url_index == self._current

    def _answered(self, call: Call) -> None:
        """The receiver answered (2xx or a rejection): it is up."""
        if self._is_current(call):
            self._consecutive_failures = 0
            self._refused = None
        if self._failing_since is not None:
            log.info("send recovered receiver=%s failed_attempts=%d failing_for_s=%.1f",
                     call.url, self._failed_attempts,
                     time.monotonic() - self._failing_since)
            self._failing_since = None
            self._failed_attempts = 0
