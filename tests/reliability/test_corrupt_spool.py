"""Scenario: a corrupt or truncated spool.db. The agent must start anyway (a fresh spool), keep the
damaged file (named in an ERROR line and a metric), and ``spoolagent spool salvage FILE`` must
re-queue every batch still readable with its original batch id.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from spoolagent.spool.file import SpoolFile
from spoolagent.spool.queue import Spool, WhenFull
from tests.conftest import AgentProc, ReceiverProc, child_env, wait_until
from tests.reliability.checker import make_line, received, verify
from tests.reliability.rig import Workload
from tests.reliability.tcpfault import Fault, TcpFaultProxy


def _fill(state_dir: Path, batches: int) -> list[str]:
    s = Spool(state_dir, max_bytes=1 << 30, when_full=WhenFull.BLOCK, compression="gzip",
              stopping=threading.Event())
    try:
        return [s.put("c", [b"p 2026-01-01 " + make_line("c", i * 20 + j) + os.urandom(200).hex().encode()
                            for j in range(20)], f"tok{i}") for i in range(batches)]
    finally:
        s.close()


def _damage(path: Path, kind: str) -> None:
    data = bytearray(path.read_bytes())
    if kind == "garbage":
        data = bytearray(os.urandom(len(data)))
    elif kind == "truncated":  # a torn file: the second half never reached the disk
        data = data[: len(data) // 2]
    elif kind == "torn_page":  # one b-tree page of the queue table overwritten
        with sqlite3.connect(path) as c:
            leaves = [r[0] for r in c.execute("SELECT pageno FROM dbstat WHERE name = "
                                              "'ack_queue_default' AND pagetype = 'leaf' ORDER BY pageno")]
            page_size = c.execute("PRAGMA page_size").fetchone()[0]
        page = leaves[len(leaves) // 2]
        data[(page - 1) * page_size: page * page_size] = os.urandom(page_size)
    path.write_bytes(bytes(data))


def _cli(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "spoolagent", "spool", *args], capture_output=True,
                          text=True, env=child_env(), timeout=timeout_s)


@pytest.mark.parametrize("kind", ["garbage", "truncated", "torn_page"])
def test_damaged_spool_is_moved_aside_kept_and_salvaged_with_original_ids(tmp_path: Path, kind: str) -> None:
    state = tmp_path / "state"
    ids = _fill(state, 200)
    db = state / "spool.db"
    _damage(db, kind)
    damaged_bytes = db.read_bytes()
    s = Spool(state, max_bytes=1 << 30, when_full=WhenFull.BLOCK, compression="gzip",
              stopping=threading.Event(), move_corrupt_aside=True)
    try:
        assert s.moved_aside is not None and s.moved_aside.name.startswith("spool.db.corrupt-")
        assert s.moved_aside.read_bytes() == damaged_bytes, "the damaged file must be kept as it was"
        assert s.stats()["ready_batches"] == 0 and s.checkpoints() == {}
        moved = s.moved_aside
    finally:
        s.close()
    p = _cli("salvage", str(moved), "--yes", "--json", "--state-dir", str(state))
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert set(res["batch_ids"]) <= set(ids)
    assert res["requeued"] == len(res["batch_ids"])
    with SpoolFile(state) as f:
        live = {b.batch_id: b for b in f.batches()}
        assert set(live) == set(res["batch_ids"])  # the original ids, nothing else
        for b in list(live.values())[:5]:
            assert f.lines(b.pqid).count(b"\n") == 20
    if kind == "garbage":
        assert res["requeued"] == 0
    elif kind == "truncated":
        assert 0 < res["requeued"] < 200 and res["requeued"] + res["unreadable"] == 200, res
    else:
        assert 150 <= res["requeued"] < 200 and res["unreadable"] >= 1, res
    # salvaging again re-queues nothing twice
    again = json.loads(_cli("salvage", str(moved), "--yes", "--json", "--state-dir", str(state)).stdout)
    assert again.get("requeued", 0) == 0 and again.get("already_queued", 0) == res["requeued"]


def test_live_spool_is_refused_by_salvage(tmp_path: Path) -> None:
    _fill(tmp_path / "state", 2)
    p = _cli("salvage", str(tmp_path / "state" / "spool.db"), "--yes", "--state-dir", str(tmp_path / "state"))
    assert p.returncode == 1 and "live spool" in p.stderr


def test_agent_starts_on_a_truncated_spool_and_salvage_resends_with_original_ids(
        receiver: ReceiverProc, agent_factory: Callable[..., AgentProc], tmp_path: Path) -> None:
    w = Workload(tmp_path / "w")
    w.raw("rw", 6000, chunk=50, delay=0.005)
    w.ckpt("ck", 6000, every=100, delay=0.005)
    with TcpFaultProxy(receiver.url) as proxy:
        a = agent_factory([proxy.url], batch="max_lines = 200\nmax_wait_ms = 50",
                          sender="max_backoff_s = 1\ntimeout_s = 2", extra_toml=w.toml())
        w.install(a)
        a.start()
        wait_until(lambda: received(receiver.data_dir, "rw") >= 1000, 30, what="some lines delivered")
        proxy.set(Fault.REFUSE)  # the rest piles up in the spool
        wait_until(lambda: w.finished() and a.get_status()["lines"]["spooled"] >= 12000
                   - received(receiver.data_dir, "rw") - received(receiver.data_dir, "ck"), 60,
                   what="everything spooled")
        ck_before = received(receiver.data_dir, "ck")
        assert a.stop() == 0  # clean: in-flight batches ready again, the WAL folded into the file
        state = a.state_dir
        shutil.copyfile(state / "spool.db", tmp_path / "before.db")
        _damage(state / "spool.db", "truncated")
        a.start()
        log = a.log_text()
        assert "level=error" in log and "spool.db.corrupt-" in log and "spool salvage" in log, log
        st = a.get_status()["spool_corrupt"]
        assert st["moved_total"] == 1 and len(st["kept_files"]) == 1, st
        with urllib.request.urlopen(a.status + "/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
        assert "spoolagent_spool_corrupt_total 1.0" in metrics
        assert "spoolagent_spool_corrupt_files 1.0" in metrics
        moved = state / st["kept_files"][0]
        # the checkpointing collector restarted without a token: it re-reads, so leave it out
        p = a.cli("spool", "salvage", str(moved), "--yes", "--json", "--skip-collector", "ck")
        assert p.returncode == 0, p.stderr
        res = json.loads(p.stdout)
        assert res["requeued"] > 0 and res["unreadable"] > 0, res
        proxy.set(Fault.PASS)
        w.settle(a, receiver.data_dir)
        assert a.stop(signal.SIGTERM) == 0
    # the raw lines lost are exactly those of the unreadable batches
    with _before(tmp_path) as f:
        waiting = [b for b in f.batches(["ready"]) if b.collector == "rw"]
        lost = sum(b.lines for b in waiting if b.batch_id not in set(res["batch_ids"]))
    rep = verify(receiver.data_dir, w.written())
    print(f"salvage: {res['requeued']} batches re-queued, {res['unreadable']} unreadable, raw lost {lost}\n{rep}")
    r, c = rep.sources["rw"], rep.sources["ck"]
    assert r.duplicated == 0 and r.corrupted == 0 and len(r.missing) == lost
    # ck re-read from its start: nothing lost; what the receiver had before comes twice
    assert not c.missing and c.duplicated == ck_before


class _before:
    """The pre-damage copy, opened as a spool directory of its own."""

    def __init__(self, tmp_path: Path) -> None:
        d = tmp_path / "before"
        d.mkdir(exist_ok=True)
        shutil.copyfile(tmp_path / "before.db", d / "spool.db")
        self.f = SpoolFile(d)

    def __enter__(self) -> SpoolFile:
        return self.f

    def __exit__(self, *exc: object) -> None:
        self.f.close()
