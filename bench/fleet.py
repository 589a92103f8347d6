"""A fleet on one receiver: ``python -m bench.fleet --agents 1000 --interval 1 --seconds 20``.

N simulated agents, each on its own keep-alive connection (asyncio, a minimal HTTP/1.1 client),
PUT zstd batches of ``--lines`` realistic loghub lines (``PROD DATE agent=A seq=S text``) with fresh
ids at a steady pace (one every ``--interval`` s, starts spread over the first interval; an agent
has one batch in flight, as the real one per receiver), retry a ``503`` after its ``Retry-After``,
and ``--restart`` of them per batch "restart": send, drop the connection unanswered, reconnect and
resend the same id. ``--backlog B`` instead gives each agent B batches to send back to back, all
agents at once (the thundering herd after an outage). The receiver is started here (fsync on,
``--processes``) unless ``--url`` is given.

``--clients K`` runs the agents from K processes (one Python process tops out near 2,000
requests/s). Reports acknowledged batches/s and lines/s, p50/p99/max ack latency (from when a batch was due to
its 2xx), 503s, other errors, the receiver's CPU (% of one core) and peak RSS (all its processes),
then checks the data files line by line: every acknowledged line stored once, nothing twice.
Imports bench.data, bench.runners and the standard library plus zstandard.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import resource
import shutil
import statistics
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zstandard

from bench.data import line_bodies
from bench.runners import Receiver, claim_work, cpu_s, descendants, rss_mib

_IO_TIMEOUT_S = 120.0


@dataclass
class Tally:
    acked: int = 0
    acked_lines: int = 0
    duplicates: int = 0
    shed: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    acked_seqs: set[tuple[int, int]] = field(default_factory=set)
    sent_seqs: set[tuple[int, int]] = field(default_factory=set)
    cpu_s: float = 0.0


class _Conn:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, batch_id: str, body: bytes, extra: str = "") -> None:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        head = (f"PUT /v1/batches/{batch_id} HTTP/1.1\r\nHost: {self.host}\r\n{extra}"
                f"Content-Encoding: zstd\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        await self.writer.drain()

    async def answer(self) -> tuple[int, dict[str, str]]:
        assert self.reader is not None
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), _IO_TIMEOUT_S)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


def _batch(agent: int, seq0: int, n: int, prod: str, date: str, texts: list[bytes],
           zc: zstandard.ZstdCompressor) -> bytes:
    raw = b"".join(b"%s %s agent=%05d seq=%07d %s\n" % (prod.encode(), date.encode(), agent, s,
                                                          texts[(agent * 7919 + s) % len(texts)])
                   for s in range(seq0, seq0 + n))
    return zc.compress(raw)


async def _agent(i: int, a: argparse.Namespace, host: str, port: int, texts: list[bytes],
                 tally: Tally, stop_at: float, run_id: str) -> None:
    zc = zstandard.ZstdCompressor(level=3)
    conn = _Conn(host, port)
    prod = f"fleet{i % a.prods:02d}"
    date = time.strftime("%Y-%m-%d")
    rnd = random.Random(i)
    due = time.monotonic() + (0 if a.backlog else rnd.uniform(0, a.interval))
    batches = 0
    summary_at, summary = -1.0, ""
    try:
        while True:
            if a.backlog:
                if batches >= a.backlog:
                    return
            else:
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if time.monotonic() >= stop_at:
                    return
            seq0 = batches * a.lines
            body = _batch(i, seq0, a.lines, prod, date, texts, zc)
            batch_id = f"{run_id}-{i}-{batches}"
            tally.sent_seqs.update((i, s) for s in range(seq0, seq0 + a.lines))
            restart = rnd.random() < a.restart
            extra = ""
            if a.identity:  # the real agent's identity headers (docs/protocol.md): the agent table's input
                now = time.monotonic()
                if now - summary_at >= 1.0:  # as the agent: the spool summary is read at most once a second
                    summary_at, summary = now, f"lines={a.lines}, bytes={len(body)}, oldest-s=0.050, dead=0"
                extra = (f"Spoolagent-Id: sim-{i:05d}\r\nSpoolagent-Version: 0.1.0\r\n"
                         f"Spoolagent-Host: sim-{i:05d}.bench\r\nSpoolagent-Spool: {summary}\r\n")
            while True:
                try:
                    await conn.send(batch_id, body, extra)
                    if restart:  # the agent "restarts": its in-flight batch is sent again
                        restart = False
                        conn.close()
                        continue
                    status, headers = await conn.answer()
                except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
                    tally.errors[type(exc).__name__] += 1
                    conn.close()
                    await asyncio.sleep(rnd.uniform(0.5, 1.5))
                    continue
                if status in (200, 201):
                    break
                if status == 503:
                    tally.shed += 1
                    await asyncio.sleep(float(headers.get("retry-after", "1")))
                    continue
                tally.errors[f"http{status}"] += 1
                await asyncio.sleep(1.0)
            tally.acked += 1
            tally.acked_lines += a.lines
            tally.duplicates += status == 200
            tally.latencies.append(time.monotonic() - due)
            tally.acked_seqs.update((i, s) for s in range(seq0, seq0 + a.lines))
            batches += 1
            due += a.interval
            if a.backlog:
                due = time.monotonic()
    finally:
        conn.close()


def _check(data_dir: Path, tally: Tally) -> dict[str, int]:
    seen: Counter[tuple[int, int]] = Counter()
    for path in data_dir.glob("fleet*.dat"):
        with open(path, "rb") as f:
            for line in f:
                fields = line.split(b" ", 2)  # stored without PROD DATE: agent=NNNNN seq=NNNNNNN
                seen[(int(fields[0][6:]), int(fields[1][4:]))] += 1
    twice = sum(1 for n in seen.values() if n > 1)
    lost = len(tally.acked_seqs - seen.keys())
    unknown = len(seen.keys() - tally.sent_seqs)
    return {"lost": lost, "twice": twice, "unknown": unknown, "lost_or_twice": lost + twice + unknown,
            "lines_on_disk": sum(seen.values())}


async def _simulate(a: argparse.Namespace, url: str, ids: range, run_id: str,
                    deadline: float) -> Tally:
    """Agents ``ids`` until the wall-clock ``deadline`` (or their backlog is sent)."""
    _raise_fd_limit()
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    texts = line_bodies(150)
    tally = Tally()
    stop_at = time.monotonic() + (deadline - time.time())
    await asyncio.gather(*(_agent(i, a, host, port, texts, tally, stop_at, run_id) for i in ids))
    tally.cpu_s = time.process_time()
    return tally


def _client(a: argparse.Namespace, url: str, ids: range, run_id: str, deadline: float) -> Tally:
    return asyncio.run(_simulate(a, url, ids, run_id, deadline))


def _merge(tallies: list[Tally]) -> Tally:
    out = Tally()
    for t in tallies:
        out.acked += t.acked
        out.acked_lines += t.acked_lines
        out.duplicates += t.duplicates
        out.shed += t.shed
        out.errors.update(t.errors)
        out.latencies += t.latencies
        out.acked_seqs |= t.acked_seqs
        out.sent_seqs |= t.sent_seqs
        out.cpu_s += t.cpu_s
    return out


def _fleet(a: argparse.Namespace, url: str, pids: list[int], data_dir: Path | None) -> dict[str, Any]:
    """Run the fleet from ``a.clients`` processes (the simulator needs CPU too), then report."""
    run_id = f"f{time.time_ns():x}"
    started = time.monotonic()
    deadline = time.time() + a.seconds
    cpu0 = cpu_s(pids)
    rss_peak = 0.0
    ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(a.clients, mp_context=ctx) as pool:
        futures = [pool.submit(_client, a, url, range(k, a.agents, a.clients), run_id, deadline)
                   for k in range(a.clients)]
        while not all(f.done() for f in futures):
            wait(futures, timeout=1.0)
            rss_peak = max(rss_peak, sum(rss_mib(p) for p in pids))
        tally = _merge([f.result() for f in futures])
    elapsed = time.monotonic() - started
    cpu = cpu_s(pids) - cpu0
    lat = sorted(tally.latencies) or [0.0]
    out: dict[str, Any] = {
        "agents": a.agents, "offered_batches_s": round(a.agents / a.interval, 1) if not a.backlog else None,
        "seconds": round(elapsed, 1), "acked_batches": tally.acked,
        "acked_batches_s": round(tally.acked / elapsed, 1),
        "acked_lines_s": round(tally.acked_lines / elapsed), "duplicates": tally.duplicates,
        "p50_ms": round(1000 * statistics.median(lat), 1),
        "p99_ms": round(1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))], 1),
        "max_ms": round(1000 * lat[-1], 1), "shed_503": tally.shed,
        "errors": dict(tally.errors),
        "receiver_cpu_pct": round(100 * cpu / elapsed, 1) if pids else None,
        "receiver_rss_mib": round(rss_peak, 1) if pids else None,
        "client_cpu_pct": round(100 * tally.cpu_s / elapsed, 1),
    }
    out.update(_rounds(url))
    if data_dir is not None:
        out.update(_check(data_dir, tally))
    return out


def _rounds(url: str) -> dict[str, Any]:
    """Group-commit figures from the receiver's /metrics (totals over its processes)."""
    import urllib.request

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    values: Counter[str] = Counter()
    for line in text.splitlines():
        if not line.startswith("#") and " " in line:
            name, _, value = line.rpartition(" ")
            values[name.split("{")[0]] += float(value)
    rounds = values["spoolreceiver_commit_round_batches_count"]
    return {"rounds": int(rounds),
            "batches_per_round": round(values["spoolreceiver_commit_round_batches_sum"] / max(rounds, 1), 1),
            "fsyncs": int(values["spoolreceiver_fsyncs_total"]),
            "shed_by_receiver": int(values["spoolreceiver_requests_shed_total"])}


