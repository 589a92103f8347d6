"""Spool: the agent's durable queue of batches in STATE_DIR/spool.db (persist-queue SQLiteAckQueue).

One row = one batch, committed in one transaction (``put_many``: several, in order, in one),
stored already compressed in the row format of ``spool_format`` (never pickle). States: ready
(0/1), in flight (2), failed (9, the dead letter). The spool is bounded by ``max_bytes``: when
full, ``put`` blocks (back-pressure) or drops the oldest ready batches. Side tables (same file):
``spool_batches`` (metadata: attempts, last error, HTTP status and reason of a dead-lettered
batch) and ``spool_checkpoints``.

The only module that imports persistqueue (what it takes beyond the public API is named in
``_pq``); a damaged file at start-up goes to ``salvage``; what becomes of a batch once its send
ends (ack, nack, fail) is ``settle``.

Why some writes bypass the library: a put must insert the row, its metadata and its checkpoint
in ONE transaction (a crash never leaves a row without metadata or a checkpoint ahead of its
lines), so ``put`` inserts into the library's table on its own connection, and an ack deletes the
row there too, riding in the next put's transaction when it may wait (``acks``); a get is one
``UPDATE ... RETURNING`` there (``_TAKE``), and none at all for a batch that a put hands to a
get already waiting (the row goes in in flight; ``ready``). The library does the rest (nack,
ack_failed, resume of in-flight rows; the get with an SQLite before 3.35).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spoolagent.errors import SpoolError
from spoolagent.protocol import Records
from spoolagent.spool import _pq
from spoolagent.spool._pq import INITED, QUEUE_TABLE, UNACK, RawBytes
from spoolagent.spool.acks import PendingAcks
from spoolagent.spool.bound import REFRESH_S, Bound, WhenFull
from spoolagent.spool.db import check_schema, configure, connect
from spoolagent.spool.file import discount_delivered, file_bytes, query_stats
from spoolagent.spool.format import (
    BUSY_TIMEOUT_S,
    DB_NAME,
    ENCODINGS,
    SpooledBatch,
    decode_row,
    handed_batch,
    insert_row,
    make_row,
    record_checkpoint,
)
from spoolagent.spool.lock import release_lock, take_lock
from spoolagent.spool.ready import ReadySignal
from spoolagent.spool.salvage import fail_unreadable_head, open_moving_damaged
from spoolagent.spool.settle import Settling
from spoolcore import imports
from spoolcore.sqlite import immediate, is_busy

# persist-queue tries its async queues (asyncio, then aiofiles) and its MySQL queue on every import;
# the spool uses neither (spoolcore.imports)
with imports.without("persistqueue.async_queue", "persistqueue.async_sqlqueue", "persistqueue.mysqlqueue"):
    from persistqueue import SQLiteAckQueue
    from persistqueue.exceptions import Empty

__all__ = ["Spool", "SpooledBatch", "WhenFull"]

log = logging.getLogger(__name__)

# A get takes the oldest ready row in one statement on the spool's own connection: no SELECT,
# UPDATE and commit on the library's second connection, whose writes also made the spool's
# connection re-read its cached pages at its next put (issue 17). RETURNING needs SQLite 3.35; an
# older library gets persist-queue's get. The row comes back as a blob whatever its type, so a
# damaged row fails to decode and goes to the dead letter like any undecodable one.
_RETURNING = sqlite3.sqlite_version_info >= (3, 35, 0)
_TAKE = (f"UPDATE `{QUEUE_TABLE}` SET status = {UNACK} WHERE _id = (SELECT _id FROM `{QUEUE_TABLE}` "
         f"WHERE status < {UNACK} ORDER BY _id LIMIT 1) RETURNING _id, CAST(data AS BLOB), "
         "(SELECT attempts FROM spool_batches WHERE pqid = _id)")

# a get also sees rows that another process (spool import, retry-failed, salvage) made ready: one
# getter queries this often while idle (the agent's own puts and nacks wake the getters at once)
_POLL_S = 5.0


class Spool(Settling):
    """The agent's spool. Thread-safe: several reader threads put, several sender threads get.

    Raises SpoolBusy if another process holds STATE_DIR/spool.lock, SpoolError if the file is
    corrupt, truncated or from a newer version. With ``move_corrupt_aside`` (the agent) a damaged
    file (garbage, truncated, failing SQLite's quick_check, run at every start) is
    renamed to ``spool.db.corrupt-<time>`` with its -wal/-shm, logged at ERROR, named in
    ``moved_aside``, and an empty spool starts in its place (``spoolagent spool salvage`` re-queues
    what is still readable). A newer version, a locked or a full disk still raise.
    """

    def __init__(self, state_dir: Path, *, max_bytes: int, when_full: WhenFull, compression: str,
                 stopping: threading.Event, busy_timeout_s: float = BUSY_TIMEOUT_S,
                 move_corrupt_aside: bool = False) -> None:
        if compression not in ENCODINGS:
            raise ValueError(f"compression must be one of {sorted(ENCODINGS)}")
        self._path = state_dir / DB_NAME
        self._bound = Bound(max_bytes, when_full)
        self._encoding = ENCODINGS[compression]
        self._stopping = stopping
        self._cond = threading.Condition()  # guards _bound, _inflight, writes on _db
        self._get_lock = threading.Lock()  # a get never races a drop_oldest delete
        self._ready: ReadySignal[SpooledBatch] = ReadySignal(_POLL_S)  # idle getters do not query
        self._inflight: dict[int, int] = {}  # pqid -> row bytes
        self._acks = PendingAcks()  # delivered, row not deleted yet: rides in the next put
        self._closed = False
        state_dir.mkdir(parents=True, exist_ok=True)
        # the lock comes first: the library's auto_resume would resend a live agent's in-flight rows
        self._lock_fd = take_lock(state_dir)
        try:
            # where a damaged spool.db went at this start (None: it was sound)
            resumed, self.moved_aside = open_moving_damaged(
                self._path, lambda: self._open(state_dir, busy_timeout_s), move_corrupt_aside)
        except sqlite3.DatabaseError as exc:
            release_lock(self._lock_fd)
            raise SpoolError(f"{self._path} is corrupt ({exc}); move it aside to start with an "
                             "empty spool") from exc
        except BaseException:
            release_lock(self._lock_fd)
            raise
        log.info("spool open path=%s bytes=%d resumed_inflight=%d", self._path, self._bound.bytes,
                 resumed)

    def _open(self, state_dir: Path, busy_timeout_s: float) -> int:
        """Open spool.db and the library's queue; returns the in-flight rows resumed. Closes what
        it opened when it fails."""
        self._db = connect(self._path, create=True)
        q: SQLiteAckQueue | None = None
        try:
            check_schema(self._db, self._path, upgrade=True)
            resumed = int(self._db.execute(
                f"SELECT count(*) FROM `{QUEUE_TABLE}` WHERE status = {UNACK}").fetchone()[0])
            q = self._q = SQLiteAckQueue(str(state_dir), auto_resume=True, db_file_name=DB_NAME,
                                         multithreading=True, timeout=busy_timeout_s,
                                         serializer=RawBytes)
            # The library sets only journal_mode=WAL. Its connections write only state changes
            # whose loss is harmless: the in-flight mark of a get (reset to ready at start-up
            # anyway), nack, ack_failed. With synchronous=NORMAL a power cut can undo the last
            # of them, and the batch is then resent with its id (the receiver dedups) -- never
            # lost. So they skip the fsync; puts and acks (our own connection) stay FULL, and a
            # FULL commit syncs every WAL frame before it too.
            for conn in _pq.connections(q):
                configure(conn)
                conn.execute("PRAGMA synchronous=NORMAL")
            self._checkpoints = dict(self._db.execute(
                "SELECT collector, token FROM spool_checkpoints").fetchall())
            self._bound.refresh(self._db)
        except BaseException:
            if q is not None:
                q.close()
            self._db.close()
            raise
        return resumed

    # -- put ---------------------------------------------------------------------------------

    def put(self, collector: str, lines: Records | Sequence[bytes], checkpoint: str | None = None) -> str:
        """Spool one batch in one transaction (the batcher's Records, or lines without newline);
        returns its batch id.

        Blocks while the spool is full with WhenFull.BLOCK (until an ack or a purge makes room,
        or ``stopping`` is set: then it writes anyway, over the bound, rather than lose the
        lines). Raises SpoolError on disk full or another SQLite error; a row that was committed
        is never lost.
        """
        return self.put_many([(collector, lines, checkpoint)])[0]

    def put_many(self, batches: Sequence[tuple[str, Records | Sequence[bytes], str | None]]) -> list[str]:
        """``put`` for several batches (collector, lines, checkpoint) in ONE transaction, in order:
        one fsync'd commit for all (the spool writer's batches queued behind a commit); all or
        none are committed, each token with its batch. Returns their batch ids."""
        made = [make_row(c, lines, self._encoding, ckpt) for c, lines, ckpt in batches]  # compress unlocked
        size = sum(len(row) for _header, row in made)
        # Lock order: _get_lock before _cond before the SQLite write lock. A get holds _get_lock
        # while the library's UPDATE waits for the SQLite write lock, so taking _get_lock inside
        # our own write transaction would deadlock (seen with drop_oldest and a sender retrying).
        dropping = self._bound.when_full is WhenFull.DROP_OLDEST
        with self._get_lock if dropping else contextlib.nullcontext(), self._cond:
            self._check_open()
            self._bound.refresh(self._db, older_than_s=REFRESH_S)
            if not dropping:
                if self._bound.bytes + size > self._bound.max_bytes:
                    self._commit_acks()  # delivered rows make room first
                self._bound.wait_for_room(size, self._db, self._cond, self._stopping, self._check_open)
            # gets waiting while nothing else is ready: their batches go in committed in flight and
            # are handed over (``ready``), with no get transaction; a crash resumes them to ready
            handing = min(len(made), self._ready.idle_getters())
            acked: list[int] = []
            pqids: list[int] = []
            try:
                with immediate(self._db):
                    if dropping:
                        self._bound.drop_oldest(self._db, size)
                    for i, (header, row) in enumerate(made):
                        status = UNACK if i < handing else INITED
                        pqids.append(pqid := insert_row(self._db, header, row, status))
                        # the token is committed with its lines, so it is durable before the
                        # row can be acked and cleared
                        record_checkpoint(self._db, header, pqid)
                    # the pending acks ride in this fsync'd commit instead of one each (``acks``)
                    acked = self._acks.ride(self._db)
            except BaseException as exc:
                self._acks.restore(acked)
                if isinstance(exc, sqlite3.Error):
                    names = ",".join(dict.fromkeys(header.collector for header, _row in made))
                    raise SpoolError(f"cannot spool {len(made)} batch(es) of {names}: {exc}") from exc
                raise
            self._forget(acked)
            self._bound.bytes += size
            for header, _row in made:
                if header.checkpoint is not None:
                    self._checkpoints[header.collector] = header.checkpoint
            handed = [handed_batch(pqid, header, row)
                      for pqid, (header, row) in zip(pqids[:handing], made[:handing], strict=True)]
            for batch, (_header, row) in zip(handed, made[:handing], strict=True):
                self._inflight[batch.pqid] = len(row)
        if handed:
            self._ready.hand(handed)
        for _one in made[handing:]:  # one bump per ready row: ReadySignal counts on it (took_one)
            self._ready.bump()
        for (header, row), pqid in zip(made, pqids, strict=True):
            log.debug("spooled batch=%s pqid=%d collector=%s lines=%d bytes=%d", header.batch_id,
                      pqid, header.collector, header.lines, len(row))
        return [header.batch_id for header, _row in made]

    # -- get (ack, nack, fail: ``settle``) ---------------------------------------------------

    def get(self, timeout_s: float | None) -> SpooledBatch | None:
        """The oldest ready batch, now in flight; None after ``timeout_s`` (None: no limit) or,
        when nothing is ready, once ``stopping`` is set. Thread-safe; blocks.

        Raises SpoolError for an undecodable row (which goes to the dead letter, so the next get
        moves on).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        poller = False  # this get holds the one role that queries every _POLL_S
        item: tuple[int, bytes, int | None] | None = None
        handed: SpooledBatch | None = None
        try:
            while True:
                generation = self._ready.generation
                self._check_open()
                item = None
                now = time.monotonic()
                acks_due = self._acks.due_at()
                if acks_due is not None and now >= acks_due:  # no put took them: commit them here
                    with self._cond:
                        self._check_open()
                        self._commit_acks()
                    acks_due = None
                handed = self._ready.take_handed()  # a put's batch, committed in flight for us
                if handed is not None:
                    return handed
                # idle agents: no query while nothing in this process made a row ready; only
                # rows that another process made ready are looked for, every _POLL_S, by one getter
                if self._ready.should_look(generation, now):
                    item = self._get_next()
                    if item is None:
                        self._ready.found_nothing(generation, now)
                    elif self._ready.polled_elsewhere(generation):
                        self.wake_getters()  # another process's rows: the other getters look too
                    else:
                        self._ready.took_one(generation)
                if item is not None:
                    return self._taken(*item)
                if self._stopping.is_set():
                    return None
                now = time.monotonic()
                remaining = None if deadline is None else deadline - now
                if remaining is not None and remaining <= 0:
                    return None
                # wake to commit them if no put comes first (one getter does; see acks.py)
                if acks_due is not None and self._acks.watched_by(threading.get_ident()):
                    until = max(0.0, acks_due - now)
                    remaining = until if remaining is None else min(remaining, until)
                poller = self._ready.wait(generation, remaining, poller, now)
        finally:
            if poller:  # a waiting get takes the role over, now or when it next waits
                self._ready.release_poller(hand_over=item is None and handed is None)

    def wake_getters(self) -> None:
        """Every waiting get looks again (the agent stops, or rows became ready elsewhere)."""
        self._ready.bump(everyone=True)

    def _get_next(self) -> tuple[int, bytes, int | None] | None:
        """Take the oldest ready row: (pqid, row, attempts, or None if not read), or None."""
        if not _RETURNING:
            return self._library_get()
        with self._cond:  # one statement on the spool's own connection (writes are under _cond)
            self._check_open()
            try:
                # the in-flight mark needs no fsync: a crash resumes it to ready anyway, and the
                # next FULL commit (a put's, an ack's) syncs it with its own
                self._db.execute("PRAGMA synchronous=NORMAL")
                try:
                    r = self._db.execute(_TAKE).fetchall()
                finally:
                    self._db.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as exc:
                raise SpoolError(f"cannot read the spool: {exc}") from exc
        return (int(r[0][0]), r[0][1], int(r[0][2] or 0)) if r else None

    def _library_get(self) -> tuple[int, bytes, int | None] | None:
        """persist-queue's get (SQLite before 3.35): a SELECT, then an UPDATE and a commit on its
        own connection; the attempts are read after."""
        with self._get_lock:
            try:
                item: dict[str, Any] = self._q.get(block=False, raw=True)
            except Empty:
                return None
            except sqlite3.OperationalError as exc:
                if is_busy(exc):
                    raise SpoolError(f"cannot read the spool: {exc}") from exc
                self._fail_head(exc)  # e.g. a row that is text, not a blob
            except sqlite3.Error as exc:
                raise SpoolError(f"cannot read the spool: {exc}") from exc
        return int(item["pqid"]), item["data"], None

    def _fail_head(self, exc: Exception) -> None:
        """The library could not read the oldest ready row: dead-letter it, so gets move on."""
        with self._cond:
            failed = fail_unreadable_head(self._db, exc)
        if failed is None:
            raise SpoolError(f"cannot read the spool: {exc}") from exc
        raise SpoolError(failed) from exc

    def _taken(self, pqid: int, data: bytes, attempts: int | None) -> SpooledBatch:
        try:
            header, body = decode_row(data, pqid)
        except SpoolError as exc:
            self.fail(pqid, 0, str(exc), "unreadable_row")
            log.error("undecodable spool row moved to failed pqid=%d err=%s", pqid, exc)
            raise
        with self._cond:
            if attempts is None:
                r = self._db.execute("SELECT attempts FROM spool_batches WHERE pqid = ?",
                                     (pqid,)).fetchone()
                attempts = int(r[0]) if r else 0
            self._inflight[pqid] = len(data)
        return SpooledBatch(pqid, header.batch_id, header.collector, header.lines, body,
                            header.encoding, header.checkpoint, header.created_s, attempts)

    # -- state -------------------------------------------------------------------------------

    def checkpoints(self) -> dict[str, str]:
        """The last committed checkpoint token per collector. Thread-safe, no I/O."""
        with self._cond:
            return dict(self._checkpoints)

    def stats(self) -> dict[str, int | float | None]:
        """DESIGN.md's ``spool stats`` keys, plus file_bytes, max_bytes, dropped_batches and
        dropped_lines. A few index-only queries: cheap enough every second. Thread-safe.
        Delivered batches whose delete is pending (``acks``) count nowhere: the agent's status,
        metrics and heartbeat show what is still to deliver (``spool stats``, reading the file
        from outside, shows them in flight for up to ``acks.ACK_DELAY_S``)."""
        with self._cond:  # rows are deleted under it: every pending ack's row is still there
            self._check_open()
            try:
                out = query_stats(self._db)
                self._bound.bytes = int(out["bytes"])  # the bound counts rows on disk
                discount_delivered(self._db, out, self._acks.pending())
            except sqlite3.Error as exc:
                raise SpoolError(f"cannot read spool stats: {exc}") from exc
            self._bound.refreshed = time.monotonic()
            out.update(file_bytes=file_bytes(self._path), **self._bound.stats())
            return out

    def close(self) -> None:
        """Put this process's in-flight batches back to ready, close, release the lock.

        Idempotent. Call after the readers and senders have stopped.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
            try:
                self._commit_acks()  # delivered: not resent
            except SpoolError as exc:
                log.error("cannot delete delivered batches; they are resent err=%s", exc)
            try:
                for pqid in list(self._inflight):
                    self._q.nack(id=pqid)
                self._inflight.clear()
            except sqlite3.Error as exc:
                log.error("cannot return in-flight batches to ready err=%s", exc)
            finally:
                self._q.close()
                self._db.close()
                release_lock(self._lock_fd)
        log.info("spool closed path=%s", self._path)

