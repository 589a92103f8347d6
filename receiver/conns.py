"""Connections: the fd limit, a cap on open connections, and an accept loop that never spins.

- ``raise_fd_limit`` (at start, before any fork): the soft RLIMIT_NOFILE goes up to the hard one.
- ``connection_cap``: the open connections (HTTP + TCP) one process may hold, below its fd limit
  with room kept for data files, the dedup index, the executor and the listening sockets.
- ``ConnectionGate`` accepts on the listening sockets instead of tornado's accept handler. At the
  cap it first closes the HTTP connection idle the longest (a keep-alive connection waiting for its
  next request, as nginx does); with none idle, and on EMFILE/ENFILE (fds short anyway), it stops
  watching the socket for a backoff (50 ms doubling to 1 s; the kernel's backlog holds new clients)
  and says so in one log line per ``_LOG_EVERY_S`` -- never a busy loop of tracebacks.
- ``GatedHTTPServer``: tornado's HTTPServer telling the gate when connections open, close, and
  go idle or busy (a request's headers have arrived).
Runs on the event loop only: not thread-safe.
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import tornado.httpserver
import tornado.httputil
import tornado.ioloop
from tornado.iostream import IOStream

log = logging.getLogger(__name__)

_ACCEPTS_PER_WAKEUP = 128
_BACKOFF_MIN_S = 0.05
_BACKOFF_MAX_S = 1.0
_LOG_EVERY_S = 10.0
_FD_RESERVE = 64  # SQLite, the log, pipes, listening sockets, the executor's own
_FD_SHORT = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft fd limit to the hard one (logged); (old soft, new soft)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("fd limit not raised soft=%d hard=%d err=%s", soft, hard, exc)
            return soft, soft
        log.info("fd limit raised soft=%d new_soft=%d hard=%d", soft, target, hard)
        return soft, target
    log.info("fd limit soft=%d hard=%d", soft, hard)
    return soft, soft


def connection_cap(configured: int | None, max_open_files: int) -> int:
    """The cap for one process: ``configured`` if given, never above what the fd limit leaves
    once data files and the rest are counted (at least 16)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    room = max(16, soft - max_open_files - _FD_RESERVE)
    if configured is not None and configured > room:
        log.warning("max_connections lowered to what the fd limit allows max_connections=%d "
                    "cap=%d fd_limit=%d", configured, room, soft)
    return room if configured is None else min(configured, room)


