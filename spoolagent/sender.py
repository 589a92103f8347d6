"""The sender: ships spooled batches to the receiver over HTTP and says how that is going.

Owns the HTTP transport (one shared transport: keep-alive pool, TLS, timeouts, the
token), one attempt and what its answer means for the batch, and the retry policy (tenacity:
exponential backoff with jitter, Retry-After, stop and wake on shutdown).

Requests go to the transport directly, not through an ``httpx.Client``: the client's per-request
machinery (URL and header merging, cookies, auth and redirect flows, event hooks) is nothing this
sender uses and cost about a third of a request's CPU (issue 17: 520 -> 380 us per PUT warm,
1.7 -> 1.0 ms cold, on the 2-vCPU bench box). The transport is ``_WireTransport``, httpx's
transport interface over ``spoolagent.wire`` (HTTP/1.1 on keep-alive sockets) instead of
httpcore and h11: issue 17, 1.4 -> ~0.4 ms of CPU per PUT at 5 sends a second. The one
``Retrying`` is built once (tenacity keeps its per-call state thread-local); its wait finds the
``Call`` in the attempt's arguments.

The only module that imports httpx and tenacity. What an answer or an address means (status
classes, Retry-After, the counts of a 2xx and the ``SendResult``, URL checks, the TLS trust) is
in ``spoolagent.answers``; the receivers list, failover, the sender's state and counters and the
summarised failure log are in ``spoolagent.delivery``. ``agent.py`` wires it to the spool with plain callables.
"""

from __future__ import annotations

import logging
import random
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from spoolagent import answers, wire
from spoolagent.answers import SendResult
from spoolagent.delivery import Call, Delivery, SenderState
from spoolagent.errors import BatchRejected, ReceiverRefused, ReceiverUnavailable
from spoolcore import imports

# httpx loads its command-line client and tenacity its tornado support whenever they are installed
# (both are, for spoolagent's CLI and the receiver); the agent uses neither (spoolcore.imports)
with imports.without("httpx._main", "tornado"):
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


log = logging.getLogger(__name__)

_BATCH_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_ANSWER_BYTES = 64 * 1024
# A pooled keep-alive connection the server closed while we picked it shows up as one of these.
# PUT with a batch id is idempotent (the receiver dedups), so one immediate resend is safe.
_STALE_CONNECTION_ERRORS = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
# every request's own headers (httpx adds Host and Content-Length); no Accept-Encoding: the answer
# is a few bytes of JSON, not worth a decoder
_HEADERS = {"User-Agent": "spoolagent-sender", "Content-Type": "text/plain"}
_ENCODED = {enc: {**_HEADERS, "Content-Encoding": enc} for enc in ("gzip", "zstd")}


# what each of wire's errors is in httpx's tree: the exceptions httpcore's transport raises for
# the same failure (a write error is not one: like httpcore, wire then reads the answer)
_HTTPX_ERRORS: dict[type[wire.WireError], type[httpx.TransportError]] = {
    wire.ConnectError: httpx.ConnectError, wire.ConnectTimeout: httpx.ConnectTimeout,
    wire.WriteTimeout: httpx.WriteTimeout, wire.ReadError: httpx.ReadError,
    wire.ReadTimeout: httpx.ReadTimeout, wire.ProtocolError: httpx.RemoteProtocolError,
    wire.LocalProtocolError: httpx.LocalProtocolError,
}
_DEFAULT_PORTS = {"http": 80, "https": 443}


