"""LineServer: the seed's TCP listener, newline-separated lines in the line protocol, no dedup.

Each connection is read in chunks; the complete lines of a chunk are checked and stored together
(the same Ingestor, validation and all-or-nothing append as HTTP) before the next chunk is read,
so a slow disk slows the sender down instead of filling memory. A line still without its newline
when the connection ends is stored as it is (a missing final newline is accepted); a line that
grows past the line cap without a newline is rejected as over-long (its first part is kept under
``_rejected/``) and the rest of it is skipped up to the next newline. There is no answer on the
wire: on a storage failure the connection is closed, and the lines of that chunk are not stored.

The bounds of HTTP bodies hold here too: a connection counts against the gate's connection cap,
is closed after ``idle_timeout_s`` without a byte, waits (reads nothing more) while the process
holds ``max_inflight`` bytes of bodies, and keeps a sample of at most 1,000 rejected lines per
connection: after that each chunk's rejected lines are only counted (one ``omitted`` record).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
from dataclasses import dataclass

import tornado.ioloop
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpserver import TCPServer

from receiver.conns import ConnectionGate
from receiver.context import AppContext
from receiver.errors import Overloaded, ReceiverError, StorageUnavailable
from receiver.validate import MAX_REJECTED_KEPT

log = logging.getLogger(__name__)

_READ_BYTES = 256 * 1024
_OVERLOADED_WAIT_S = 0.05


class LineServer(TCPServer):
    """Accepts line streams; one instance per process. Runs on the event loop."""

    def __init__(self, ctx: AppContext, max_line_bytes: int, *, gate: ConnectionGate,
                 idle_timeout_s: float, ssl_options: ssl.SSLContext | None = None) -> None:
        super().__init__(ssl_options=ssl_options)
        self._ctx = ctx
        self._max_line_bytes = max_line_bytes
        self._gate = gate
        self._idle_timeout_s = idle_timeout_s
        self._streams: set[IOStream] = set()

    def listen_gated(self, socks: list[socket.socket]) -> None:
        """Accept on ``socks`` through the gate (tornado's own per-connection set-up after)."""
        for sock in socks:
            self._gate.listen(sock, self._handle_connection)

    def close_connections(self) -> None:
        """Close every open connection (after ``stop`` and the drain, at shutdown)."""
        for stream in list(self._streams):
            stream.close()

    async def handle_stream(self, stream: IOStream, address: tuple[str, int]) -> None:
        self._ctx.metrics.tcp_connections.inc()
        self._gate.opened()
        self._streams.add(stream)
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        try:
            await self._serve(stream, _Conn(peer))
        finally:
            self._streams.discard(stream)
            self._gate.closed()
            stream.close()

    async def _serve(self, stream: IOStream, conn: _Conn) -> None:
        pending = b""
        skipping = False  # inside an over-long line: drop up to its newline
        while True:
            try:
                chunk = await asyncio.wait_for(stream.read_bytes(_READ_BYTES, partial=True),
                                               self._idle_timeout_s)
            except StreamClosedError:
                break
            except TimeoutError:
                log.info("tcp connection idle, closing peer=%s idle_timeout_s=%.0f", conn.peer,
                         self._idle_timeout_s)
                return
            data = pending + chunk if pending else chunk
            pending = b""
            if skipping:
                nl = data.find(b"\n")
                if nl < 0:
                    continue
                data, skipping = data[nl + 1:], False
            cut = data.rfind(b"\n")
            if cut < 0:
                if len(data) > self._max_line_bytes:
                    skipping = True
                    if not await self._store(data, conn):  # rejected as over-long
                        return
                else:
                    pending = data
                continue
            pending = data[cut + 1:]
            if not await self._store(data[:cut + 1], conn):
                return
        if pending and not skipping:
            await self._store(pending, conn)

    async def _store(self, block: bytes, conn: _Conn) -> bool:
        ctx = self._ctx
        ctx.inflight.count += 1
        charge = ctx.budget.charge()
        try:
            while True:  # no 503 on a stream: read nothing more until the bodies in memory shrink
                try:
                    charge.take(len(block))
                    break
                except Overloaded:
                    await asyncio.sleep(_OVERLOADED_WAIT_S)
            loop = tornado.ioloop.IOLoop.current()
            # the block is bounded by the reads (_READ_BYTES and a line), not by --max-body, which
            # caps a request's body: held to a smaller --max-body it was refused whole and the
            # connection closed with its lines lost
            work = functools.partial(ctx.ingestor.put_lines, "tcp", None, block, charge=charge.add,
                                     max_bytes=max(len(block), 1),
                                     keep_rejected=MAX_REJECTED_KEPT - conn.kept)
            stored = await loop.run_in_executor(ctx.executor, work)
            outcome = await asyncio.wrap_future(stored)
        except ReceiverError as exc:
            if isinstance(exc, StorageUnavailable):
                ctx.metrics.storage_errors.inc()
            log.error("tcp lines not stored, closing peer=%s bytes=%d err=%s", conn.peer, len(block),
                      exc)
            return False
        finally:
            charge.close()
            ctx.inflight.count -= 1
        ctx.metrics.lines_stored.labels("tcp").inc(outcome.stored)
        ctx.metrics.bytes_stored.inc(outcome.bytes_stored)
        if outcome.rejected:
            conn.kept = min(MAX_REJECTED_KEPT, conn.kept + outcome.rejected)
            ctx.metrics.lines_rejected.labels("tcp").inc(outcome.rejected)
            log.warning("tcp lines rejected peer=%s stored=%d rejected=%d", conn.peer, outcome.stored,
                        outcome.rejected)
        return True


@dataclass
class _Conn:
    """One TCP connection: its peer, and how much of its rejected-line sample is spent."""

    peer: str
    kept: int = 0
