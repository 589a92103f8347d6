"""Settling: what becomes of a batch in flight once its send ends -- ack, nack, a failed attempt
noted, the dead letter -- for the live ``Spool`` (``queue``), of which it is a part.

A mixin, not a class of its own: every one of these writes on the Spool's connection under its
condition lock and keeps its in-flight and bound bookkeeping, which ``Spool`` sets up (the
attributes below). Does not import persistqueue (``queue`` is the only importer): the library's
queue is only called (nack, ack_failed), and what is taken beyond its API is named in ``_pq``.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from spoolagent.errors import SpoolError
from spoolagent.spool import _pq
from spoolagent.spool.acks import PendingAcks
from spoolagent.spool.bound import Bound
from spoolagent.spool.format import SpooledBatch
from spoolagent.spool.ready import ReadySignal


class Settling:
    """ack / nack / note_attempt / fail of the Spool. Thread-safe (under ``_cond``)."""

    _cond: threading.Condition  # guards _bound, _inflight, writes on _db
    _db: sqlite3.Connection
    _q: Any  # the library's SQLiteAckQueue
    _acks: PendingAcks
    _bound: Bound
    _inflight: dict[int, int]  # pqid -> row bytes
    _ready: ReadySignal[SpooledBatch]
    _closed: bool

    def _check_open(self) -> None:
        if self._closed:
            raise SpoolError("the spool is closed")

    @contextmanager
    def _settling(self, what: str, pqid: int) -> Iterator[None]:
        """Under ``_cond``, on an open spool; SQLite's errors become SpoolError naming ``what``."""
        with self._cond:
            self._check_open()
            try:
                yield
            except sqlite3.Error as exc:
                raise SpoolError(f"cannot {what} pqid={pqid}: {exc}") from exc

    def ack(self, pqid: int, *, wait: bool = True) -> None:
        """The batch was delivered: delete its row (its checkpoint is already durable).
        Thread-safe. Raises SpoolError (closed, or SQLite failed: the ack stays pending).

        ``wait``: return once the delete is committed (fsync'd), with any other pending ack.
        Otherwise return at once: the delete rides in the next put's commit, or a get commits it
        within ``acks.ACK_DELAY_S``; a crash before that sends the batch again with its id.
        """
        self._check_open()
        self._acks.add(pqid)
        if wait:
            with self._settling("ack", pqid):
                self._commit_acks()

    def _commit_acks(self) -> None:
        """Delete the rows of every pending ack in one fsync'd commit (the caller holds _cond).
        Raises SpoolError; the acks then stay pending. (The library's ack is an UPDATE to
        "acked", and clearing acked rows a second DELETE: two commits where one does; the
        trigger takes a deleted row's metadata.)"""
        if self._acks.due_at() is not None:
            self._forget(self._acks.commit(self._db))

    def _forget(self, acked: list[int]) -> None:
        """After their delete is committed (the caller holds _cond)."""
        for pqid in acked:
            _pq.forget_unacked(self._q, pqid)  # what the library's ack forgets too
            self._bound.bytes -= self._inflight.pop(pqid, 0)
        if acked:
            self._cond.notify_all()  # a put waiting for room

    def note_attempt(self, pqid: int, error: str) -> None:
        """One failed send attempt of a batch in flight: attempts + 1 and the error kept, so
        ``spool ls`` shows them while the sender retries (it retries without giving the batch
        back). Thread-safe."""
        with self._settling("note an attempt", pqid):
            self._db.execute("UPDATE spool_batches SET attempts = attempts + 1, "
                             "last_error = ? WHERE pqid = ?", (error, pqid))

    def nack(self, pqid: int, error: str | None = None, *, attempted: bool = True) -> None:
        """Back to ready, same batch id; attempts + 1 (unless ``attempted`` is False: the
        attempts were counted by ``note_attempt``) and the error kept. Thread-safe."""
        with self._settling("nack", pqid):
            self._db.execute("UPDATE spool_batches SET attempts = attempts + ?, "
                             "last_error = coalesce(?, last_error) WHERE pqid = ?",
                             (int(attempted), error, pqid))
            self._q.nack(id=pqid)
            self._inflight.pop(pqid, None)
        self._ready.bump()

    def fail(self, pqid: int, status: int, error: str, code: str | None = None) -> None:
        """Dead letter (the library's ack_failed), with HTTP status, the stable reason ``code``
        (default ``http_<status>``: what ``spool ls`` groups by) and the ``error`` text kept.
        Thread-safe."""
        with self._settling("fail", pqid):
            # reason first: a crash in between leaves a row that is simply resent
            self._db.execute("UPDATE spool_batches SET attempts = attempts + 1, "
                             "http_status = ?, reason = ?, last_error = ?, failed_s = ? "
                             "WHERE pqid = ?", (status, code or f"http_{status}", error,
                                                time.time(), pqid))
            self._q.ack_failed(id=pqid)
            self._inflight.pop(pqid, None)
