"""Scenarios that run the whole pipeline: tail collector -> agent -> receiver -> file.

- ``e2e``: the pipeline is up and idle (one warm-up line delivered), then the input file's lines are
  appended to the tailed file at once; the clock runs from the append until the receiver's data
  file holds every byte.
- ``drain``: a spool holding a backlog (built once by the real ``Spool.put`` in batches cut as the
  batcher cuts them, then copied per round) is drained by an agent; the clock runs from the first
  byte in the receiver's file to the last, and the time from the agent's launch is kept too.
- ``stats``: ``python -m spoolagent spool stats --json`` on that backlog (the whole command).
- ``cpu``: the agent and its collectors at a steady rate and idle: utime+stime from /proc, RSS.
- ``latency``: lines stamped with the wall clock written at a steady rate; the receiver's file is
  followed and each line's delay from its write to its arrival there is taken; p50/p99.

Each function runs one round and returns a dict of figures. Imports bench.data, bench.runners.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.data import LINE_BYTES, input_file, line_bodies, parse_stamp, stamped_line
from bench.runners import Agent, Receiver, child_env, comm, cpu_s, descendants, rss_mib, wait_for, wakeups

WARMUP_LINE = b"seq=warmup " + b"w" * (LINE_BYTES - 12) + b"\n"


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def _append(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, open(dst, "r+b") as fout:
        size = os.fstat(fin.fileno()).st_size
        base = os.fstat(fout.fileno()).st_size  # copy_file_range refuses O_APPEND
        done = 0
        while done < size:
            n = os.copy_file_range(fin.fileno(), fout.fileno(), size - done, done, base + done)
            if n == 0:
                break
            done += n


def e2e(work: Path, lines: int, compression: str | None, timeout_s: float,
        probe: Callable[[dict[str, int]], Callable[[], Any]] | None = None) -> dict[str, Any]:
    """tail -> agent -> receiver -> file. ``probe`` is called with the pids ({"agent", "receiver",
    and each collector by name}) as the lines start, and what it returns when they are all in;
    that result goes under "probe"."""
    src = input_file(work, lines)
    run = _fresh(work / "e2e")
    log = run / "app.log"
    log.write_bytes(WARMUP_LINE)
    rcv = Receiver(run / "data").start()
    agent = Agent(run / "agent", rcv.http, paths=[str(log)], compression=compression)
    try:
        agent.start()
        assert agent.proc is not None and rcv.proc is not None
        wait_for(lambda: rcv.stored_bytes() >= LINE_BYTES, 60, "the warm-up line")
        tree = descendants(agent.proc.pid)
        cpu0_agent, cpu0_rcv = cpu_s(tree), cpu_s(descendants(rcv.proc.pid))
        pids = {"agent": agent.proc.pid, "receiver": rcv.proc.pid,
                **{comm(p): p for p in tree if p != agent.proc.pid}}
        probed = probe(pids) if probe is not None else None
        total = LINE_BYTES + src.stat().st_size
        t0 = time.monotonic()
        _append(src, log)
        wait_for(lambda: rcv.stored_bytes() >= total, timeout_s, f"{lines} lines in the receiver's file")
        elapsed = time.monotonic() - t0
        probed = probed() if probed is not None else None
        cpu_agent = cpu_s(tree) - cpu0_agent
        cpu_rcv = cpu_s(descendants(rcv.proc.pid)) - cpu0_rcv
        if rcv.stored_bytes() != total:
            raise RuntimeError(f"receiver holds {rcv.stored_bytes()} bytes, expected {total}")
        return {"lines_per_s": lines / elapsed, "seconds": elapsed,
                "agent_cpu_s": cpu_agent, "receiver_cpu_s": cpu_rcv,
                **({"probe": probed} if probe is not None else {})}
    finally:
        agent.stop()
        rcv.stop()


# -- backlog -------------------------------------------------------------------------------------

def build_backlog(work: Path, lines: int, compression: str, batch_bytes: int = 512 * 1024) -> Path:
    """A state dir whose spool holds ``lines`` input lines in batches of ``batch_bytes`` (the
    batcher's default cut), written by the real Spool. Cached per (lines, compression)."""
    state = work / f"backlog-{lines}-{compression}"
    done = state / "built"
    if done.exists():
        return state
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from spoolagent.spool.queue import Spool, WhenFull

    shutil.rmtree(state, ignore_errors=True)
    state.mkdir(parents=True)
    spool = Spool(state, max_bytes=1 << 40, when_full=WhenFull.BLOCK, compression=compression,
                  stopping=threading.Event())
    per_batch = max(1, batch_bytes // LINE_BYTES)
    today = time.strftime("%Y-%m-%d").encode()
    prefix = b"bench " + today + b" "
    with open(input_file(work, lines), "rb") as f:
        while True:
            block = f.read(per_batch * LINE_BYTES)
            if not block:
                break
            recs = [prefix + line for line in block.split(b"\n")[:-1]]
            spool.put("tail", recs, None)
    spool.close()
    done.write_text("ok")
    return state


def drain(work: Path, lines: int, compression: str, timeout_s: float) -> dict[str, Any]:
    backlog = build_backlog(work, lines, compression)
    run = _fresh(work / "drain")
    agent_base = run / "agent"
    (agent_base / "state").mkdir(parents=True)
    for name in os.listdir(backlog):
        if name.startswith("spool.db"):
            shutil.copy2(backlog / name, agent_base / "state" / name)
    rcv = Receiver(run / "data").start()
    agent = Agent(agent_base, rcv.http, compression=compression)
    total = lines * LINE_BYTES
    try:
        launched = time.monotonic()
        agent.start()
        assert agent.proc is not None
        first = wait_for(lambda: rcv.stored_bytes() > 0 and time.monotonic(), 60, "the first batch")
        at_first = rcv.stored_bytes()
        cpu0 = cpu_s([agent.proc.pid])
        wait_for(lambda: rcv.stored_bytes() >= total, timeout_s, f"{lines} drained lines")
        end = time.monotonic()
        cpu = cpu_s([agent.proc.pid]) - cpu0
        return {"lines_per_s": (total - at_first) / LINE_BYTES / (end - first),
                "seconds_from_launch": end - launched, "agent_cpu_s": cpu}
    finally:
        agent.stop()
        rcv.stop()


def spool_stats(work: Path, lines: int, compression: str) -> dict[str, Any]:
    state = build_backlog(work, lines, compression)
    cmd = [sys.executable, "-m", "spoolagent", "spool", "stats", "--json", "--state-dir", str(state)]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=120)
    elapsed = time.monotonic() - t0
    if r.returncode != 0 or json.loads(r.stdout).get("ready_lines") != lines:
        raise RuntimeError(f"spool stats failed rc={r.returncode}: {r.stdout[-300:]} {r.stderr[-300:]}")
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import spoolagent.cli.commands"], env=child_env(), check=True)
    startup = time.monotonic() - t0
    return {"seconds": elapsed, "interpreter_and_import_s": startup}


# -- steady writers ----------------------------------------------------------------------------------

class _Writer(threading.Thread):
    """Appends ``rate`` lines/s to ``path`` in 10 ms ticks; stamped lines when ``stamped``."""

    def __init__(self, path: Path, rate: int, stamped: bool) -> None:
        super().__init__(daemon=True)
        self.path, self.rate, self.stamped = path, rate, stamped
        self.stop_event = threading.Event()
        self.written = 0
        self.bodies = line_bodies()

    def run(self) -> None:
        tick = 0.01
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        start = time.monotonic()
        n = 0
        try:
            while not self.stop_event.is_set():
                due = int((time.monotonic() - start) * self.rate)
                if due > self.written:
                    out = []
                    for i in range(self.written, due):
                        body = self.bodies[i % len(self.bodies)]
                        if self.stamped:
                            out.append(stamped_line(i, time.time_ns(), body))
                        else:
                            out.append(b"seq=%09d %s\n" % (i, body))
                    os.write(fd, b"".join(out))
                    self.written = due
                n += 1
                time.sleep(max(0.0, start + n * tick - time.monotonic()))
        finally:
            os.close(fd)


@contextlib.contextmanager
def steady(work: Path, rate: int, compression: str | None) -> Iterator[tuple[Agent, Receiver, _Writer]]:
    """A receiver, an agent whose tail follows one file, and a writer appending ``rate`` lines/s
    to it, 2 s into the steady state; all stopped on exit."""
    log = work / "app.log"
    log.write_bytes(WARMUP_LINE)
    rcv = Receiver(work / "data").start()
    agent = Agent(work / "agent", rcv.http, paths=[str(log)], compression=compression)
    writer = _Writer(log, rate, stamped=False)
    try:
        agent.start()
        wait_for(lambda: rcv.stored_bytes() >= LINE_BYTES, 60, "the warm-up line")
        writer.start()
        time.sleep(2.0)  # steady state
        yield agent, rcv, writer
    finally:
        writer.stop_event.set()
        if writer.is_alive():
            writer.join()
        agent.stop()
        rcv.stop()


def cpu(work: Path, rate: int, seconds: float, idle_seconds: float,
        compression: str | None) -> dict[str, Any]:
    with steady(_fresh(work / "cpu"), rate, compression) as (agent, rcv, writer):
        assert agent.proc is not None
        tree = descendants(agent.proc.pid)
        c0, a0, t0 = cpu_s(tree), cpu_s([agent.proc.pid]), time.monotonic()
        time.sleep(seconds)
        busy = (cpu_s(tree) - c0) / (time.monotonic() - t0)
        busy_agent = (cpu_s([agent.proc.pid]) - a0) / (time.monotonic() - t0)
        rss = {comm(p): rss_mib(p) for p in tree}
        rss_total = sum(rss_mib(p) for p in tree)
        writer.stop_event.set()
        writer.join()
        wait_for(lambda: rcv.stored_bytes() >= LINE_BYTES * (1 + writer.written), 60, "the last lines")
        time.sleep(2.0)  # let the last batch, checkpoint and timers settle
        tree = descendants(agent.proc.pid)
        c0, a0, t0 = cpu_s(tree), cpu_s([agent.proc.pid]), time.monotonic()
        w0, wa0 = wakeups(tree), wakeups([agent.proc.pid])
        time.sleep(idle_seconds)
        idle_s = time.monotonic() - t0
        idle = (cpu_s(tree) - c0) / idle_s
        idle_agent = (cpu_s([agent.proc.pid]) - a0) / idle_s
        wake = (wakeups(tree) - w0) / idle_s
        wake_agent = (wakeups([agent.proc.pid]) - wa0) / idle_s
        return {"busy_core_pct": 100 * busy, "idle_core_pct": 100 * idle,
                "busy_agent_only_pct": 100 * busy_agent, "idle_agent_only_pct": 100 * idle_agent,
                "idle_wakeups_per_s": wake, "idle_wakeups_agent_only_per_s": wake_agent,
                "agent_rss_mib": rss_mib(agent.proc.pid), "rss_total_mib": rss_total,
                "rss_by_process": rss}


def latency(work: Path, rate: int, seconds: float, compression: str | None) -> dict[str, Any]:
    run = _fresh(work / "latency")
    log = run / "app.log"
    log.write_bytes(WARMUP_LINE)
    rcv = Receiver(run / "data").start()
    agent = Agent(run / "agent", rcv.http, paths=[str(log)], compression=compression)
    delays: list[int] = []
    try:
        agent.start()
        wait_for(lambda: rcv.stored_bytes() >= LINE_BYTES, 60, "the warm-up line")
        dat = wait_for(lambda: next(iter(rcv.data_dir.glob("*.dat")), None), 10, "the data file")
        writer = _Writer(log, rate, stamped=True)
        with open(dat, "rb") as f:
            f.seek(0, os.SEEK_END)
            pending = b""
            writer.start()
            end = time.monotonic() + seconds
            while time.monotonic() < end or len(delays) < writer.written:
                if time.monotonic() > end:
                    writer.stop_event.set()
                if time.monotonic() > end + 30:
                    raise RuntimeError(f"only {len(delays)} of {writer.written} stamped lines arrived")
                chunk = f.read()
                now = time.time_ns()
                if not chunk:
                    time.sleep(0.002)
                    continue
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for line in lines:
                    ts = parse_stamp(line)
                    if ts > 0:
                        delays.append(now - ts)
        writer.stop_event.set()
        writer.join()
        skip = rate  # the first second: the pipeline settles into the rate
        kept = sorted(delays[skip:]) or sorted(delays)
        return {"p50_ms": kept[len(kept) // 2] / 1e6, "p99_ms": kept[int(len(kept) * 0.99)] / 1e6,
                "max_ms": kept[-1] / 1e6, "lines": len(delays)}
    finally:
        agent.stop()
        rcv.stop()
