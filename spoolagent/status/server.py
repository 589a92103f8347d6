"""The agent's status endpoint: ``GET /metrics`` (Prometheus text) and ``GET /status`` (JSON).

Both are rendered from one ``snapshot()`` callable returning a ``snapshot.Snapshot`` (agent.py passes
``Agent.snapshot``), so the parts keep plain counters and never import prometheus_client; the
metrics themselves (``status.metrics``) are loaded at the first scrape. Runs a small threaded HTTP
server on its own daemon thread.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from spoolagent.snapshot import Snapshot

log = logging.getLogger(__name__)

SnapshotFn = Callable[[], Snapshot]


class StatusServer:
    """Serves /metrics and /status on ``listen`` (``HOST:PORT``, port 0 picks one; see ``url``).

    ``start()`` binds (raises OSError if the address is taken) and serves on a daemon thread;
    ``stop()`` blocks until the server thread ends. Thread-safe snapshot access is the caller's.
    """

    def __init__(self, listen: str, snapshot: SnapshotFn) -> None:
        host, _, port = listen.rpartition(":")
        self._addr = (host.strip("[]"), int(port))
        self.snapshot = snapshot
        self._metrics: Callable[[], bytes] | None = None
        self._content_type = ""
        self._metrics_lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                path = self.path.split("?", 1)[0]
                try:
                    if path == "/metrics":
                        body, ctype = outer.metrics_text()
                    elif path == "/status":
                        body = json.dumps(outer.snapshot().to_json(), default=str).encode()
                        ctype = "application/json"
                    elif path in ("/", "/healthz"):
                        body, ctype = b"ok\n", "text/plain"
                    else:
                        self.send_error(404, "try /status or /metrics")
                        return
                except Exception:
                    log.exception("status request failed path=%s", path)
                    self.send_error(500)
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("status request %s", format % args)

        self._server = ThreadingHTTPServer(self._addr, Handler)
        self._server.daemon_threads = True
        host, port = str(self._server.server_address[0]), int(self._server.server_address[1])
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        self._server.timeout = None  # handle_request blocks until a connection: no idle wake-ups
        self._stopped = False
        self._thread = threading.Thread(target=self._serve, name="status", daemon=True)
        self._thread.start()

    def metrics_text(self) -> tuple[bytes, str]:
        """The Prometheus exposition and its content type; loads prometheus_client the first time."""
        with self._metrics_lock:
            if self._metrics is None:
                from spoolagent.status import metrics
                reg = metrics.registry(self.snapshot)
                self._metrics = lambda: metrics.render(reg)
                self._content_type = metrics.CONTENT_TYPE
        return self._metrics(), self._content_type

    def _serve(self) -> None:
        # not serve_forever: it wakes every poll_interval (0.5 s) to look for a shutdown request
        server = self._server
        assert server is not None
        while not self._stopped:
            server.handle_request()

    def stop(self) -> None:
        if self._server is not None:
            self._stopped = True
            try:  # a shut-down listening socket wakes the blocked select (Linux)...
                self._server.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            if self._thread is not None and self._thread.is_alive():
                self._poke()  # ... elsewhere a connection does
        if self._thread is not None:
            self._thread.join(5)
        if self._server is not None:
            self._server.server_close()

    def _poke(self) -> None:
        assert self._server is not None
        host, port = str(self._server.server_address[0]), int(self._server.server_address[1])
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
        try:
            socket.create_connection((host, port), timeout=1.0).close()
        except OSError:
            pass
