"""Spool: real SQLite files in tmp_path, real child processes killed with SIGKILL."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spoolagent.errors import SpoolBusy, SpoolError
from spoolagent.protocol import Records
from spoolagent.spool import queue as spool_queue
from spoolagent.spool.acks import ACK_DELAY_S, PendingAcks
from spoolagent.spool.file import BatchInfo, SpoolFile
from spoolagent.spool.format import decompress, new_batch_id
from spoolagent.spool.queue import Spool, SpooledBatch, WhenFull
from spoolagent.spool.ready import ReadySignal
from tests.conftest import child_env, wait_until

ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def make_lines(n: int, tag: str = "x", prod: str = "app") -> list[bytes]:
    return [f"{prod} 2024-05-01 {tag} line {i:06d} ".encode() + b"y" * 160 for i in range(n)]


def body_lines(b: SpooledBatch) -> list[bytes]:
    return decompress(b.body, b.encoding).split(b"\n")[:-1]


@pytest.fixture
def open_spool(tmp_path: Path) -> Iterator[object]:
    spools: list[Spool] = []

    def make(max_bytes: int = 1 << 30, when_full: WhenFull = WhenFull.BLOCK,
             compression: str = "zstd", stopping: threading.Event | None = None) -> Spool:
        s = Spool(tmp_path / "state", max_bytes=max_bytes, when_full=when_full,
                  compression=compression, stopping=stopping or threading.Event())
        spools.append(s)
        return s

    yield make
    for s in spools:
        s.close()


@pytest.mark.parametrize("compression,encoding", [("gzip", "gzip"), ("zstd", "zstd"),
                                                  ("none", "identity")])
def test_put_get_ack_round_trip(open_spool, compression: str, encoding: str) -> None:
    spool = open_spool(compression=compression)
    lines = make_lines(500) + [b"app 2024-05-01 \xff\xfe not utf-8", b"web 2024-05-02"]
    bid = spool.put("tail", lines, checkpoint="inode=7 off=99")
    assert ID_RE.match(bid)
    assert spool.stats()["ready_lines"] == 502
    b = spool.get(timeout_s=1)
    assert b is not None
    assert (b.batch_id, b.collector, b.lines, b.encoding, b.checkpoint, b.attempts) == (
        bid, "tail", 502, encoding, "inode=7 off=99", 0)
    assert body_lines(b) == lines
    st = spool.stats()
    assert (st["ready_batches"], st["inflight_batches"], st["inflight_lines"]) == (0, 1, 502)
    spool.ack(b.pqid)
    assert spool.get(timeout_s=0.05) is None
    st = spool.stats()
    assert (st["ready_batches"], st["inflight_batches"], st["bytes"], st["oldest_age_s"]) == (
        0, 0, 0, None)


def test_put_many_commits_batches_in_order_each_token_with_its_batch(open_spool) -> None:
    spool = open_spool()
    ids = spool.put_many([("a", make_lines(3, "a1"), "a-t1"), ("b", make_lines(2, "b1"), None),
                          ("a", make_lines(4, "a2"), "a-t2")])
    assert len(set(ids)) == 3 and all(ID_RE.match(i) for i in ids)
    assert spool.checkpoints() == {"a": "a-t2"}
    got = []
    for _ in range(3):  # each row is ready at once: one bump per row, no wait for a poll
        b = spool.get(timeout_s=0.0)
        assert b is not None
        got.append((b.batch_id, b.collector, b.checkpoint, body_lines(b)))
        spool.ack(b.pqid)
    assert got == [(ids[0], "a", "a-t1", make_lines(3, "a1")), (ids[1], "b", None, make_lines(2, "b1")),
                   (ids[2], "a", "a-t2", make_lines(4, "a2"))]


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_a_batchers_records_are_compressed_run_by_run_into_one_body(open_spool, compression: str) -> None:
    spool = open_spool(compression=compression)
    lines = make_lines(300)
    records = Records()
    for part in (lines[:1], lines[1:200], lines[200:]):  # runs as the reader cut them
        records.add(b"".join(ln + b"\n" for ln in part), len(part), "app")
    spool.put("tail", records, None)
    b = spool.get(timeout_s=1)
    assert b is not None and b.lines == 300 and body_lines(b) == lines


def test_a_forked_child_draws_batch_ids_of_its_own() -> None:
    new_batch_id()  # the parent's pool of random bytes is filled
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            time.sleep(0.005)  # a later millisecond: fresh random bits, not a count up
            os.write(w, new_batch_id().encode())
        finally:
            os._exit(0)
    os.close(w)
    time.sleep(0.005)
    mine = new_batch_id()
    with os.fdopen(r, "rb") as f:
        theirs = f.read().decode()
    os.waitpid(pid, 0)
    assert len(theirs) == 26 and theirs[10:] != mine[10:]  # the 80 random bits differ


def test_batch_ids_unique_and_sortable(open_spool) -> None:
    ids = [new_batch_id() for _ in range(20000)]
    assert len(set(ids)) == len(ids) and ids == sorted(ids)
    assert all(ID_RE.match(i) and len(i) == 26 for i in ids[:100])
    spool = open_spool()
    put = [spool.put("c", [b"p 2024-01-01 %d" % i]) for i in range(30)]
    assert put == sorted(put)
    got = []
    while (b := spool.get(timeout_s=0.05)) is not None:
        got.append(b.batch_id)
    assert got == put  # oldest first


def test_nack_keeps_id_and_counts_attempts(open_spool, tmp_path: Path) -> None:
    spool = open_spool()
    bid = spool.put("c", make_lines(10))
    for attempt in range(3):
        b = spool.get(timeout_s=1)
        assert b is not None and b.batch_id == bid and b.attempts == attempt
        spool.nack(b.pqid, f"503 try {attempt}")
    with SpoolFile(tmp_path / "state") as f:
        (info,) = f.batches()
    assert (info.batch_id, info.state, info.attempts, info.last_error) == (
        bid, "ready", 3, "503 try 2")


def test_fail_keeps_status_and_reason(open_spool, tmp_path: Path) -> None:
    spool = open_spool()
    bid = spool.put("c", make_lines(7))
    b = spool.get(timeout_s=1)
    assert b is not None
    spool.fail(b.pqid, 400, "bad line framing")
    assert spool.get(timeout_s=0.05) is None
    st = spool.stats()
    assert (st["failed_batches"], st["failed_lines"], st["ready_batches"]) == (1, 7, 0)
    with SpoolFile(tmp_path / "state") as f:
        (info,) = f.batches(["failed"])
    assert (info.batch_id, info.http_status, info.reason, info.last_error) == (
        bid, 400, "http_400", "bad line framing")


CHILD = r"""
import json, sys, threading, time
from pathlib import Path
from spoolagent.spool.queue import Spool, WhenFull
spool = Spool(Path(sys.argv[1]), max_bytes=1 << 30, when_full=WhenFull.BLOCK,
              compression="gzip", stopping=threading.Event())
