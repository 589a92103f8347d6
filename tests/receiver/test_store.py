"""receiver.store and receiver.dedup: locks across real processes, rollback by the next holder of a
file's lock, all-or-nothing over several files, the bounded cache of open files, moved files."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from receiver.append import Appender
from receiver.dedup import DedupIndex
from receiver.errors import StorageUnavailable
from receiver.store import Batch, PartitionedStore
from tests.conftest import child_env, wait_until


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


def _open(data_dir: Path, **kw: object) -> tuple[PartitionedStore, DedupIndex]:
    dedup = DedupIndex(data_dir / ".receiver", fsync=False)
    dedup.create()
    store = PartitionedStore(data_dir, dedup, fsync=False, **kw)  # type: ignore[arg-type]
    store.create()
    return store, dedup


@pytest.fixture
def opened(data_dir: Path) -> Iterator[tuple[PartitionedStore, DedupIndex]]:
    store, dedup = _open(data_dir)
    yield store, dedup
    store.close()
    dedup.close()


_CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from receiver.dedup import DedupIndex
    from receiver.store import PartitionedStore
    data_dir, crash_at, batch, tag, count = Path(sys.argv[1]), sys.argv[2] or None, sys.argv[3], \\
        sys.argv[4], int(sys.argv[5])
    dedup = DedupIndex(data_dir / ".receiver", fsync=False)
    dedup.create()
    store = PartitionedStore(data_dir, dedup, fsync=False, crash_at=crash_at)
    for i in range(count):
        lines = b"".join(b"%s %d %d\\n" % (tag.encode(), i, j) for j in range(50))
        store.append(f"{batch}-{i}", {"a_2026-01-01.dat": lines, "b_2026-01-01.dat": lines}, 100, 0)
""")


def _child(data_dir: Path, crash_at: str, batch: str, tag: str, count: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(data_dir), crash_at, batch, tag,
                             str(count)], env=child_env())


def test_next_holder_of_the_lock_rolls_back_a_crashed_append(
        data_dir: Path, opened: tuple[PartitionedStore, DedupIndex]) -> None:
    store, dedup = opened
    store.append("before", {"a_2026-01-01.dat": b"kept\n", "b_2026-01-01.dat": b"kept\n"}, 2, 0)
    child = _child(data_dir, "mid_append", "crashed", "torn", 1)
    assert child.wait(30) == -9
    assert (data_dir / "a_2026-01-01.dat").read_bytes() != b"kept\n"  # torn bytes on disk
    assert {i.file for i in dedup.intents()} == {"a_2026-01-01.dat", "b_2026-01-01.dat"}
    # no restart: this live store is the next holder of the lock, and rolls back before appending
    store.append("after", {"a_2026-01-01.dat": b"next\n"}, 1, 0)
    assert (data_dir / "a_2026-01-01.dat").read_bytes() == b"kept\nnext\n"
    # b's intent is the crashed child's; a's stands at a's new size for the next round
    assert sorted((i.file, i.size_before) for i in dedup.intents()) == [
        ("a_2026-01-01.dat", len(b"kept\nnext\n")), ("b_2026-01-01.dat", len(b"kept\n"))]
    assert dedup.lookup("crashed-0") is None and dedup.lookup("after") is not None
    assert store.recover() == 0  # b had no bytes appended yet: nothing to truncate, intent dropped
    assert dedup.intents() == []
    assert (data_dir / "b_2026-01-01.dat").read_bytes() == b"kept\n"


def test_before_mark_crash_rolls_back_every_file_of_the_batch(
        data_dir: Path, opened: tuple[PartitionedStore, DedupIndex]) -> None:
    store, dedup = opened
    child = _child(data_dir, "before_mark", "crashed", "whole", 1)
    assert child.wait(30) == -9
    assert (data_dir / "b_2026-01-01.dat").stat().st_size > 0  # fully appended, never recorded
    assert store.recover() == 2
    assert (data_dir / "a_2026-01-01.dat").read_bytes() == b""
    assert (data_dir / "b_2026-01-01.dat").read_bytes() == b""
    assert dedup.lookup("crashed-0") is None and dedup.intents() == []


