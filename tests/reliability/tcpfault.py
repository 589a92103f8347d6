"""A TCP fault proxy on 127.0.0.1:0 between the agent's sender and a receiver.

It copies bytes, but reads the HTTP/1.1 framing (request and response headers, Content-Length or
chunked bodies) so that it can fault one request at a precise point. Faults (``Fault``):

- ``PASS``: forward the request and its answer.
- ``REFUSE``: the listening socket is closed: connects fail with ECONNREFUSED (and open
  connections are reset).
- ``RESET_BODY``: forward the headers and half of the body, then reset both sides (the receiver
  sees a torn body; the agent sees a reset mid-request).
- ``RESET_AFTER_REQUEST``: forward the whole request, wait for the receiver's answer (so the batch
  IS stored), then reset the agent's connection without passing the answer on: the classic
  duplicate maker.
- ``DELAY``: hold each request ``delay_s`` before forwarding it.
- ``BLACKHOLE``: accept and read, never forward or answer (until the fault changes, the proxy
  stops or ``blackhole_s`` passes; then the connection is reset).
- ``THROTTLE``: forward at ``throttle_bps`` bytes/s each way.

The fault applies per request: ``set(fault)`` switches it for everything that follows;
``schedule(steps)`` cycles through ``(fault, seconds)`` steps on a thread; ``mix(rnd, weights)``
draws a fault per request. ``counts`` says how often each fault was applied. Bounded: at most
``max_conns`` connections, every socket has a timeout, ``close()`` ends every thread.
Imports nothing from the project.
"""

from __future__ import annotations

import enum
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Sequence


class Fault(enum.Enum):
    PASS = "pass"
    REFUSE = "refuse"
    RESET_BODY = "reset_body"
    RESET_AFTER_REQUEST = "reset_after_request"
    DELAY = "delay"
    BLACKHOLE = "blackhole"
    THROTTLE = "throttle"


class _Closed(Exception):
    pass