ids = []
for i in range(10):
    lines = [b"app 2024-05-01 batch %d line %d" % (i, j) for j in range(200)]
    ids.append(spool.put("c%d" % (i % 2), lines, checkpoint="tok-%02d" % i))
inflight = [spool.get(1.0) for _ in range(3)]
spool.ack(inflight[0].pqid)
print(json.dumps({"ids": ids, "acked": inflight[0].batch_id,
                  "inflight": [b.batch_id for b in inflight[1:]]}), flush=True)
time.sleep(120)
"""


def test_inflight_batch_resent_with_same_id_after_kill(open_spool, tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(state)], stdout=subprocess.PIPE,
                            env=child_env())
    try:
        assert proc.stdout is not None
        told = json.loads(proc.stdout.readline())
        # the child holds the lock: a second opener is refused, and does not touch its rows
        with pytest.raises(SpoolBusy):
            open_spool()
        with SpoolFile(state) as f:
            st = f.stats()
        assert (st["ready_batches"], st["inflight_batches"]) == (7, 2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert proc.stdout is not None
        proc.stdout.close()
    spool = open_spool()
    st = spool.stats()
    assert (st["ready_batches"], st["inflight_batches"], st["ready_lines"]) == (9, 0, 1800)
    # the newest token of each collector, although tok-00 went with the acked row
    assert spool.checkpoints() == {"c0": "tok-08", "c1": "tok-09"}
    got = []
    while (b := spool.get(timeout_s=0.05)) is not None:
        i = int(body_lines(b)[0].split()[3])
        assert body_lines(b) == [b"app 2024-05-01 batch %d line %d" % (i, j) for j in range(200)]
        assert b.batch_id == told["ids"][i]
        got.append(b.batch_id)
        spool.ack(b.pqid)
    assert got == [i for i in told["ids"] if i != told["acked"]]
    assert set(told["inflight"]) <= set(got)


def test_checkpoints_survive_ack_and_clear_newest_wins(open_spool, tmp_path: Path) -> None:
    spool = open_spool()
    spool.put("tail", make_lines(3), checkpoint="a")
    spool.put("tail", make_lines(3), checkpoint="b")
    spool.put("tail", make_lines(3))  # no token: keeps "b"
    spool.put("journal", make_lines(3), checkpoint="cursor=1")
    assert spool.checkpoints() == {"tail": "b", "journal": "cursor=1"}
    while (b := spool.get(timeout_s=0.05)) is not None:
        spool.ack(b.pqid)
    spool.close()
    again = open_spool()
    assert again.checkpoints() == {"tail": "b", "journal": "cursor=1"}


def test_close_returns_inflight_to_ready(open_spool) -> None:
    spool = open_spool()
    bid = spool.put("c", make_lines(5))
    assert spool.get(timeout_s=1) is not None
    spool.close()
    again = open_spool()
    st = again.stats()
    assert (st["ready_batches"], st["inflight_batches"]) == (1, 0)
    b = again.get(timeout_s=1)
    assert b is not None and b.batch_id == bid


def test_block_put_waits_for_ack_and_stopping_releases_it(open_spool) -> None:
    stopping = threading.Event()
    spool = open_spool(max_bytes=60_000, compression="none", stopping=stopping)
    spool.put("c", make_lines(200))  # ~40 KB: a second one does not fit
    done: list[str] = []
    t = threading.Thread(target=lambda: done.append(spool.put("c", make_lines(200, "2"))))
    t.start()
    t.join(0.5)
    assert t.is_alive() and not done  # blocked: back-pressure
    b = spool.get(timeout_s=1)
    assert b is not None
    spool.ack(b.pqid)
    t.join(5)
    assert done and not t.is_alive()
    t2 = threading.Thread(target=lambda: done.append(spool.put("c", make_lines(200, "3"))))
    t2.start()
    t2.join(0.5)
    assert t2.is_alive()
    stopping.set()  # shutting down: write over the bound rather than lose lines held in memory
    t2.join(5)
    assert len(done) == 2
    assert spool.stats()["bytes"] > 60_000


def _delivered_deferred(spool: Spool) -> None:
    """One batch put, taken and acked without waiting for its delete."""
    spool.put("c", make_lines(5))
    b = spool.get(timeout_s=1)
    assert b is not None
    spool.ack(b.pqid, wait=False)


def test_deferred_ack_rides_in_the_next_put(open_spool, tmp_path: Path) -> None:
    spool = open_spool()
    _delivered_deferred(spool)
    with SpoolFile(tmp_path / "state") as f:  # not deleted yet: no commit of its own
        assert [i.state for i in f.batches()] == ["inflight"]
    # ... but delivered: the agent's own view (status, metrics, heartbeat) counts it nowhere
    st = spool.stats()
    assert (st["ready_batches"], st["inflight_batches"], st["inflight_lines"], st["bytes"]) == (0, 0, 0, 0)
    spool.put("c", make_lines(5, "2"))  # its commit deletes the delivered row
    st = spool.stats()
    assert (st["ready_batches"], st["inflight_batches"]) == (1, 0)
    with SpoolFile(tmp_path / "state") as f:  # committed: another connection sees it
        assert [i.state for i in f.batches()] == ["ready"]


def test_deferred_ack_committed_by_a_waiting_get_when_no_put_comes(open_spool) -> None:
    spool = open_spool()
    _delivered_deferred(spool)
    # nothing ready: the get waits, and commits the ack once it is ACK_DELAY_S old
    assert spool.get(timeout_s=ACK_DELAY_S + 2) is None
    st = spool.stats()
    assert (st["ready_batches"], st["inflight_batches"], st["bytes"]) == (0, 0, 0)


def test_one_getter_watches_the_ack_deadline_not_every_idle_sender() -> None:
    acks = PendingAcks()
    assert not acks.watched_by(1)  # nothing pending: nobody needs to wake
    acks.add(7)
    assert acks.watched_by(2)  # the first to ask (the sender that acked, back in its get)
    assert not acks.watched_by(1) and acks.watched_by(2)  # the other idle senders sleep on
    acks.add(8)
    assert acks.watched_by(2) and not acks.watched_by(3)
    assert acks.take() == [7, 8]  # committed (ridden by a put): the role ends with them
    acks.add(9)
    assert acks.watched_by(3)


def test_the_acking_sender_commits_its_ack_while_another_sender_waits(open_spool) -> None:
    stopping = threading.Event()
    spool = open_spool(stopping=stopping)
    got: list[SpooledBatch | None] = []
    idle = threading.Thread(target=lambda: got.append(spool.get(timeout_s=None)))
    idle.start()  # an idle sender, waiting with no deadline
    try:
        spool.put("c", make_lines(5))
        wait_until(lambda: got, 5, what="the idle sender taking the batch")
        batch = got.pop()
        assert batch is not None
        idle = threading.Thread(target=lambda: got.append(spool.get(timeout_s=None)))
        idle.start()  # it waits again; the batch is acked by this thread, the watcher
        spool.ack(batch.pqid, wait=False)
        assert spool.get(timeout_s=ACK_DELAY_S + 2) is None
        st = spool.stats()
        assert (st["ready_batches"], st["inflight_batches"], st["bytes"]) == (0, 0, 0)
    finally:
        stopping.set()
        spool.wake_getters()
        idle.join(5)
    assert got == [None]


def test_deferred_ack_committed_at_close(open_spool) -> None:
    spool = open_spool()
    _delivered_deferred(spool)
    spool.close()
    st = open_spool().stats()
    assert (st["ready_batches"], st["inflight_batches"]) == (0, 0)  # not resent


CHILD_DEFERRED = r"""
import json, sys, threading, time
from pathlib import Path
from spoolagent.spool.queue import Spool, WhenFull
spool = Spool(Path(sys.argv[1]), max_bytes=1 << 30, when_full=WhenFull.BLOCK,
              compression="zstd", stopping=threading.Event())
