"""Scenarios: the agent's disk full (its spool on a small tmpfs) and the receiver's disk full.

Agent: collectors are slowed (their puts fail and are retried; the pipe fills), nothing is
corrupted (a SIGKILL while full, then a restart: the spool is not moved aside), and shipping
resumes when space returns. Receiver: 503 until space returns, then everything exactly once.
"""

from __future__ import annotations

import errno
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import AgentProc, ReceiverProc, mounted_tmpfs, wait_until
from tests.reliability.rig import Workload, elapsed, first_tokens, raw_window_lines, scale
from tests.reliability.tcpfault import Fault, TcpFaultProxy


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    with mounted_tmpfs(tmp_path / "tmpfs", "8m") as mnt:
        yield mnt


def _fill(path: Path) -> int:
    """Write zeros to ``path`` until the file system is full; returns the bytes written."""
    n = 0
    with open(path, "wb", buffering=0) as f:
        block = bytes(64 * 1024)
        while True:
            try:
                n += f.write(block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
        for size in (4096, 512, 1):  # the last few bytes too
            try:
                while True:
                    n += f.write(bytes(size))
            except OSError:
                pass
    return n


def _workload(base: Path, n: int) -> Workload:
    w = Workload(base)
    w.ckpt("ck", n, every=100, delay=0.003)
    w.raw("rw", n, chunk=50, delay=0.003)
    w.tail("tl", n, rate=2000)
    return w


def test_agent_disk_full_slows_collectors_corrupts_nothing_and_resumes(
        receiver: ReceiverProc, agent_factory: Callable[..., AgentProc], tmp_path: Path, tmpfs: Path) -> None:
    n = scale(15_000, 100_000)
    w = _workload(tmp_path / "w", n)
    with TcpFaultProxy(receiver.url) as proxy:
        a = agent_factory([proxy.url], batch="max_lines = 500\nmax_wait_ms = 50",
                          sender="max_backoff_s = 1\ntimeout_s = 2", extra_toml=w.toml())
        a.state_dir.symlink_to(tmpfs)  # the spool on the small file system
        w.install(a)
        t0 = time.monotonic()
        proxy.set(Fault.REFUSE)  # nothing drains: the spool only grows
        a.start()
        w.start()
        first_tokens(a, w)
        wait_until(lambda: a.get_status()["lines"]["spooled"] >= 2000, 30, what="some lines spooled")
        filler = tmpfs / "filler"
        _fill(filler)
        wait_until(lambda: a.get_status()["spool_errors"] >= 2, 30, what="spool writes failing")
        spooled = a.get_status()["lines"]["spooled"]
        time.sleep(1.5)  # a stall can only be seen over time
        st = a.get_status()
        assert st["lines"]["spooled"] <= spooled + 1000, "collectors were not slowed by the full disk"
        assert st["spool"]["dropped_lines"] == 0
        a.kill()  # SIGKILL while the disk is full
        filler.unlink()  # space returns
        a.start()
        st = a.get_status()
        assert st["spool_corrupt"]["moved_total"] == 0 and not st["spool_corrupt"]["kept_files"], st
        proxy.set(Fault.PASS)
        w.settle(a, receiver.data_dir)
        rep = w.verify(receiver.data_dir)
        print(f"agent disk full: s={elapsed(t0)} spool_errors={st['spool_errors']}\n{rep}")
        rep.assert_exactly_once("ck", "tl")
        rep.assert_at_most_once("rw", raw_window_lines(60, 500, 512 * 1024))
        assert a.stop() == 0


def test_receiver_disk_full_503_then_everything_exactly_once(
        receiver_factory: Callable[..., ReceiverProc], agent_factory: Callable[..., AgentProc],
        tmp_path: Path, tmpfs: Path) -> None:
    n = scale(15_000, 100_000)
    r = receiver_factory(data_dir=tmpfs / "data")
    w = _workload(tmp_path / "w", n)
    a = agent_factory([r.url], batch="max_lines = 500\nmax_wait_ms = 50",
                      sender="max_backoff_s = 1\ntimeout_s = 2", extra_toml=w.toml())
    w.install(a)
    t0 = time.monotonic()
    a.start()
    w.start()
    wait_until(lambda: w.received(r.data_dir) >= 1000, 30, what="some lines stored")
    filler = tmpfs / "filler"
    _fill(filler)
    wait_until(lambda: a.get_status()["sender"]["consecutive_failures"] >= 2, 30,
               what="the receiver failing (503: disk full)")
    failing = a.get_status()["sender"]["consecutive_failures"]
    assert "503" in r.log_text() or "SQLITE_FULL" in r.log_text() or "No space" in r.log_text()
    assert r.proc is not None and r.proc.poll() is None, "the receiver died of a full disk"
    filler.unlink()
    w.settle(a, r.data_dir)
    rep = w.verify(r.data_dir)
    print(f"receiver disk full: s={elapsed(t0)} consecutive_failures={failing}\n{rep}")
    rep.assert_exactly_once()
    assert a.stop(signal.SIGTERM) == 0
