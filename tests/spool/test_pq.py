"""Pins what the spool takes from persist-queue (spoolagent/spool/_pq.py) against the installed
library: a new version that renames a status, the table or a private attribute fails here."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from persistqueue import SQLiteAckQueue
from persistqueue.sqlackqueue import AckStatus

from spoolagent.spool import _pq


def test_status_codes_are_the_librarys() -> None:
    assert (_pq.INITED, _pq.READY, _pq.UNACK, _pq.ACKED, _pq.ACK_FAILED) == tuple(
        int(v) for v in (AckStatus.inited, AckStatus.ready, AckStatus.unack, AckStatus.acked,
                         AckStatus.ack_failed))


def _table_sql(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        row = conn.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?",
                           (_pq.QUEUE_TABLE,)).fetchone()
    finally:
        conn.close()
    assert row is not None, f"the library made no table {_pq.QUEUE_TABLE}"
    return str(row[0])


def test_table_name_and_definition_are_the_librarys(tmp_path: Path) -> None:
    q = SQLiteAckQueue(str(tmp_path / "lib"), db_file_name="q.db", auto_commit=True)
    q.close()
    ours = sqlite3.connect(tmp_path / "ours.db")
    ours.execute(_pq.QUEUE_DDL)
    ours.close()
    # SQLite keeps the CREATE statement as written (minus IF NOT EXISTS): compare the columns
    lib, mine = _table_sql(tmp_path / "lib" / "q.db"), _table_sql(tmp_path / "ours.db")
    assert lib.split("(", 1)[1] == mine.split("(", 1)[1]


def test_private_attributes_the_live_queue_uses_exist(tmp_path: Path) -> None:
    q = SQLiteAckQueue(str(tmp_path), db_file_name="q.db", multithreading=True)
    try:
        assert len(_pq.connections(q)) >= 1
        assert all(isinstance(c, sqlite3.Connection) for c in _pq.connections(q))
        q.put(b"x")
        item = q.get(block=False, raw=True)
        assert item["pqid"] in getattr(q, _pq.UNACK_CACHE)
        _pq.forget_unacked(q, item["pqid"])
        assert item["pqid"] not in getattr(q, _pq.UNACK_CACHE)
    finally:
        q.close()
