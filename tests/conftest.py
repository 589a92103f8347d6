"""Shared fixtures: real receivers and agents as subprocesses on loopback, polling helpers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
LOGHUB = ROOT.parent / "shared" / "data" / "loghub"


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


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child: the repo importable, the venv first on PATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


class ReceiverProc:
    """A real ``spoolreceiver`` (``python -m receiver``) on 127.0.0.1 with an ephemeral port."""

    def __init__(self, data_dir: Path, *args: str, log_path: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
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
        cmd = [sys.executable, "-m", "receiver", "--data-dir", str(self.data_dir),
               "--listen", listen, "--ready-file", str(ready), *self.args]
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
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode

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
             env: dict[str, str] | None = None) -> ReceiverProc:
        d = data_dir or tmp_path / f"data{len(procs)}"
        d.mkdir(parents=True, exist_ok=True)
        r = ReceiverProc(d, *args, env=env)
        procs.append(r)
        return r.start() if start else r

    yield make
    for r in procs:
        r.stop(signal.SIGKILL)


@pytest.fixture
def receiver(receiver_factory: Callable[..., ReceiverProc]) -> ReceiverProc:
    """One real receiver on 127.0.0.1:0 with its own data dir under tmp_path."""
    return receiver_factory()
