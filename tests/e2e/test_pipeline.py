"""End to end: real collectors -> real agent -> (fault proxy) -> real receiver -> files, line by line."""

from __future__ import annotations

import datetime
import json
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import AgentProc, ReceiverProc, child_env, count_lines, wait_until
from tests.httpfault import HttpFaultProxy
from tests.reliability.checker import CKPT  # the checkpointing collector: `seq=N` first in DATA

TODAY = datetime.date.today().isoformat()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _seqs(data_dir: Path, prod: str) -> Counter[int]:
    c: Counter[int] = Counter()
    for p in data_dir.glob(f"{prod}_*.dat"):
        for line in p.read_bytes().splitlines():
            c[int(line.split(b" ")[0].split(b"=")[1])] += 1
    return c


def _assert_exactly_once(data_dir: Path, prod: str, total: int) -> None:
    seen = _seqs(data_dir, prod)
    missing = [i for i in range(total) if seen[i] == 0]
    dups = {i: n for i, n in seen.items() if n > 1}
    assert not missing and not dups, (
        f"missing={missing[:10]} ({len(missing)}) dups={list(dups.items())[:10]} ({len(dups)})")
    assert sum(seen.values()) == total


def test_interval_0_and_interval_n_collectors_land_in_date_files(
        receiver: ReceiverProc, agent_factory: Callable[..., AgentProc]) -> None:
    a = agent_factory([receiver.url], extra_toml='[collectors.tick]\nformat = "raw"\nprod = "periodic"\n')
    a.add_collector("zero.py", "import sys, time, datetime\nd = datetime.date.today().isoformat()\n"
                    "for i in range(500):\n    print(f'app {d} zero {i}')\nsys.stdout.flush()\ntime.sleep(3600)\n")
    a.add_collector("tick.sh", "#!/bin/sh\necho \"tick $$\"\n", interval=1)
    a.start()
    app = receiver.data_dir / f"app_{TODAY}.dat"
    wait_until(lambda: app.exists() and app.read_bytes().count(b"\n") == 500, 20, what="500 app lines")
    assert app.read_bytes().splitlines() == [b"zero %d" % i for i in range(500)]
    periodic = receiver.data_dir / f"periodic_{TODAY}.dat"
    wait_until(lambda: periodic.exists() and periodic.read_bytes().count(b"\n") >= 2, 20, what="2 ticks")
    assert all(line.startswith(b"tick ") for line in periodic.read_bytes().splitlines())
    st = a.get_status()
    names = {c["name"]: c for c in st["collectors"]}
    assert names["zero"]["state"] == "running" and names["tick"]["interval_s"] == 1
    assert a.stop() == 0
    assert st["sender"]["lines_sent"] >= 500


def test_receiver_down_lines_pile_up_then_arrive_exactly_once(
        receiver_factory: Callable[..., ReceiverProc], agent_factory: Callable[..., AgentProc]) -> None:
    port = _free_port()
    r = receiver_factory(start=False)
    a = agent_factory([f"http://127.0.0.1:{port}"], extra_toml="[collectors.ck]\ntotal = 3000\nevery = 50\n")
    a.add_collector("ck.py", CKPT)
    a.start()
    wait_until(lambda: a.get_status()["spool"]["ready_lines"] + a.get_status()["spool"]["inflight_lines"] == 3000,
               30, what="3000 lines spooled while the receiver is down")
    wait_until(lambda: a.get_status()["sender"]["consecutive_failures"] > 0, 10, what="the sender to fail")
    assert a.get_status()["sender"]["lines_sent"] == 0
    r.start(port=port)
    wait_until(lambda: count_lines(r.data_dir) >= 3000, 30, what="backlog delivered")
    wait_until(lambda: a.get_status()["spool"]["ready_batches"] == 0, 10)
    _assert_exactly_once(r.data_dir, "ck", 3000)


def _spool_settled(a: AgentProc) -> bool:
    spool = a.get_status()["spool"]
    return bool(spool["ready_batches"] == 0 and spool["inflight_batches"] == 0)


def test_inflight_batch_resent_with_same_id_after_kill(
        receiver: ReceiverProc, agent_factory: Callable[..., AgentProc]) -> None:
    proxy = HttpFaultProxy(receiver.url, mode="hold")
    try:
        a = agent_factory([proxy.url], batch="max_lines = 500\nmax_wait_ms = 50",
                          extra_toml="[collectors.ck]\ntotal = 2000\nevery = 100\n")
        a.add_collector("ck.py", CKPT)
        a.start()
        # the receiver has stored the held batches, but the agent never saw the answer
        wait_until(lambda: len(proxy.batch_ids()) >= 2, 20, what="2 batches in flight")
        held = proxy.batch_ids()
        a.kill()
        proxy.mode = "pass"
        a.start()
        wait_until(lambda: count_lines(receiver.data_dir) >= 2000, 30, what="all lines")
        # nothing ready nor in flight: every resend answered (the senders take the held batches
        # at once, so "nothing ready" alone comes before their answers)
        wait_until(lambda: _spool_settled(a), 10, what="every resend answered")
        resent = proxy.batch_ids()[len(held):]
        assert set(held) <= set(resent), f"held {held} not resent with the same ids: {resent}"
        _assert_exactly_once(receiver.data_dir, "ck", 2000)
        assert a.stop() == 0
    finally:
        proxy.close()