class _Conn:
    """Buffered reads of one socket."""

    def __init__(self, sock: socket.socket, stop: threading.Event) -> None:
        self.sock, self.buf, self.stop = sock, b"", stop

    def _fill(self) -> None:
        while True:
            if self.stop.is_set():
                raise _Closed
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise _Closed from exc
            if not data:
                raise _Closed
            self.buf += data
            return

    def until(self, sep: bytes, limit: int = 1 << 20) -> bytes:
        while True:
            i = self.buf.find(sep)
            if i >= 0:
                out, self.buf = self.buf[: i + len(sep)], self.buf[i + len(sep):]
                return out
            if len(self.buf) > limit:
                raise _Closed
            self._fill()

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def message(self) -> tuple[bytes, bytes]:
        """(headers, body) of one HTTP message, raw."""
        head = self.until(b"\r\n\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in
                  (ln.partition(b":") for ln in head.split(b"\r\n")[1:] if b":" in ln)}
        if fields.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = b""
            while True:
                size_line = self.until(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                body += size_line + self.exactly(size + 2)
                if size == 0:
                    break
            return head, body
        return head, self.exactly(int(fields.get(b"content-length", b"0")))


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), as a dropped connection looks to the peer."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class TcpFaultProxy:
    def __init__(self, upstream: tuple[str, int] | str, *, delay_s: float = 1.0,
                 throttle_bps: int = 64 * 1024, blackhole_s: float = 30.0, max_conns: int = 64) -> None:
        if isinstance(upstream, str):  # "http://host:port"
            hostport = upstream.split("://", 1)[-1].rstrip("/")
            host, _, port = hostport.rpartition(":")
            upstream = (host, int(port))
        self.upstream = upstream
        self.delay_s, self.throttle_bps, self.max_conns = delay_s, throttle_bps, max_conns
        self.blackhole_s = blackhole_s
        self.counts: Counter[str] = Counter()
        self._fault = Fault.PASS
        self._mix: tuple[random.Random, list[Fault], list[float]] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._listener: socket.socket | None = None
        self.port = 0
        self._bind()
        self.url = f"http://127.0.0.1:{self.port}"
        self._spawn(self._accept_loop, "tcpfault-accept")

    # -- control -----------------------------------------------------------------------------------

    @property
    def fault(self) -> Fault:
        return self._fault

    def set(self, fault: Fault) -> None:
        """Switch the fault for every request from now on (and stop any mix)."""
        with self._changed:
            self._mix = None
            self._fault = fault
            self._changed.notify_all()
        if fault is Fault.REFUSE:
            self._unbind()
            for s in list(self._socks):
                _reset(s)
        elif self._listener is None:
            self._bind()

    def mix(self, rnd: random.Random, weights: dict[Fault, float]) -> None:
        """Draw a fault per request with these weights (REFUSE is not drawn: it is not per request)."""
        faults: list[Fault] = [f for f in weights if f is not Fault.REFUSE]
        self.set(Fault.PASS)
        with self._changed:
            self._mix = (rnd, faults, [weights[f] for f in faults])

    def schedule(self, steps: Sequence[tuple[Fault, float]], *, repeat: bool = True) -> None:
        """Cycle through (fault, seconds) on a thread until ``close()`` (or once)."""
        def run() -> None:
            while not self._stop.is_set():
                for fault, seconds in steps:
                    if self._stop.is_set():
                        return
                    self.set(fault)
                    self._stop.wait(seconds)
                if not repeat:
                    return
        self._spawn(run, "tcpfault-schedule")

    def close(self) -> None:
        self._stop.set()
        with self._changed:
            self._changed.notify_all()
        self._unbind()
        for s in list(self._socks):
            _reset(s)
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> TcpFaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------------------

    def _spawn(self, target: object, name: str, *args: object) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)  # type: ignore[arg-type]
        t.start()
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()] + [t]

    def _bind(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        deadline = time.monotonic() + 5
        while True:
            try:
                s.bind(("127.0.0.1", self.port))
                break
            except OSError:
                if time.monotonic() > deadline:
                    s.close()
                    raise
                time.sleep(0.05)
        s.listen(64)
        s.settimeout(0.1)
        self.port = s.getsockname()[1]
        self._listener = s

    def _unbind(self) -> None:
        s, self._listener = self._listener, None
        if s is not None:
            s.close()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            s = self._listener
            if s is None:
                self._stop.wait(0.05)
                continue
            try:
                client, _ = s.accept()
            except TimeoutError:
                continue
            except OSError:  # closed under us by REFUSE
                self._stop.wait(0.05)
                continue
            if len(self._socks) >= 2 * self.max_conns:
                _reset(client)
                continue
            self._spawn(self._serve, "tcpfault-conn", client)

    def _pick(self) -> Fault:
        with self._changed:
            if self._mix is not None:
                rnd, faults, weights = self._mix
                return rnd.choices(faults, weights)[0]
            return self._fault

    def _track(self, *socks: socket.socket) -> None:
        with self._lock:
            self._socks.update(socks)

    def _serve(self, client: socket.socket) -> None:
        client.settimeout(0.2)
        up: socket.socket | None = None
        self._track(client)
        try:
            cin = _Conn(client, self._stop)
            uin: _Conn | None = None
            while not self._stop.is_set():
                head, body = cin.message()
                fault = self._pick()
                self.counts[fault.value] += 1
                if fault is Fault.REFUSE:
                    return
                if fault is Fault.BLACKHOLE:
                    # until the fault changes (a mix: for blackhole_s), then a reset
                    until = time.monotonic() + self.blackhole_s
                    with self._changed:
                        while (not self._stop.is_set() and time.monotonic() < until
                               and (self._mix is not None or self._fault is Fault.BLACKHOLE)):
                            self._changed.wait(0.2)
                    return
                if fault is Fault.DELAY:
                    if self._stop.wait(self.delay_s):
                        return
                if up is None:
                    up = socket.create_connection(self.upstream, timeout=30)
                    up.settimeout(0.2)
                    self._track(up)
                    uin = _Conn(up, self._stop)
                assert uin is not None
                if fault is Fault.RESET_BODY:
                    up.sendall(head + body[: len(body) // 2])
                    time.sleep(0.01)
                    return
                self._send(up, head + body, fault)
                rhead, rbody = uin.message()
                if fault is Fault.RESET_AFTER_REQUEST:
                    return
                self._send(client, rhead + rbody, fault)
                if b"\r\nconnection: close" in rhead.lower():
                    return
        except (_Closed, OSError, ValueError):
            pass
        finally:
            for s in (client, up):
                if s is not None:
                    _reset(s)
                    with self._lock:
                        self._socks.discard(s)

    def _send(self, sock: socket.socket, data: bytes, fault: Fault) -> None:
        if fault is not Fault.THROTTLE:
            sock.sendall(data)
            return
        step = max(1, self.throttle_bps // 20)
        for i in range(0, len(data), step):
            if self._stop.is_set():
                raise _Closed
            sock.sendall(data[i:i + step])
            time.sleep(0.05)