class ConnectionGate:
    """Counts this process's open connections against ``cap`` and accepts new ones within it.
    ``on_open(n)``, ``on_idle_closed()`` and ``on_pause()`` report to the metrics."""

    def __init__(self, cap: int, *, on_open: Callable[[int], None] | None = None,
                 on_idle_closed: Callable[[], None] | None = None,
                 on_pause: Callable[[], None] | None = None) -> None:
        self.cap = cap
        self.open = 0
        self._on_open = on_open or (lambda n: None)
        self._on_idle_closed = on_idle_closed or (lambda: None)
        self._on_pause = on_pause or (lambda: None)
        self._idle: OrderedDict[object, Callable[[], None]] = OrderedDict()  # oldest first
        self._sockets: list[socket.socket] = []
        self._on_accept: dict[int, Callable[[socket.socket, Any], None]] = {}
        self._paused = False
        self._backoff_s = _BACKOFF_MIN_S
        self._resume: object | None = None
        self._logged_at = -_LOG_EVERY_S
        self._pauses = 0
        self.closed_idle = 0

    # -- what the servers report ------------------------------------------------------------
    def opened(self) -> None:
        self.open += 1
        self._on_open(self.open)

    def closed(self, conn: object | None = None) -> None:
        self.open -= 1
        self._on_open(self.open)
        if conn is not None:
            self._idle.pop(conn, None)

    def idle(self, conn: object, close: Callable[[], None]) -> None:
        """``conn`` waits for its next request; ``close()`` would close it."""
        self._idle.pop(conn, None)
        self._idle[conn] = close

    def busy(self, conn: object) -> None:
        self._idle.pop(conn, None)

    # -- accepting ----------------------------------------------------------------------------
    def listen(self, sock: socket.socket, on_accept: Callable[[socket.socket, Any], None]) -> None:
        """Accept connections on ``sock`` and hand each to ``on_accept(connection, address)``."""
        sock.setblocking(False)
        self._sockets.append(sock)
        self._on_accept[sock.fileno()] = on_accept
        if not self._paused:
            self._watch(sock)

    def stop(self) -> None:
        """Stop accepting (at shutdown)."""
        loop = tornado.ioloop.IOLoop.current()
        if not self._paused:
            for sock in self._sockets:
                loop.remove_handler(sock)
        if self._resume is not None:
            loop.remove_timeout(self._resume)
        self._paused = True
        self._sockets = []

    def _watch(self, sock: socket.socket) -> None:
        tornado.ioloop.IOLoop.current().add_handler(sock, self._accept, tornado.ioloop.IOLoop.READ)

    def _accept(self, sock: socket.socket, events: int) -> None:
        for _ in range(_ACCEPTS_PER_WAKEUP):
            if self._paused:
                return
            if self.open >= self.cap and not self._close_idle():
                self._pause("connection cap reached")
                return
            try:
                conn, address = sock.accept()
            except BlockingIOError:
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in _FD_SHORT:
                    raise
                self._close_idle()
                self._pause(f"accept failed: {exc.strerror}")
                return
            self._backoff_s = _BACKOFF_MIN_S
            self._on_accept[sock.fileno()](conn, address)

    def _close_idle(self) -> bool:
        if not self._idle:
            return False
        _conn, close = self._idle.popitem(last=False)
        self.closed_idle += 1
        self._on_idle_closed()
        close()
        return True

    def _pause(self, why: str) -> None:
        loop = tornado.ioloop.IOLoop.current()
        for sock in self._sockets:
            loop.remove_handler(sock)
        self._paused = True
        self._pauses += 1
        self._on_pause()
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY_S:
            self._logged_at = now
            log.warning("not accepting for now reason=%s open=%d cap=%d backoff_s=%.2f pauses=%d",
                        why, self.open, self.cap, self._backoff_s, self._pauses)
            self._pauses = 0
        self._resume = loop.call_later(self._backoff_s, self._unpause)
        self._backoff_s = min(self._backoff_s * 2, _BACKOFF_MAX_S)

    def _unpause(self) -> None:
        self._resume = None
        if not self._paused:
            return
        self._paused = False
        for sock in self._sockets:
            self._watch(sock)


class _Watched(tornado.httputil.HTTPMessageDelegate):
    """Passes a request through, telling the gate once its headers are in (busy)."""

    def __init__(self, inner: tornado.httputil.HTTPMessageDelegate, gate: ConnectionGate,
                 server_conn: object) -> None:
        self._inner = inner
        self._gate = gate
        self._conn = server_conn

    def headers_received(self, start_line: Any, headers: Any) -> Any:
        self._gate.busy(self._conn)
        return self._inner.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Any:
        return self._inner.data_received(chunk)

    def finish(self) -> None:
        self._inner.finish()

    def on_connection_close(self) -> None:
        self._inner.on_connection_close()


class GatedHTTPServer(tornado.httpserver.HTTPServer):
    """An HTTPServer whose connections the gate counts, and may close while idle."""

    gate: ConnectionGate

    def listen_gated(self, gate: ConnectionGate, socks: list[socket.socket]) -> None:
        self.gate = gate
        for sock in socks:
            # tornado's own per-connection set-up (TLS wrap, IOStream) for each accepted socket
            gate.listen(sock, self._handle_connection)

    def handle_stream(self, stream: IOStream, address: tuple[Any, ...]) -> None:
        self.gate.opened()
        super().handle_stream(stream, address)

    def start_request(self, server_conn: object,
                      request_conn: tornado.httputil.HTTPConnection) -> tornado.httputil.HTTPMessageDelegate:
        delegate = super().start_request(server_conn, request_conn)
        stream = getattr(server_conn, "stream", None)
        if stream is not None:  # waiting for the next request's headers: idle until they come
            self.gate.idle(server_conn, stream.close)
        return _Watched(delegate, self.gate, server_conn)

    def on_close(self, server_conn: object) -> None:
        super().on_close(server_conn)
        self.gate.closed(server_conn)
