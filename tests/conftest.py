"""Shared fixtures: real receivers and agents as subprocesses on loopback, polling helpers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from spoolagent.protocol import Records

ROOT = Path(__file__).resolve().parent.parent
LOGHUB = ROOT.parent / "shared" / "data" / "loghub"


def run_of(lines: Sequence[bytes]) -> tuple[bytes, int]:
    """Lines as the collector's reader hands them over (``on_lines(run, n)``): joined, each ending
    in a newline, and their count."""
    return b"".join(line + b"\n" for line in lines), len(lines)


def lines_of(records: Records | Sequence[bytes]) -> list[bytes]:
    """A batch's lines without their newlines (a batcher puts Records)."""
    if not isinstance(records, Records):
        return list(records)
    joined = records.joined()
    assert joined.count(b"\n") == records.lines == sum(records.prods.values())
    return joined.split(b"\n")[:-1] if joined else []


def wait_until(cond: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.02,
               what: str = "") -> Any:
    """Poll ``cond`` until it returns a truthy value; fail the test after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or cond}")
        time.sleep(interval_s)


# Every process the suite starts inherits this mark (child_env copies os.environ), so the
# session's end can find the ones left behind, re-parented to pid 1 or not.
_SESSION_MARK = "SPOOLAGENT_TEST_SESSION"


def _marked_processes(mark: str) -> dict[int, str]:
    """pid -> command line of every other process whose environment carries ``mark``."""
    needle = f"{_SESSION_MARK}={mark}".encode()
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace").strip()
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


@pytest.fixture(scope="session", autouse=True)
def no_process_left_behind() -> Iterator[None]:
    """Fails the session if a process it started outlives it (and kills what it finds)."""
    mark = f"{os.getpid()}-{time.monotonic_ns()}"
    os.environ[_SESSION_MARK] = mark
    yield
    # a process signalled by the last teardown may still be on its way out
    deadline = time.monotonic() + 10.0
    while (left := _marked_processes(mark)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"processes the tests started outlived the session (killed now): {left}"


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child: the repo importable, the venv first on PATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


def stop_process(proc: subprocess.Popen[bytes] | None, sig: int, timeout_s: float, *, group: bool) -> int | None:
    """Send ``sig`` (to the process group with ``group``), wait; SIGKILL the group past ``timeout_s``."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            (os.killpg if group else os.kill)(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    return proc.returncode


class ReceiverProc:
    """A real ``spoolreceiver`` (``python -m receiver``) on 127.0.0.1 with an ephemeral port."""

    def __init__(self, data_dir: Path, *args: str, log_path: Path | None = None,
                 env: dict[str, str] | None = None, prefix: list[str] | None = None) -> None:
        self.data_dir = data_dir
        self.prefix = prefix or []  # e.g. ["prlimit", "--nofile=256:256", "--"]
        self.args = list(args)
        self.log_path = log_path or data_dir.parent / f"receiver-{data_dir.name}.log"
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.http: str = ""
        self.tcp: str | None = None
        self.port: int | None = None

    def start(self, timeout_s: float = 20.0, port: int | None = None) -> ReceiverProc:
        ready = self.data_dir.parent / f".ready-{self.data_dir.name}-{time.monotonic_ns()}.json"
        listen = f"127.0.0.1:{port if port is not None else (self.port or 0)}"
        cmd = [*self.prefix, *self.command(), "--listen", listen, "--ready-file", str(ready), *self.args]
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     env=child_env(**self.extra_env), start_new_session=True)
        log.close()

        def _ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"receiver exited {self.proc.returncode}: {self.log_text()}")
            return ready.exists()

        wait_until(_ready, timeout_s, what="receiver ready file")
        info = json.loads(ready.read_text())
        self.http = "http://" + info["http"]
        self.tcp = info.get("tcp")
        self.port = int(info["http"].rsplit(":", 1)[1])
        return self

    def command(self) -> list[str]:
        """The receiver's command line before ``--listen``; an ingest node has no data dir."""
        return [sys.executable, "-m", "receiver", "--data-dir", str(self.data_dir)]

    @property
    def url(self) -> str:
        return self.http

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-5000:]
        except FileNotFoundError:
            return ""

    def send_signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int | None:
        return stop_process(self.proc, sig, timeout_s, group=True)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def read_lines(self) -> dict[str, list[bytes]]:
        """Every ``.dat`` file in the data dir, as {file name: [lines without newline]}."""
        out: dict[str, list[bytes]] = {}
        for p in sorted(self.data_dir.glob("*.dat")):
            out[p.name] = p.read_bytes().split(b"\n")[:-1]
        return out


