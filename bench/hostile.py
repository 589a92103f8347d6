"""``python -m bench.hostile [--work DIR] [--json FILE]``: what hostile bodies cost a real receiver
(issue 12). For each body, a fresh receiver (default flags, fsync on) gets it once; the table shows
the answer, the receiver's peak memory (VmHWM, its baseline included), its CPU for the request and
what the body added to ``_rejected/``. Then many-member gzip bodies of growing size: decode CPU vs
size (linear, not quadratic). Imports bench.runners.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import zstandard

from bench.runners import Receiver, cpu_s, wait_for

MIB = 1024 * 1024


def _zstd(data: bytes) -> bytes:
    return zstandard.ZstdCompressor().compress(data)


def _vmhwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _rejected_bytes(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in (data_dir / "_rejected").glob("*.jsonl"))


def _bodies() -> list[tuple[str, str | None, Callable[[], bytes]]]:
    member = gzip.compress(b"web 2026-01-01 " + b"m" * 100 + b"\n")
    return [
        ("4 MiB of \\n, gzip (4 KiB)", "gzip", lambda: gzip.compress(b"\n" * (4 * MIB))),
        ("64 MiB of \\n, gzip (64 KiB)", "gzip", lambda: gzip.compress(b"\n" * (64 * MIB))),
        ("64 MiB of \\n, zstd", "zstd", lambda: _zstd(b"\n" * (64 * MIB))),
        ("32 MiB of 'x\\n', zstd", "zstd", lambda: _zstd(b"x\n" * (16 * MIB))),
        ("2 MiB of empty gzip members", "gzip", lambda: gzip.compress(b"") * (2 * MIB // 20)),
        ("10,000 one-line gzip members", "gzip", lambda: member * 10_000),
        ("nested zstd(gzip) bomb, 256 MiB of 'a'", "zstd, gzip",
         lambda: gzip.compress(_zstd(b"a" * (256 * MIB)))),
    ]


def _one(work: Path, name: str, encoding: str | None, body: bytes) -> dict[str, Any]:
    shutil.rmtree(work, ignore_errors=True)
    rcv = Receiver(work / "data").start()
    try:
        assert rcv.proc is not None
        pid = rcv.proc.pid
        base_mib = _vmhwm_mib(pid)
        c0, t0 = cpu_s([pid]), time.monotonic()
        headers = {"Content-Encoding": encoding} if encoding else {}
        with httpx.Client(timeout=600) as client:
            resp = client.put(f"{rcv.http}/v1/batches/hostile", content=body, headers=headers)
        return {"body": name, "wire_bytes": len(body), "status": resp.status_code,
                "answer": resp.text[:120], "cpu_s": round(cpu_s([pid]) - c0, 3),
                "wall_s": round(time.monotonic() - t0, 3), "vmhwm_mib": round(_vmhwm_mib(pid), 1),
                "baseline_vmhwm_mib": round(base_mib, 1), "rejected_bytes": _rejected_bytes(rcv.data_dir)}
    finally:
        rcv.stop()


def _tcp_newlines(work: Path) -> dict[str, Any]:
    shutil.rmtree(work, ignore_errors=True)
    rcv = Receiver(work / "data", "--tcp-listen", "127.0.0.1:0").start()
    try:
        assert rcv.proc is not None and rcv.tcp is not None
        pid = rcv.proc.pid
        host, port = rcv.tcp.rsplit(":", 1)
        c0 = cpu_s([pid])
        with socket.create_connection((host, int(port))) as s:
            s.sendall(b"\n" * (4 * MIB) + b"web 2026-01-01 end\n")
        wait_for(lambda: rcv.stored_bytes() > 0, 120, "the last TCP line")
        return {"body": "TCP: 4 MiB of \\n", "wire_bytes": 4 * MIB + 19, "status": "-",
                "cpu_s": round(cpu_s([pid]) - c0, 3), "vmhwm_mib": round(_vmhwm_mib(pid), 1),
                "rejected_bytes": _rejected_bytes(rcv.data_dir)}
    finally:
        rcv.stop()


def _members_scaling(work: Path) -> list[dict[str, Any]]:
    member = gzip.compress(b"web 2026-01-01 " + os.urandom(600).hex().encode() + b"\n", 1)
    shutil.rmtree(work, ignore_errors=True)
    rcv = Receiver(work / "data").start()
    out = []
    try:
        assert rcv.proc is not None
        with httpx.Client(timeout=600) as client:
            for n in (1250, 2500, 5000, 10_000):
                body = member * n
                c0 = cpu_s([rcv.proc.pid])
                resp = client.put(f"{rcv.http}/v1/batches/members-{n}", content=body,
                                  headers={"Content-Encoding": "gzip"})
                out.append({"members": n, "wire_bytes": len(body), "status": resp.status_code,
                            "cpu_s": round(cpu_s([rcv.proc.pid]) - c0, 3)})
    finally:
        rcv.stop()
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "spoolagent-bench-hostile")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    rows = [_one(args.work, name, enc, make()) for name, enc, make in _bodies()]
    rows.append(_tcp_newlines(args.work))
    scaling = _members_scaling(args.work)
    print("| body | wire bytes | answer | receiver CPU s | VmHWM MiB (at rest) | _rejected/ bytes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['body']} | {r['wire_bytes']:,} | {r['status']} | {r['cpu_s']} | {r['vmhwm_mib']} "
              f"({r.get('baseline_vmhwm_mib', '-')}) | {r['rejected_bytes']:,} |")
    print("\n| gzip members | wire bytes | answer | receiver CPU s |\n|---|---|---|---|")
    for s in scaling:
        print(f"| {s['members']:,} | {s['wire_bytes']:,} | {s['status']} | {s['cpu_s']} |")
    if args.json:
        args.json.write_text(json.dumps({"bodies": rows, "members": scaling}, indent=1))
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
