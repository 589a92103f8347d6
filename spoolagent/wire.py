"""HTTP/1.1 on keep-alive sockets: the exchanges the sender makes (a PUT with a body, a small answer).

Owns the sockets: a pool of idle keep-alive connections per origin, one request and its answer on
a connection, TLS through the caller's ``ssl.SSLContext``. Standard library only; ``sender.py``
puts it behind an ``httpx.BaseTransport`` and maps ``WireError`` to httpx's exceptions, so that
tenacity and the delivery logic see what httpx's own transport raised.

Why not httpcore and h11 (issue 17): they spend ~1,700 Python calls on a request. At 5 batches a
second every send runs with cold caches, and a PUT cost ~1.4 ms of CPU where the same exchange on
a socket costs ~0.2 ms (2-vCPU bench box).

What it does, as httpcore does for these requests: answers framed by Content-Length, chunked, or
read to close (then the connection is not reused); interim 1xx answers skipped; an idle pooled
connection that became readable (the server closed it, or sent something unasked) is dropped
before use; a request whose write fails still reads the answer (a server may answer 413 and close
before reading the body); the most recently used idle connection is taken first, so that at low
rates one warm connection does the work. Not supported (the sender never needs them): request
bodies of unknown length, Expect: 100-continue, pipelining, proxies, HTTP/2, compressed answers.
"""

from __future__ import annotations

import re
import select
import socket
import ssl
import threading
from dataclasses import dataclass

__all__ = ["Answer", "ConnectError", "ConnectTimeout", "LocalProtocolError", "Pool",
           "ProtocolError", "ReadError", "ReadTimeout", "WireError", "WriteTimeout"]

_MAX_HEAD_BYTES = 64 * 1024  # status line and headers of one answer
_RECV_BYTES = 64 * 1024
_NO_BODY = (204, 304)
# what would break the request's framing: in a method, target or header name, and in a value
_BAD_TOKEN = re.compile(rb"[\s\0]")
_BAD_VALUE = re.compile(rb"[\r\n\0]")


class WireError(Exception):
    """An exchange failed; the subclass says in which phase (sender.py maps each to httpx)."""


class ConnectError(WireError):
    """Connecting (TCP or the TLS handshake) failed."""


class ConnectTimeout(WireError):
    """Connecting took longer than the connect timeout."""


class WriteTimeout(WireError):
    """Sending the request took longer than the write timeout."""


class ReadError(WireError):
    """Reading the answer failed."""


class ReadTimeout(WireError):
    """The answer took longer than the read timeout."""


class ProtocolError(WireError):
    """The server closed early or answered something that is not HTTP/1.x."""


class LocalProtocolError(WireError):
    """The request cannot be sent as given (a header with a line break, say)."""


@dataclass(frozen=True)
class Answer:
    status: int
    reason: bytes
    http_version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes  # at most ``max_body`` bytes: a longer one is cut, and its connection closed