bid = spool.put("c", [b"app 2024-05-01 line %d" % i for i in range(50)], checkpoint="tok")
b = spool.get(1.0)
spool.ack(b.pqid, wait=False)
print(json.dumps({"id": bid}), flush=True)
time.sleep(120)
"""


def test_deferred_ack_lost_in_a_crash_resends_the_batch_with_its_id(open_spool,
                                                                    tmp_path: Path) -> None:
    """A crash before a deferred ack is committed costs a resend (the receiver answers it as a
    duplicate), never a line: the batch and its checkpoint were committed at its put."""
    proc = subprocess.Popen([sys.executable, "-c", CHILD_DEFERRED, str(tmp_path / "state")],
                            stdout=subprocess.PIPE, env=child_env())
    try:
        assert proc.stdout is not None
        told = json.loads(proc.stdout.readline())
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()
    spool = open_spool()
    assert spool.checkpoints() == {"c": "tok"}
    b = spool.get(timeout_s=1)
    assert b is not None and b.batch_id == told["id"] and b.lines == 50


def test_drop_oldest_drops_ready_never_inflight(open_spool) -> None:
    spool = open_spool(max_bytes=130_000, when_full=WhenFull.DROP_OLDEST, compression="none")
    ids = [spool.put("c", make_lines(200, str(i))) for i in range(3)]  # ~40 KB each
    first = spool.get(timeout_s=1)
    assert first is not None and first.batch_id == ids[0]
    ids += [spool.put("c", make_lines(200, str(i))) for i in range(3, 6)]
    st = spool.stats()
    assert st["bytes"] <= 130_000
    assert (st["dropped_batches"], st["dropped_lines"]) == (3, 600)
    left = [first.batch_id]
    while (b := spool.get(timeout_s=0.05)) is not None:
        left.append(b.batch_id)
    assert left == [ids[0], ids[4], ids[5]]  # 1, 2, 3 dropped; 0 was in flight
    assert len(ids) - len(left) == st["dropped_batches"]


def test_second_opener_gets_spool_busy(open_spool) -> None:
    first = open_spool()
    with pytest.raises(SpoolBusy):
        open_spool()
    first.close()
    open_spool().put("c", [b"a 2024-01-01 ok"])


def test_acked_rows_do_not_accumulate(open_spool, tmp_path: Path) -> None:
    spool = open_spool(compression="none")
    db = tmp_path / "state" / "spool.db"
    sizes = []
    for cycle in range(120):
        spool.put("c", make_lines(1000, str(cycle)))
        b = spool.get(timeout_s=1)
        assert b is not None
        spool.ack(b.pqid)
        if cycle in (20, 119):
            sizes.append(db.stat().st_size + Path(str(db) + "-wal").stat().st_size)
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM ack_queue_default").fetchone() == (0,)
        assert conn.execute("SELECT count(*) FROM spool_batches").fetchone() == (0,)
    assert sizes[1] <= sizes[0] * 1.5 + 1_000_000, sizes  # 120 x 190 KB went through


def test_concurrent_putters_and_getters_each_batch_once(open_spool) -> None:
    spool = open_spool(compression="gzip")
    put: list[str] = []
    got: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def putter(k: int) -> None:
        for i in range(25):
            bid = spool.put(f"c{k}", make_lines(50, f"{k}-{i}"))
            with lock:
                put.append(bid)

    def getter() -> None:
        while not stop.is_set():
            b = spool.get(timeout_s=0.1)
            if b is not None:
                with lock:
                    got.append(b.batch_id)
                spool.ack(b.pqid)

    getters = [threading.Thread(target=getter) for _ in range(2)]
    putters = [threading.Thread(target=putter, args=(k,)) for k in range(4)]
    for t in getters + putters:
        t.start()
    for t in putters:
        t.join(60)
    wait_until(lambda: len(got) == 100, timeout_s=30, what="all batches got")
    stop.set()
    for t in getters:
        t.join(10)
    assert sorted(got) == sorted(put) and len(set(got)) == 100


def _write_spool(state: Path) -> None:
    s = Spool(state, max_bytes=1 << 30, when_full=WhenFull.BLOCK, compression="none",
              stopping=threading.Event())
    for i in range(40):
        s.put("c", make_lines(300, str(i)))
    s.close()


def test_garbage_spool_db_gives_clear_error(tmp_path: Path, open_spool) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "spool.db").write_bytes(b"this is not a database, it is a log line\n" * 200)
    with pytest.raises(SpoolError, match="not a usable spool|corrupt"):
        open_spool()
    with pytest.raises(SpoolError):
        SpoolFile(state)
    # the lock was released: with the file moved aside, the agent can start
    (state / "spool.db").rename(state / "spool.db.corrupt")
    open_spool().put("c", [b"a 2024-01-01 ok"])


def test_truncated_spool_db_gives_clear_error(tmp_path: Path, open_spool) -> None:
    state = tmp_path / "state"
    _write_spool(state)
    db = state / "spool.db"
    with open(db, "r+b") as f:
        f.truncate(db.stat().st_size // 2)
    with pytest.raises(SpoolError, match="truncated|corrupt"):
        open_spool()


def test_newer_version_gives_clear_error(tmp_path: Path, open_spool) -> None:
    state = tmp_path / "state"
    _write_spool(state)
    with sqlite3.connect(state / "spool.db") as conn:
        conn.execute("PRAGMA user_version=7")
    with pytest.raises(SpoolError, match="newer spoolagent"):
        open_spool()


def test_undecodable_row_goes_to_failed_and_names_the_row(tmp_path: Path, open_spool) -> None:
    state = tmp_path / "state"
    s = open_spool()
    s.put("c", make_lines(2, "before"))
    s.close()
    with sqlite3.connect(state / "spool.db") as conn:
        conn.execute("UPDATE ack_queue_default SET data = x'00112233445566778899'")
    s = open_spool()
    good = s.put("c", make_lines(2, "after"))
    with pytest.raises(SpoolError, match="spool row 1 .*not a spoolagent batch"):
        s.get(timeout_s=1)
    b = s.get(timeout_s=1)
    assert b is not None and b.batch_id == good
    assert s.stats()["failed_batches"] == 1


def test_text_row_goes_to_failed_and_names_the_row(tmp_path: Path, open_spool) -> None:
    s = open_spool()
    s.put("c", make_lines(2, "before"))
    good = s.put("c", make_lines(2, "after"))
    with sqlite3.connect(tmp_path / "state" / "spool.db") as conn:
        conn.execute("UPDATE ack_queue_default SET data = 'SPAB' || x'ff' WHERE _id = 1")
    with pytest.raises(SpoolError, match="spool row 1 "):
        s.get(timeout_s=1)
    b = s.get(timeout_s=1)
    assert b is not None and b.batch_id == good
    assert s.stats()["failed_batches"] == 1


def test_newer_row_format_gives_clear_error(open_spool, tmp_path: Path) -> None:
    s = open_spool()
    s.put("c", make_lines(2))
    with sqlite3.connect(tmp_path / "state" / "spool.db") as conn:
        conn.execute("UPDATE ack_queue_default SET data = "
                     "CAST(substr(data, 1, 4) || x'09' || substr(data, 6) AS BLOB)")
    with pytest.raises(SpoolError, match="row format v9 by a newer spoolagent"):
        s.get(timeout_s=1)


def test_move_out_deletes_only_what_it_wrote_and_nothing_when_writing_fails(open_spool,
                                                                          tmp_path: Path) -> None:
    spool = open_spool()
    ids = [spool.put("c", make_lines(3)) for _ in range(5)]
    taken = spool.get(timeout_s=1)  # one in flight: never moved
    assert taken is not None and taken.batch_id == ids[0]
    written: list[str] = []

    def failing(info: BatchInfo, data: bytes) -> None:
        if len(written) == 2:
            raise OSError("disk full")
        written.append(info.batch_id)

    with SpoolFile(tmp_path / "state", readonly=False) as f:
        with pytest.raises(OSError):
            f.move_out(["ready", "failed"], None, failing, lambda: None, chunk=10)
        assert len(f.batches(["ready"])) == 4  # the chunk rolled back: all still there
        out: list[tuple[str, bytes]] = []
        moved = f.move_out(["ready", "inflight", "failed"], None,
                           lambda info, data: out.append((info.batch_id, data)), lambda: None, chunk=2)
        assert [m.batch_id for m in moved] == [i for i, _ in out] == ids[1:]
        assert all(data.count(b"\n") == 3 for _, data in out)
        assert [b.batch_id for b in f.batches()] == [ids[0]]  # the in-flight one stays
    spool.ack(taken.pqid)


def _count_queries(spool: Spool) -> list[int]:
    """A one-item list counting the spool's ready-row queries from now on."""
    queries = [0]
    real = spool._get_next

    def counted() -> object:
        queries[0] += 1
        return real()
    spool._get_next = counted  # type: ignore[method-assign]
    return queries