class _WireTransport(httpx.BaseTransport):
    """httpx's transport interface over ``wire.Pool``: a request's method, URL, headers (httpx
    added Host and Content-Length) and bytes body go out as they are; the answer comes back read
    (up to ``_MAX_ANSWER_BYTES``: a longer one is cut and its connection closed). Honours the
    request's ``timeout`` extension as httpx's transport does. Thread-safe."""

    def __init__(self, tls: ssl.SSLContext, max_idle: int) -> None:
        self._pool = wire.Pool(tls=tls, max_idle=max_idle)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        timeouts = request.extensions.get("timeout", {})
        try:
            head = wire.request_head(request.method.encode("ascii"), url.raw_path, request.headers.raw)
            answer = self._pool.request(
                url.scheme, url.host, url.port or _DEFAULT_PORTS[url.scheme], head, request.read(),
                max_body=_MAX_ANSWER_BYTES, connect_timeout_s=timeouts.get("connect"),
                read_timeout_s=timeouts.get("read"), write_timeout_s=timeouts.get("write"))
        except wire.WireError as exc:
            raise _HTTPX_ERRORS[type(exc)](str(exc), request=request) from exc
        return httpx.Response(answer.status, headers=answer.headers, content=answer.body,
                              request=request, extensions={"reason_phrase": answer.reason,
                                                           "http_version": answer.http_version})

    def close(self) -> None:
        self._pool.close()


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
        self._closed = threading.Event()
        self._delivery = Delivery(self._balanced(answers.check_urls(urls)), closed=self._closed,
                                  failover_after=failover_after,
                                  log_summary_every_s=log_summary_every_s)
        self._stopping = stopping
        self._initial_backoff_s = initial_backoff_s
        self._timeout_s, self._pool = timeout_s, max(1, in_flight)
        self._lock = threading.Lock()    # the transport and its trust, the token, _last_request_s
        self._ca_file = ca_file
        self._tls = answers.load_trust(ca_file, self._delivery.urls())
        self._transport = self._make_transport(self._tls)
        # what httpx.Client would add to every request: a timeout for each network operation
        self._extensions = {"timeout": httpx.Timeout(timeout_s).as_dict()}
        # the agent's id, version and spool summary (docs/protocol.md), read once per request
        self._identity = identity or dict
        self._last_request_s: float | None = None  # monotonic: when a request last started
        self._sleep_on_event = sleep_using_event(stopping)
        self._auth: dict[str, str] = {}  # per request, so set_token() takes effect at once
        self.set_token(token)
        self._retrying = Retrying(
            retry=retry_if_exception_type(ReceiverUnavailable),
            wait=self._wait,
            # shutdown stops retrying; so does close() (the agent is past the in-flight send)
            stop=stop_any(stop_when_event_set(self._stopping), stop_when_event_set(self._closed)),
            sleep=self._backoff,
            reraise=True,
        )
        self._exponential = wait_exponential_jitter(multiplier=initial_backoff_s, max=max_backoff_s,
                                                    jitter=initial_backoff_s)

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
        headers = _HEADERS if not encoding or encoding == "identity" else _ENCODED.get(encoding)
        if headers is None:
            headers = {**_HEADERS, "Content-Encoding": encoding}
        call = Call(batch_id, on_failure=on_failure)
        # The first attempt runs without tenacity: its per-call machinery (a RetryCallState, the
        # action lists of iter) cost ~160 us of CPU per batch with cold caches (issue 17), and
        # most batches need one attempt. A retryable failure goes on in tenacity, whose first
        # "attempt" replays that failure: from there on the stop checks, the waits (attempt
        # numbers included) and the re-raise are exactly those of a send that started in it.
        try:
            return self._attempt(call, body, headers, lines)
        except ReceiverUnavailable as exc:
            first: ReceiverUnavailable | None = exc

        def attempt(call: Call, body: bytes, headers: dict[str, str], lines: int) -> SendResult:
            nonlocal first
            if first is not None:
                replay, first = first, None
                raise replay
            return self._attempt(call, body, headers, lines)
        result: SendResult = self._retrying(attempt, call, body, headers, lines)
        return result

    def set_token(self, token: str | None) -> None:
        """Send ``token`` from the next attempt on (SIGHUP re-reads the token file). Thread-safe;
        the token is never logged."""
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        with self._lock:
            self._auth = auth
        if token:
            answers.warn_cleartext(self._delivery.urls())

    def _make_transport(self, tls: ssl.SSLContext | None) -> _WireTransport:
        if tls is None:
            # no https:// receiver: a context that verifies and trusts no CA loads nothing, and
            # should an https URL ever reach this pool it fails verification, never goes unchecked
            tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # no proxies (only config.py reads the environment) and no redirects: a transport has
        # neither. One idle connection per sender thread; each thread uses one at a time.
        return _WireTransport(tls, max_idle=self._pool)

    def set_ca_file(self, ca_file: str | None) -> None:
        """New TLS trust (a reload changed ``[sender] ca_file``): a new connection pool from the
        next request on. Raises ConfigError (nothing changed) if the file cannot be loaded. The
        old pool is closed once the requests on it have had ``timeout_s`` to finish."""
        self._swap_transport(answers.load_trust(ca_file, self._delivery.urls()), ca_file)

    def _swap_transport(self, tls: ssl.SSLContext | None, ca_file: str | None) -> None:
        new = self._make_transport(tls)
        with self._lock:
            old, self._transport = self._transport, new
            self._tls, self._ca_file = tls, ca_file
        closer = threading.Timer(2 * self._timeout_s, old.close)
        closer.daemon = True
        closer.start()

    def set_receivers(self, urls: Sequence[str], balance: str | None = None) -> None:
        """Send to ``urls`` from the next attempt on (a reload changed ``[sender] receivers`` or
        ``balance``).

        Thread-safe. Raises ConfigError (nothing changed) for a URL that is not http(s). An
        attempt already on the wire finishes against the old URL; its answer still counts. The
        first https:// receiver loads the system's CAs (a client with them, before any attempt
        can go there).
        """
        if balance is not None and (balance == "spread") != bool(self._spread):
            self._spread = random.randrange(1, 1 << 30) if balance == "spread" else 0
        new = self._balanced(answers.check_urls(urls))
        with self._lock:
            tls, ca_file = self._tls, self._ca_file
        if tls is None and answers.needs_tls(new):
            self._swap_transport(answers.load_trust(ca_file, new), ca_file)
        if not self._delivery.set_urls(new):
            return
        with self._lock:
            auth = self._auth
        if auth:
            answers.warn_cleartext(new)

    def heartbeat(self) -> int:
        """``PUT {url}/v1/heartbeat`` (no body; the identity headers) to the current receiver, once.

        Returns the status (a receiver older than heartbeats answers 404 or 405). Blocks up to
        ``timeout_s``; thread-safe. Raises ReceiverUnavailable (connection failed, or closed).
        It never retries, fails over or touches the counters: the next heartbeat is the retry.
        """
        url = self._delivery.current_url()
        with self._lock:
            auth = self._auth
        try:
            status, _reason, _retry_after, _answer = self._exchange(
                f"{url}/v1/heartbeat", b"", {**_HEADERS, **self._identity(), **auth})
        except httpx.RequestError as exc:
            raise ReceiverUnavailable(f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc
        return status

    def last_request_s(self) -> float | None:
        """``time.monotonic()`` when the last request (batch or heartbeat) started; None before
        the first. Thread-safe."""
        with self._lock:
            return self._last_request_s

    def state(self) -> dict[str, object]:
        """A JSON-ready snapshot for /status. Thread-safe, never blocks on the network."""
        return self._delivery.state()

    def stats(self) -> dict[str, int]:
        """Counters since start (for /metrics). Thread-safe.

        batches_retried counts failed attempts that were retried; batches_failed counts
        rejected batches; requests_total counts HTTP requests, reconnects included.
        """
        return self._delivery.stats()

    def close(self) -> None:
        """Close the connection pool; later sends raise ReceiverUnavailable and no send retries.
        Idempotent, never blocks. It does not interrupt a request already on the wire: that one
        ends with its answer or after ``timeout_s`` (httpx cannot abort a blocked read)."""
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            transport = self._transport
        transport.close()

    def _balanced(self, urls: tuple[str, ...]) -> tuple[str, ...]:
        first = self._spread % len(urls)
        return urls[first:] + urls[:first]

    # -- one attempt -----------------------------------------------------------------------

    def _attempt(self, call: Call, body: bytes, headers: dict[str, str],
                 lines: int) -> SendResult:
        call.attempts += 1
        call.retry_after_s = None
        if call.attempts > 1 and self._stopping.is_set():
            # tenacity makes one more attempt after an interrupted sleep; shutdown wins over it
            raise ReceiverUnavailable(f"stopping; last error: {call.last_error}")
        url = self._delivery.start(call)  # raises once closed
        try:
            with self._lock:
                auth = self._auth
            status, reason, retry_after, answer = self._request(
                f"{url}/v1/batches/{call.batch_id}", body, {**headers, **auth})
        except httpx.RequestError as exc:
            message = f"{type(exc).__name__}: {exc}".rstrip(": ")
            self._failed(call, message, None)
            raise ReceiverUnavailable(message) from exc
        finally:
            self._delivery.finish()
        if 200 <= status < 300:
            stored, rejected, duplicate = answers.counts(answer, lines, status)
            self._delivery.succeeded(call, lines, len(body), duplicate)
            return SendResult(status=status, stored=stored, rejected=rejected,
                              duplicate=duplicate, receiver=call.url)
        message = f"{status} {reason}: {answers.excerpt(answer)}".rstrip(": ")
        refused = answers.REFUSED_STATES.get(status)
        if refused is not None:
            self._failed(call, message, None, SenderState(refused))
            raise ReceiverRefused(message, state=refused)
        if 400 <= status < 500 and status not in (408, 429):
            self._delivery.rejected(call, status, message)
            raise BatchRejected(message, status=status)
        # 5xx, 408, 429, and whatever else (a 3xx from a misconfigured URL must not dead-letter
        # every batch; it is retried and its log line tells the operator)
        self._failed(call, message, retry_after)
        raise ReceiverUnavailable(message, retry_after_s=retry_after)

    def _request(self, target: str, body: bytes,
                 headers: dict[str, str]) -> tuple[int, str, float | None, bytes]:
        headers = {**headers, **self._identity()}
        for tries in (1, 2):
            self._delivery.count("requests_total")
            try:
                return self._exchange(target, body, headers)
            except _STALE_CONNECTION_ERRORS as exc:
                if tries == 2:
                    raise
                log.debug("send reconnect target=%s err=%s: %s", target, type(exc).__name__, exc)
                self._delivery.count("reconnects")
        raise AssertionError("unreachable")

    def _exchange(self, target: str, body: bytes,
                  headers: dict[str, str]) -> tuple[int, str, float | None, bytes]:
        """One PUT on the pooled transport: (status, reason, Retry-After, the answer read up to
        the cap). Raises ReceiverUnavailable once closed, httpx.RequestError from the network."""
        with self._lock:
            if self._closed.is_set():
                raise ReceiverUnavailable("sender is closed")
            self._last_request_s = time.monotonic()
            transport = self._transport
        request = httpx.Request("PUT", target, content=body, headers=headers,
                                extensions=self._extensions)
        resp = transport.handle_request(request)
        try:
            answer = resp.read()  # read by the transport already, and capped there
            retry_after = answers.parse_retry_after(resp.headers.get("Retry-After"), time.time())
            return resp.status_code, resp.reason_phrase, retry_after, answer
        finally:
            resp.close()
            if self._closed.is_set():
                # close() ran while this request was on the wire: a pool closed under a request
                # keeps the connection that request opened; closing again closes that one too
                transport.close()

    # -- retry policy ----------------------------------------------------------------------

    def _wait(self, retry_state: RetryCallState) -> float:
        call: Call = retry_state.args[0]  # _attempt's first argument
        if self._delivery.moved_on(call):
            # failed over (by us or another thread): try the next receiver soon
            return random.uniform(0.0, self._initial_backoff_s)
        if call.retry_after_s is not None:
            # the receiver said when; a little jitter on top keeps threads apart
            return call.retry_after_s + random.uniform(0.0, min(1.0, call.retry_after_s / 10))
        # half to all of the backoff: agents that failed together (a receiver went away under
        # a fleet) retry apart, from the first retry on
        return float(self._exponential(retry_state)) * random.uniform(0.5, 1.0)

    def _backoff(self, delay_s: float) -> None:
        with self._delivery.backing_off(delay_s):
            self._sleep_on_event(delay_s)  # returns at once when `stopping` is set

    def _failed(self, call: Call, message: str, retry_after: float | None,
                refused: SenderState | None = None) -> None:
        call.last_error = message
        call.retry_after_s = retry_after
        if call.on_failure is not None:
            call.on_failure(message)  # outside any lock: the agent writes it to the spool
        self._delivery.failed(call, message, refused)