def request_head(method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> bytes:
    """The request line and headers, as sent. Raises LocalProtocolError for a method, target or
    header that would break the framing (a CR, LF or NUL; a colon or space in a name)."""
    if _BAD_TOKEN.search(method) or _BAD_TOKEN.search(target):
        raise LocalProtocolError(f"invalid request line {method!r} {target!r}")
    lines = [b"%s %s HTTP/1.1" % (method, target)]
    for name, value in headers:
        if not name or _BAD_TOKEN.search(name) or b":" in name or _BAD_VALUE.search(value):
            raise LocalProtocolError(f"invalid header {name!r}")
        lines.append(name + b": " + value)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


class _Connection:
    """One socket and what was read past the last answer (nothing, when it may be reused)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()

    def is_dead(self) -> bool:
        """An idle connection that is readable was closed by the server (or got unasked bytes)."""
        if self.sock.fileno() < 0:
            return True
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(0))

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def exchange(self, head: bytes, body: bytes, max_body: int, read_timeout_s: float | None,
                 write_timeout_s: float | None) -> tuple[Answer, bool]:
        """Send one request, read its answer: (answer, whether the connection may be reused).
        A timeout of None waits without limit."""
        write_failed = False
        self.sock.settimeout(write_timeout_s)
        try:
            if len(body) <= _RECV_BYTES:
                self.sock.sendall(head + body)  # one segment for a small batch
            else:
                self.sock.sendall(head)
                self.sock.sendall(body)
        except TimeoutError as exc:
            raise WriteTimeout(str(exc) or "timed out") from exc
        except OSError:
            # the server may have answered (413) and closed before reading the body: read that
            # answer; if there is none, the read fails as httpcore's does (the server disconnected)
            write_failed = True
        self.sock.settimeout(read_timeout_s)
        answer, reusable = self._answer(max_body)
        return answer, reusable and not write_failed

    # -- reading -------------------------------------------------------------------------------

    def _recv(self) -> bytes:
        try:
            return self.sock.recv(_RECV_BYTES)
        except TimeoutError as exc:
            raise ReadTimeout(str(exc) or "timed out") from exc
        except OSError as exc:
            raise ReadError(str(exc) or type(exc).__name__) from exc

    def _fill(self, what: str) -> None:
        """Read more into the buffer; EOF here is a violation (``what`` was still missing)."""
        data = self._recv()
        if not data:
            raise ProtocolError(what)
        self._buf += data

    def _head(self) -> tuple[bytes, int, bytes, list[tuple[bytes, bytes]]]:
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end >= 0:
                break
            if len(self._buf) > _MAX_HEAD_BYTES:
                raise ProtocolError("answer head too long")
            if not self._buf:
                # the same words as httpcore: a stale keep-alive connection shows up as this
                self._fill("Server disconnected without sending a response.")
            else:
                self._fill("peer closed connection without sending a complete answer head")
        raw = bytes(self._buf[:end])
        del self._buf[:end + 4]
        status_line, *lines = raw.split(b"\r\n")
        version, _, rest = status_line.partition(b" ")
        code, _, reason = rest.partition(b" ")
        if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
            raise ProtocolError(f"not an HTTP/1.x status line: {status_line[:80]!r}")
        headers = []
        for line in lines:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip() or line[:1] in b" \t":
                raise ProtocolError(f"malformed header line: {line[:80]!r}")
            headers.append((name, value.strip(b" \t")))
        return version, int(code), reason, headers

    def _answer(self, max_body: int) -> tuple[Answer, bool]:
        version, status, reason, headers = self._head()
        while 100 <= status < 200:  # interim answers (100 Continue, 103 Early Hints): skipped
            if status == 101:
                raise ProtocolError("unexpected 101 Switching Protocols")
            version, status, reason, headers = self._head()
        lower: dict[bytes, bytes] = {}
        for name, value in headers:
            key = name.lower()
            lower[key] = lower[key] + b"," + value if key in lower else value
        reusable = version == b"HTTP/1.1" and b"close" not in lower.get(b"connection", b"").lower()
        if status in _NO_BODY:
            body = b""
        elif lower.get(b"transfer-encoding", b"").lower().rsplit(b",", 1)[-1].strip() == b"chunked":
            body, complete = self._chunked(max_body)
            reusable = reusable and complete
        elif b"content-length" in lower:
            lengths = {v.strip() for v in lower[b"content-length"].split(b",")}
            if len(lengths) != 1 or not next(iter(lengths)).isdigit():
                raise ProtocolError(f"bad Content-Length {lower[b'content-length'][:40]!r}")
            length = int(lengths.pop())
            body = self._exactly(min(length, max_body))
            reusable = reusable and length <= max_body
        else:
            body, reusable = self._to_close(max_body), False
        reusable = reusable and not self._buf  # no pipelining: anything more is garbage
        return Answer(status, reason, version, headers, body), reusable

    def _exactly(self, n: int) -> bytes:
        while len(self._buf) < n:
            self._fill("peer closed connection without sending complete message body")
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _line(self) -> bytes:
        while (end := self._buf.find(b"\r\n")) < 0:
            if len(self._buf) > _MAX_HEAD_BYTES:
                raise ProtocolError("chunk line too long")
            self._fill("peer closed connection without sending complete message body")
        line = bytes(self._buf[:end])
        del self._buf[:end + 2]
        return line

    def _chunked(self, max_body: int) -> tuple[bytes, bool]:
        """The body of a chunked answer: (up to max_body bytes, whether it was read to its end)."""
        out = bytearray()
        while True:
            size_hex = self._line().split(b";", 1)[0].strip()
            try:
                size = int(size_hex, 16)
            except ValueError:
                raise ProtocolError(f"bad chunk size {size_hex[:20]!r}") from None
            if size == 0:
                while self._line():  # trailers, up to the empty line
                    pass
                return bytes(out), True
            if len(out) + size > max_body:
                out += self._exactly(max_body - len(out))
                return bytes(out), False
            out += self._exactly(size)
            if self._exactly(2) != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")

    def _to_close(self, max_body: int) -> bytes:
        while len(self._buf) < max_body:
            data = self._recv()
            if not data:
                break
            self._buf += data
        out = bytes(self._buf[:max_body])
        self._buf.clear()
        return out


class Pool:
    """Keep-alive connections per (scheme, host, port). Thread-safe: each request takes a
    connection of its own (an idle one, the most recently used first, or a new one) and gives
    it back when the answer was read to its end and the server keeps it open.

    ``tls``: the context of https:// origins (the caller's: its trust and settings are used as
    they are). ``max_idle``: idle connections kept per origin; more are closed.
    """

    def __init__(self, *, tls: ssl.SSLContext | None, max_idle: int) -> None:
        self._tls = tls
        self._max_idle = max_idle
        self._lock = threading.Lock()
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._closed = False

    def request(self, scheme: str, host: str, port: int, head: bytes, body: bytes, *,
                max_body: int, connect_timeout_s: float | None, read_timeout_s: float | None,
                write_timeout_s: float | None) -> Answer:
        """One request on a pooled or new connection. Blocks up to the timeouts per operation.
        Raises a WireError subclass (the connection is then closed), or ConnectError once closed."""
        key = (scheme, host, port)
        conn = self._checkout(key) or self._connect(scheme, host, port, connect_timeout_s)
        try:
            answer, reusable = conn.exchange(head, body, max_body, read_timeout_s, write_timeout_s)
        except BaseException:
            conn.close()
            raise
        with self._lock:
            idle = self._idle.setdefault(key, [])
            pooled = reusable and not self._closed and len(idle) < self._max_idle
            if pooled:
                idle.append(conn)
        if not pooled:
            conn.close()
        return answer

    def close(self) -> None:
        """Close the idle connections; a request on the wire closes its own when it ends, and
        later requests raise ConnectError. Idempotent."""
        with self._lock:
            self._closed = True
            idle = [c for conns in self._idle.values() for c in conns]
            self._idle.clear()
        for conn in idle:
            conn.close()

    def _checkout(self, key: tuple[str, str, int]) -> _Connection | None:
        while True:
            with self._lock:
                if self._closed:
                    raise ConnectError("the connection pool is closed")
                idle = self._idle.get(key)
                if not idle:
                    return None
                conn = idle.pop()
            if not conn.is_dead():
                return conn
            conn.close()

    def _connect(self, scheme: str, host: str, port: int, timeout_s: float | None) -> _Connection:
        try:
            sock = socket.create_connection((host, port), timeout=timeout_s)
        except TimeoutError as exc:
            raise ConnectTimeout(str(exc) or "timed out") from exc
        except OSError as exc:
            raise ConnectError(str(exc) or type(exc).__name__) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                if self._tls is None:
                    raise ConnectError("https:// without a TLS context")
                sock = self._tls.wrap_socket(sock, server_hostname=host)
        except TimeoutError as exc:
            sock.close()
            raise ConnectTimeout(str(exc) or "timed out") from exc
        except OSError as exc:  # ssl.SSLError too: a failed handshake or verification
            sock.close()
            raise ConnectError(str(exc) or type(exc).__name__) from exc
        except BaseException:
            sock.close()
            raise
        return _Connection(sock)
