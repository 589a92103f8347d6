"""An HTTP-aware fault proxy on 127.0.0.1:0 in front of a real receiver.

Modes (settable while running, via ``proxy.mode``):
- ``pass``: forward every request and its answer.
- ``hold``: forward the request (the receiver stores it) but never answer: the agent's batch stays
  in flight. The connection is closed when the mode changes or the proxy stops.
- ``reset``: forward, then drop the connection before answering (the classic duplicate maker).
- ``status:NNN``: answer NNN without forwarding. ``status_once:NNN`` does that for the next
  request only, then goes back to ``pass``.
- ``down``: close every connection at once without reading it.
Every loop is bounded: the proxy stops with the test.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


class HttpFaultProxy:
    def __init__(self, upstream: str, mode: str = "pass") -> None:
        u = urlsplit(upstream)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self.mode = mode
        self.requests: list[tuple[str, str, int]] = []  # (method, path, answer status or -1)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _handle(self) -> None:
                with outer._lock:  # status_once: exactly one request, even with two at once
                    mode = outer.mode
                    if mode.startswith("status_once"):
                        outer.mode = "pass"
                if mode == "down":
                    self.close_connection = True
                    _reset(self.connection)
                    return
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                if mode.startswith("status"):
                    status = int(mode.split(":")[1])
                    payload = b'{"error": "injected by the fault proxy"}'
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    outer._record(self.command, self.path, status)
                    return
                conn = http.client.HTTPConnection(*outer.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "host")}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if mode == "reset":
                    outer._record(self.command, self.path, -1)
                    self.close_connection = True
                    _reset(self.connection)
                    return
                if mode == "hold":
                    outer._record(self.command, self.path, -1)
                    while outer.mode == "hold" and not outer._stopping.wait(0.05):
                        pass
                    self.close_connection = True
                    _reset(self.connection)
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                outer._record(self.command, self.path, resp.status)

            do_PUT = do_POST = do_GET = _handle  # noqa: N815

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def _record(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, path, status))

    def batch_ids(self) -> list[str]:
        with self._lock:
            return [p.rsplit("/", 1)[1] for m, p, _ in self.requests if m == "PUT"]

    def close(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a dropped connection looks to the client."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    except OSError:
        pass
