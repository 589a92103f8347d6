"""``spoolagent demo``: a receiver and an agent on loopback with the bundled collectors and a
sample log that grows, and a live view of the counts until Ctrl-C.

Everything lives under one directory (default ``./spoolagent-demo``): ``agent.toml``, the agent's
``state/`` (the spool), the tailed ``logs/app.log`` and the receiver's ``data/`` where the
``{prod}_{date}.dat`` files land. Runs both programs as real subprocesses (``python -m receiver``,
``python -m spoolagent run``), so stopping the receiver by hand is a real outage. Imports only
config (for the bundled collectors dir); reads the others' state over HTTP and from files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from spoolagent.config import bundled_collectors_dir

_SAMPLE = [
    "GET /api/v1/orders/{n} 200 {ms}ms user={u}",
    "POST /api/v1/cart 201 {ms}ms user={u} items={k}",
    "WARN cache miss key=session:{n} backend=redis-{k}",
    "ERROR payment declined order={n} code=51 user={u}",
    "INFO worker-{k} processed job={n} in {ms}ms",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metrics(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            for line in resp.read().decode().splitlines():
                if line and not line.startswith("#"):
                    name, _, value = line.rpartition(" ")
                    try:
                        out[name] = out.get(name, 0.0) + float(value)
                    except ValueError:
                        pass
    except OSError:
        pass
    return out


class _Writer(threading.Thread):
    """Appends sample lines to the tailed log at ``rate`` lines/s."""

    def __init__(self, path: Path, rate: float, stop: threading.Event) -> None:
        super().__init__(daemon=True, name="demo-writer")
        self.path, self.rate, self.stop, self.written = path, rate, stop, 0

    def run(self) -> None:
        rnd = random.Random(7)
        with open(self.path, "a", buffering=1) as f:
            while not self.stop.wait(1.0 / self.rate):
                t = rnd.choice(_SAMPLE).format(n=self.written, ms=rnd.randint(1, 900), u=rnd.randint(1, 99),
                                               k=rnd.randint(1, 9))
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {t}\n")
                self.written += 1


def _write_config(base: Path, receiver_port: int, status_port: int) -> Path:
    cfg = base / "agent.toml"
    cfg.write_text(f"""# written by `spoolagent demo`; see docs/configuration.md for every key
[agent]
id = "demo"
collectors_dir = "{bundled_collectors_dir()}"
state_dir = "state"
stop_grace_s = 3

[batch]
max_wait_ms = 200

[sender]
receivers = ["http://127.0.0.1:{receiver_port}"]
max_backoff_s = 5

[status]
listen = "127.0.0.1:{status_port}"

[collectors.tail]
paths = ["{base / 'logs'}/*.log"]
prod = "demo"
""")
    return cfg


def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live
    from rich.table import Table

    con = Console()
    base = Path(args.dir).resolve()
    for d in ("logs", "data", "state"):
        (base / d).mkdir(parents=True, exist_ok=True)
    rport, sport = _free_port(), _free_port()
    cfg = _write_config(base, rport, sport)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    recv_cmd = [sys.executable, "-m", "receiver", "--data-dir", str(base / "data"), "--listen", f"127.0.0.1:{rport}"]
    recv_log = open(base / "receiver.log", "ab")
    agent_log = open(base / "agent.log", "ab")
    receiver = subprocess.Popen(recv_cmd, stdout=recv_log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    (base / "receiver.pid").write_text(str(receiver.pid))
    agent = subprocess.Popen([sys.executable, "-m", "spoolagent", "run", "--config", str(cfg)], stdout=agent_log,
                             stderr=subprocess.STDOUT, env=env, start_new_session=True)
    stop = threading.Event()
    writer = _Writer(base / "logs" / "app.log", args.rate, stop)
    writer.start()
    con.print(f"[bold]spoolagent demo[/] in {base}")
    con.print(f"  receiver  pid {receiver.pid} on http://127.0.0.1:{rport}  -> files land in [bold]{base / 'data'}[/]")
    con.print(f"  agent     pid {agent.pid}, spool in {base / 'state'}, status http://127.0.0.1:{sport}/status")
    con.print(f"  tailing   {base / 'logs' / 'app.log'} ({args.rate:g} lines/s)")
    con.print(f"  try:      spoolagent status -c {cfg}   |   spoolagent spool stats -c {cfg}")
    con.print(f"  outage:   kill {receiver.pid}   then restart it with:  {' '.join(recv_cmd[2:])} "
              f"(as `spoolreceiver ...`)")
    con.print("  Ctrl-C stops the demo\n")
    deadline = time.monotonic() + args.duration if args.duration else None

    def view() -> Table:
        a = _metrics(f"http://127.0.0.1:{sport}/metrics")
        r = _metrics(f"http://127.0.0.1:{rport}/metrics")
        t = Table(title=f"{time.strftime('%H:%M:%S')}  receiver {'[green]up[/]' if r else '[red]down[/]'}  "
                        f"agent {'[green]up[/]' if a else '[red]down[/]'}")
        for col in ("written", "read", "spooled", "sent", "stored", "spool depth", "spool bytes"):
            t.add_column(col, justify="right")
        files = sorted(p.name for p in (base / "data").glob("*.dat"))
        t.caption = "files: " + (", ".join(files) if files else "(none yet)")
        t.add_row(str(writer.written), f"{a.get('spoolagent_lines_read_total', 0):.0f}",
                  f"{a.get('spoolagent_lines_spooled_total', 0):.0f}", f"{a.get('spoolagent_lines_sent_total', 0):.0f}",
                  f"{r.get('spoolreceiver_lines_stored_total', 0):.0f}" if r else "-",
                  "{:.0f}".format(a.get('spoolagent_spool_batches{state="ready"}', 0)),
                  f"{a.get('spoolagent_spool_bytes', 0):.0f}")
        return t

    code = 0
    try:
        if con.is_terminal:
            with Live(view(), console=con, refresh_per_second=2) as live:
                while not (deadline and time.monotonic() > deadline):
                    time.sleep(1)
                    live.update(view())
        else:
            while not (deadline and time.monotonic() > deadline):
                time.sleep(2)
                con.print(view())
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        for p in (agent, receiver):
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in (agent, receiver):
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                code = 1
        recv_log.close()
        agent_log.close()
    stored = sum(len(p.read_bytes().splitlines()) for p in (base / "data").glob("*.dat"))
    files = sorted(str(p) for p in (base / "data").glob("*.dat"))
    summary = {"dir": str(base), "written": writer.written, "stored_lines": stored, "files": files}
    con.print(f"\nstopped. {writer.written} lines written, {stored} lines stored in:")
    for f in files:
        con.print(f"  {f}")
    con.print(f"logs: {base / 'agent.log'}, {base / 'receiver.log'}")
    if args.json:
        print(json.dumps(summary))
    return code


def add_demo_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="run a receiver and an agent on loopback and watch logs flow",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  spoolagent demo\n  spoolagent demo --dir /tmp/sa-demo --rate 200 --duration 30\n\n"
               "While it runs, kill the receiver (its pid is printed) to see the spool grow; start it "
               "again and every line arrives once.")
    p.add_argument("--dir", default="spoolagent-demo", help="where everything goes (default ./spoolagent-demo)")
    p.add_argument("--rate", type=float, default=20.0, help="sample log lines per second (default 20)")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds (default: until Ctrl-C)")
    p.add_argument("--json", action="store_true", help="print a JSON summary at the end")
    p.set_defaults(func=run_demo)
