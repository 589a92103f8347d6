"""DedupIndex: the receiver's durable state in ``DATA_DIR/.receiver/``: which batch ids are stored
(with their counts), the intent journal of appends in progress, and per-id claims.

One SQLite database in WAL mode (``state.sqlite3``) holds two tables:

- ``batches(id, stored, rejected, stored_at)``: a row means the batch is durably stored;
- ``intents(file, batch_id, size_before, ...)``: a row means an append to ``file`` may be in progress
  or torn. It is written (and committed) before the append and deleted in the *same transaction*
  that inserts the batch row, so "stored" and "no intent left" become true together: a crash at any
  point leaves either a stored batch or an intent that the next holder of the file's lock rolls back.

Claims: the same id stored twice at once (by two processes) is serialised by an exclusive lock
on one byte of ``claims.lock`` (offset: crc32 of the id modulo 2**20), taken without waiting by the
store's commit round. They are Linux open-file-description locks: they exclude other processes
and other holders in this one, and die with their holder (closing one descriptor drops them all).

Thread-safe: one SQLite connection per thread (and per process: none crosses a fork). Every SQLite
failure is raised as StorageUnavailable. Imports only ``receiver.errors`` and ``spoolcore``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sqlite3
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from receiver.errors import StorageUnavailable
from spoolcore.sqlite import immediate

log = logging.getLogger(__name__)

_CLAIM_STRIPES = 1 << 20  # byte ranges of one file: a round's claims rarely collide with another's
_STORAGE_RETRY_AFTER_S = 5
_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, stored INTEGER NOT NULL, rejected INTEGER NOT NULL,
    stored_at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS batches_stored_at ON batches (stored_at);
CREATE TABLE IF NOT EXISTS intents (
    file TEXT PRIMARY KEY, batch_id TEXT, size_before INTEGER NOT NULL, pid INTEGER NOT NULL,
    created_at REAL NOT NULL
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class StoredBatch:
    """What a stored batch answered: its line counts."""

    stored: int
    rejected: int


@dataclass(frozen=True)
class Intent:
    """An append that was begun and never recorded as done: roll ``file`` back to ``size_before``."""

    file: str
    batch_id: str | None
    size_before: int


class Claims:
    """Claims on batch ids held by one holder: an open file description of ``claims.lock`` with
    one byte-range lock (Linux OFD lock) per stripe of ids. Not thread-safe: one holder, one thread.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._held: set[int] = set()

    def try_claim(self, batch_id: str) -> bool:
        """Take the claim of ``batch_id`` without waiting (at once if its stripe is held here
        already). False if another holder has the stripe: try again later."""
        stripe = zlib.crc32(batch_id.encode()) % _CLAIM_STRIPES
        if stripe in self._held:
            return True
        lock = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, stripe, 1, 0)
        try:
            fcntl.fcntl(self._fd, fcntl.F_OFD_SETLK, lock)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise StorageUnavailable(f"cannot claim {batch_id}: {exc}",
                                     retry_after_s=_STORAGE_RETRY_AFTER_S) from exc
        self._held.add(stripe)
        return True

    def release(self) -> None:
        """Release every claim (closing the description drops all its locks). Idempotent."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self._held.clear()


class DedupIndex:
    """The dedup index, intent journal and claims of one data dir. Thread-safe."""

    def __init__(self, state_dir: Path, *, fsync: bool = True, busy_timeout_s: float = 30.0) -> None:
        self.state_dir = state_dir
        self.db_path = state_dir / "state.sqlite3"
        self.claims_path = state_dir / "claims.lock"
        self._synchronous = "FULL" if fsync else "NORMAL"
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()

    # -- set-up -------------------------------------------------------------------------------

    def create(self) -> None:
        """Create the directories and the schema (idempotent). Blocks; raises StorageUnavailable."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageUnavailable(f"cannot create {self.state_dir}: {exc}",
                                     retry_after_s=_STORAGE_RETRY_AFTER_S) from exc
        with self._errors("create schema"):
            self._conn().executescript(_SCHEMA)

    def close(self) -> None:
        """Close every connection. Call once no other thread uses the index any more."""
        with self._all_lock:
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()

    # -- batches ------------------------------------------------------------------------------

    def lookup(self, batch_id: str) -> StoredBatch | None:
        """The counts of ``batch_id`` if it is stored, else None. Blocks briefly."""
        with self._errors("lookup", batch_id):
            row = self._conn().execute(
                "SELECT stored, rejected FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return None if row is None else StoredBatch(int(row[0]), int(row[1]))

    def lookup_many(self, batch_ids: Iterable[str]) -> dict[str, StoredBatch]:
        """The counts of every id of ``batch_ids`` that is stored (one query per 500 ids)."""
        ids = list(batch_ids)
        out: dict[str, StoredBatch] = {}
        with self._errors("lookup"):
            conn = self._conn()
            for i in range(0, len(ids), 500):  # below SQLite's host-parameter limit
                chunk = ids[i:i + 500]
                rows = conn.execute(
                    f"SELECT id, stored, rejected FROM batches WHERE id IN ({','.join('?' * len(chunk))})",
                    chunk).fetchall()
                out.update((str(r[0]), StoredBatch(int(r[1]), int(r[2]))) for r in rows)
        return out

    def claims(self) -> Claims:
        """A new holder of claims (one per round); release it with ``Claims.release``."""
        try:
            fd = os.open(self.claims_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StorageUnavailable(f"cannot open {self.claims_path}: {exc}",
                                     retry_after_s=_STORAGE_RETRY_AFTER_S) from exc
        return Claims(fd)

    def purge(self, older_than_s: float) -> int:
        """Forget batch ids stored more than ``older_than_s`` ago; a later resend of one of them is
        stored again. Returns how many were forgotten."""
        cutoff = time.time() - older_than_s  # wall clock: the retention must survive restarts
        with self._errors("purge"):
            with immediate(self._conn()) as conn:
                n = conn.execute("DELETE FROM batches WHERE stored_at < ?", (cutoff,)).rowcount
        return int(n)

    # -- intents ------------------------------------------------------------------------------

    def intents(self, files: Iterable[str] | None = None) -> list[Intent]:
        """The intents left on ``files`` (all intents if None). The caller holds the files' locks."""
        with self._errors("read intents"):
            conn = self._conn()
            if files is None:
                rows = conn.execute("SELECT file, batch_id, size_before FROM intents").fetchall()
            else:
                names = list(files)
                marks = ",".join("?" * len(names))
                rows = conn.execute(
                    f"SELECT file, batch_id, size_before FROM intents WHERE file IN ({marks})",
                    names).fetchall()
        return [Intent(str(r[0]), r[1], int(r[2])) for r in rows]

    def record_intents(self, batch_id: str | None, sizes: Mapping[str, int]) -> None:
        """Durably record that ``batch_id`` is about to append to each file, from its size.

        Replaces the intents already there (the caller rolled them back to the same size first).
        """
        now, pid = time.time(), os.getpid()
        rows = [(name, batch_id, size, pid, now) for name, size in sizes.items()]
        with self._errors("record intents", batch_id):
            self._write(lambda c: c.executemany(
                "INSERT OR REPLACE INTO intents VALUES (?, ?, ?, ?, ?)", rows))

    def commit(self, batches: Iterable[tuple[str, int, int]], files: Iterable[str],
               next_sizes: Mapping[str, int] | None = None) -> None:
        """In one transaction: record every ``(batch_id, stored, rejected)`` as stored and clear the
        intents of ``files``, except those in ``next_sizes`` (file -> its size now): their intent
        is recorded anew from that size, as the intent of the next append to them (the caller
        holds their locks). Only after this returns are the appends kept by a crash."""
        now = time.time()
        rows = [(batch_id, stored, rejected, now) for batch_id, stored, rejected in batches]
        next_sizes = next_sizes or {}
        names = [(name,) for name in files if name not in next_sizes]
        again = [(name, None, size, os.getpid(), now) for name, size in next_sizes.items()]

        def work(conn: sqlite3.Connection) -> None:
            conn.executemany("INSERT INTO batches VALUES (?, ?, ?, ?)", rows)
            conn.executemany("DELETE FROM intents WHERE file = ?", names)
            conn.executemany("INSERT OR REPLACE INTO intents VALUES (?, ?, ?, ?, ?)", again)

        with self._errors("commit", rows[0][0] if rows else None):
            self._write(work)

    def drop_intents(self, files: Iterable[str]) -> None:
        """Clear the intents of ``files`` after their appends were rolled back."""
        names = [(name,) for name in files]
        with self._errors("drop intents"):
            self._write(lambda c: c.executemany("DELETE FROM intents WHERE file = ?", names))

    # -- internals ----------------------------------------------------------------------------

    def _write(self, work: Callable[[sqlite3.Connection], object]) -> None:
        with immediate(self._conn()) as conn:
            work(conn)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = sqlite3.connect(self.db_path, timeout=self._busy_timeout_s,
                                   isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            self._local.conn, self._local.pid = conn, os.getpid()
            with self._all_lock:
                self._all.append(conn)
        return conn

    @contextlib.contextmanager
    def _errors(self, what: str, batch_id: str | None = None) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as exc:
            code = getattr(exc, "sqlite_errorname", type(exc).__name__)
            log.debug("dedup index failed op=%s batch=%s code=%s err=%s", what, batch_id, code, exc)
            raise StorageUnavailable(f"dedup index: {what} failed: {code}: {exc}",
                                     retry_after_s=_STORAGE_RETRY_AFTER_S) from exc
