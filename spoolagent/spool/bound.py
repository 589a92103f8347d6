"""Bound: the spool's ``max_bytes`` and what a put does when it is reached (``WhenFull``).

``BLOCK`` (the default) makes a put wait for room -- an ack or an operator's purge -- so the
collectors feel a full spool through their pipes; while the agent stops it writes over the bound
rather than lose lines. ``DROP_OLDEST`` deletes the oldest ready batches inside the put's own
transaction (data lost: counted and logged at ERROR, summarised). The byte total is the sum of the
undelivered rows' sizes, re-read from SQL every few seconds (the operator's CLI changes the file).
Not thread-safe on its own: the Spool calls it under its condition lock.
"""

from __future__ import annotations

import enum
import logging
import sqlite3
import threading
import time
from collections.abc import Callable

from spoolagent.spool._pq import ACKED, QUEUE_TABLE

log = logging.getLogger(__name__)

REFRESH_S = 2.0  # re-read the byte total from SQL this often: the operator may purge or import


class WhenFull(enum.Enum):
    BLOCK = "block"
    DROP_OLDEST = "drop_oldest"


class Bound:
    """The byte total of undelivered batches against ``max_bytes``."""

    def __init__(self, max_bytes: int, when_full: WhenFull) -> None:
        self.max_bytes = max_bytes
        self.when_full = when_full
        self.bytes = 0
        self.refreshed = 0.0  # monotonic time of the last SQL read of the total
        self.blocked_since: float | None = None  # wall time a put started waiting for room
        self.dropped_batches = 0
        self.dropped_lines = 0
        self._drop_logged_s = -1e9

    def refresh(self, db: sqlite3.Connection, older_than_s: float = 0.0) -> None:
        """Re-read the byte total from SQL (if the last read is older than ``older_than_s``)."""
        if older_than_s and time.monotonic() - self.refreshed <= older_than_s:
            return
        self.bytes = int(db.execute(
            "SELECT total(m.bytes) FROM spool_batches AS m JOIN "
            f"`{QUEUE_TABLE}` AS q ON q._id = m.pqid WHERE q.status != {ACKED}").fetchone()[0])
        self.refreshed = time.monotonic()

    def wait_for_room(self, size: int, db: sqlite3.Connection, cond: threading.Condition,
                      stopping: threading.Event, check_open: Callable[[], None]) -> None:
        """BLOCK: wait on ``cond`` (held by the caller) until ``size`` more bytes fit, or the agent
        stops. Raises what ``check_open`` raises (the spool closed meanwhile)."""
        waited = False
        while self.bytes > 0 and self.bytes + size > self.max_bytes:
            if stopping.is_set():
                log.warning("spool full, writing anyway while stopping bytes=%d max_bytes=%d",
                            self.bytes, self.max_bytes)
                return
            if not waited:
                log.warning("spool full, blocking readers bytes=%d max_bytes=%d", self.bytes,
                            self.max_bytes)
                waited = True
                self.blocked_since = time.time()  # status: "blocked" with the bound
            try:
                cond.wait(0.2)
                check_open()
            except BaseException:
                self.blocked_since = None
                raise
            self.refresh(db, older_than_s=1.0)
        if waited:
            self.blocked_since = None
            log.info("spool has room again bytes=%d", self.bytes)

    def drop_oldest(self, db: sqlite3.Connection, size: int) -> None:
        """DROP_OLDEST, inside the put transaction: delete the oldest ready rows until ``size``
        fits."""
        need = self.bytes + size - self.max_bytes
        batches = lines = freed = 0
        while need - freed > 0:
            rows = db.execute(
                f"SELECT q._id, m.bytes, m.lines FROM `{QUEUE_TABLE}` AS q "
                "JOIN spool_batches AS m ON m.pqid = q._id WHERE q.status < 2 "
                "ORDER BY q._id LIMIT 64").fetchall()
            if not rows:
                log.error("spool over its bound with no ready batch left to drop bytes=%d "
                          "max_bytes=%d (in flight or failed: see spool purge --failed)",
                          self.bytes - freed + size, self.max_bytes)
                break
            for pqid, nbytes, nlines in rows:
                if need - freed <= 0:
                    break
                db.execute(f"DELETE FROM `{QUEUE_TABLE}` WHERE _id = ?", (pqid,))
                batches, lines, freed = batches + 1, lines + nlines, freed + nbytes
        if batches:
            self.bytes -= freed
            self.dropped_batches += batches
            self.dropped_lines += lines
            # data lost: ERROR, but summarised (a full spool drops on every put)
            now = time.monotonic()
            if now - self._drop_logged_s >= 10.0:
                log.error("spool full, dropped oldest batches=%d lines=%d bytes=%d total_dropped_batches=%d "
                          "total_dropped_lines=%d", batches, lines, freed, self.dropped_batches,
                          self.dropped_lines)
                self._drop_logged_s = now

    def stats(self) -> dict[str, int | float | str | None]:
        return {"max_bytes": self.max_bytes, "when_full": self.when_full.value,
                "blocked_since_s": self.blocked_since, "dropped_batches": self.dropped_batches,
                "dropped_lines": self.dropped_lines}
