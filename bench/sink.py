"""A counting TCP sink for the peers (``python -m bench.sink --port-file F --counter-file C``).

Listens on 127.0.0.1 (an ephemeral port, written to F once listening), accepts any number of
connections, counts newlines and keeps the total in the 8-byte counter file C (mmap'd, so the
bench reads it without a round trip). Stops on SIGTERM. Imports only the standard library.
"""

from __future__ import annotations

import argparse
import mmap
import os
import selectors
import signal
import socket
import struct
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port-file", type=Path, required=True)
    ap.add_argument("--counter-file", type=Path, required=True)
    args = ap.parse_args(argv)
    args.counter_file.write_bytes(b"\0" * 8)
    fd = os.open(args.counter_file, os.O_RDWR)
    counter = mmap.mmap(fd, 8)
    stopping = False

    def _stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    srv.setblocking(False)
    tmp = args.port_file.with_suffix(".tmp")
    tmp.write_text(str(srv.getsockname()[1]))
    os.replace(tmp, args.port_file)
    sel = selectors.DefaultSelector()
    sel.register(srv, selectors.EVENT_READ)
    buf = bytearray(1 << 20)
    total = 0
    while not stopping:
        for key, _ in sel.select(0.2):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is srv:
                conn, _addr = srv.accept()
                conn.setblocking(False)
                sel.register(conn, selectors.EVENT_READ)
                continue
            try:
                n = sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                n = 0
            if n == 0:
                sel.unregister(sock)
                sock.close()
                continue
            total += buf.count(b"\n", 0, n)
            counter[:8] = struct.pack("<Q", total)
    return 0


def read_counter(path: Path) -> int:
    """The sink's newline count so far (0 before it started)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    return int(struct.unpack("<Q", data[:8])[0]) if len(data) >= 8 else 0


if __name__ == "__main__":
    sys.exit(main())
