"""spoolagent.wire against a scripted HTTP/1.1 server on loopback: framing (Content-Length,
chunked, read to close, interim 1xx), keep-alive reuse, stale and half-closed connections, caps,
timeouts, and the httpx exceptions sender.py maps each failure to."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable, Iterator

import httpx
import pytest

from spoolagent import wire
from spoolagent.sender import _WireTransport

pytestmark = pytest.mark.timeout(30)

Handler = Callable[[socket.socket], None]


class Scripted:
    """Accepts connections on 127.0.0.1:0; each is served by the next handler (the last repeats)."""

    def __init__(self, *handlers: Handler) -> None:
        self.handlers = list(handlers)
        self.accepted = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.threads: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            handler = self.handlers[min(self.accepted, len(self.handlers) - 1)]
            self.accepted += 1
            t = threading.Thread(target=self._serve, args=(handler, conn), daemon=True)
            t.start()
            self.threads.append(t)

    @staticmethod
    def _serve(handler: Handler, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                handler(conn)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone does not
        self.listener.close()
        self.thread.join(5)
        for t in self.threads:
            t.join(5)


def read_request(conn: socket.socket) -> bytes | None:
    """One request (head and Content-Length body); None at EOF."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return None
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        body += conn.recv(65536)
    return head


def answering(*answers: bytes) -> Handler:
    """Answer each request on the connection with the next of ``answers``, then close it."""
    def handler(conn: socket.socket) -> None:
        for answer in answers:
            if read_request(conn) is None:
                return
            conn.sendall(answer)
    return handler


OK = b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}"


@pytest.fixture
def serve() -> Iterator[Callable[..., Scripted]]:
    servers: list[Scripted] = []

    def start(*handlers: Handler) -> Scripted:
        servers.append(Scripted(*handlers))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def put(pool: wire.Pool, srv: Scripted, body: bytes = b"x" * 10, *, max_body: int = 65536,
        timeout_s: float = 5.0) -> wire.Answer:
    head = wire.request_head(b"PUT", b"/v1/batches/b1", [
        (b"Host", b"127.0.0.1:%d" % srv.port), (b"Content-Length", b"%d" % len(body))])
    return pool.request("http", "127.0.0.1", srv.port, head, body, max_body=max_body,
                        connect_timeout_s=timeout_s, read_timeout_s=timeout_s,
                        write_timeout_s=timeout_s)


def test_keep_alive_connection_is_reused(serve: Callable[..., Scripted]) -> None:
    srv = serve(answering(OK, OK, OK))
    pool = wire.Pool(tls=None, max_idle=1)
    for _ in range(3):
        a = put(pool, srv)
        assert (a.status, a.reason, a.body) == (201, b"Created", b"{}")
    assert srv.accepted == 1
    pool.close()


def test_chunked_answer_with_trailers(serve: Callable[..., Scripted]) -> None:
    chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"3;ext=1\r\nabc\r\n5\r\ndefgh\r\n0\r\nX-Trailer: 1\r\n\r\n")
    srv = serve(answering(chunked, OK))
    pool = wire.Pool(tls=None, max_idle=1)
    assert put(pool, srv).body == b"abcdefgh"
    assert put(pool, srv).status == 201
    assert srv.accepted == 1  # read to its end: reused
    pool.close()


