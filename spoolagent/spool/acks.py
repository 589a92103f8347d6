"""PendingAcks: delivered batches whose row is not deleted yet, so that acks share commits.

An ack is a DELETE in an fsync'd transaction. While collectors are busy the spool writer commits a
put (also fsync'd) every few milliseconds, so a sender's ack waits here and rides in the next put's
transaction: one fsync per batch instead of two. When no put comes (a backlog draining, an agent
going quiet) a getter commits the pending acks once the oldest is ``delay_s`` old, all in one
transaction: one getter, the watcher (the first to wait while acks are pending: the sender that
just acked), not every idle sender thread waking for the same deadline. A watcher that takes a
batch instead commits them when it next gets, after that send. What a crash can cost: the
batches acked in the last ``delay_s`` (plus that send) are sent again with their ids, and the
receiver answers them as duplicates; no line is lost, since a batch's lines and checkpoint were
committed at its put. Thread-safe; never blocks on SQLite (the Spool commits).
"""

from __future__ import annotations

import sqlite3
import threading
import time

from spoolagent.errors import SpoolError
from spoolagent.spool._pq import QUEUE_TABLE
from spoolcore.sqlite import immediate

# longest an ack waits for a put to ride on: about max_wait_ms, so that a collector printing
# steadily (one put per max_wait_ms) carries every ack
ACK_DELAY_S = 0.25


class PendingAcks:
    """The pending acks of one spool. ``add``, ``take``, ``restore`` and ``due_at`` are
    thread-safe; ``ride`` and ``commit`` write on the caller's connection, under its lock."""

    def __init__(self, delay_s: float = ACK_DELAY_S) -> None:
        self.delay_s = delay_s
        self._lock = threading.Lock()
        self._pqids: list[int] = []
        self._oldest_s = 0.0  # monotonic time the oldest pending ack was added
        self._watcher: int | None = None  # thread ident of the getter that wakes for due_at()

    def add(self, pqid: int) -> None:
        with self._lock:
            if not self._pqids:
                self._oldest_s = time.monotonic()
            self._pqids.append(pqid)

    def take(self) -> list[int]:
        """Every pending ack; the caller deletes their rows (or ``restore``s them on failure)."""
        with self._lock:
            pqids, self._pqids = self._pqids, []
            self._watcher = None
            return pqids

    def restore(self, pqids: list[int]) -> None:
        """Put back acks whose transaction failed: they are committed by a later one."""
        if pqids:
            with self._lock:
                if not self._pqids:
                    self._oldest_s = time.monotonic()
                self._pqids[:0] = pqids

    def pending(self) -> list[int]:
        """The pqids acked and not yet deleted, in order."""
        with self._lock:
            return list(self._pqids)

    def due_at(self) -> float | None:
        """When the pending acks must be committed without waiting for a put (monotonic), or None
        if none is pending. Lock-free read."""
        return self._oldest_s + self.delay_s if self._pqids else None

    def watched_by(self, ident: int) -> bool:
        """Whether the getter ``ident`` is the one to wake at ``due_at()``: the first to ask while
        acks are pending, until they are committed."""
        with self._lock:
            if not self._pqids:
                return False
            if self._watcher is None:
                self._watcher = ident
            return self._watcher == ident

    def ride(self, db: sqlite3.Connection) -> list[int]:
        """Inside the caller's transaction: delete the rows of every pending ack; returns them
        (``restore`` them if that transaction fails)."""
        pqids = self.take()
        db.executemany(f"DELETE FROM `{QUEUE_TABLE}` WHERE _id = ?", [(p,) for p in pqids])
        return pqids

    def commit(self, db: sqlite3.Connection) -> list[int]:
        """Delete the rows of every pending ack in one fsync'd transaction of their own; returns
        them. Raises SpoolError, and the acks stay pending."""
        pqids: list[int] = []
        try:
            with immediate(db):
                pqids = self.ride(db)
        except BaseException as exc:
            self.restore(pqids)
            if isinstance(exc, sqlite3.Error):
                raise SpoolError(f"cannot ack pqids={pqids}: {exc}") from exc
            raise
        return pqids