def test_two_processes_appending_to_the_same_files_never_interleave(data_dir: Path) -> None:
    children = [_child(data_dir, "", f"p{n}", f"p{n}", 40) for n in range(3)]
    assert [c.wait(120) for c in children] == [0, 0, 0]
    for name in ("a_2026-01-01.dat", "b_2026-01-01.dat"):
        lines = (data_dir / name).read_bytes().split(b"\n")[:-1]
        assert len(lines) == 3 * 40 * 50
        # each append of 50 lines is contiguous, and in order within its process
        blocks = [lines[i:i + 50] for i in range(0, len(lines), 50)]
        for block in blocks:
            tag, i, _ = block[0].split()
            assert block == [b"%s %s %d" % (tag, i, j) for j in range(50)]
    # and both files got the batches in the same order: the two locks were held together
    a_order = (data_dir / "a_2026-01-01.dat").read_bytes()
    assert a_order == (data_dir / "b_2026-01-01.dat").read_bytes()


def test_failure_on_the_second_file_rolls_back_the_first(data_dir: Path) -> None:
    store, dedup = _open(data_dir, fault_enospc_after_bytes=10)
    try:
        with pytest.raises(StorageUnavailable):
            store.append("multi", {"a_2026-01-01.dat": b"12345\n", "b_2026-01-01.dat": b"67890\n"},
                         2, 0)
        # created by the refused batch: removed, not left empty
        assert not (data_dir / "a_2026-01-01.dat").exists()
        assert not (data_dir / "b_2026-01-01.dat").exists()
        assert dedup.lookup("multi") is None and dedup.intents() == []
    finally:
        store.close()
        dedup.close()


def test_names_outside_the_data_dir_are_refused(opened: tuple[PartitionedStore, DedupIndex]) -> None:
    store, _ = opened
    for name in ("../x.dat", "/etc/passwd", ".receiver/state.sqlite3", "a/b.dat", "_rejected/../x"):
        with pytest.raises(ValueError):
            store.append(None, {name: b"x\n"}, 1, 0)


class _CountingIndex(DedupIndex):
    """A DedupIndex that counts its intent transactions (step 3 of a round)."""

    recorded = 0

    def record_intents(self, batch_id: str | None, sizes: Mapping[str, int]) -> None:
        self.recorded += 1
        super().record_intents(batch_id, sizes)


def test_a_steady_stream_records_its_intents_in_the_previous_rounds_commit(data_dir: Path) -> None:
    dedup = _CountingIndex(data_dir / ".receiver", fsync=False)
    dedup.create()
    # one batch per round, all queued before the committer starts: each commit sees the next one
    store = PartitionedStore(data_dir, dedup, fsync=False, max_round_bytes=1)
    store.create()
    try:
        futures = [store.submit(Batch(f"s{i}", {"a_2026-01-01.dat": b"line %d\n" % i}, 1, 0))
                   for i in range(3)]
        store.start()
        assert [f.result(timeout=10).duplicate for f in futures] == [False] * 3
        assert (data_dir / "a_2026-01-01.dat").read_bytes() == b"line 0\nline 1\nline 2\n"
        assert dedup.recorded == 1  # rounds 2 and 3 appended under the intent round 1 and 2 left
        # the last round leaves one standing at the file's size, cleared once the file is idle
        assert [(i.file, i.size_before) for i in dedup.intents()] == [("a_2026-01-01.dat", 21)]
        store.close()
        assert dedup.intents() == []  # a clean stop settles it
    finally:
        store.close()
    # the intent a commit leaves for the next round is an intent like any other: bytes a holder
    # that crashed mid-append left after it are rolled back by the next holder
    appender = Appender(data_dir, dedup, fsync=False, max_open_files=8)
    try:
        appender.append([("u", 1, 0)], {"a_2026-01-01.dat": b"line 3\n"}, lambda: {"a_2026-01-01.dat"})
        kept = (data_dir / "a_2026-01-01.dat").read_bytes()
        assert [(i.file, i.size_before) for i in dedup.intents()] == [("a_2026-01-01.dat", len(kept))]
        with open(data_dir / "a_2026-01-01.dat", "ab") as f:
            f.write(b"torn li")  # appended, never recorded: the crashed holder's
        appender.append([("v", 1, 0)], {"a_2026-01-01.dat": b"line 4\n"})
        assert (data_dir / "a_2026-01-01.dat").read_bytes() == kept + b"line 4\n"
        assert dedup.recorded == 2 and dedup.intents() == []  # u's own; v appended under u's
        assert dedup.lookup("u") is not None and dedup.lookup("v") is not None
    finally:
        appender.close()
        dedup.close()


