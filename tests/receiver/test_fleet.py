"""Group commit and admission control, with the real receiver and the store in real processes.

Many connections to the same and to different files are each stored once and answered only after
their round is durable; a round that fails fails every request in it and stores none of them; a
crash in a round of several batches over several files is rolled back whole; a flood past the
queue bound is answered 503 + Retry-After and everything is stored once it passes.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from receiver.admission import Admission
from receiver.dedup import DedupIndex
from receiver.errors import StorageUnavailable
from receiver.store import Batch, PartitionedStore, RoundStats, Stored
from tests.conftest import ReceiverProc, child_env, wait_until

DATE = time.strftime("%Y-%m-%d")


def _body(prod: str, tag: str, n: int = 10) -> bytes:
    return b"".join(b"%s %s %s %03d\n" % (prod.encode(), DATE.encode(), tag.encode(), i)
                    for i in range(n))


def _put(client: httpx.Client, batch_id: str, payload: bytes) -> httpx.Response:
    return client.put(f"/v1/batches/{batch_id}", content=payload)


def _metric(r: ReceiverProc, name: str) -> float:
    text = httpx.get(f"{r.url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def test_concurrent_puts_from_many_connections_are_each_stored_once(
        receiver_factory: Callable[..., ReceiverProc]) -> None:
    r = receiver_factory("--processes", "2")
    # 40 connections: half write the same file, half one file each; every id is sent twice at
    # once, from two connections (a restarted agent resending what was in flight)
    jobs = [(f"b{n}", "shared" if n % 2 else f"own{n}") for n in range(40)]
    clients = [httpx.Client(base_url=r.url, timeout=60) for _ in range(2 * len(jobs))]
    try:
        with ThreadPoolExecutor(len(clients)) as pool:
            futures = [pool.submit(_put, clients[2 * i + k], bid, _body(prod, bid))
                       for i, (bid, prod) in enumerate(jobs) for k in range(2)]
            codes = Counter(f.result().status_code for f in futures)
    finally:
        for c in clients:
            c.close()
    assert codes[201] == len(jobs), (codes, r.log_text())
    assert codes[201] + codes[200] == 2 * len(jobs), codes
    stored = r.read_lines()
    assert len(stored[f"shared_{DATE}.dat"]) == 20 * 10
    for bid, prod in jobs:
        lines = stored[f"{prod}_{DATE}.dat"]
        assert sum(1 for ln in lines if ln.startswith(bid.encode() + b" ")) == 10, bid
    assert _metric(r, "spoolreceiver_commit_round_batches_count") > 0
    assert _metric(r, "spoolreceiver_fsyncs_total") > 0


def _store(data_dir: Path, **kw: object) -> tuple[PartitionedStore, DedupIndex]:
    dedup = DedupIndex(data_dir / ".receiver", fsync=True)
    dedup.create()
    store = PartitionedStore(data_dir, dedup, fsync=True, **kw)  # type: ignore[arg-type]
    store.create()
    return store, dedup


def _round_batches() -> list[Batch]:
    """Six batches over three files, one id twice: queued before the committer starts, so they
    are one round."""
    out = []
    for n, files in enumerate([("a", "b"), ("a",), ("c",), ("b", "c"), ("a", "c")]):
        out.append(Batch(f"r{n}", {f"{f}_{DATE}.dat": b"r%d %s\n" % (n, f.encode()) for f in files},
                         len(files), 0))
    out.append(out[0])  # the same id twice in the round: stored once
    return out


def test_a_failed_round_fails_every_batch_in_it_and_stores_none(tmp_path: Path) -> None:
    rounds: list[RoundStats] = []
    store, dedup = _store(tmp_path, fault_enospc_after_bytes=12, on_round=rounds.append)
    try:
        futures = [store.submit(b) for b in _round_batches()]
        store.start()
        for f in futures:
            with pytest.raises(StorageUnavailable):
                f.result(timeout=60)
        assert [(s.batches, s.files, s.failed) for s in rounds] == [(5, 3, True)]
        assert list(tmp_path.glob("*.dat")) == []  # the files the round created are gone too
        assert dedup.intents() == [] and dedup.lookup_many([f"r{n}" for n in range(5)]) == {}
    finally:
        store.close()
        dedup.close()


_CRASHING_ROUND = textwrap.dedent("""
    import sys
    from pathlib import Path
    from tests.receiver.test_fleet import _round_batches, _store
    store, _ = _store(Path(sys.argv[1]), crash_at=sys.argv[2])
    futures = [store.submit(b) for b in _round_batches()]
    store.start()
    for f in futures:
        f.result(timeout=60)
