"""Bench: ``spool stats`` on a spool of 1,000,000 lines (200-byte lines, 5,000-line batches).

Builds the spool with the real Spool (timing puts), times ``spool stats`` in process (SpoolFile)
and as the command an operator runs (``python -m spoolagent spool stats --json``), then times
get+ack. Usage: ``.venv/bin/python bench/bench_spool_stats.py [--lines N] [--compression C]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from spoolagent.spool.file import SpoolFile  # noqa: E402
from spoolagent.spool.queue import Spool, WhenFull  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--compression", default="zstd", choices=["gzip", "zstd", "none"])
    args = ap.parse_args()
    state = Path(tempfile.mkdtemp(prefix="bench-spool-"))
    # 200-byte lines that compress like logs, not like a repeated constant
    words = [os.urandom(4).hex() for _ in range(2000)]
    spool = Spool(state, max_bytes=1 << 40, when_full=WhenFull.BLOCK,
                  compression=args.compression, stopping=threading.Event())
    put_s: list[float] = []
    for b in range(args.lines // args.batch):
        lines = []
        for i in range(args.batch):
            head = f"app{i % 7} 2024-05-01 req={b * args.batch + i} "
            body = " ".join(words[(b * 31 + i * 7 + k) % 2000] for k in range(20))
            lines.append((head + body)[:200].ljust(200, "x").encode())
        t = time.perf_counter()
        spool.put(f"c{b % 3}", lines)
        put_s.append(time.perf_counter() - t)
    db = state / "spool.db"
    print(f"spool: {args.lines} lines in {len(put_s)} batches, {args.compression}, "
          f"{db.stat().st_size / 1e6:.1f} MB on disk")
    print(f"put (5,000 lines, incl. compression, synchronous=FULL): median "
          f"{statistics.median(put_s) * 1e3:.1f} ms -> {1 / statistics.median(put_s):.0f} puts/s, "
          f"{args.batch / statistics.median(put_s) / 1e3:.0f}k lines/s")

    stats_s = []
    for _ in range(20):
        t = time.perf_counter()
        with SpoolFile(state) as f:
            st = f.stats()
        stats_s.append(time.perf_counter() - t)
    assert st["ready_lines"] == args.lines, st
    print(f"spool stats (open + query, in process): median {statistics.median(stats_s) * 1e3:.1f} ms")
    t = time.perf_counter()
    spool.stats()
    print(f"Spool.stats() in the agent: {(time.perf_counter() - t) * 1e3:.1f} ms")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "spoolagent", "spool", "stats", "--json",
                        "--state-dir", str(state)], capture_output=True, text=True, env=env)
    cmd_s = time.perf_counter() - t
    print(f"`spoolagent spool stats --json` (whole command incl. interpreter start): "
          f"{cmd_s * 1e3:.0f} ms, exit {r.returncode}" + (f" {r.stderr[-300:]}" if r.returncode else ""))

    n = min(100, len(put_s))
    t = time.perf_counter()
    for _ in range(n):
        b = spool.get(timeout_s=1)
        assert b is not None
        spool.ack(b.pqid)
    ga = (time.perf_counter() - t) / n
    print(f"get+ack (5,000-line batches): {ga * 1e3:.1f} ms -> {1 / ga:.0f} batches/s, "
          f"{args.batch / ga / 1e3:.0f}k lines/s")
    spool.close()


if __name__ == "__main__":
    main()