def test_a_get_that_took_the_only_ready_batch_does_not_query_again_until_the_next_put(open_spool) -> None:
    """Issue 17: the sender back from a send queried SQLite once per batch for nothing (~165 us
    with cold caches). One put, one bump, one row: once it is taken the next get waits without
    querying; two puts between looks are both got; a bump for everyone (rows from another
    process) turns the shortcut off until a get finds nothing again."""
    spool = open_spool()
    queries = _count_queries(spool)
    assert spool.get(timeout_s=0) is None  # looks once: found nothing
    for i in range(3):
        spool.put("tail", make_lines(2, tag=str(i)))
        b = spool.get(timeout_s=1)
        assert b is not None
        spool.ack(b.pqid)
        assert spool.get(timeout_s=0) is None
    assert queries[0] == 1 + 3  # one query per batch, none for the gets that found nothing
    spool.put("tail", make_lines(2, tag="a"))
    spool.put("tail", make_lines(2, tag="b"))
    got = [spool.get(timeout_s=1), spool.get(timeout_s=1)]
    assert all(g is not None for g in got) and spool.get(timeout_s=0) is None
    spool.wake_getters()  # as when another process made rows ready
    spool.put("tail", make_lines(2, tag="c"))
    before = queries[0]
    assert spool.get(timeout_s=1) is not None
    assert spool.get(timeout_s=0) is None and queries[0] == before + 2  # looked again


