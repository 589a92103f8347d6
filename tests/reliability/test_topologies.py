"""Scenarios: two agents shipping to one receiver with ``--processes 2`` (the same data files
written by both worker processes), and the local date changing at midnight in the middle of a
batch.

Midnight without changing the clock: libfaketime breaks Python 3.11's ``time.sleep`` (EINVAL from
its clock_nanosleep hook), so the agent and its collectors run with a ``TZ`` whose local midnight
is a few seconds away. The date is decided where it lives (the batcher stamps a raw collector's
lines with the agent's local date per read; tail takes the local date when it reads; a protocol
collector prints its own), by the real clock and the real C library.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from spoolagent.spool.file import SpoolFile
from tests.conftest import AgentProc, ReceiverProc, wait_until
from tests.reliability.checker import _LINE
from tests.reliability.rig import Workload, elapsed, first_tokens, poll_progress, raw_window_lines, scale
from tests.reliability.tcpfault import Fault, TcpFaultProxy


def test_two_agents_one_receiver_two_processes(receiver_factory: Callable[..., ReceiverProc],
                                               agent_factory: Callable[..., AgentProc],
                                               tmp_path: Path) -> None:
    n = scale(15_000, 150_000)
    r = receiver_factory("--processes", "2")
    ws, agents = [], []
    for i in (1, 2):
        w = Workload(tmp_path / f"w{i}")
        w.ckpt(f"ck{i}", n, every=100, delay=0.003, prod="shared")  # both agents, one file
        w.raw(f"rw{i}", n, chunk=50, delay=0.003, prod="shared")
        w.tail(f"tl{i}", n, rate=2500)  # prod "tl" for both: one file
        a = agent_factory([r.url], name=f"agent{i}", batch="max_lines = 500\nmax_wait_ms = 50",
                          sender="max_backoff_s = 1\nin_flight = 3", extra_toml=w.toml())
        w.install(a)
        ws.append(w)
        agents.append(a)
    t0 = time.monotonic()
    for a, w in zip(agents, ws, strict=True):
        a.start()
        w.start()
    first_tokens(agents[0], ws[0])
    poll_progress(ws[0], r.data_dir, 3000)
    agents[0].kill()  # one agent restarts mid-stream; the other keeps going
    agents[0].start()
    for a, w in zip(agents, ws, strict=True):
        w.settle(a, r.data_dir)
    for i, w in enumerate(ws, 1):
        rep = w.verify(r.data_dir)
        print(f"two agents: agent{i} s={elapsed(t0)}\n{rep}")
        rep.assert_exactly_once(f"ck{i}", f"tl{i}")
        if i == 1:
            rep.assert_at_most_once("rw1", raw_window_lines(60, 500, 512 * 1024))
        else:
            rep.assert_exactly_once("rw2")
    for a in agents:
        assert a.stop() == 0


def _tz_with_midnight_in(seconds: float) -> str:
    """A POSIX TZ string under which local midnight comes ``seconds`` from now."""
    utc_sod = int(time.time()) % 86400
    east = (86400 - int(seconds) - utc_sod) % 86400
    if east > 43200:
        east -= 86400
    west = -east
    a = abs(west)
    return f"MID{'-' if west < 0 else '+'}{a // 3600:02d}:{a % 3600 // 60:02d}:{a % 60:02d}"


def test_midnight_in_the_middle_of_a_batch(receiver: ReceiverProc, agent_factory: Callable[..., AgentProc],
                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n = 8000
    w = Workload(tmp_path / "w")
    w.raw("rw", n, chunk=20, delay=0.02)  # ~1000 lines/s for ~8 s
    w.ckpt("ck", n, every=20, delay=0.02)
    w.tail("tl", n, rate=1000)
    with TcpFaultProxy(receiver.url) as proxy:
        # long batches (3 s): one is open while the date changes
        a = agent_factory([proxy.url], batch="max_lines = 100000\nmax_wait_ms = 3000",
                          sender="max_backoff_s = 1", extra_toml=w.toml())
        w.install(a)
        tz = _tz_with_midnight_in(5)  # the writers start in ~1 s and write for ~8 s
        monkeypatch.setenv("TZ", tz)  # for the agent and its collectors only (the receiver runs)
        proxy.set(Fault.REFUSE)  # hold the batches in the spool so the test can look at them
        a.start()
        monkeypatch.delenv("TZ")
        w.start()
        wait_until(w.finished, 60, interval_s=0.1, what="writers done")
        wait_until(lambda: a.get_status()["lines"]["spooled"] >= 3 * n, 30, what="all spooled")
        day1 = datetime.datetime.now(datetime.UTC).astimezone(datetime.timezone(
            -datetime.timedelta(seconds=_west_s(tz)))).date() - datetime.timedelta(days=1)
        d1, d2 = day1.isoformat().encode(), (day1 + datetime.timedelta(days=1)).isoformat().encode()
        a.stop()  # the batches are ready again: look inside them
        straddling = {}
        with SpoolFile(a.state_dir) as f:
            for b in f.batches(["ready"]):
                dates = {line.split(b" ")[1] for line in f.lines(b.pqid).splitlines()}
                if dates == {d1, d2}:
                    straddling[b.collector] = b.batch_id
        a.start()
        proxy.set(Fault.PASS)
        w.settle(a, receiver.data_dir)
        rep = w.verify(receiver.data_dir)
        print(f"midnight: tz={tz} straddling batches={straddling}\n{rep}")
        rep.assert_exactly_once()
        assert "rw" in straddling, f"no raw batch held lines of both dates: {straddling}"
        # each source split cleanly: every line read before midnight in day 1's file, after it in day 2's
        for src, prod in (("rw", "rw"), ("ck", "ck"), ("tl", "tl")):
            first = _seqs(receiver.data_dir / f"{prod}_{d1.decode()}.dat", src)
            second = _seqs(receiver.data_dir / f"{prod}_{d2.decode()}.dat", src)
            assert first and second, f"{src}: lines on one side of midnight only"
            assert max(first) < min(second), f"{src}: a line filed under the wrong date"
        assert a.stop() == 0


def _west_s(tz: str) -> int:
    sign, hms = tz[3], tz[4:]
    h, m, s = (int(x) for x in hms.split(":"))
    return (1 if sign == "+" else -1) * (h * 3600 + m * 60 + s)


def _seqs(path: Path, src: str) -> list[int]:
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().splitlines():
        m = _LINE.match(line)
        if m and m.group(2).decode() == src:
            out.append(int(m.group(1)))
    return out


