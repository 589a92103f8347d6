"""The real commands the bench runs: ``python -m receiver``, ``python -m spoolagent run``, and
/proc readings (CPU time and RSS of a process and its descendants).

Every process is started in its own session on 127.0.0.1 (port 0, or a port the OS just handed
out) and stopped by its own pid (or its own process group); nothing is matched by name.
Imports only the standard library.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TAIL = ROOT / "collectors" / "0" / "tail.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def claim_work(work: Path) -> str | None:
    """Create ``work`` and hold its lock for this process's life; an error message if another
    bench holds it (two benches in one work dir would overwrite each other's runs and stop each
    other's processes). Also turns SIGTERM (``timeout``, ``kill``) into SystemExit, so that the
    ``with`` blocks that started a receiver, an agent or a writer stop them on the way out."""
    work.mkdir(parents=True, exist_ok=True)
    lock = os.open(work / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(lock)
        return f"another bench is running in {work} (use --work)"
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(128 + signal.SIGTERM))
    return None


def wait_for(cond: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.005) -> Any:
    """Poll ``cond`` until truthy; raise TimeoutError naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def stop_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> None:
    """Signal the process group ``proc`` leads (started with start_new_session) and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    try:  # anything it left in its session
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Receiver:
    """``python -m receiver`` on 127.0.0.1:0, fsync on (the default)."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.data_dir = data_dir
        self.args = list(args)
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = ""
        self.tcp: str | None = None

    def start(self, timeout_s: float = 30.0) -> Receiver:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        ready = self.data_dir.parent / f".ready-{self.data_dir.name}-{time.monotonic_ns()}.json"
        log = open(self.data_dir.parent / f"receiver-{self.data_dir.name}.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "receiver", "--data-dir", str(self.data_dir), "--listen",
             "127.0.0.1:0", "--ready-file", str(ready), "--log-level", "WARNING", *self.args],
            stdout=log, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
        log.close()
        proc = self.proc

        def _ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"receiver exited {proc.returncode}; see its log in {self.data_dir.parent}")
            return ready.exists()

        wait_for(_ready, timeout_s, "the receiver's ready file")
        info = json.loads(ready.read_text())
        self.http = "http://" + info["http"]
        self.tcp = info.get("tcp")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)

    def stored_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.data_dir.glob("*.dat"))


class Agent:
    """``python -m spoolagent run -c agent.toml`` in ``base``; the bundled tail collector (linked
    from the checkout) follows ``paths`` when given."""

    def __init__(self, base: Path, receiver_url: str, *, paths: list[str] | None = None,
                 prod: str = "bench", compression: str | None = None, extra: str = "") -> None:
        self.base = base
        self.state_dir = base / "state"
        self.proc: subprocess.Popen[bytes] | None = None
        collectors = base / "collectors" / "0"
        collectors.mkdir(parents=True, exist_ok=True)
        sender = f"receivers = [{json.dumps(receiver_url)}]\n"
        if compression:
            sender += f"compression = {json.dumps(compression)}\n"
        tail = ""
        if paths:
            link = collectors / "tail.py"
            if not link.exists():
                link.symlink_to(TAIL)
            tail = (f"[collectors.tail]\npaths = {json.dumps(paths)}\nprod = {json.dumps(prod)}\n"
                    "start_at = \"beginning\"\n")
        self.config = base / "agent.toml"
        self.config.write_text(
            f"[agent]\nid = \"bench\"\ncollectors_dir = \"collectors\"\nstate_dir = \"state\"\n\n"
            f"[spool]\nmax_bytes = \"8GiB\"\n\n[sender]\n{sender}\n[status]\nlisten = \"127.0.0.1:0\"\n\n"
            f"{tail}\n{extra}\n")

    def start(self, timeout_s: float = 60.0) -> Agent:
        rt = self.state_dir / "agent.json"
        if rt.exists():
            rt.unlink()
        log = open(self.base / "agent.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "spoolagent", "run", "-c", str(self.config)],
                                     stdout=log, stderr=subprocess.STDOUT, env=child_env(),
                                     start_new_session=True)
        log.close()
        proc = self.proc

        def _up() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"agent exited {proc.returncode}; see {self.base / 'agent.log'}")
            return rt.exists()

        wait_for(_up, timeout_s, "the agent's runtime file")
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)  # the agent stops its collectors itself
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        stop_group(self.proc, signal.SIGKILL)


# -- /proc ------------------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text[text.rindex(")") + 2:].split()  # fields from 3 (state) on; comm may hold spaces


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(_stat_fields(int(entry))[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_s(pids: list[int]) -> float:
    """utime + stime of ``pids`` (those still alive), in seconds."""
    total = 0
    for pid in pids:
        try:
            f = _stat_fields(pid)
        except OSError:
            continue
        total += int(f[11]) + int(f[12])  # utime, stime (fields 14 and 15)
    return total / CLK_TCK


def wakeups(pids: list[int]) -> int:
    """Voluntary context switches of every thread of ``pids`` (those still alive): each one is a
    sleep the thread chose, so their rate while idle counts the wake-ups of timers and polls."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/status") as f:
                    for line in f:
                        if line.startswith("voluntary_ctxt_switches:"):
                            total += int(line.split()[1])
            except (OSError, ValueError):
                continue
    return total


def rss_mib(pid: int) -> float:
    """VmRSS of ``pid`` in MiB (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().split(b"\0")
    except OSError:
        return "?"
    shown = [a.decode(errors="replace") for a in args if a][:4]
    return " ".join(os.path.basename(a) if "/" in a else a for a in shown)