def _waiting_getter(spool: Spool) -> tuple[threading.Thread, list[SpooledBatch | None]]:
    got: list[SpooledBatch | None] = []
    t = threading.Thread(target=lambda: got.append(spool.get(timeout_s=10)), daemon=True)
    t.start()
    wait_until(lambda: spool._ready._waiting == 1, timeout_s=5)
    return t, got


def test_a_put_hands_its_batch_to_a_waiting_get_committed_in_flight(open_spool, tmp_path: Path) -> None:
    """Issue 17: a put that finds a get waiting (and nothing else ready) commits the row in flight
    and hands the batch over: no get transaction, no query. The file shows it in flight from its
    commit on (a crash resumes it to ready, as a got batch); nack and close give it back."""
    spool = open_spool()
    queries = _count_queries(spool)
    assert spool.get(timeout_s=0) is None and queries[0] == 1
    t, got = _waiting_getter(spool)
    lines = make_lines(20)
    bid = spool.put("tail", lines, checkpoint="off=20")
    t.join(10)
    b = got[0]
    assert b is not None and queries[0] == 1
    assert (b.batch_id, b.collector, b.lines, b.checkpoint, b.attempts) == (bid, "tail", 20, "off=20", 0)
    assert body_lines(b) == lines
    with SpoolFile(tmp_path / "state") as f:
        st = f.stats()
    assert (st["ready_batches"], st["inflight_batches"], st["inflight_lines"]) == (0, 1, 20)
    spool.nack(b.pqid, "503 busy")
    again = spool.get(timeout_s=1)
    assert again is not None and (again.batch_id, again.attempts) == (bid, 1)
    t, got = _waiting_getter(spool)
    bid2 = spool.put("tail", make_lines(3))
    t.join(10)
    assert got[0] is not None and got[0].batch_id == bid2
    spool.ack(again.pqid)
    spool.close()  # the handed batch was never acked: ready again, same id
    reopened = open_spool()
    st = reopened.stats()
    assert (st["ready_batches"], st["inflight_batches"]) == (1, 0)
    b = reopened.get(timeout_s=1)
    assert b is not None and b.batch_id == bid2