def test_checkpointing_collector_exactly_once_across_random_sigkills(
        receiver: ReceiverProc, agent_factory: Callable[..., AgentProc]) -> None:
    total = 100_000
    a = agent_factory([receiver.url], batch="max_lines = 2000\nmax_wait_ms = 50",
                      extra_toml=f"[collectors.ck]\ntotal = {total}\nevery = 200\ndelay = 0.002\n")
    a.add_collector("ck.py", CKPT)
    rnd = random.Random(20261126)
    kills = 0
    for _ in range(8):
        a.start()
        goal = min(total, count_lines(receiver.data_dir) + rnd.randint(2000, 15000))
        wait_until(lambda g=goal: count_lines(receiver.data_dir) >= g, 30, what=f"{goal} lines before the kill")
        a.kill()  # mid-stream: batches spooled, in flight, and lines held after the last checkpoint
        kills += 1
        if goal >= total:
            break
    assert kills >= 3
    a.start()
    wait_until(lambda: count_lines(receiver.data_dir) >= total, 90, what=f"{total} lines")
    wait_until(lambda: a.get_status()["spool"]["ready_batches"] == 0, 10)
    _assert_exactly_once(receiver.data_dir, "ck", total)
    assert a.stop() == 0


def _progress_collector(total: int, progress: Path) -> str:
    return f"""\
import datetime, os, sys
d = datetime.date.today().isoformat().encode()
out = sys.stdout.buffer
for i in range(0, {total}, 100):
    out.write(b"".join(b"fill %s seq=%08d %s\\n" % (d, j, b"y" * 150) for j in range(i, i + 100)))
    out.flush()
    with open({str(progress)!r} + ".tmp", "w") as f:
        f.write(str(i + 100))
    os.replace({str(progress)!r} + ".tmp", {str(progress)!r})
import time
while True:
    time.sleep(3600)
"""

def _full_spool_agent(agent_factory: Callable[..., AgentProc], port: int, when_full: str, total: int,
                      progress: Path) -> AgentProc:
    """An agent with a 256 KiB spool, uncompressed rows, and a receiver port nobody listens on yet."""
    a = agent_factory([f"http://127.0.0.1:{port}"], batch='max_bytes = "16KiB"\nmax_wait_ms = 20',
                      spool=f'max_bytes = "256KiB"\nwhen_full = "{when_full}"',
                      sender='compression = "none"\nmax_backoff_s = 1')
    a.add_collector("fill.py", _progress_collector(total, progress))
    return a.start()


def test_full_spool_block_slows_collector_and_loses_nothing(
        receiver_factory: Callable[..., ReceiverProc], agent_factory: Callable[..., AgentProc],
        tmp_path: Path) -> None:
    total, port, progress = 20_000, _free_port(), tmp_path / "progress"
    r = receiver_factory(start=False)
    a = _full_spool_agent(agent_factory, port, "block", total, progress)

    def stalled() -> bool:
        before = progress.read_text() if progress.exists() else ""
        time.sleep(1.0)  # a stall can only be seen over time: the collector made no progress for 1 s
        return bool(before) and progress.read_text() == before

    wait_until(stalled, 30, interval_s=0.1, what="the collector to be blocked by the full spool")
    written = int(progress.read_text())
    assert written < total, "the collector was never slowed"
    st = a.get_status()["spool"]
    assert st["bytes"] <= 256 * 1024 + 64 * 1024
    assert st.get("dropped_lines", 0) == 0
    r.start(port=port)
    wait_until(lambda: count_lines(r.data_dir) >= total, 60, what="everything after the spool drained")
    seen = _seqs(r.data_dir, "fill")
    assert sorted(seen) == list(range(total)) and set(seen.values()) == {1}


def test_full_spool_drop_oldest_counts_match_missing(
        receiver_factory: Callable[..., ReceiverProc], agent_factory: Callable[..., AgentProc],
        tmp_path: Path) -> None:
    total, port, progress = 20_000, _free_port(), tmp_path / "progress"
    r = receiver_factory(start=False)
    a = _full_spool_agent(agent_factory, port, "drop_oldest", total, progress)
    wait_until(lambda: progress.exists() and int(progress.read_text()) == total, 30, what="collector done")
    wait_until(lambda: a.get_status()["lines"]["spooled"] == total, 30, what="all lines spooled or dropped")
    dropped = a.get_status()["spool"]["dropped_lines"]
    assert dropped > 0
    r.start(port=port)
    wait_until(lambda: a.get_status()["spool"]["ready_batches"] == 0
               and a.get_status()["spool"]["inflight_batches"] == 0, 60, what="spool drained")
    seen = _seqs(r.data_dir, "fill")
    assert set(seen.values()) == {1}
    assert len(seen) + a.get_status()["spool"]["dropped_lines"] == total
    assert max(seen) == total - 1  # the newest lines were kept