""")


@pytest.mark.parametrize("point", ["after_intent", "mid_append", "before_mark"])
def test_a_crash_in_a_round_over_several_files_is_rolled_back_whole(tmp_path: Path, point: str) -> None:
    store, dedup = _store(tmp_path)
    try:
        kept = store.commit(Batch("kept", {f"{f}_{DATE}.dat": b"kept\n" for f in "abc"}, 3, 0))
        assert kept == Stored(3, 0, duplicate=False)
        child = subprocess.Popen([sys.executable, "-c", _CRASHING_ROUND, str(tmp_path), point],
                                 env=child_env(), cwd=Path(__file__).resolve().parents[2])
        assert child.wait(60) == -9
        assert {i.file for i in dedup.intents()} == {f"{f}_{DATE}.dat" for f in "abc"}
        # mid_append tears the first file of the round; before_mark has appended to all three
        assert store.recover() == {"after_intent": 0, "mid_append": 1, "before_mark": 3}[point]
        assert {p.name: p.read_bytes() for p in tmp_path.glob("*.dat")} == {
            f"{f}_{DATE}.dat": b"kept\n" for f in "abc"}
        # sent again: every batch once, the id that came twice once
        results = [store.submit(b) for b in _round_batches()]
        assert [f.result(timeout=60).duplicate for f in results] == [False] * 5 + [True]
        for f in "abc":
            lines = (tmp_path / f"{f}_{DATE}.dat").read_bytes().splitlines()
            assert lines[0] == b"kept" and len(lines) == len(set(lines))
        assert sum(len((tmp_path / f"{f}_{DATE}.dat").read_bytes().splitlines())
                   for f in "abc") == 3 + 8
    finally:
        store.close()
        dedup.close()


def test_a_flood_past_the_queue_bound_gets_503_then_everything_is_stored_once(
        receiver_factory: Callable[..., ReceiverProc]) -> None:
    r = receiver_factory("--queue-max", "2")
    held = r.data_dir / f"held_{DATE}.dat"
    held.touch()
    lock = os.open(held, os.O_WRONLY)
    pool = ThreadPoolExecutor(8)
    clients = [httpx.Client(base_url=r.url, timeout=60) for _ in range(8)]
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the round waits for this lock: the requests pile up
        waiting: list[Future[httpx.Response]] = [
            pool.submit(_put, clients[i], f"w{i}", _body("held", f"w{i}")) for i in range(2)]
        wait_until(lambda: _metric(r, "spoolreceiver_queue_requests") == 2, 30,
                   what="two requests admitted")
        flood = [_put(clients[2 + i % 6], f"f{i}", _body("held", f"f{i}")) for i in range(6)]
        assert [resp.status_code for resp in flood] == [503] * 6
        assert all(int(resp.headers["Retry-After"]) >= 1 for resp in flood)
        assert _metric(r, "spoolreceiver_requests_shed_total") == 6
        fcntl.flock(lock, fcntl.LOCK_UN)
        assert [f.result(timeout=60).status_code for f in waiting] == [201, 201]
        assert [_put(clients[2], f"f{i}", _body("held", f"f{i}")).status_code
                for i in range(6)] == [201] * 6
    finally:
        os.close(lock)
        for c in clients:
            c.close()
        pool.shutdown()
    lines = r.read_lines()[held.name]
    assert len(lines) == 8 * 10 and len(set(lines)) == 8 * 10


_WIDE = textwrap.dedent("""
    import sys
    from pathlib import Path
    from tests.receiver.test_fleet import _store, _wide_batch
    store, _ = _store(Path(sys.argv[1]), max_open_files=3, crash_at="before_mark")
    store.commit(_wide_batch("crashed"))
