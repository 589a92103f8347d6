"""``python -m bench.threads [--rate 1000] [--seconds 20] [--e2e LINES]``: where the CPU of a busy
agent goes, per thread. The ``cpu`` scenario's busy phase (a writer appends ``rate`` lines/s to one file in 10 ms
ticks, the bundled tail follows it, default config), then per thread of the agent and of each
collector: CPU (``/proc/PID/task/TID/schedstat``, nanoseconds, not the 10 ms ticks of ``stat``)
and voluntary context switches (wake-ups), both per second of the window. Thread names come from
``py-spy dump`` when py-spy is installed (Python 3.11 does not name OS threads); else the tid.
``--profile`` also records every process with py-spy during the window and summarises it.
``--e2e LINES`` instead runs the e2e scenario once (LINES lines as fast as they go through) and
gives CPU-seconds per 1M lines per process (agent, its collectors, receiver) and per thread.
Imports bench modules.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import pipeline, runners
from bench.pipeline import _fresh, steady
from bench.profile import Spy, summarize
from bench.runners import comm, descendants

_PYSPY_THREAD = re.compile(r"^Thread (?:0x[0-9A-Fa-f]+|(\d+)) .*?\"([^\"]*)\"")


def _tasks(pid: int) -> dict[int, tuple[int, int]]:
    """tid -> (CPU ns, voluntary context switches), for the threads of ``pid`` still alive."""
    out: dict[int, tuple[int, int]] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                vol = next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches:"))
        except (OSError, ValueError, StopIteration):
            continue
        out[int(tid)] = (ns, vol)
    return out


def _names(pid: int) -> dict[int, str]:
    """tid -> Python thread name, from ``py-spy dump`` (empty without py-spy or ptrace rights)."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    try:
        text = subprocess.run([exe, "dump", "--pid", str(pid), "--native"], capture_output=True,
                              text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    names: dict[int, str] = {}
    tid = None
    for line in text.splitlines():
        m = _PYSPY_THREAD.match(line)
        if m:
            tid = m.group(1)
            if tid is not None:
                names[int(tid)] = m.group(2)
    return names


def measure(work: Path, rate: int, seconds: float, compression: str | None, profile: bool = False) -> str:
    run = _fresh(work / "threads")
    with steady(run, rate, compression) as (agent, _rcv, _writer):
        assert agent.proc is not None
        pids = descendants(agent.proc.pid)
        spies = [Spy(pid, run / f"profile-{pid}.txt", rate=200) for pid in pids] if profile else []
        before = {pid: _tasks(pid) for pid in pids}
        t0 = time.monotonic()
        time.sleep(seconds)
        after = {pid: _tasks(pid) for pid in pids}
        elapsed = time.monotonic() - t0
        for spy in spies:
            spy.stop()
        names = {pid: _names(pid) for pid in pids}
        comms = {pid: comm(pid) for pid in pids}
    out = [f"{rate} lines/s for {elapsed:.1f} s (CPU in % of a core, wake-ups per second)"]
    for pid in pids:
        rows = []
        for tid, (ns1, vol1) in after[pid].items():
            ns0, vol0 = before[pid].get(tid, (0, 0))
            rows.append(((ns1 - ns0) / 1e9 / elapsed * 100, (vol1 - vol0) / elapsed,
                         names[pid].get(tid, "main" if tid == pid else str(tid))))
        total = sum(r[0] for r in rows)
        out.append(f"\n{comms[pid]} (pid {pid}): {total:.2f} %")
        for pct, wake, name in sorted(rows, reverse=True):
            if pct >= 0.005 or wake >= 0.05:
                out.append(f"  {pct:6.2f} %  {wake:7.1f}/s  {name}")
    for spy in spies:
        out.append(f"\n== py-spy, {comms[spy.pid]} (pid {spy.pid}; the profiler's own cost is in the CPU figures "
                   f"above): {spy.out}")
        out.append(summarize(spy.out, top=30))
    return "\n".join(out)


def measure_e2e(work: Path, lines: int, compression: str | None) -> str:
    """One e2e run; CPU-seconds per 1M lines per process and per thread (threads of one name
    summed: sender-0..3 as "sender")."""
    before: dict[str, dict[int, tuple[int, int]]] = {}
    names: dict[str, dict[int, str]] = {}

    def probe(pids: dict[str, int]) -> Any:
        names.update({k: {p: "main", **_names(p)} for k, p in pids.items()})
        before.update({k: _tasks(p) for k, p in pids.items()})
        def end() -> dict[str, dict[int, tuple[int, int]]]:
            after = {k: _tasks(p) for k, p in pids.items()}
            for k, p in pids.items():  # threads started meanwhile (a receiver's pool) are named now
                names[k] = {**_names(p), **names[k]}
            return after

        return end

    result = pipeline.e2e(work, lines, compression, 600, probe=probe)
    out = [f"e2e: {result['lines_per_s']:,.0f} lines/s (CPU-seconds per 1M lines)"]
    for proc, after in result["probe"].items():
        per: dict[str, float] = {}
        for tid, (ns, _vol) in after.items():
            name = re.sub(r"[-_]\d+$", "", names[proc].get(tid, str(tid)))
            per[name] = per.get(name, 0.0) + (ns - before[proc].get(tid, (0, 0))[0]) / 1e9 / lines * 1e6
        out.append(f"{proc}: {sum(per.values()):.3f}")
        out.extend(f"  {cpu:.3f}  {name}" for name, cpu in sorted(per.items(), key=lambda x: -x[1]) if cpu >= 0.005)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rate", type=int, default=1000, help="lines per second (default 1000)")
    ap.add_argument("--seconds", type=float, default=20.0, help="the measured window (default 20)")
    ap.add_argument("--compression", default=None, choices=["zstd", "gzip", "none"],
                    help="the agent's [sender] compression (default: the agent's own default)")
    ap.add_argument("--profile", action="store_true",
                    help="also py-spy record every process during the window (200 Hz) and summarise")
    ap.add_argument("--e2e", type=int, default=0, metavar="LINES",
                    help="instead: one e2e run of LINES lines, CPU-seconds per 1M lines per process and thread")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "spoolagent-bench-threads")
    args = ap.parse_args(argv)
    busy = runners.claim_work(args.work)
    if busy:
        ap.error(busy)
    if args.e2e:
        print(measure_e2e(args.work, args.e2e, args.compression))
        return 0
    print(measure(args.work, args.rate, args.seconds, args.compression, args.profile))
    return 0


if __name__ == "__main__":
    sys.exit(main())
