"""``spoolagent demo``: a receiver and an agent on loopback with the bundled collectors and a
sample log that grows, and a live view of the counts until Ctrl-C.

Everything lives under one directory (default ``./spoolagent-demo``): ``agent.toml``, the agent's
``state/`` (the spool and the tailer's checkpoint), the tailed ``logs/app.log`` and the receiver's
``data/`` where the ``{prod}_{date}.dat`` files land. Runs both programs as real subprocesses
(``python -m receiver``, ``python -m spoolagent run``), so killing the receiver by hand is a real
outage. Run it again in the same directory and it resumes: every line of ``logs/app.log`` ends up
in ``data/`` exactly once.

Stopping delivers first: the writer stops, the demo waits (bounded) until the receiver's files hold
every line written, then stops the agent with SIGTERM and the receiver after it. Reads the others'
state over HTTP and from files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

from spoolagent import runtime
from spoolagent.cli.output import EXIT_INTERRUPTED, EXIT_OK, EXIT_RUNTIME, console, print_json
from spoolagent.config import bundled_collectors_dir

_SAMPLE = [
    "GET /api/v1/orders/{n} 200 {ms}ms user={u}",
    "POST /api/v1/cart 201 {ms}ms user={u} items={k}",
    "WARN cache miss key=session:{n} backend=redis-{k}",
    "ERROR payment declined order={n} code=51 user={u}",
    "INFO worker-{k} processed job={n} in {ms}ms",
]
_DEMO_PROD = "demo"  # the tailed log's PROD: its lines land in data/demo_{date}.dat
_DEMO_FILES = _DEMO_PROD + "_"
_START_TIMEOUT_S = 20.0
_DELIVER_TIMEOUT_S = 20.0


def _metrics(url: str) -> dict[str, float] | None:
    """``url``'s Prometheus samples summed by name (labels dropped); None if it does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url + "/metrics", timeout=1) as resp:
            text = resp.read().decode()
    except (OSError, ValueError):
        return None
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + float(s.value)
    return out


def _count_lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


class _StoredLines:
    """Lines in ``data/*.dat``, counted incrementally (only new bytes are read): the truth about
    what is stored, whatever happens to the receiver process and its counters."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self._seen: dict[Path, tuple[int, int]] = {}  # file -> (bytes read, lines in them)

    def count(self, prefix: str = "") -> int:
        """Lines stored in every ``.dat`` file, or in those whose name starts with ``prefix``."""
        for p in self.data_dir.glob("*.dat"):
            offset, lines = self._seen.get(p, (0, 0))
            try:
                with open(p, "rb") as f:
                    f.seek(offset)
                    chunk = f.read()
            except FileNotFoundError:
                continue
            # count only complete lines: an append may be under way
            end = chunk.rfind(b"\n") + 1
            self._seen[p] = (offset + end, lines + chunk.count(b"\n", 0, end))
        return sum(lines for p, (_, lines) in self._seen.items() if p.name.startswith(prefix))

    def files(self) -> list[tuple[str, int]]:
        """(file name, lines) of every data file seen so far."""
        return sorted((p.name, lines) for p, (_, lines) in self._seen.items())


class _Writer(threading.Thread):
    """Appends sample lines to the tailed log at ``rate`` lines/s; ``written`` counts this run's."""

    def __init__(self, path: Path, rate: float, first_n: int) -> None:
        super().__init__(daemon=True, name="demo-writer")
        self.path, self.rate, self.first_n, self.written = path, rate, first_n, 0
        self.stop = threading.Event()

    def run(self) -> None:
        rnd = random.Random()
        next_s = time.monotonic()
        with open(self.path, "a", buffering=1) as f:
            while not self.stop.wait(max(0.0, next_s - time.monotonic())):
                next_s += 1.0 / self.rate
                t = rnd.choice(_SAMPLE).format(n=self.first_n + self.written, ms=rnd.randint(1, 900),
                                               u=rnd.randint(1, 99), k=rnd.randint(1, 9))
                f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {t}\n")
                self.written += 1


def _write_config(base: Path, receiver_http: str) -> Path:
    cfg = base / "agent.toml"
    cfg.write_text(f"""# written by `spoolagent demo`; docs/configuration.md explains every key
[agent]
id = "demo"
collectors_dir = "{bundled_collectors_dir()}"
state_dir = "state"
stop_grace_s = 3

[batch]
max_wait_ms = 200

[sender]
receivers = ["http://{receiver_http}"]
max_backoff_s = 5

[status]
listen = "127.0.0.1:0"

[collectors.tail]
paths = ["{base / 'logs'}/*.log"]
prod = "{_DEMO_PROD}"
""" + ("" if _has_journal() else """
[collectors.journald]
# no systemd journal on this host (no journal files in /run/log/journal or /var/log/journal)
enabled = false
"""))
    return cfg


def _has_journal() -> bool:
    """Whether this host keeps a system journal (journald's ``MACHINE-ID/*.journal`` files). The
    bundled journald collector runs where there is one; without one (a container, a minimal
    host) it would only exit 13, and the demo would greet a newcomer with "not collecting"."""
    return any(next(Path(d).glob("*/*.journal"), None) is not None
               for d in ("/run/log/journal", "/var/log/journal"))