def test_standing_intents_are_settled_once_their_files_are_idle(data_dir: Path) -> None:
    store, dedup = _open(data_dir, settle_after_s=1.0)
    try:
        store.append("s1", {"a_2026-01-01.dat": b"one\n", "b_2026-01-01.dat": b"one\n"}, 2, 0)
        assert sorted(i.file for i in dedup.intents()) == ["a_2026-01-01.dat", "b_2026-01-01.dat"]
        wait_until(lambda: dedup.intents() == [], what="the idle files' intents settled")
        # a file appended to after its intent was settled records a fresh one first, and keeps it
        store.append("s2", {"a_2026-01-01.dat": b"two\n"}, 1, 0)
        assert [(i.file, i.size_before) for i in dedup.intents()] == [("a_2026-01-01.dat", 8)]
        with open(data_dir / "a_2026-01-01.dat", "ab") as f:
            f.write(b"torn")  # as if another process crashed mid-append under that intent
        wait_until(lambda: dedup.intents() == [], what="the crashed append rolled back")
        assert (data_dir / "a_2026-01-01.dat").read_bytes() == b"one\ntwo\n"
        assert (data_dir / "b_2026-01-01.dat").read_bytes() == b"one\n"
    finally:
        store.close()
        dedup.close()


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_cache_of_open_files_is_bounded(data_dir: Path) -> None:
    store, dedup = _open(data_dir, max_open_files=3)
    try:
        store.append(None, {"warm_2026-01-01.dat": b"x\n"}, 1, 0)
        base = _open_fds()
        for day in range(1, 29):
            store.append(None, {f"p_2026-02-{day:02d}.dat": b"x\n"}, 1, 0)
        assert _open_fds() <= base + 3
        assert len(list(data_dir.glob("p_*.dat"))) == 28
    finally:
        store.close()
        dedup.close()


def test_a_moved_file_is_reopened_not_written_behind_the_move(
        data_dir: Path, opened: tuple[PartitionedStore, DedupIndex]) -> None:
    store, _ = opened
    store.append(None, {"w_2026-01-01.dat": b"one\n"}, 1, 0)
    os.rename(data_dir / "w_2026-01-01.dat", data_dir / "archived.old")
    store.append(None, {"w_2026-01-01.dat": b"two\n"}, 1, 0)
    assert (data_dir / "archived.old").read_bytes() == b"one\n"
    assert (data_dir / "w_2026-01-01.dat").read_bytes() == b"two\n"
    (data_dir / "w_2026-01-01.dat").unlink()
    store.append(None, {"w_2026-01-01.dat": b"three\n"}, 1, 0)
    assert (data_dir / "w_2026-01-01.dat").read_bytes() == b"three\n"


def test_claim_is_taken_without_waiting_and_excludes_other_holders(data_dir: Path) -> None:
    dedup = DedupIndex(data_dir / ".receiver", fsync=False)
    dedup.create()
    mine, other = dedup.claims(), dedup.claims()
    try:
        assert mine.try_claim("same")
        assert mine.try_claim("same")  # a stripe already held: claimed at once
        assert not other.try_claim("same")
        assert other.try_claim("different")
        mine.release()
        assert other.try_claim("same")
    finally:
        mine.release()
        other.release()
        dedup.close()


def test_purge_forgets_only_old_ids(opened: tuple[PartitionedStore, DedupIndex]) -> None:
    store, dedup = opened
    store.append("old", {}, 0, 0)
    assert dedup.purge(3600) == 0
    assert dedup.lookup("old") is not None
    assert dedup.purge(0) == 1
    assert dedup.lookup("old") is None