def test_400_moves_batch_to_failed_and_sender_carries_on(
        receiver: ReceiverProc, agent_factory: Callable[..., AgentProc]) -> None:
    proxy = HttpFaultProxy(receiver.url, mode="status_once:400")
    try:
        a = agent_factory([proxy.url], batch="max_lines = 100\nmax_wait_ms = 20",
                          extra_toml="[collectors.ck]\ntotal = 1000\nevery = 100\n")
        a.add_collector("ck.py", CKPT)
        a.start()
        def drained() -> bool:
            # every line accounted for, not only an empty queue: between two of the collector's
            # batches nothing is ready or in flight either (a delivered batch is no longer counted
            # in flight while its delete waits for the next commit)
            sp = a.get_status()["spool"]
            return bool(sp["ready_batches"] == 0 and sp["inflight_batches"] == 0 and sp["failed_batches"] >= 1
                        and count_lines(receiver.data_dir) + sp["failed_lines"] >= 1000)

        wait_until(drained, 20, what="the other batches delivered")
        st = a.get_status()
        assert st["spool"]["failed_batches"] == 1
        failed_lines = st["spool"]["failed_lines"]
        assert count_lines(receiver.data_dir) == 1000 - failed_lines
        assert "400" in (st.get("last_error") or "")
        assert a.stop() == 0
    finally:
        proxy.close()


@pytest.mark.parametrize("toml, expect", [
    ('[agent]\nstate_dir = "s"\ncollectors_dir = "c"\nbogus = 1\n', "[agent] bogus: unknown key"),
    ('[agent]\nstate_dir = "s"\ncollectors_dir = "c"\n[batch]\nmax_bytes = "12XB"\n', "[batch] max_bytes"),
    ('[agent]\nstate_dir = "s"\ncollectors_dir = "nowhere"\n', "[agent] collectors_dir"),
    ('[agent]\nstate_dir = "s"\ncollectors_dir = "c"\n[spool]\nwhen_full = "explode"\n', "[spool] when_full"),
    ('[agent\n', "invalid TOML"),
])
def test_bad_config_clear_message_exit_2(tmp_path: Path, toml: str, expect: str) -> None:
    (tmp_path / "c").mkdir()
    cfg = tmp_path / "agent.toml"
    cfg.write_text(toml)
    for cmd in ("check", "run"):
        p = subprocess.run([sys.executable, "-m", "spoolagent", cmd, "-c", str(cfg)], capture_output=True,
                           text=True, env=child_env(), timeout=30)
        assert p.returncode == 2, p.stderr
        assert expect in p.stderr, p.stderr


def test_check_ok_exit_0(tmp_path: Path) -> None:
    (tmp_path / "c").mkdir()
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[agent]\nstate_dir = "s"\ncollectors_dir = "c"\n')
    p = subprocess.run([sys.executable, "-m", "spoolagent", "check", "-c", str(cfg), "--json"],
                       capture_output=True, text=True, env=child_env(), timeout=30)
    assert p.returncode == 0 and json.loads(p.stdout)["ok"] is True


def test_invalid_and_overlong_lines_counted_and_kept_for_the_operator(
        receiver: ReceiverProc, agent_factory: Callable[..., AgentProc]) -> None:
    a = agent_factory([receiver.url], agent='stop_grace_s = 3\nmax_line_bytes = "4KiB"')
    a.add_collector("mixed.py", f"""\
import sys, time
out = sys.stdout.buffer
out.write(b"good {TODAY} one\\n")
out.write(b"../etc {TODAY} traversal\\n")
out.write(b"good 2026-02-30 not a date\\n")
out.write(b"good {TODAY} " + b"z" * 10000 + b"\\n")
out.write(b"good {TODAY} two\\n")
out.flush()
time.sleep(3600)
""")
    a.start()
    good = receiver.data_dir / f"good_{TODAY}.dat"
    wait_until(lambda: good.exists() and good.read_bytes() == b"one\ntwo\n", 20, what="the two good lines")
    wait_until(lambda: a.get_status()["lines"]["rejected"] == 3, 10, what="3 rejected lines counted")
    kept = (a.state_dir / "rejected.log").read_bytes()
    assert b"../etc" in kept and b"2026-02-30" in kept and b"over the limit" in kept
    metrics = __import__("urllib.request").request.urlopen(a.status + "/metrics", timeout=5).read().decode()
    assert "spoolagent_lines_rejected_total 3.0" in metrics
