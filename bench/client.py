"""A load client for the receiver alone (``python -m bench.client URL --lines N ...``).

Sends ``PUT /v1/batches/{id}`` with pre-built, pre-compressed bodies (what the agent sends: one
spooled batch of ``--batch-bytes`` of 200-byte lines, PROD DATE prefixed) over ``--in-flight``
keep-alive connections (http.client, one per thread), every id new. Prints one JSON object:
``{"lines", "batches", "start", "end", "latencies_ms"}`` (wall clock, so several clients can be
summed; ``latencies_ms``: every request's time to its answer, sorted).
Imports bench.data and the standard library plus zstandard.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import threading
import time
import zlib
from urllib.parse import urlsplit

import zstandard

from bench.data import LINE_BYTES, line_bodies


def build_bodies(prod: str, batch_lines: int, encoding: str, count: int = 8) -> list[bytes]:
    bodies = line_bodies()
    date = time.strftime("%Y-%m-%d")
    out = []
    for b in range(count):
        raw = b"".join(b"%s %s seq=%09d %s\n" % (prod.encode(), date.encode(), b * batch_lines + i,
                                                 bodies[(b * batch_lines + i) % len(bodies)])
                       for i in range(batch_lines))
        if encoding == "zstd":
            raw = zstandard.ZstdCompressor(level=3).compress(raw)
        elif encoding == "gzip":
            c = zlib.compressobj(3, zlib.DEFLATED, 31)
            raw = c.compress(raw) + c.flush()
        out.append(raw)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("url")
    ap.add_argument("--lines", type=int, default=2_000_000)
    ap.add_argument("--batch-bytes", type=int, default=512 * 1024)
    ap.add_argument("--in-flight", type=int, default=4)
    ap.add_argument("--encoding", default="zstd", choices=["gzip", "zstd", "identity"])
    ap.add_argument("--prod", default="bench")
    args = ap.parse_args(argv)
    batch_lines = max(1, args.batch_bytes // LINE_BYTES)
    bodies = build_bodies(args.prod, batch_lines, args.encoding)
    n_batches = -(-args.lines // batch_lines)
    parts = urlsplit(args.url)
    headers = {"Content-Type": "text/plain"}
    if args.encoding != "identity":
        headers["Content-Encoding"] = args.encoding
    lock = threading.Lock()
    next_batch = 0
    errors: list[str] = []
    latencies: list[float] = []
    tag = f"{os.getpid():x}{time.monotonic_ns() & 0xFFFFFF:x}"

    def worker() -> None:
        nonlocal next_batch
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
        while True:
            with lock:
                b = next_batch
                next_batch += 1
            if b >= n_batches or errors:
                break
            sent = time.monotonic()
            conn.request("PUT", f"/v1/batches/bench-{tag}-{b}", body=bodies[b % len(bodies)],
                         headers=headers)
            resp = conn.getresponse()
            answer = resp.read()
            latencies.append(1000.0 * (time.monotonic() - sent))  # list.append: atomic
            if resp.status != 201:
                errors.append(f"{resp.status} {answer[:200]!r}")
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(args.in_flight)]
    start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    end = time.time()
    if errors:
        print(json.dumps({"error": errors[0]}))
        return 1
    print(json.dumps({"lines": n_batches * batch_lines, "batches": n_batches, "start": start,
                      "end": end, "latencies_ms": sorted(round(x, 2) for x in latencies)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