def test_a_put_hands_nothing_over_while_a_batch_is_ready() -> None:
    """The oldest ready batch goes first: while a put or nack since the last empty look is not
    taken (a bump no get has answered), puts are spooled ready, not handed over; one batch per
    waiting get, and a waiting get returns at once for one."""
    ready: ReadySignal[str] = ReadySignal(5.0)
    assert ready.idle_getters() == 0  # nothing looked yet
    ready.found_nothing(ready.generation, time.monotonic())
    waiter = threading.Thread(target=ready.wait, args=(ready.generation, 10.0, False, time.monotonic()))
    waiter.start()
    wait_until(lambda: ready._waiting == 1, timeout_s=5)
    assert ready.idle_getters() == 1
    ready.bump()  # a nack: that row is ready, the get it woke has not taken it yet
    assert ready.idle_getters() == 0
    waiter.join(10)
    generation = ready.generation
    ready.took_one(generation)  # the woken get took it: nothing ready again
    waiter = threading.Thread(target=ready.wait, args=(generation, 10.0, False, time.monotonic()))
    waiter.start()
    wait_until(lambda: ready._waiting == 1, timeout_s=5)
    assert ready.idle_getters() == 1
    ready.hand(["batch"])
    assert ready.idle_getters() == 0  # that get's batch is on its way
    waiter.join(10)
    assert not waiter.is_alive()
    ready.hand(["later"])  # a get that comes to wait with a batch handed over takes it at once
    waiter = threading.Thread(target=ready.wait, args=(generation, None, False, time.monotonic()))
    waiter.start()
    waiter.join(10)
    assert not waiter.is_alive()
    assert [ready.take_handed(), ready.take_handed(), ready.take_handed()] == ["batch", "later", None]


