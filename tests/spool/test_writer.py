"""SpoolWriter: batches committed in the order they were handed over; a failing spool is retried
and, at shutdown, given up on after a few attempts (counted, reported)."""

from __future__ import annotations

import threading
from pathlib import Path

from spoolagent.spool.queue import Spool, WhenFull
from spoolagent.spool.writer import SLOTS, SpoolWriter


def _spool(tmp_path: Path, stopping: threading.Event) -> Spool:
    return Spool(tmp_path / "state", max_bytes=1 << 30, when_full=WhenFull.BLOCK, compression="none",
                 stopping=stopping)


def test_batches_are_committed_in_hand_over_order_with_their_tokens(tmp_path: Path) -> None:
    stopping = threading.Event()
    spool = _spool(tmp_path, stopping)
    writer = SpoolWriter(spool, stopping=stopping, on_error=lambda err: None)
    writer.start()
    try:
        for i in range(20):
            writer.put("c", [b"app 2026-11-30 line %d" % i], f"t{i}")
        writer.wait_spooled()
        assert spool.checkpoints() == {"c": "t19"}  # durable once wait_spooled returns
        got = []
        while (b := spool.get(timeout_s=0.0)) is not None:
            got.append(b.body)
            spool.ack(b.pqid)
        assert got == [b"app 2026-11-30 line %d\n" % i for i in range(20)]
    finally:
        writer.close()
        spool.close()
    assert writer.errors == 0


def test_a_spool_that_keeps_failing_at_shutdown_is_given_up_on_and_reported(tmp_path: Path) -> None:
    stopping = threading.Event()
    spool = _spool(tmp_path, stopping)
    errors: list[str] = []
    writer = SpoolWriter(spool, stopping=stopping, on_error=errors.append)
    writer.start()
    stopping.set()
    spool.close()  # every put now raises SpoolError
    writer.put("c", [b"app 2026-11-30 lost"], None)
    writer.close()  # returns: three attempts at shutdown, then the batch is logged as lost
    assert writer.errors == 3
    assert len(errors) == 3 and all(e.startswith("spool: ") for e in errors)


def test_a_batch_put_due_while_the_writer_is_idle_is_committed_on_the_callers_thread(tmp_path: Path) -> None:
    stopping = threading.Event()
    spool = _spool(tmp_path, stopping)
    writer = SpoolWriter(spool, stopping=stopping, on_error=lambda err: None)
    writer.start()
    try:
        writer.put_due("c", [b"app 2026-11-30 aged"], "t1")
        # committed when put_due returns: no hand-over to the writer thread, nothing to wait for
        assert spool.checkpoints() == {"c": "t1"}
        b = spool.get(timeout_s=0.0)
        assert b is not None and b.body == b"app 2026-11-30 aged\n"
    finally:
        writer.close()
        spool.close()


def test_a_batch_put_due_behind_a_handed_over_one_is_committed_after_it(tmp_path: Path) -> None:
    stopping = threading.Event()
    spool = _spool(tmp_path, stopping)
    writer = SpoolWriter(spool, stopping=stopping, on_error=lambda err: None)
    # not started yet: the handed-over batch waits in the queue, so put_due must not overtake it
    writer.put("c", [b"app 2026-11-30 first"], "t1")
    done = threading.Event()
    t = threading.Thread(target=lambda: (writer.put_due("c", [b"app 2026-11-30 second"], "t2"), done.set()))
    t.start()
    writer.start()
    try:
        t.join(30)
        assert done.is_set()
        writer.wait_spooled()
        assert spool.checkpoints() == {"c": "t2"}
        got = []
        while (b := spool.get(timeout_s=0.0)) is not None:
            got.append(b.body)
        assert got == [b"app 2026-11-30 first\n", b"app 2026-11-30 second\n"]
    finally:
        writer.close()
        spool.close()


def test_slots_plus_one_batches_are_handed_over_then_put_blocks_until_a_commit(tmp_path: Path) -> None:
    stopping = threading.Event()
    spool = _spool(tmp_path, stopping)
    writer = SpoolWriter(spool, stopping=stopping, on_error=lambda err: None)
    # not started: nothing takes the batches, as with a stalled disk
    # as many as the queue before and the batch being committed: the loss window's count
    for i in range(SLOTS + 1):
        writer.put("c", [b"app 2026-11-30 queued %d" % i], f"t{i}")
    blocked = threading.Thread(target=writer.put, args=("c", [b"app 2026-11-30 next"], "tn"))
    blocked.start()
    blocked.join(0.2)  # a bounded look: it must still be waiting (back-pressure)
    assert blocked.is_alive()
    writer.start()
    try:
        blocked.join(30)
        assert not blocked.is_alive()
        writer.wait_spooled()
        assert spool.checkpoints() == {"c": "tn"}
    finally:
        writer.close()
        spool.close()


def test_batches_queued_during_a_commit_are_committed_together_in_order(tmp_path: Path) -> None:
    stopping = threading.Event()
    spool = _spool(tmp_path, stopping)
    groups: list[int] = []
    put_many = spool.put_many

    def counted(batches):  # type: ignore[no-untyped-def]
        groups.append(len(batches))
        return put_many(batches)

    spool.put_many = counted  # type: ignore[method-assign]
    writer = SpoolWriter(spool, stopping=stopping, on_error=lambda err: None)
    for i in range(SLOTS):  # queued before the thread starts, as behind a slow commit
        writer.put("c", [b"app 2026-11-30 line %d" % i], f"t{i}")
    writer.start()
    try:
        writer.wait_spooled()
        assert groups == [SLOTS]
        assert spool.checkpoints() == {"c": f"t{SLOTS - 1}"}
        got = []
        while (b := spool.get(timeout_s=0.0)) is not None:
            got.append(b.body)
        assert got == [b"app 2026-11-30 line %d\n" % i for i in range(SLOTS)]
    finally:
        writer.close()
        spool.close()