@pytest.fixture
def receiver_factory(tmp_path: Path) -> Iterator[Callable[..., ReceiverProc]]:
    procs: list[ReceiverProc] = []

    def make(*args: str, data_dir: Path | None = None, start: bool = True,
             env: dict[str, str] | None = None, prefix: list[str] | None = None) -> ReceiverProc:
        d = data_dir or tmp_path / f"data{len(procs)}"
        d.mkdir(parents=True, exist_ok=True)
        r = ReceiverProc(d, *args, env=env, prefix=prefix)
        procs.append(r)
        return r.start() if start else r

    yield make
    for r in procs:
        r.stop(signal.SIGKILL)


@pytest.fixture
def receiver(receiver_factory: Callable[..., ReceiverProc]) -> ReceiverProc:
    """One real receiver on 127.0.0.1:0 with its own data dir under tmp_path."""
    return receiver_factory()


class AgentProc:
    """A real ``spoolagent run`` (``python -m spoolagent run -c agent.toml``) in its own session.

    ``base`` holds ``agent.toml``, ``state/`` (the spool) and ``collectors/<interval>/``.
    ``status`` is the status endpoint's URL, read from ``state/agent.json`` once it is up.
    """

    def __init__(self, base: Path, receivers: list[str], *, extra_toml: str = "",
                 batch: str = "max_wait_ms = 50", sender: str = "max_backoff_s = 1",
                 spool: str = "", agent: str = "stop_grace_s = 3", agent_id: str = "test") -> None:
        self.base = base
        self.state_dir = base / "state"
        self.collectors_dir = base / "collectors"
        self.collectors_dir.mkdir(parents=True, exist_ok=True)
        self.config = base / "agent.toml"
        self.log_path = base / "agent.log"
        recv = ", ".join(json.dumps(r) for r in receivers)
        self.config.write_text(
            f"[agent]\nid = {json.dumps(agent_id)}\ncollectors_dir = \"collectors\"\nstate_dir = \"state\"\n{agent}\n\n"
            f"[spool]\n{spool}\n\n[batch]\n{batch}\n\n[sender]\nreceivers = [{recv}]\n{sender}\n\n"
            f"[status]\nlisten = \"127.0.0.1:0\"\n\n{extra_toml}\n")
        self.proc: subprocess.Popen[bytes] | None = None
        self.status = ""

    def add_collector(self, name: str, source: str, interval: int = 0) -> Path:
        d = self.collectors_dir / str(interval)
        d.mkdir(parents=True, exist_ok=True)
        p = d / name
        p.write_text(source)
        p.chmod(0o755)
        return p

    def start(self, timeout_s: float = 20.0) -> AgentProc:
        rt = self.state_dir / "agent.json"
        if rt.exists():
            rt.unlink()  # left by a killed agent
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "spoolagent", "run", "-c", str(self.config)],
                                     stdout=log, stderr=subprocess.STDOUT, env=child_env(),
                                     start_new_session=True)
        log.close()

        def _up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited {self.proc.returncode}: {self.log_text()}")
            return rt.exists()

        wait_until(_up, timeout_s, what="agent runtime file")
        self.status = json.loads(rt.read_text())["status_url"]
        return self

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-8000:]
        except FileNotFoundError:
            return ""

    def get_status(self) -> dict[str, Any]:
        import urllib.request

        with urllib.request.urlopen(self.status + "/status", timeout=5) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int | None:
        # the agent only, not its process group: it stops its collectors itself
        return stop_process(self.proc, sig, timeout_s, group=False)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def cli(self, *args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
        """Run ``spoolagent ARGS -c agent.toml`` and return the completed process."""
        return subprocess.run([sys.executable, "-m", "spoolagent", *args, "-c", str(self.config)],
                              capture_output=True, text=True, env=child_env(), timeout=timeout_s)


@pytest.fixture
def agent_factory(tmp_path: Path) -> Iterator[Callable[..., AgentProc]]:
    agents: list[AgentProc] = []

    def make(receivers: list[str], name: str = "", **kw: Any) -> AgentProc:
        a = AgentProc(tmp_path / (name or f"agent{len(agents)}"), receivers, **kw)
        agents.append(a)
        return a

    yield make
    for a in agents:
        a.stop(signal.SIGKILL)
        if a.proc is not None:
            try:
                os.killpg(a.proc.pid, signal.SIGKILL)  # and anything left in its session
            except ProcessLookupError:
                pass


def count_lines(data_dir: Path, pattern: str = "*.dat") -> int:
    return sum(p.read_bytes().count(b"\n") for p in data_dir.glob(pattern))


@contextlib.contextmanager
def mounted_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` at ``where`` (a small disk to fill); skips the test without root."""
    where.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)
