"""SpoolWriter: the thread that commits every batch the batchers cut, in order.

Compressing and committing a batch (an fsync) then overlaps with reading the next ones. The
hand-over queue holds ``SLOTS`` (two) batches: with one, the reader waited 35-40 % of its time in
e2e for the writer to take the batch it had cut (a commit's fsync shares the disk with the
receiver's, so a put's wall time swings 1-6 ms); with two it reads on through such a commit.
Still bounded, so a full spool or a slow disk reaches the collectors through their pipes within
three batches. The batches that queued up during a commit are committed together in the next
one (``Spool.put_many``: one transaction, one fsync, each token with its batch). A batch the
flusher cuts by age (``put_due``) is committed on the flusher's own thread when the writer has
nothing to do: at low rates that saves a thread hand-off per batch, and the flusher has nothing
to overlap with. A failing disk is
retried (the collector waits), never dropped, except at shutdown after three attempts (logged as
data lost).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from spoolagent.errors import SpoolError
from spoolagent.protocol import Records
from spoolagent.spool.queue import Spool

log = logging.getLogger(__name__)

_Item = tuple[str, "Records | Sequence[bytes]", "str | None"]

# batches handed over that may wait while the writer commits: at most SLOTS + 1 are handed over
# and not committed at any time, whether the writer commits them one by one or together
# (docs/reliability.md counts them in the raw collectors' loss window: each is at most
# batch.max_bytes)
SLOTS = 2


class SpoolWriter:
    """One writer thread in front of ``spool.put``. ``put`` and ``wait_spooled`` are thread-safe;
    ``start`` and ``close`` are for the agent's main thread."""

    def __init__(self, spool: Spool, *, stopping: threading.Event, on_error: Callable[[str], None]) -> None:
        self._spool = spool
        self._stopping = stopping
        self._on_error = on_error
        self._q: queue.Queue[_Item | None] = queue.Queue()  # bounded by _room
        self._room = threading.Semaphore(SLOTS + 1)  # one per batch handed over, not committed
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards _queued
        self._queued = 0  # batches handed over and not committed yet
        self._writing = threading.Lock()  # held for each commit: the thread's and put_due's
        self.errors = 0  # failed spool writes (each retried)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="spool-writer", daemon=True)
        self._thread.start()

    def put(self, collector: str, lines: Records | Sequence[bytes], checkpoint: str | None) -> object:
        """The batchers' ``put``: hand one batch over (``Records`` are handed over as they are: the
        caller drops them). Blocks while ``SLOTS + 1`` batches are handed over and not committed
        (that is the back-pressure)."""
        with self._lock:
            self._queued += 1
        self._room.acquire()
        self._q.put((collector, _owned(lines), checkpoint))
        return None

    def put_due(self, collector: str, lines: Records | Sequence[bytes], checkpoint: str | None) -> object:
        """The flusher's ``put`` (a batch cut by age): committed on the caller's thread when
        nothing is handed over and not committed yet (the writer thread is not woken for it), else
        handed over behind the rest like ``put`` (a collector's batches stay in order: its
        batcher's lock is held across either). Blocks for the commit."""
        with self._lock:
            inline = self._queued == 0 and self._thread is not None and not self._stopping.is_set()
            if inline:
                self._writing.acquire()  # free: the thread holds it only for a queued batch
        if not inline:
            return self.put(collector, lines, checkpoint)
        try:
            self._commit([(collector, _owned(lines), checkpoint)])
        finally:
            self._writing.release()
        return None

    def wait_spooled(self) -> None:
        """Block until every batch handed over is committed (its token is then durable)."""
        self._q.join()

    def close(self) -> None:
        """Commit everything handed over, then stop the thread. Blocks."""
        if self._thread is not None:
            self._q.put(None)
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while True:
            group = [self._q.get()]
            # the batches handed over while the last commit ran go in one transaction: one fsync
            # for all (in e2e the writer spent ~60 % of its time in its commits, the reader
            # waited for it)
            while group[-1] is not None and len(group) < SLOTS + 1:
                try:
                    group.append(self._q.get_nowait())
                except queue.Empty:
                    break
            items = [item for item in group if item is not None]
            try:
                if items:
                    with self._writing:
                        self._commit(items)
                    with self._lock:
                        self._queued -= len(items)
                    for _ in items:
                        self._room.release()
            finally:
                for _ in group:
                    self._q.task_done()
            if group[-1] is None:
                return

    def _commit(self, items: list[_Item]) -> None:
        try:
            self._write(items)
        except Exception:
            log.exception("data lost: cannot spool batches=%d collector=%s lines=%d", len(items),
                          items[0][0], sum(len(item[1]) for item in items))

    def _write(self, items: list[_Item]) -> object:
        attempt = 0
        collector, lines = items[0][0], sum(len(item[1]) for item in items)
        while True:
            try:
                return self._spool.put_many(items)
            except SpoolError as exc:
                attempt += 1
                self.errors += 1
                self._on_error(f"spool: {exc}")
                if attempt == 1 or attempt % 60 == 0:
                    log.error("cannot spool batches=%d collector=%s lines=%d attempt=%d err=%s; retrying",
                              len(items), collector, lines, attempt, exc)
                if self._stopping.is_set() and attempt >= 3:
                    log.error("data lost: cannot spool at shutdown batches=%d collector=%s lines=%d err=%s",
                              len(items), collector, lines, exc)
                    raise
                self._stopping.wait(1.0) if not self._stopping.is_set() else time.sleep(0.5)


def _owned(lines: Records | Sequence[bytes]) -> Records | Sequence[bytes]:
    """The batch as the writer keeps it: Records as they are, other lines copied."""
    return lines if isinstance(lines, Records) else list(lines)
