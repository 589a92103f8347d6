"""Everything the spool takes from persist-queue beyond its public API, in one place.

The spool shares ``spool.db`` with ``persistqueue.SQLiteAckQueue``: puts, acks, the status index,
the CLI's offline access and salvage all write the library's table directly, and the live queue
reaches into two private attributes. A new library version that changes any of this must fail a
test, not corrupt a spool: ``tests/spool/test_pq.py`` pins every name here against the installed
library. This module does not import persistqueue (``queue`` is the only importer); it names the
library's internals as data.
"""

from __future__ import annotations

import sqlite3
from typing import Any

# the library's table for queue name "default": f"{SQLiteAckQueue._TABLE_NAME}_{name}"
QUEUE_TABLE = "ack_queue_default"

# persistqueue.sqlackqueue.AckStatus (the library keeps them as strings; SQLite stores ints)
INITED, READY, UNACK, ACKED, ACK_FAILED = 0, 1, 2, 5, 9

# SQLiteAckQueue._SQL_CREATE for this table, verbatim, so that a spool the CLI creates (import,
# salvage) holds exactly the library's table
QUEUE_DDL = (
    f"CREATE TABLE IF NOT EXISTS `{QUEUE_TABLE}` (_id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "data BLOB, timestamp FLOAT, status INTEGER)"
)

# private attributes of a SQLiteAckQueue instance that the live queue uses
GETTER, PUTTER, UNACK_CACHE = "_getter", "_putter", "_unack_cache"


def connections(q: Any) -> list[sqlite3.Connection]:
    """The library's own SQLite connections (to tune their pragmas); skips one it has not made."""
    return [c for c in (getattr(q, GETTER, None), getattr(q, PUTTER, None)) if c is not None]


def forget_unacked(q: Any, pqid: int) -> None:
    """Drop ``pqid`` from the library's in-memory map of in-flight rows: what its own ``ack``
    does, for a row we deleted ourselves."""
    getattr(q, UNACK_CACHE).pop(pqid, None)


class RawBytes:
    """The library's serializer for our rows: they are already bytes in the row format of
    ``format`` (never the library's default, pickle)."""

    @staticmethod
    def dumps(value: bytes) -> bytes:
        return value

    @staticmethod
    def loads(value: bytes) -> bytes:
        return value
