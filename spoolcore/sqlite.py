"""One SQLite write transaction and one busy/locked test, for every writer in both programs.

Connections are opened with ``isolation_level=None`` (autocommit): the ``sqlite3`` module then
never opens a transaction behind our back, and every write goes through ``immediate``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

# SQLITE_BUSY: another connection holds the lock past the busy timeout; SQLITE_LOCKED: a
# conflict inside this connection's shared cache. Both mean "try again later", never "damaged".
_BUSY_CODES = ("SQLITE_BUSY", "SQLITE_LOCKED")


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``, or ``ROLLBACK`` if the body (or the commit) raises.

    IMMEDIATE takes the write lock up front, so a transaction that reads and then writes cannot
    fail half-way with SQLITE_BUSY (a deferred one can, and cannot be retried from inside).
    Blocks up to the connection's busy timeout for the lock; raises what sqlite3 raises. Not
    thread-safe beyond what the connection is: one transaction per connection at a time.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        # COMMIT inside the try: a commit that fails (busy, disk full) leaves the transaction
        # open, and it must be rolled back rather than left holding the write lock
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def is_busy(exc: BaseException) -> bool:
    """True if ``exc`` is SQLite saying the database is busy or locked (by error code, not text:
    the text is for people and changes between SQLite versions)."""
    name = getattr(exc, "sqlite_errorname", None) or ""
    return any(name == c or name.startswith(c + "_") for c in _BUSY_CODES)
