"""LineServer: the seed's TCP listener, newline-separated lines in the line protocol, no dedup.

Each connection is read in chunks; the complete lines of a chunk are checked and stored together
(the same Ingestor, validation and all-or-nothing append as HTTP) before the next chunk is read,
so a slow disk slows the sender down instead of filling memory. A line still without its newline
when the connection ends is stored as it is (a missing final newline is accepted); a line that
grows past the line cap without a newline is rejected as over-long (its first part is kept under
``_rejected/``) and the rest of it is skipped up to the next newline. There is no answer on the
wire: on a storage failure the connection is closed, and the lines of that chunk are not stored.
"""

from __future__ import annotations

import asyncio
import logging
import ssl

import tornado.ioloop
from tornado.iostream import IOStream, StreamClosedError
from tornado.tcpserver import TCPServer

from receiver.context import AppContext
from receiver.errors import ReceiverError, StorageUnavailable

log = logging.getLogger(__name__)

_READ_BYTES = 256 * 1024


class LineServer(TCPServer):
    """Accepts line streams; one instance per process. Runs on the event loop."""

    def __init__(self, ctx: AppContext, max_line_bytes: int,
                 ssl_options: ssl.SSLContext | None = None) -> None:
        super().__init__(ssl_options=ssl_options)
        self._ctx = ctx
        self._max_line_bytes = max_line_bytes
        self._streams: set[IOStream] = set()

    def close_connections(self) -> None:
        """Close every open connection (after ``stop`` and the drain, at shutdown)."""
        for stream in list(self._streams):
            stream.close()

    async def handle_stream(self, stream: IOStream, address: tuple[str, int]) -> None:
        self._ctx.metrics.tcp_connections.inc()
        self._streams.add(stream)
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else str(address)
        try:
            await self._serve(stream, peer)
        finally:
            self._streams.discard(stream)
            stream.close()

    async def _serve(self, stream: IOStream, peer: str) -> None:
        pending = b""
        skipping = False  # inside an over-long line: drop up to its newline
        while True:
            try:
                chunk = await stream.read_bytes(_READ_BYTES, partial=True)
            except StreamClosedError:
                break
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
                    if not await self._store(data, peer):  # rejected as over-long
                        return
                else:
                    pending = data
                continue
            pending = data[cut + 1:]
            if not await self._store(data[:cut + 1], peer):
                return
        if pending and not skipping:
            await self._store(pending, peer)

    async def _store(self, block: bytes, peer: str) -> bool:
        ctx = self._ctx
        ctx.inflight.count += 1
        try:
            loop = tornado.ioloop.IOLoop.current()
            stored = await loop.run_in_executor(ctx.executor, ctx.ingestor.put_lines, "tcp",
                                                None, block)
            outcome = await asyncio.wrap_future(stored)
        except ReceiverError as exc:
            if isinstance(exc, StorageUnavailable):
                ctx.metrics.storage_errors.inc()
            log.error("tcp lines not stored, closing peer=%s bytes=%d err=%s", peer, len(block), exc)
            return False
        finally:
            ctx.inflight.count -= 1
        ctx.metrics.lines_stored.labels("tcp").inc(outcome.stored)
        ctx.metrics.bytes_stored.inc(outcome.bytes_stored)
        if outcome.rejected:
            ctx.metrics.lines_rejected.labels("tcp").inc(outcome.rejected)
            log.warning("tcp lines rejected peer=%s stored=%d rejected=%d", peer, outcome.stored,
                        outcome.rejected)
        return True