@pytest.mark.parametrize("returning", [True, False], ids=["update-returning", "library-get"])
def test_get_takes_the_oldest_ready_row_with_its_attempts_either_way(
        open_spool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, returning: bool) -> None:
    """A get is one UPDATE ... RETURNING on the spool's own connection (SQLite >= 3.35), else
    persist-queue's get: the same row, state, attempts and dead letter either way."""
    monkeypatch.setattr(spool_queue, "_RETURNING", returning)
    spool = open_spool()
    first, second = spool.put("c", make_lines(2, "a")), spool.put("c", make_lines(3, "b"))
    b = spool.get(timeout_s=1)
    assert b is not None and (b.batch_id, b.attempts) == (first, 0)
    with SpoolFile(tmp_path / "state") as f:
        st = f.stats()
    assert (st["ready_batches"], st["inflight_batches"]) == (1, 1)
    spool.nack(b.pqid, "503")
    spool.nack(b.pqid, "503")  # a second nack of the same row counts again
    b = spool.get(timeout_s=1)
    assert b is not None and (b.batch_id, b.attempts) == (first, 2)
    spool.ack(b.pqid)
    with sqlite3.connect(tmp_path / "state" / "spool.db") as conn:
        conn.execute("UPDATE ack_queue_default SET data = 'SPAB' || x'ff' WHERE status < 2")
    with pytest.raises(SpoolError, match="spool row 2 "):
        spool.get(timeout_s=1)
    assert spool.get(timeout_s=0) is None
    with SpoolFile(tmp_path / "state") as f:
        assert [(i.batch_id, i.reason) for i in f.batches(["failed"])] == [(second, "unreadable_row")]