def test_answer_read_to_close_is_not_reused(serve: Callable[..., Scripted]) -> None:
    def to_close(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nall of it")
    srv = serve(to_close)
    pool = wire.Pool(tls=None, max_idle=1)
    assert put(pool, srv).body == b"all of it"
    assert put(pool, srv).body == b"all of it"
    assert srv.accepted == 2
    pool.close()


def test_interim_answers_are_skipped(serve: Callable[..., Scripted]) -> None:
    srv = serve(answering(b"HTTP/1.1 100 Continue\r\n\r\n" + OK))
    pool = wire.Pool(tls=None, max_idle=1)
    assert put(pool, srv).status == 201
    pool.close()


def test_idle_connection_the_server_closed_is_replaced(serve: Callable[..., Scripted]) -> None:
    srv = serve(answering(OK))  # each connection is closed after one answer
    pool = wire.Pool(tls=None, max_idle=1)
    assert put(pool, srv).status == 201
    # poll until the server's close reached this side (no sleep)
    for _ in range(1000):
        conn = pool._idle[("http", "127.0.0.1", srv.port)][0]
        if conn.is_dead():
            break
        threading.Event().wait(0.01)
    assert put(pool, srv).status == 201
    assert srv.accepted == 2
    pool.close()


def test_server_closing_without_answer_is_a_protocol_error(serve: Callable[..., Scripted]) -> None:
    def hang_up(conn: socket.socket) -> None:
        read_request(conn)
    srv = serve(hang_up)
    pool = wire.Pool(tls=None, max_idle=1)
    with pytest.raises(wire.ProtocolError, match="Server disconnected without sending a response"):
        put(pool, srv)
    pool.close()


def test_answer_cut_mid_body_is_a_protocol_error(serve: Callable[..., Scripted]) -> None:
    def cut(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 100\r\n\r\nonly this")
    srv = serve(cut)
    pool = wire.Pool(tls=None, max_idle=1)
    with pytest.raises(wire.ProtocolError):
        put(pool, srv)
    pool.close()


def test_long_answer_is_cut_at_the_cap_and_its_connection_closed(serve: Callable[..., Scripted]) -> None:
    big = b"HTTP/1.1 500 Oops\r\nContent-Length: 5000\r\n\r\n" + b"e" * 5000
    srv = serve(answering(big, big))
    pool = wire.Pool(tls=None, max_idle=1)
    for _ in range(2):
        a = put(pool, srv, max_body=100)
        assert (a.status, a.body) == (500, b"e" * 100)
    assert srv.accepted == 2
    pool.close()


def test_garbage_answer_is_a_protocol_error(serve: Callable[..., Scripted]) -> None:
    srv = serve(answering(b"SSH-2.0-OpenSSH_9.6\r\n\r\n"))
    pool = wire.Pool(tls=None, max_idle=1)
    with pytest.raises(wire.ProtocolError, match="status line"):
        put(pool, srv)
    pool.close()


def test_silent_server_is_a_read_timeout(serve: Callable[..., Scripted]) -> None:
    release = threading.Event()

    def silent(conn: socket.socket) -> None:
        read_request(conn)
        release.wait(10)
    srv = serve(silent)
    pool = wire.Pool(tls=None, max_idle=1)
    with pytest.raises(wire.ReadTimeout):
        put(pool, srv, timeout_s=0.2)
    release.set()
    pool.close()


def test_refused_connection_is_a_connect_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        pool = wire.Pool(tls=None, max_idle=1)
        with pytest.raises(wire.ConnectError):
            pool.request("http", "127.0.0.1", port, b"PUT / HTTP/1.1\r\n\r\n", b"", max_body=10,
                         connect_timeout_s=5, read_timeout_s=5, write_timeout_s=5)


def test_a_closed_pool_refuses() -> None:
    pool = wire.Pool(tls=None, max_idle=1)
    pool.close()
    with pytest.raises(wire.ConnectError, match="closed"):
        pool.request("http", "127.0.0.1", 1, b"", b"", max_body=10, connect_timeout_s=1,
                     read_timeout_s=1, write_timeout_s=1)


@pytest.mark.parametrize("headers", [[(b"Bad Name", b"v")], [(b"X", b"a\r\nInjected: 1")],
                                     [(b"X:", b"v")], [(b"", b"v")], [(b"X", b"nul\0")]])
def test_header_that_breaks_the_framing_is_refused(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(wire.LocalProtocolError):
        wire.request_head(b"PUT", b"/", headers)


def test_transport_maps_failures_to_httpx_exceptions(serve: Callable[..., Scripted]) -> None:
    """What the sender's retry and reconnect logic sees: httpx's exceptions, as httpcore raises."""
    def hang_up(conn: socket.socket) -> None:
        read_request(conn)
    ok, gone = serve(answering(OK)), serve(hang_up)
    transport = _WireTransport(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), 1)
    url = f"http://127.0.0.1:{ok.port}/v1/batches/b1"
    resp = transport.handle_request(httpx.Request("PUT", url, content=b"x"))
    assert (resp.status_code, resp.reason_phrase, resp.read()) == (201, "Created", b"{}")
    assert resp.headers["content-type"] == "application/json"
    with pytest.raises(httpx.RemoteProtocolError):
        transport.handle_request(httpx.Request("PUT", f"http://127.0.0.1:{gone.port}/", content=b"x"))
    with pytest.raises(httpx.LocalProtocolError):
        transport.handle_request(httpx.Request("PUT", url, content=b"x", headers={"X": "a\nb"}))
    transport.close()
    with pytest.raises(httpx.ConnectError):
        transport.handle_request(httpx.Request("PUT", url, content=b"x"))