def run(work: Path, agents: int, interval: float, seconds: float, *, lines: int = 10,
        processes: int = 1, backlog: int = 0, restart: float = 0.01, prods: int = 8,
        clients: int = 1, receiver_args: tuple[str, ...] = (), identity: bool = False) -> dict[str, Any]:
    """One fleet run against a fresh receiver in ``work``; the report as a dict."""
    a = argparse.Namespace(agents=agents, interval=interval, seconds=seconds, lines=lines,
                           backlog=backlog, restart=restart, prods=prods, clients=clients, identity=identity)
    _raise_fd_limit()
    data_dir = work / f"fleet-{time.monotonic_ns()}"
    receiver = Receiver(data_dir, "--processes", str(processes), *receiver_args).start()
    try:
        assert receiver.proc is not None
        pids = descendants(receiver.proc.pid)
        return _fleet(a, receiver.http, pids, data_dir)
    finally:
        receiver.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between an agent's batches")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--lines", type=int, default=10, help="lines per batch")
    ap.add_argument("--backlog", type=int, default=0, help="batches each agent sends back to back")
    ap.add_argument("--restart", type=float, default=0.01, help="share of batches resent after a 'restart'")
    ap.add_argument("--prods", type=int, default=8)
    ap.add_argument("--processes", type=int, default=1, help="receiver processes")
    ap.add_argument("--clients", type=int, default=1, help="simulator processes sharing the agents")
    ap.add_argument("--identity", action="store_true",
                    help="send the agents' identity headers (the receiver's agent table is then kept)")
    ap.add_argument("--url", help="an already running receiver (no CPU/RSS, no file check)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "spoolagent-bench")
    ap.add_argument("receiver_args", nargs="*", help="extra receiver flags, after --")
    args = ap.parse_args(argv)
    if args.url:
        _raise_fd_limit()
        out = _fleet(args, args.url, [], None)
    else:
        busy = claim_work(args.work)
        if busy:
            ap.error(busy)
        out = run(args.work, args.agents, args.interval, args.seconds, lines=args.lines,
                  processes=args.processes, backlog=args.backlog, restart=args.restart,
                  prods=args.prods, clients=args.clients, receiver_args=tuple(args.receiver_args),
                  identity=args.identity)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
