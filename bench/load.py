"""The receiver alone: ``python -m receiver`` (1 process, or ``--processes 2``) under load from
``bench.client`` processes (one per receiver process, each its own PROD, as separate agents would
be), fsync on. The rate is all lines over the span from the first client's start to the last one's
end. Imports bench.runners.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.runners import Receiver, child_env, cpu_s, descendants


def receiver_alone(work: Path, lines: int, processes: int, encoding: str,
                   timeout_s: float) -> dict[str, Any]:
    run = work / f"receiver-{processes}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    args = ["--processes", str(processes)] if processes != 1 else []
    rcv = Receiver(run / "data", *args).start()
    try:
        assert rcv.proc is not None
        clients = max(1, processes)
        per_client = lines // clients
        tree = descendants(rcv.proc.pid)
        c0 = cpu_s(tree)
        procs = [subprocess.Popen([sys.executable, "-m", "bench.client", rcv.http, "--lines", str(per_client),
                                   "--encoding", encoding, "--prod", f"bench{i}"],
                                  stdout=subprocess.PIPE, env=child_env(), start_new_session=True)
                 for i in range(clients)]
        results = []
        for p in procs:
            out, _ = p.communicate(timeout=timeout_s)
            results.append(json.loads(out))
        bad = [r for r in results if "error" in r]
        if bad:
            raise RuntimeError(f"client failed: {bad[0]['error']}")
        total = sum(int(r["lines"]) for r in results)
        span = max(r["end"] for r in results) - min(r["start"] for r in results)
        stored = rcv.stored_bytes()
        return {"lines_per_s": total / span, "seconds": span, "lines": total,
                "receiver_cpu_s": cpu_s(tree) - c0, "stored_bytes": stored}
    finally:
        rcv.stop()
