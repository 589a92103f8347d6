"""A long soak with faults every few seconds: ``python -m bench.soak --minutes 30`` (or
``python bench/soak.py``), run by hand; its figures go into docs/reliability.md.

One receiver, one agent sending through the TCP fault proxy (tests/reliability/tcpfault.py), and
four sources: a checkpointing collector (CKPT), two tailed files (one rotated by rename) and a raw
collector (RAW). Every ``--fault-every`` seconds (jittered) one event: agent SIGKILL, agent SIGTERM
and restart, receiver SIGKILL and restart, or a proxy fault burst (refuse, reset mid-body, reset
after the request, delay, black-hole, throttle) for 1-3 s; between events the proxy also resets
or delays ~5% of the requests. When the writers are done the faults stop, everything settles and
the checker counts every line. Exit status 0 when the checkpointing sources are exactly once and
the raw source lost nothing twice and no more than its window per agent kill.

Reuses the test suite's process wrappers and checker (tests.conftest, tests.reliability) rather
than copies of them.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import AgentProc, ReceiverProc  # noqa: E402
from tests.reliability.rig import Workload, first_tokens, raw_window_lines  # noqa: E402
from tests.reliability.tcpfault import Fault, TcpFaultProxy  # noqa: E402

BURSTS = [Fault.REFUSE, Fault.RESET_BODY, Fault.RESET_AFTER_REQUEST, Fault.DELAY, Fault.BLACKHOLE,
          Fault.THROTTLE]
BATCH_MAX_LINES = 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--rate", type=int, default=400, help="lines/s per source (default %(default)s)")
    p.add_argument("--fault-every", type=float, default=4.0, help="seconds between events")
    p.add_argument("--seed", type=int, default=20261126)
    p.add_argument("--work", type=Path, help="work dir (default: a new temp dir, kept)")
    p.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = p.parse_args(argv)
    rnd = random.Random(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="spoolagent-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    total = int(args.rate * args.minutes * 60)
    print(f"soak: {args.minutes} min, {total} lines per source, work dir {work}", flush=True)

    w = Workload(work / "w")
    w.ckpt("ck", total, every=100, delay=100 / args.rate)
    w.raw("rw", total, chunk=50, delay=50 / args.rate)
    w.tail("tl-a", total, rate=args.rate, rotate_every=max(1000, total // 20))
    w.tail("tl-b", total, rate=args.rate)
    data = work / "data"
    data.mkdir(exist_ok=True)
    receiver = ReceiverProc(data, log_path=work / "receiver.log").start()
    proxy = TcpFaultProxy(receiver.url, delay_s=0.5, throttle_bps=256 * 1024, blackhole_s=4)
    agent = AgentProc(work / "agent", [proxy.url], batch=f"max_lines = {BATCH_MAX_LINES}\nmax_wait_ms = 100",
                      sender="max_backoff_s = 2\ntimeout_s = 3", extra_toml=w.toml())
    w.install(agent)
    events: Counter[str] = Counter()
    t0 = time.monotonic()
    try:
        agent.start()
        w.start()
        first_tokens(agent, w)  # the first run of a checkpointing collector has its own window
        background = {Fault.PASS: 95.0, Fault.RESET_AFTER_REQUEST: 2.0, Fault.RESET_BODY: 1.5,
                      Fault.DELAY: 1.5}
        proxy.mix(rnd, background)
        next_report = t0 + 60
        while not w.finished():
            time.sleep(rnd.uniform(0.5, 1.5) * args.fault_every)
            event = rnd.choice(["agent_kill", "agent_kill", "agent_term", "receiver_kill", "proxy",
                                "proxy"])
            if event == "agent_kill":
                agent.kill()
                agent.start()
            elif event == "agent_term":
                agent.stop()
                agent.start()
            elif event == "receiver_kill":
                receiver.kill()
                time.sleep(rnd.uniform(0, 2))
                receiver.start()
            else:
                fault = rnd.choice(BURSTS)
                event = f"proxy_{fault.value}"
                proxy.set(fault)
                time.sleep(rnd.uniform(1, 3))
                proxy.mix(rnd, background)
            events[event] += 1
            if time.monotonic() >= next_report:
                next_report += 60
                print(f"  {(time.monotonic() - t0) / 60:.1f} min: written={w.written()} "
                      f"events={sum(events.values())}", flush=True)
        proxy.set(Fault.PASS)
        w.settle(agent, data, timeout_s=600)
        report = w.verify(data)
        agent_kills = events["agent_kill"]
        window = raw_window_lines(60, BATCH_MAX_LINES, 512 * 1024)
        exact = [s for s in report.sources if s != "rw"]
        ok = True
        try:
            report.assert_exactly_once(*exact)
            report.assert_at_most_once("rw", agent_kills * window)
        except AssertionError as exc:
            ok = False
            print(exc)
        figures = {
            "minutes": round((time.monotonic() - t0) / 60, 1), "seed": args.seed, "rate": args.rate,
            "events": dict(events), "events_total": sum(events.values()),
            "proxy_requests": dict(proxy.counts),
            "agent_restarts": agent_kills + events["agent_term"],
            "sources": {s: {"expected": r.expected, "received": r.received, "missing": len(r.missing),
                            "duplicated": r.duplicated, "reordered": r.reordered,
                            "corrupted": r.corrupted} for s, r in report.sources.items()},
            "raw_window_per_kill": window, "unparsable": report.unparsable, "ok": ok, "work": str(work),
        }
        print(report)
        print(json.dumps(figures, indent=1))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=1))
        agent.stop()
        return 0 if ok else 1
    finally:
        w.stop()
        proxy.close()
        agent.stop(signal.SIGKILL)
        receiver.stop()


if __name__ == "__main__":
    sys.exit(main())
