"""spoolcore.sqlite: the write transaction and the busy/locked test, on real files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from spoolcore.sqlite import immediate, is_busy


def _connect(path: Path, timeout_s: float = 5.0) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=timeout_s, isolation_level=None)
    conn.execute("CREATE TABLE IF NOT EXISTS t (v INTEGER)")
    return conn


def test_immediate_commits_the_body(tmp_path: Path) -> None:
    conn = _connect(tmp_path / "db")
    with immediate(conn):
        conn.execute("INSERT INTO t VALUES (1)")
        assert conn.in_transaction
    assert not conn.in_transaction
    other = _connect(tmp_path / "db")
    assert other.execute("SELECT count(*) FROM t").fetchone()[0] == 1
    other.close()
    conn.close()


def test_immediate_rolls_back_when_the_body_raises(tmp_path: Path) -> None:
    conn = _connect(tmp_path / "db")
    with pytest.raises(KeyError), immediate(conn):
        conn.execute("INSERT INTO t VALUES (1)")
        raise KeyError("boom")
    assert not conn.in_transaction
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    conn.close()


def test_immediate_takes_the_write_lock_up_front_and_busy_is_told_by_error_code(tmp_path: Path) -> None:
    holder = _connect(tmp_path / "db")
    waiter = _connect(tmp_path / "db", timeout_s=0.0)
    try:
        with immediate(holder):
            with pytest.raises(sqlite3.OperationalError) as info, immediate(waiter):
                pass  # BEGIN IMMEDIATE itself fails: nothing of the body ran
            assert is_busy(info.value)
            assert not waiter.in_transaction
    finally:
        waiter.close()
        holder.close()


def test_other_sqlite_errors_are_not_busy(tmp_path: Path) -> None:
    bad = tmp_path / "not-a-db"
    bad.write_bytes(b"this is not an SQLite file" * 100)
    conn = sqlite3.connect(bad, isolation_level=None)
    with pytest.raises(sqlite3.DatabaseError) as info:
        conn.execute("SELECT * FROM sqlite_master").fetchall()
    conn.close()
    assert not is_busy(info.value)
    assert not is_busy(sqlite3.OperationalError("database is locked"))  # text alone says nothing
    assert not is_busy(ValueError("busy"))
