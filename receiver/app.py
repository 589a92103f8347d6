"""make_app: the receiver's HTTP API as a tornado Application with thin handlers.

- ``PUT /v1/batches/{id}``: 201 stored / 200 duplicate, JSON ``{batch_id, stored, rejected,
  duplicate}``; 400 bad id or undecodable body; 401 bad token; 413 too large; 503 + Retry-After
  (storage unavailable, or the same id being stored right now and not done within the claim wait).
- ``POST /`` (any other path): the seed's protocol, lines stored without dedup, 200 JSON
  ``{stored, rejected}``.
- ``PUT /v1/heartbeat``: an idle agent's heartbeat (identity headers, no body): 204; 400 without
  ``Spoolagent-Id``; 401 bad token.
- ``GET /v1/agents``: the agent table as JSON ``{"agents": [...]}`` (token required).
- ``GET /healthz``, ``GET /metrics``: liveness; Prometheus text (no token).

Bodies are streamed in and capped before they are decoded; decoding and checking run on the
executor (on the event loop for a body under SMALL_BODY_BYTES), storing in the store's rounds.
Errors become JSON ``{"error": ...}`` with one log line each, naming the batch. Imports ingest,
metrics, errors (and tornado); no handlers of logging.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import logging
import re
import time
from concurrent.futures import Future
from typing import Any

import tornado.ioloop
import tornado.web

from receiver import agents, body, offload
from receiver.context import AppContext
from receiver.errors import (
    BadRequest,
    BodyTooLarge,
    ReceiverError,
    RetryableError,
    StorageUnavailable,
)
from receiver.ingest import SMALL_BODY_BYTES, Charge, Outcome
from receiver.metrics import CONTENT_TYPE

log = logging.getLogger(__name__)

_SHED_LOG_EVERY_S = 10.0
_BATCH_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
# a small body is decoded on the event loop only while it stays this small decoded: a 16 KiB zstd
# body can expand to the whole cap, and checking 64 MiB there would stall every connection
_INLINE_DECODED_BYTES = 256 * 1024


def make_app(ctx: AppContext) -> tornado.web.Application:
    """The Application for one process. Handlers share ``ctx``; the server owns its parts."""
    args = {"ctx": ctx}
    return tornado.web.Application(
        [
            (r"/healthz", HealthHandler, args),
            (r"/metrics", MetricsHandler, args),
            (r"/v1/batches/([^/]*)", BatchHandler, args),
            (r"/v1/heartbeat", HeartbeatHandler, args),
            (r"/v1/agents", AgentsHandler, args),
            (r"/.*", LinesHandler, args),
        ],
        log_function=_log_request,
        compress_response=False,
    )


def authorized(tokens: tuple[str, ...] | None, header: str | None) -> bool:
    """True if no token is set, or ``header`` is ``Bearer <one of tokens>`` (constant-time
    compares, every token compared: the time does not tell which one matched)."""
    if tokens is None:
        return True
    scheme, _, given = (header or "").partition(" ")
    secret = given.strip().encode()
    matches = [hmac.compare_digest(secret, t.encode()) for t in tokens]
    return scheme.lower() == "bearer" and any(matches)


class _Handler(tornado.web.RequestHandler):
    handler_name = "other"

    def initialize(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self._started = time.monotonic()
        self._counted = True
        self._admitted = False  # a body request holding a slot of ctx.admission
        ctx.inflight.count += 1

    def on_finish(self) -> None:
        self._release()
        m = self.ctx.metrics
        m.requests.labels(self.handler_name, str(self.get_status())).inc()
        m.request_duration.labels(self.handler_name).observe(time.monotonic() - self._started)

    def on_connection_close(self) -> None:
        self._release()

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            self.ctx.inflight.count -= 1
            if self._admitted:
                self.ctx.admission.release()
                self.ctx.metrics.queue_requests.dec()
                self._admitted = False

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        self.finish({"error": self._reason})

    def check_xsrf_cookie(self) -> None:  # an API for programs, not browsers
        return


class HealthHandler(_Handler):
    handler_name = "healthz"

    def get(self) -> None:
        self.write({"status": "ok"})


class MetricsHandler(_Handler):
    handler_name = "metrics"

    async def get(self) -> None:
        # off the loop: it reads the metrics files and the agent table
        text = await tornado.ioloop.IOLoop.current().run_in_executor(self.ctx.executor,
                                                                    self.ctx.metrics.render)
        self.set_header("Content-Type", CONTENT_TYPE)
        self.write(text)


class _BodyHandler(_Handler):
    """Streams the body in, refusing it (413) once it is past what the cap could decode from, or
    (503 + Retry-After) once this process holds ``max_inflight`` bytes of bodies. Both answers
    come as soon as the body crosses the bound, chunked or not; the connection is then closed."""

    _charge: Charge | None = None
    _reserved = 0

    def prepare(self) -> None:
        self._charge = self.ctx.budget.charge()
        self._chunks: list[bytes] = []
        self._received = 0
        self._too_large = False
        self._raw_cap = body.raw_cap(self.ctx.max_body_bytes)
        if not authorized(self.ctx.tokens, self.request.headers.get("Authorization")):
            self._refuse(401, "bad or missing token")
            return
        length = self.request.headers.get("Content-Length", "")
        if length.isdigit() and int(length) > self._raw_cap:
            self._refuse(413, f"body of {length} bytes is over the cap")
            return
        if not self.ctx.admission.admit():
            self._shed()
            return
        self._admitted = True
        self.ctx.metrics.queue_requests.inc()
        self._reserved = int(length) if length.isdigit() else 0
        try:  # the whole declared body at once: refused before it is read, never half-way
            self._charge.take(self._reserved)
        except RetryableError as exc:
            self._refuse(503, str(exc), retry_after_s=exc.retry_after_s)

    def _shed(self) -> None:
        """503 before the body is read: this process holds all the work it may. Not an error of
        the request: one debug line each, and a warning with the count now and then."""
        ctx = self.ctx
        ctx.metrics.requests_shed.inc()
        ctx.shed.count += 1
        now = time.monotonic()
        if now - ctx.shed.logged_at >= _SHED_LOG_EVERY_S:
            log.warning("shedding load: queue full requests=%d shed_since_last=%d",
                        ctx.admission.requests, ctx.shed.count)
            ctx.shed.count, ctx.shed.logged_at = 0, now
        log.debug("request shed path=%s", self.request.path)
        self.set_status(503)
        self.set_header("Retry-After", str(ctx.admission.retry_after_s()))
        self.finish({"error": "receiver busy, retry after Retry-After"})

    def data_received(self, chunk: bytes) -> None:
        if self._too_large or self._finished:
            return
        self._received += len(chunk)
        if self._received > self._raw_cap:
            self._too_large = True
            self._chunks = []
            self._refuse(413, f"body is over the cap of {self._raw_cap} bytes")
            return
        try:
            assert self._charge is not None
            beyond = self._received - max(self._reserved, self._received - len(chunk))
            if beyond > 0:  # chunked, or more than declared: charged as it comes
                self._charge.take(beyond)
        except RetryableError as exc:
            self._chunks = []
            self._refuse(503, str(exc), retry_after_s=exc.retry_after_s)
            return
        self._chunks.append(chunk)

    def _release(self) -> None:
        super()._release()
        if self._charge is not None:
            self._charge.close()

    def _take_body(self) -> bytes:
        if self._too_large:
            raise BodyTooLarge(f"body is over the cap of {self._raw_cap} bytes")
        raw = b"".join(self._chunks)
        self._chunks = []
        return raw

    def _refuse(self, status: int, reason: str, batch_id: str | None = None,
                retry_after_s: int | None = None) -> None:
        if batch_id is None and self.path_args:
            batch_id = self.path_args[0]
        if status >= 500:
            log.error("request refused batch=%s status=%d path=%s err=%s",
                      batch_id, status, self.request.path, reason)
        else:
            log.warning("request refused batch=%s status=%d path=%s err=%s",
                        batch_id, status, self.request.path, reason)
        self.set_status(status)
        if retry_after_s is not None:
            self.set_header("Retry-After", str(retry_after_s))
        payload: dict[str, Any] = {"error": reason}
        if batch_id is not None:
            payload["batch_id"] = batch_id
        self.finish(payload)

    async def _run(self, batch_id: str | None, work: Any, *args: Any) -> Outcome | None:
        """Run ``work(*args)`` (on the executor unless the body is small), wait for its round;
        answer errors here. None if it was refused."""
        if self._finished:  # refused while the body came in
            return None
        try:
            raw = self._take_body()
            charge = None if self._charge is None else self._charge.add
            stored: Future[Outcome] | None = None
            if len(raw) <= SMALL_BODY_BYTES:
                # never above the body cap: a body between the two would be stored, not refused
                inline = min(_INLINE_DECODED_BYTES, self.ctx.max_body_bytes)
                with contextlib.suppress(BodyTooLarge):
                    stored = work(*args, raw, max_bytes=inline, charge=charge)
            if stored is None:
                return await offload.off_loop(self.ctx.executor, functools.partial(work, *args, raw, charge=charge))
            return await asyncio.wrap_future(stored)
        except BadRequest as exc:
            self._refuse(400, str(exc), batch_id)
        except BodyTooLarge as exc:
            self._refuse(413, str(exc), batch_id)
        except RetryableError as exc:
            if isinstance(exc, StorageUnavailable):
                self.ctx.metrics.storage_errors.inc()
            self._refuse(503, str(exc), batch_id, retry_after_s=exc.retry_after_s)
        except ReceiverError as exc:
            self._refuse(500, str(exc), batch_id)
        except Exception as exc:  # the top of a request: answer 5xx (retried), keep serving
            log.exception("request failed batch=%s path=%s", batch_id, self.request.path)
            self._refuse(500, f"internal error: {type(exc).__name__}", batch_id)
        return None

    def _count(self, source: str, outcome: Outcome) -> None:
        m = self.ctx.metrics
        m.lines_stored.labels(source).inc(outcome.stored)
        if outcome.rejected:
            m.lines_rejected.labels(source).inc(outcome.rejected)
        m.bytes_stored.inc(outcome.bytes_stored)


@tornado.web.stream_request_body
class BatchHandler(_BodyHandler):
    """``PUT /v1/batches/{id}``: store a batch exactly once."""

    handler_name = "batch"

    def prepare(self) -> None:
        super().prepare()
        if not self._finished and _BATCH_ID_RE.match(self.path_args[0]) is None:
            self._refuse(400, "batch id must match [A-Za-z0-9_-]{1,64}")

    async def put(self, batch_id: str) -> None:
        encoding = self.request.headers.get("Content-Encoding")
        outcome = await self._run(batch_id, self.ctx.ingestor.put_batch, batch_id, encoding)
        if outcome is None:
            _seen(self)  # refused (503 above all): the agent and its growing backlog still show
            return
        if outcome.duplicate:  # stored before: nothing new to count but the resend
            _seen(self, batches=1, duplicates=1)
        else:
            _seen(self, batches=1, lines=outcome.stored, bytes_=outcome.bytes_stored,
                  rejected=outcome.rejected)
        if outcome.duplicate:
            self.ctx.metrics.batches_duplicate.inc()
            log.debug("duplicate batch=%s", batch_id)
        else:
            self.ctx.metrics.batches_stored.inc()
            self._count("batch", outcome)
            if outcome.rejected:
                log.warning("batch stored with rejected lines batch=%s stored=%d rejected=%d",
                            batch_id, outcome.stored, outcome.rejected)
        self.set_status(200 if outcome.duplicate else 201)
        self.finish(outcome.as_json())


@tornado.web.stream_request_body
class LinesHandler(_BodyHandler):
    """``POST /`` (any path): the seed's protocol, lines stored without dedup."""

    handler_name = "post"

    async def post(self) -> None:
        encoding = self.request.headers.get("Content-Encoding")
        outcome = await self._run(None, self.ctx.ingestor.put_lines, "post", encoding)
        if outcome is None:
            return
        self._count("post", outcome)
        if outcome.rejected:
            log.warning("post stored with rejected lines stored=%d rejected=%d",
                        outcome.stored, outcome.rejected)
        self.finish({"stored": outcome.stored, "rejected": outcome.rejected})


