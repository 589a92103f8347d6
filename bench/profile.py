"""``python -m bench.profile [e2e|drain|receiver|cpu] [--lines N]``: one run of a scenario with py-spy
attached to every process of the pipeline (agent, its collectors, receiver), then a summary per
process: the functions with the most samples, by own time and inclusive (threads merged; idle
samples left out, so the shares are of CPU time). The raw collapsed stacks are kept in the work dir
for flame graphs. Needs py-spy (``pip install py-spy``) and ptrace rights. Imports bench modules.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench import load, pipeline
from bench.runners import comm, descendants


class Spy:
    """py-spy record on one pid, collapsed stacks to ``out``, until stop()."""

    def __init__(self, pid: int, out: Path, rate: int = 100) -> None:
        self.pid, self.out = pid, out
        exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        self.proc = subprocess.Popen([exe, "record", "-p", str(pid), "-f", "raw", "-o", str(out), "-r", str(rate),
                                      "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def summarize(path: Path, top: int = 18) -> str:
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"  (no profile at {path})"
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        frames = [f for f in stack.split(";") if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    out = [f"  {total} samples"]
    out.append("  own time:")
    out += [f"    {100 * c / total:5.1f}%  {f}" for f, c in own.most_common(top)]
    out.append("  inclusive:")
    out += [f"    {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("scenario", choices=["e2e", "drain", "receiver", "cpu"])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--compression", default="zstd", choices=["zstd", "gzip", "none"],
                    help="the agent's [sender] compression (default zstd, as the agent's own default)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "spoolagent-bench-profile")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    spies: list[Spy] = []
    stop = threading.Event()

    def attach() -> None:
        # attach to every python process the scenario starts (agent, collectors, receiver)
        seen: set[int] = set()
        while not stop.is_set():
            for pid in descendants(os.getpid()):
                name = comm(pid)
                if pid in seen or pid == os.getpid() or "py-spy" in name or "python" not in name:
                    continue
                if "spoolagent" in name or "receiver" in name or "tail.py" in name:
                    seen.add(pid)
                    tag = name.split()[-1].replace("/", "_") if "tail" in name else name.split()[2]
                    spies.append(Spy(pid, args.work / f"{args.scenario}-{tag}-{pid}.txt"))
            stop.wait(0.05)

    watcher = threading.Thread(target=attach, daemon=True)
    watcher.start()
    try:
        if args.scenario == "e2e":
            result = pipeline.e2e(args.work, args.lines, args.compression, 600)
        elif args.scenario == "cpu":  # 10 s at 1,000 lines/s, then 10 s idle
            result = pipeline.cpu(args.work, 1000, 10.0, 10.0, args.compression)
        elif args.scenario == "drain":
            result = pipeline.drain(args.work, args.lines, args.compression, 600)
        else:
            wire = {"none": "identity"}.get(args.compression, args.compression)
            result = load.receiver_alone(args.work, args.lines, 1, wire, 600)
    finally:
        stop.set()
        time.sleep(0.1)
        for s in spies:
            s.stop()
    print(f"{args.scenario}: {result}")
    for s in spies:
        print(f"\n== {s.out.name}")
        print(summarize(s.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
