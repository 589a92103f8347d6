"""``python -m bench [--quick] [--rounds N] [--only a,b] [--json FILE]``: every scenario of issue 7
against the real commands on loopback, several rounds, then a table of medians, spreads (min-max)
and each throughput as a ratio to the peers measured in the same run.

Scenarios: e2e (tail -> agent -> receiver -> file), drain (a spooled backlog), receiver1 and
receiver2 (the receiver alone, 1 and 2 processes), cpu (agent at a steady rate, and idle), latency
(p99 file -> receiver file), stats (``spool stats`` on the backlog), peers (rsyslog, syslog-ng),
fleet (bench/fleet.py: 1,000 and 10,000 simulated agents, small-batch capacity, a thundering herd).
Work files go under ``--work`` (default: $TMPDIR/spoolagent-bench); the input is generated there
from the loghub samples, read in place. Imports the bench modules only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import fleet, load, peers, pipeline, runners

SCENARIOS = ("peers", "e2e", "drain", "receiver1", "receiver2", "cpu", "latency", "stats", "fleet")


def _machine() -> dict[str, str]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kib = 0
    return {"cpus": str(os.cpu_count()), "cpu": model, "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
            "kernel": platform.release(), "python": platform.python_version()}


def _default_compression() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from spoolagent.config import SenderSection

    return str(SenderSection().compression)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer lines, shorter runs, 1 round")
    ap.add_argument("--rounds", type=int, help="rounds per scenario (default 3; --quick: 1)")
    ap.add_argument("--lines", type=int, help="lines for e2e/drain/receiver/stats/peers (default 2,000,000)")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    ap.add_argument("--compression", choices=["gzip", "zstd", "none"],
                    help="[sender] compression for the agent (default: the agent's own default)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "spoolagent-bench")
    ap.add_argument("--json", type=Path, help="also write every round's figures here")
    args = ap.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 3)
    lines = args.lines or (500_000 if args.quick else 2_000_000)
    secs = 8.0 if args.quick else 20.0
    only = set(args.only.split(",")) if args.only else set(SCENARIOS)
    unknown = only - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenarios: {sorted(unknown)}")
    compression = args.compression or _default_compression()
    wire = {"none": "identity"}.get(compression, compression)
    work = args.work
    busy = runners.claim_work(work)
    if busy:
        ap.error(busy)
    timeout = max(120.0, lines / 20_000)
    started = time.time()
    results: dict[str, list[dict[str, Any]]] = {}
    plan: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    if "peers" in only:
        for peer in peers.PEERS:
            plan.append((f"peer:{peer.name}", lambda p=peer: peers.run(p, work, lines, timeout)))  # type: ignore[misc]
    if "e2e" in only:
        plan.append(("e2e", lambda: pipeline.e2e(work, lines, compression, timeout)))
    if "drain" in only:
        plan.append(("drain", lambda: pipeline.drain(work, lines, compression, timeout)))
    if "receiver1" in only:
        plan.append(("receiver1", lambda: load.receiver_alone(work, lines, 1, wire, timeout)))
    if "receiver2" in only:
        plan.append(("receiver2", lambda: load.receiver_alone(work, lines, 2, wire, timeout)))
    if "cpu" in only:
        plan.append(("cpu", lambda: pipeline.cpu(work, 1000, secs, secs, compression)))
    if "latency" in only:
        plan.append(("latency", lambda: pipeline.latency(work, 10_000, secs, compression)))
    if "stats" in only:
        plan.append(("stats", lambda: pipeline.spool_stats(work, lines, compression)))
    if "fleet" in only:  # issue 13: 10-line zstd batches, fsync on; bench/fleet.py
        plan += [
            ("fleet1000", lambda: fleet.run(work, 1000, 1.0, secs)),
            ("fleet1000p2", lambda: fleet.run(work, 1000, 1.0, secs, processes=2)),
            ("fleet10k", lambda: fleet.run(work, 10_000, 10.0, max(secs, 30.0), processes=2,
                                           clients=2)),
            ("fleetcap", lambda: fleet.run(work, 3000, 0.5, secs, processes=2, clients=2)),
            ("herd", lambda: fleet.run(work, 5000, 1.0, 0.0, backlog=4, processes=2, clients=2)),
        ]
    print(f"bench: {rounds} round(s), {lines:,} lines, agent compression={compression}, work={work}",
          flush=True)
    # rounds interleave scenarios, so a slow minute of the machine does not land on one of them
    for r in range(rounds):
        for name, fn in plan:
            # the earlier scenarios' files (a 2M-line input is 400 MB, written without fsync)
            # reach the disk now, not while this one measures: 390-780 MB were still dirty when
            # the cpu scenario started, and its figure read 1.3-2.35 % (1.30-1.45 % after a sync)
            os.sync()
            t0 = time.monotonic()
            try:
                out = fn()
            except Exception as exc:  # one failing scenario must not lose the others' figures
                out = {"error": f"{type(exc).__name__}: {exc}"}
            results.setdefault(name, []).append(out)
            shown = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out.items()
                     if not isinstance(v, dict)}
            print(f"  round {r + 1} {name}: {shown} ({time.monotonic() - t0:.1f}s)", flush=True)
    from bench.report import table

    meta = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
            "rounds": rounds, "lines": lines, "compression": compression,
            "duration_s": round(time.time() - started), **_machine(),
            "peers": {p.name: peers.version(p, work) for p in peers.PEERS}}
    print()
    print(table(results, meta))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    return 0


def median(values: list[float]) -> float:
    return statistics.median(values)


if __name__ == "__main__":
    sys.exit(main())