def _seen(handler: _Handler, **counts: int) -> agents.Report | None:
    """Note the agent of an authorized request, and add ``counts``, in the agent table (memory
    only: a few microseconds)."""
    if handler.ctx.agents is None:
        return None
    report = agents.report_from_headers(handler.request.headers, handler.request.remote_ip)
    if report is not None:
        handler.ctx.agents.seen(report, **counts)
    return report


class HeartbeatHandler(_Handler):
    """``PUT /v1/heartbeat``: an idle agent says it is alive and what its spool holds."""

    handler_name = "heartbeat"

    def put(self) -> None:
        if not authorized(self.ctx.tokens, self.request.headers.get("Authorization")):
            self.set_status(401)
            self.finish({"error": "bad or missing token"})
            return
        report = _seen(self, heartbeats=1)
        if report is None and self.ctx.agents is not None:
            self.set_status(400)
            self.finish({"error": "a heartbeat needs a valid Spoolagent-Id header"})
            return
        self.set_status(204)
        self.finish()


class AgentsHandler(_Handler):
    """``GET /v1/agents``: the agent table, the JSON of ``spoolreceiver agents --json``."""

    handler_name = "agents"

    async def get(self) -> None:
        if not authorized(self.ctx.tokens, self.request.headers.get("Authorization")):
            self.set_status(401)
            self.finish({"error": "bad or missing token"})
            return
        table = self.ctx.agents
        if table is None:
            self.finish({"agents": []})
            return
        silent_for = self.get_query_argument("silent_for_s", None)
        sort = self.get_query_argument("sort", "id")
        if sort not in agents.SORT_KEYS:
            self.set_status(400)
            self.finish({"error": f"sort: expected one of {', '.join(agents.SORT_KEYS)}"})
            return
        try:
            silent_for_s = None if silent_for is None else float(silent_for)
        except ValueError:
            self.set_status(400)
            self.finish({"error": "silent_for_s: expected seconds"})
            return

        try:
            # this process's last second too
            rows = await tornado.ioloop.IOLoop.current().run_in_executor(self.ctx.executor, table.rows)
        except StorageUnavailable as exc:
            self.set_status(503)
            self.finish({"error": str(exc)})
            return
        self.finish({"agents": agents.listing(rows, now=time.time(), silent_for_s=silent_for_s,
                                              sort=sort)})


def _log_request(handler: tornado.web.RequestHandler) -> None:
    request = handler.request
    log.debug("request method=%s path=%s status=%d duration_ms=%.1f", request.method,
              request.path, handler.get_status(), 1000.0 * request.request_time())