def _command(name: str, module: str) -> str:
    """How the operator runs ``name`` from this install: the script next to this Python, else -m."""
    script = Path(sys.executable).parent / name
    return str(script) if script.exists() else f"{sys.executable} -m {module}"


def _wait_for_file(path: Path, proc: subprocess.Popen[bytes], what: str, log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; see {log}")
        try:
            info: dict[str, Any] = json.loads(path.read_text())
            return info
        except (FileNotFoundError, ValueError):
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not start within {_START_TIMEOUT_S:.0f}s; see {log}")


def _stop(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> bool:
    """SIGTERM ``proc`` (it stops its own children), SIGKILL its session after ``timeout_s``.
    True if it stopped by itself."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout_s)
        return True
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
        return False


def _stop_restarted(ready: Path, timeout_s: float = 15.0) -> bool:
    """SIGTERM the receiver the operator restarted with the printed command (its ready file has
    its pid), so Ctrl-C leaves nothing of the demo running; True if there was one."""
    try:
        pid = int(json.loads(ready.read_text())["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if b"receiver" not in cmdline:  # the pid was reused by something else
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.05)
    ready.unlink(missing_ok=True)
    return True


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # SIGTERM/SIGHUP: clean up like Ctrl-C, never leave the children behind


def run_demo(args: argparse.Namespace) -> int:
    from rich.live import Live
    from rich.table import Table

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    con = console(soft_wrap=True)  # long paths: let the terminal wrap, never cut
    base = Path(args.dir).resolve()
    for d in ("logs", "data", "state"):
        (base / d).mkdir(parents=True, exist_ok=True)
    app_log, data_dir = base / "logs" / "app.log", base / "data"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    ready = base / "receiver.ready.json"
    ready.unlink(missing_ok=True)
    restarted = base / "receiver.restarted.json"
    restarted.unlink(missing_ok=True)
    runtime_file = runtime.path(base / "state")
    runtime_file.unlink(missing_ok=True)  # left by an agent that was killed
    # new sessions: a Ctrl-C reaches only the demo, which then stops them in order
    with open(base / "receiver.log", "ab") as out:
        receiver = subprocess.Popen(
            [sys.executable, "-m", "receiver", "--data-dir", str(data_dir), "--listen", "127.0.0.1:0",
             "--ready-file", str(ready)], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    agent: subprocess.Popen[bytes] | None = None
    before = _count_lines(app_log)  # lines earlier runs wrote: they are delivered too
    writer = _Writer(app_log, args.rate, before)
    stored = _StoredLines(data_dir)
    code = 0
    try:
        recv_http = str(_wait_for_file(ready, receiver, "the receiver", base / "receiver.log")["http"])
        cfg = _write_config(base, recv_http)
        with open(base / "agent.log", "ab") as out:
            agent = subprocess.Popen([sys.executable, "-m", "spoolagent", "run", "--config", str(cfg)],
                                     stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        status_url = str(_wait_for_file(runtime_file, agent, "the agent", base / "agent.log")["status_url"])
        writer.start()
        agent_cmd, recv_cmd = _command("spoolagent", "spoolagent"), _command("spoolreceiver", "receiver")
        con.print(f"[bold]spoolagent demo[/] in {base}")
        con.print(f"  writing   logs/app.log, {args.rate:g} lines/s, tailed into data/{_DEMO_FILES}<date>.dat")
        con.print(f"  receiver  pid {receiver.pid}, http://{recv_http}")
        con.print(f"  agent     pid {agent.pid}, spool in state/, {status_url}/metrics")
        con.print(f"  [bold]files land in {data_dir}/[/]")
        con.print(f"  look:     {agent_cmd} status -c {cfg}")
        con.print(f"  outage:   kill {receiver.pid}   (the spool grows; nothing is lost)")
        # the ready file tells the demo's Ctrl-C which receiver the operator started by hand
        con.print(f"  restart:  {recv_cmd} --data-dir {data_dir} --listen {recv_http} --ready-file {restarted}")
        con.print("  [dim]Ctrl-C stops: the writer first, then the agent once it has delivered, then the receiver[/]\n")

        def counts() -> dict[str, Any]:
            a, r = _metrics(status_url), _metrics(f"http://{recv_http}")
            return {"written": before + writer.written, "agent": a is not None, "receiver": r is not None,
                    "spooled": (a or {}).get("spoolagent_lines_spooled_total", 0.0),
                    "sent": (a or {}).get("spoolagent_lines_sent_total", 0.0),
                    "in_spool": (a or {}).get("spoolagent_spool_lines", 0.0),
                    "spool_bytes": (a or {}).get("spoolagent_spool_bytes", 0.0),
                    "retries": (a or {}).get("spoolagent_batches_retried_total", 0.0),
                    "stored": stored.count(), "stored_demo": stored.count(_DEMO_FILES)}

        def updown(up: bool) -> str:
            return "[green]up[/]" if up else "[red]down[/]"

        def view() -> Table:
            c = counts()
            t = Table(title=f"{time.strftime('%H:%M:%S')}   agent {updown(c['agent'])}   "
                            f"receiver {updown(c['receiver'])}", title_justify="left")
            for col in ("written", "spooled", "sent", "stored", "in spool", "spool bytes", "retries"):
                t.add_column(col, justify="right")
            t.add_row(*(f"{c[k]:,.0f}" for k in ("written", "spooled", "sent", "stored", "in_spool",
                                                  "spool_bytes", "retries")))
            files = stored.files()
            t.caption = "data/: " + (", ".join(f"{n} ({k:,})" for n, k in files) if files else "(no file yet)")
            t.caption_justify = "left"
            return t

        def line() -> str:
            c = counts()
            return (f"{time.strftime('%H:%M:%S')} written {c['written']} spooled {c['spooled']:.0f} "
                    f"sent {c['sent']:.0f} stored {c['stored']} (demo {c['stored_demo']}) in_spool {c['in_spool']:.0f} "
                    f"agent {'up' if c['agent'] else 'down'} receiver {'up' if c['receiver'] else 'down'}")

        deadline = time.monotonic() + args.duration if args.duration else None
        try:
            if con.is_terminal:
                with Live(view(), console=con, refresh_per_second=4, auto_refresh=False) as live:
                    while not (deadline and time.monotonic() > deadline):
                        time.sleep(0.5)
                        live.update(view(), refresh=True)
            else:
                while not (deadline and time.monotonic() > deadline):
                    time.sleep(1.0)
                    con.print(line())
        except KeyboardInterrupt:
            pass
        writer.stop.set()
        writer.join()
        code = _deliver(con, counts, agent, receiver)
    except RuntimeError as exc:
        con.print(f"[red]demo failed:[/] {exc}")
        code = EXIT_RUNTIME
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
    finally:
        writer.stop.set()
        # the agent first: it sends what it can to a receiver that is still up
        for p in (agent, receiver):
            if p is not None and not _stop(p):
                code = code or EXIT_RUNTIME
        if _stop_restarted(restarted):
            con.print("stopped the receiver restarted by hand")
    written, total = before + writer.written, stored.count(_DEMO_FILES)
    files = stored.files()
    summary = {"dir": str(base), "written": written, "written_this_run": writer.written,
               "stored_lines": total, "stored_all_lines": stored.count(),
               "files": [str(data_dir / f) for f, _ in files]}
    con.print(f"\nstopped. {written} lines written to logs/app.log, {total} stored in data/{_DEMO_FILES}*.dat")
    for f, n in files:
        con.print(f"  {data_dir / f}  {n} lines")
    if total < written:
        con.print(f"  {written - total} lines wait in the spool (or the log): run the demo again to deliver them")
    con.print(f"logs: {base / 'agent.log'}, {base / 'receiver.log'}")
    if args.json:
        print_json(summary)
    return code


def _deliver(con: Any, counts: Any, agent: subprocess.Popen[bytes], receiver: subprocess.Popen[bytes]) -> int:
    """Wait (bounded; Ctrl-C skips) until everything written is stored. EXIT_OK, or EXIT_RUNTIME
    if it was not."""
    c = counts()
    if c["stored_demo"] >= c["written"]:
        return EXIT_OK
    if not c["receiver"] or agent.poll() is not None:
        con.print("not waiting for delivery: the receiver or the agent is down; the spool keeps the lines")
        return EXIT_OK
    con.print(f"delivering the last {c['written'] - c['stored_demo']:.0f} lines (Ctrl-C to stop now) ...")
    deadline = time.monotonic() + _DELIVER_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            c = counts()
            if c["stored_demo"] >= c["written"]:
                return EXIT_OK
            time.sleep(0.1)
    except KeyboardInterrupt:
        return EXIT_OK
    con.print(f"[yellow]not delivered within {_DELIVER_TIMEOUT_S:.0f}s:[/] stored {c['stored_demo']} of "
              f"{c['written']}")
    return EXIT_RUNTIME


def add_demo_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo", help="run a receiver and an agent on loopback and watch logs flow",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  spoolagent demo\n  spoolagent demo --dir /tmp/sa-demo --rate 200 --duration 30\n"
               "  spoolagent demo --duration 10 --json | tail -1 | jq .stored_lines\n\n"
               "While it runs, kill the receiver (its pid is printed) and watch the spool grow; start it\n"
               "again with the printed command and every line arrives, once. Run the demo again in the\n"
               "same --dir and it resumes where it stopped.")
    p.add_argument("--dir", default="spoolagent-demo", help="where everything goes (default ./spoolagent-demo)")
    p.add_argument("--rate", type=float, default=20.0, help="sample log lines per second (default 20)")
    p.add_argument("--duration", type=float, default=0, help="stop after this many seconds (default: until Ctrl-C)")
    p.add_argument("--json", action="store_true", help="print a JSON summary as the last line")
    p.set_defaults(func=run_demo)