""")


def _wide_batch(batch_id: str) -> Batch:
    return Batch(batch_id, {f"w{n:02d}_{DATE}.dat": b"%s %d\n" % (batch_id.encode(), n)
                            for n in range(10)}, 10, 0)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_batch_over_the_open_file_budget_is_written_in_groups_all_or_nothing(
        tmp_path: Path) -> None:
    # 10 files, 3 open at most: four groups; a crash after the last group is rolled back whole
    child = subprocess.Popen([sys.executable, "-c", _WIDE, str(tmp_path)], env=child_env(),
                             cwd=Path(__file__).resolve().parents[2])
    assert child.wait(60) == -9
    rounds: list[RoundStats] = []
    store, dedup = _store(tmp_path, max_open_files=3, on_round=rounds.append)
    try:
        assert len(dedup.intents()) == 10
        assert store.recover() == 10
        assert all(p.read_bytes() == b"" for p in tmp_path.glob("w*.dat"))
        base = _open_fds()
        assert store.commit(_wide_batch("wide")) == Stored(10, 0, duplicate=False)
        assert _open_fds() <= base + 3 + 1 + 8  # the budget, wide.lock, the fsync threads' none
        assert sorted(p.read_bytes() for p in tmp_path.glob("w*.dat")) == [
            b"wide %d\n" % n for n in range(10)]
        assert store.commit(_wide_batch("wide")).duplicate
        assert [(r.batches, r.files, r.failed) for r in rounds] == [(1, 10, False)]
        assert dedup.intents() == []
    finally:
        store.close()
        dedup.close()


def test_a_refused_batch_over_the_budget_leaves_no_file_behind(tmp_path: Path) -> None:
    store, dedup = _store(tmp_path, max_open_files=3, fault_enospc_after_bytes=40)
    try:
        with pytest.raises(StorageUnavailable):
            store.commit(_wide_batch("full"))
        assert list(tmp_path.glob("*.dat")) == [] and dedup.intents() == []
        assert dedup.lookup("full") is None
    finally:
        store.close()
        dedup.close()


@pytest.mark.parametrize("point", ["mid_append", "before_mark"])
def test_two_processes_crashing_in_rounds_ack_nothing_lost_and_resends_store_once(
        receiver_factory: Callable[..., ReceiverProc], tmp_path: Path, point: str) -> None:
    data_dir = tmp_path / "data"
    r0 = receiver_factory("--processes", "2", data_dir=data_dir)
    kept = {f"k{i}": _body(f"p{i % 3}", f"k{i}", 50) for i in range(6)}
    with httpx.Client(base_url=r0.url, timeout=60) as c:
        assert [_put(c, bid, body).status_code for bid, body in kept.items()] == [201] * 6
    assert r0.stop() == 0
    before = {p.name: p.read_bytes() for p in data_dir.glob("*.dat")}

    # every round crashes its worker (the supervisor starts another): nothing may be answered
    # 2xx, since a round is answered only after its fsync and its commit
    crashing = receiver_factory("--processes", "2", data_dir=data_dir,
                                env={"SPOOLRECEIVER_CRASH_AT": point})
    sent = {f"c{i}": _body(f"p{i % 3}", f"c{i}", 50) for i in range(12)}

    def put_once(item: tuple[str, bytes]) -> int:
        try:
            with httpx.Client(base_url=crashing.url, timeout=30) as c:
                return _put(c, *item).status_code
        except httpx.TransportError:
            return 0

    with ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(put_once, sent.items()))
    crashing.kill()
    assert all(code in (0, 503) for code in codes), codes

    r2 = receiver_factory("--processes", "2", data_dir=data_dir)
    assert {p.name: p.read_bytes() for p in data_dir.glob("*.dat") if p.read_bytes()} == before
    with httpx.Client(base_url=r2.url, timeout=60) as c:
        assert [_put(c, bid, body).status_code for bid, body in sent.items()] == [201] * 12
        assert [_put(c, bid, body).status_code for bid, body in kept.items()] == [200] * 6
    lines = [ln for ls in r2.read_lines().values() for ln in ls]
    assert len(lines) == 18 * 50 and len(set(lines)) == 18 * 50


def test_admission_counts_the_stores_backlog_and_spreads_retry_after() -> None:
    backlog = [(0, 0)]
    admission = Admission(3, backlog=lambda: backlog[0], max_backlog_bytes=1000)
    assert [admission.admit() for _ in range(4)] == [True, True, True, False]
    admission.release()
    backlog[0] = (3, 0)  # batches whose clients went away still wait in the store
    assert not admission.admit()
    backlog[0] = (0, 1000)
    assert not admission.admit()
    backlog[0] = (0, 0)
    assert admission.admit()
    waits = {admission.retry_after_s() for _ in range(200)}
    assert min(waits) >= 1 and max(waits) <= 10 and len(waits) > 1


def test_a_bug_in_a_round_fails_that_round_and_the_committer_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, dedup = _store(tmp_path)
    real = store._claim
    calls = []

    def broken(*args: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "_claim", broken)
    try:
        with pytest.raises(StorageUnavailable):
            store.commit(Batch("x", {f"x_{DATE}.dat": b"x\n"}, 1, 0))
        assert store.commit(Batch("x", {f"x_{DATE}.dat": b"x\n"}, 1, 0)) == Stored(1, 0, False)
    finally:
        store.close()
        dedup.close()
