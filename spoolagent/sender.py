"""The sender: ships spooled batches to the receiver over HTTP and says how that is going.

Owns the HTTP client (one shared httpx.Client: keep-alive pool, TLS, timeouts), the retry policy
(tenacity: exponential backoff with jitter, Retry-After, stop and wake on shutdown), failover
across the configured receivers, the sender's state and counters, and the summarised logging of a
receiver that keeps failing.

The only module that imports httpx and tenacity; what an answer or an address means (status
classes, Retry-After, the counts of a 2xx, URL checks) is in ``spoolagent.answers``. ``agent.py``
wires it to the spool with plain callables.
"""

from __future__ import annotations

import enum
import logging
import random
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    sleep_using_event,
    stop_any,
    stop_when_event_set,
    wait_exponential_jitter,
)

from spoolagent import answers
from spoolagent.errors import BatchRejected, ConfigError, ReceiverRefused, ReceiverUnavailable

log = logging.getLogger(__name__)

_BATCH_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_ANSWER_BYTES = 64 * 1024
# A pooled keep-alive connection the server closed while we picked it shows up as one of these.
# PUT with a batch id is idempotent (the receiver dedups), so one immediate resend is safe.
_STALE_CONNECTION_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class SenderState(enum.Enum):
    """What the sender is doing; ``state()["state"]`` carries the value."""

    IDLE = "idle"          # nothing in flight
    SENDING = "sending"    # at least one request in flight, none waiting to retry
    BACKOFF = "backoff"    # at least one send waits before retrying a failed attempt
    UNAUTHORIZED = "unauthorized"    # the receiver answered 401/403: fix the token, SIGHUP
    MISCONFIGURED = "misconfigured"  # the receiver answered 404/405: fix the URL, SIGHUP
    STOPPED = "stopped"    # closed


@dataclass(frozen=True)
class SendResult:
    """The receiver's answer to a batch it accepted (2xx)."""

    status: int
    stored: int
    rejected: int
    duplicate: bool
    receiver: str


@dataclass
class _Call:
    """The retry context of one ``send()``: which receiver the last attempt went to and why it
    failed."""

    batch_id: str
    attempts: int = 0
    url_index: int = 0
    url: str = ""
    on_failure: Callable[[str], None] | None = None  # told each failed attempt (not rejections)
    generation: int = 0  # of the receivers list the last attempt used (set_receivers bumps it)
    last_error: str = ""
    retry_after_s: float | None = None


def _read_capped(resp: httpx.Response) -> bytes:
    chunks: list[bytes] = []
    size = 0
    for chunk in resp.iter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= _MAX_ANSWER_BYTES:
            break  # leaving the stream unfinished makes httpx close, not pool, the connection
    return b"".join(chunks)[:_MAX_ANSWER_BYTES]


