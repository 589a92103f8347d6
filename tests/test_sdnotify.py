"""systemd readiness: the receiver and the agent say READY=1 (and STOPPING=1) over $NOTIFY_SOCKET,
as the shipped units' Type=notify expects, with no dependency."""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import AgentProc, ReceiverProc, wait_until


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    try:
        yield sock, path
    finally:
        sock.close()


def _messages(sock: socket.socket, into: list[str]) -> list[str]:
    while True:
        try:
            into.append(sock.recv(4096).decode())
        except BlockingIOError:
            return into


@pytest.mark.parametrize("processes", ["1", "2"])
def test_receiver_notifies_ready_then_stopping(receiver_factory: Callable[..., ReceiverProc],
                                               notify_socket: tuple[socket.socket, str], processes: str) -> None:
    sock, path = notify_socket
    r = receiver_factory("--processes", processes, env={"NOTIFY_SOCKET": path})
    got: list[str] = []
    wait_until(lambda: any("READY=1" in m for m in _messages(sock, got)), 20, what="READY=1")
    ready = next(m for m in got if "READY=1" in m)
    assert r.proc is not None and f"MAINPID={r.proc.pid}" in ready
    r.stop(signal.SIGTERM)
    wait_until(lambda: any("STOPPING=1" in m for m in _messages(sock, got)), 20, what="STOPPING=1")


def test_agent_notifies_ready(receiver: ReceiverProc, agent_factory: Callable[..., AgentProc],
                              notify_socket: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch) -> None:
    sock, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)  # child_env() copies the environment
    a = agent_factory([receiver.url]).start()
    got: list[str] = []
    wait_until(lambda: any("READY=1" in m for m in _messages(sock, got)), 20, what="READY=1")
    a.stop(signal.SIGTERM)
    wait_until(lambda: any("STOPPING=1" in m for m in _messages(sock, got)), 20, what="STOPPING=1")