class Sender:
    """Sends batches with ``PUT {url}/v1/batches/{id}`` and retries until success or shutdown.

    Thread-safe: ``send`` is called from ``in_flight`` threads at once; they share one keep-alive
    connection pool, the failover position, the counters and the failure log summary.
    Construction raises ConfigError for a URL that is not http(s) or a CA file that cannot be
    loaded.
    """

    def __init__(self, *, urls: Sequence[str], stopping: threading.Event,
                 token: str | None = None, timeout_s: float = 10.0, in_flight: int = 2,
                 ca_file: str | None = None, max_backoff_s: float = 30.0,
                 failover_after: int = 3, initial_backoff_s: float = 1.0,
                 log_summary_every_s: float = 30.0, balance: str = "ordered",
                 identity: Callable[[], Mapping[str, str]] | None = None) -> None:
        # "spread": this agent prefers one receiver at random (kept across reloads), so a fleet
        # spreads over several receivers without a load balancer; failover goes on in list order
        self._spread = random.randrange(1 << 30) if balance == "spread" else 0
        self._urls = self._balanced(answers.check_urls(urls))
        self._stopping = stopping
        self._max_backoff_s = max_backoff_s
        self._initial_backoff_s = initial_backoff_s
        self._failover_after = max(1, failover_after)
        self._log_summary_every_s = log_summary_every_s
        self._timeout_s, self._pool = timeout_s, max(1, in_flight)
        self._client = self._make_client(ca_file)
        # the agent's id, version and spool summary (docs/protocol.md), read once per request
        self._identity = identity or dict
        self._last_request_s: float | None = None  # monotonic: when a request last started
        self._sleep_on_event = sleep_using_event(stopping)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._current = 0                # index into _urls, shared by all threads
        self._generation = 0             # bumped when a reload replaces _urls
        self._auth: dict[str, str] = {}  # per request, so set_token() takes effect at once
        self.set_token(token)
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

    # -- public surface --------------------------------------------------------------------

    def send(self, batch_id: str, body: bytes, encoding: str, lines: int = 0, *,
             on_failure: Callable[[str], None] | None = None) -> SendResult:
        """Send one batch; block until the receiver accepted it or shutdown gave up on it.

        ``body`` is sent as given (already compressed with ``encoding``: gzip, zstd or
        identity). Thread-safe. Raises BatchRejected (a 4xx about this batch -- 400, 413, 415,
        422... -- dead-letter it, never retried), ReceiverUnavailable (``stopping`` was set
        before the batch got through, or the sender is closed: nack it; a 401/403/404/405 is
        retried with backoff until then, never rejected), ValueError for a malformed batch id (a caller bug).
        Once ``stopping`` is set no new attempt starts; the one in flight finishes (bounded by
        ``timeout_s`` per network operation).
        """
        if not _BATCH_ID.fullmatch(batch_id):
            raise ValueError(f"batch id {batch_id!r} does not match {_BATCH_ID.pattern}")
        headers = {}
        if encoding and encoding != "identity":
            headers["Content-Encoding"] = encoding
        call = _Call(batch_id, on_failure=on_failure)
        retrying = Retrying(
            retry=retry_if_exception_type(ReceiverUnavailable),
            wait=self._wait_for(call),
            # shutdown stops retrying; so does close() (the agent is past the in-flight send)
            stop=stop_any(stop_when_event_set(self._stopping), stop_when_event_set(self._closed)),
            sleep=self._backoff,
            reraise=True,
        )
        result: SendResult = retrying(self._attempt, call, body, headers, lines)
        return result

    def set_token(self, token: str | None) -> None:
        """Send ``token`` from the next attempt on (SIGHUP re-reads the token file). Thread-safe;
        the token is never logged."""
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        with self._lock:
            self._auth = auth
        if token:
            answers.warn_cleartext(self._urls)

    def _make_client(self, ca_file: str | None) -> httpx.Client:
        try:
            # TLS: the CA file when given, else the system's CAs (not certifi's bundle)
            tls = ssl.create_default_context(cafile=ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"sender.ca_file: cannot load {ca_file!r}: {exc}") from exc
        return httpx.Client(
            headers={"User-Agent": "spoolagent-sender", "Content-Type": "text/plain"},
            timeout=httpx.Timeout(self._timeout_s),
            # room for a second connection per sender thread while failing over
            limits=httpx.Limits(max_connections=2 * self._pool, max_keepalive_connections=self._pool),
            verify=tls,
            # only config.py reads the environment: no proxies or CA paths from env vars
            trust_env=False,
            follow_redirects=False,
        )

    def set_ca_file(self, ca_file: str | None) -> None:
        """New TLS trust (a reload changed ``[sender] ca_file``): a new connection pool from the
        next request on. Raises ConfigError (nothing changed) if the file cannot be loaded. The
        old pool is closed once the requests on it have had ``timeout_s`` to finish."""
        new = self._make_client(ca_file)
        with self._lock:
            old, self._client = self._client, new
        closer = threading.Timer(2 * self._timeout_s, old.close)
        closer.daemon = True
        closer.start()

    def set_receivers(self, urls: Sequence[str], balance: str | None = None) -> None:
        """Send to ``urls`` from the next attempt on (a reload changed ``[sender] receivers`` or
        ``balance``).

        Thread-safe. Raises ConfigError (nothing changed) for a URL that is not http(s). An
        attempt already on the wire finishes against the old URL; its answer still counts.
        """
        if balance is not None and (balance == "spread") != bool(self._spread):
            self._spread = random.randrange(1, 1 << 30) if balance == "spread" else 0
        new = self._balanced(answers.check_urls(urls))
        with self._lock:
            if new == self._urls:
                return
            self._urls = new
            if self._auth:
                answers.warn_cleartext(new)
            self._generation += 1
            self._current = 0
            self._consecutive_failures = 0
            self._refused = None

    def heartbeat(self) -> int:
        """``PUT {url}/v1/heartbeat`` (no body; the identity headers) to the current receiver, once.

        Returns the status (a receiver older than heartbeats answers 404 or 405). Blocks up to
        ``timeout_s``; thread-safe. Raises ReceiverUnavailable (connection failed, or closed).
        It never retries, fails over or touches the counters: the next heartbeat is the retry.
        """
        with self._lock:
            if self._closed.is_set():
                raise ReceiverUnavailable("sender is closed")
            url = self._urls[self._current]
            auth = self._auth
            self._last_request_s = time.monotonic()
        try:
            resp = self._client.put(f"{url}/v1/heartbeat", content=b"", headers={**self._identity(), **auth})
        except httpx.RequestError as exc:
            raise ReceiverUnavailable(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc
        except RuntimeError as exc:  # the client was closed under us: shutdown
            raise ReceiverUnavailable("sender is closed") from exc
        return resp.status_code

    def last_request_s(self) -> float | None:
        """``time.monotonic()`` when the last request (batch or heartbeat) started; None before
        the first. Thread-safe."""
        with self._lock:
            return self._last_request_s

    def state(self) -> dict[str, object]:
        """A JSON-ready snapshot for /status. Thread-safe, never blocks on the network."""
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
        """Counters since start (for /metrics). Thread-safe.

        batches_retried counts failed attempts that were retried; batches_failed counts
        rejected batches; requests_total counts HTTP requests, reconnects included.
        """
        with self._lock:
            return dict(self._stats)

    def close(self) -> None:
        """Close the connection pool; later sends raise ReceiverUnavailable and no send retries.
        Idempotent, never blocks. It does not interrupt a request already on the wire: that one
        ends with its answer or after ``timeout_s`` (httpx cannot abort a blocked read)."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
        self._client.close()

    def _balanced(self, urls: tuple[str, ...]) -> tuple[str, ...]:
        first = self._spread % len(urls)
        return urls[first:] + urls[:first]

    # -- one attempt -----------------------------------------------------------------------

    def _attempt(self, call: _Call, body: bytes, headers: dict[str, str],
                 lines: int) -> SendResult:
        call.attempts += 1
        call.retry_after_s = None
        if call.attempts > 1 and self._stopping.is_set():
            # tenacity makes one more attempt after an interrupted sleep; shutdown wins over it
            raise ReceiverUnavailable(f"stopping; last error: {call.last_error}")
        with self._lock:
            if self._closed.is_set():
                raise ReceiverUnavailable("sender is closed")
            index = self._current
            self._sending += 1
            auth = self._auth
            url = call.url = self._urls[index]
            call.url_index, call.generation = index, self._generation
        try:
            status, reason, retry_after, answer = self._request(
                f"{url}/v1/batches/{call.batch_id}", body, {**headers, **auth})
        except httpx.RequestError as exc:
            message = f"{type(exc).__name__}: {exc}".rstrip(": ")
            self._failed(call, index, message, None)
            raise ReceiverUnavailable(message) from exc
        except RuntimeError as exc:
            if not self._closed.is_set():
                raise
            # httpx refuses to send on a client close() shut under us: shutdown, not a fault
            raise ReceiverUnavailable("sender is closed") from exc
        finally:
            with self._lock:
                self._sending -= 1
        if 200 <= status < 300:
            return self._succeeded(call, index, status, answer, lines, len(body))
        message = f"{status} {reason}: {answers.excerpt(answer)}".rstrip(": ")
        refused = answers.REFUSED_STATES.get(status)
        if refused is not None:
            self._failed(call, index, message, None, SenderState(refused))
            raise ReceiverRefused(message, state=refused)
        if 400 <= status < 500 and status not in (408, 429):
            self._rejected(call, index, status, message)
            raise BatchRejected(message, status=status)
        # 5xx, 408, 429, and whatever else (a 3xx from a misconfigured URL must not dead-letter
        # every batch; it is retried and its log line tells the operator)
        self._failed(call, index, message, retry_after)
        raise ReceiverUnavailable(message, retry_after_s=retry_after)

    def _request(self, target: str, body: bytes,
                 headers: dict[str, str]) -> tuple[int, str, float | None, bytes]:
        headers = {**headers, **self._identity()}
        for tries in (1, 2):
            with self._lock:
                self._stats["requests_total"] += 1
                self._last_request_s = time.monotonic()
            try:
                # stream + capped read: the answer is always read (or cut) and closed here
                with self._client.stream("PUT", target, content=body, headers=headers) as resp:
                    answer = _read_capped(resp)
                    retry_after = answers.parse_retry_after(resp.headers.get("Retry-After"), time.time())
                    return resp.status_code, resp.reason_phrase, retry_after, answer
            except _STALE_CONNECTION_ERRORS as exc:
                if tries == 2:
                    raise
                log.debug("send reconnect target=%s err=%s: %s", target, type(exc).__name__, exc)
                with self._lock:
                    self._stats["reconnects"] += 1
        raise AssertionError("unreachable")

    # -- retry policy ----------------------------------------------------------------------

    def _wait_for(self, call: _Call) -> Callable[[RetryCallState], float]:
        exponential = wait_exponential_jitter(multiplier=self._initial_backoff_s,
                                              max=self._max_backoff_s,
                                              jitter=self._initial_backoff_s)

        def wait(retry_state: RetryCallState) -> float:
            with self._lock:
                moved_on = not self._is_current(call)
            if moved_on:
                # failed over (by us or another thread): try the next receiver soon
                return random.uniform(0.0, self._initial_backoff_s)
            if call.retry_after_s is not None:
                # the receiver said when; a little jitter on top keeps threads apart
                return call.retry_after_s + random.uniform(0.0, min(1.0, call.retry_after_s / 10))
            # half to all of the backoff: agents that failed together (a receiver went away under
            # a fleet) retry apart, from the first retry on
            return float(exponential(retry_state)) * random.uniform(0.5, 1.0)

        return wait

    def _backoff(self, delay_s: float) -> None:
        with self._lock:
            self._stats["batches_retried"] += 1
            self._backing_off += 1
            self._retry_delay_s = delay_s
        try:
            self._sleep_on_event(delay_s)  # returns at once when `stopping` is set
        finally:
            with self._lock:
                self._backing_off -= 1

    # -- bookkeeping (all under the lock, so two failing threads log once) -----------------

    def _failed(self, call: _Call, index: int, message: str, retry_after: float | None,
                refused: SenderState | None = None) -> None:
        url = call.url
        call.last_error = message
        call.retry_after_s = retry_after
        if call.on_failure is not None:
            call.on_failure(message)  # outside the lock: the agent writes it to the spool
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
                self._current = (index + 1) % len(self._urls)
                self._consecutive_failures = 0
                self._stats["failovers"] += 1
                log.warning("receiver failover from=%s to=%s after_failures=%d err=%s",
                            url, self._urls[self._current], self._failover_after, message)

    def _is_current(self, call: _Call) -> bool:
        """The last attempt went to the current receiver. Called under the lock."""
        return call.generation == self._generation and call.url_index == self._current

    def _answered(self, call: _Call) -> None:
        """The receiver answered (2xx or a rejection): it is up. Called under the lock."""
        if self._is_current(call):
            self._consecutive_failures = 0
            self._refused = None
        if self._failing_since is not None:
            log.info("send recovered receiver=%s failed_attempts=%d failing_for_s=%.1f",
                     call.url, self._failed_attempts,
                     time.monotonic() - self._failing_since)
            self._failing_since = None
            self._failed_attempts = 0

    def _succeeded(self, call: _Call, index: int, status: int, answer: bytes, lines: int,
                   size: int) -> SendResult:
        stored, rejected, duplicate = answers.counts(answer, lines, status)
        with self._lock:
            self._answered(call)
            self._last_success_s = time.time()
            self._stats["batches_sent"] += 1
            self._stats["batches_duplicate"] += int(duplicate)
            self._stats["lines_sent"] += lines
            self._stats["bytes_sent"] += size
        return SendResult(status=status, stored=stored, rejected=rejected, duplicate=duplicate,
                          receiver=call.url)

    def _rejected(self, call: _Call, index: int, status: int, message: str) -> None:
        with self._lock:
            self._answered(call)
            self._last_error = f"{call.url}: batch={call.batch_id} rejected: {message}"
            self._last_error_s = time.time()
            self._stats["batches_failed"] += 1
        log.error("send rejected batch=%s receiver=%s status=%d err=%s",
                  call.batch_id, call.url, status, message)
