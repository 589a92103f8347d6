"""Opening spool.db: who may (a permission problem is named as one, never as damage), the
settings of every connection, and the schema checked, created or upgraded (the side tables next to
persist-queue's own, their indexes and trigger).

Shared by ``queue`` (the agent's Spool), ``file`` (the operator's offline and read-only access)
and ``salvage``; the row format itself is ``format``'s.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path

from spoolagent.errors import SpoolBusy, SpoolError
from spoolagent.spool._pq import QUEUE_DDL, QUEUE_TABLE
from spoolagent.spool.format import BUSY_TIMEOUT_S, decode_row
from spoolcore.sqlite import immediate, is_busy

SCHEMA_VERSION = 1  # PRAGMA user_version of a spool this build writes
WAL_LIMIT_BYTES = 16 * 1024 * 1024

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS spool_batches (
    pqid INTEGER PRIMARY KEY,          -- {QUEUE_TABLE}._id
    batch_id TEXT NOT NULL UNIQUE,
    collector TEXT NOT NULL,
    lines INTEGER NOT NULL,
    bytes INTEGER NOT NULL,            -- length of the stored row
    prods TEXT NOT NULL,               -- JSON {{prod: lines}}
    created_s REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    http_status INTEGER,
    reason TEXT,
    failed_s REAL
);
CREATE TABLE IF NOT EXISTS spool_checkpoints (
    collector TEXT PRIMARY KEY,
    token TEXT NOT NULL,
    pqid INTEGER NOT NULL,             -- the row that carried it: newest wins by row id
    batch_id TEXT NOT NULL,
    updated_s REAL NOT NULL
);
-- persist-queue has no index on status: without these every get and every COUNT walks the
-- blobs' overflow pages (status is stored after the blob).
CREATE INDEX IF NOT EXISTS spool_q_ready ON `{QUEUE_TABLE}`(_id) WHERE status < 2;
CREATE INDEX IF NOT EXISTS spool_q_status ON `{QUEUE_TABLE}`(status);
-- whoever deletes a row (the library's clear_acked_data, purge, drop_oldest), its metadata goes too
CREATE TRIGGER IF NOT EXISTS spool_q_delete AFTER DELETE ON `{QUEUE_TABLE}`
BEGIN DELETE FROM spool_batches WHERE pqid = OLD._id; END;
"""


def connect(path: Path, *, readonly: bool = False, create: bool = False,
            busy_timeout_s: float = BUSY_TIMEOUT_S) -> sqlite3.Connection:
    """A connection to spool.db in autocommit mode (explicit BEGIN), WAL, synchronous=FULL.

    Raises SpoolError if the file is missing (unless ``create``) or is not a SQLite database.
    """
    _check_access(path, readonly, create)
    mode = "ro" if readonly else ("rwc" if create else "rw")
    try:
        conn = sqlite3.connect(f"file:{path}?mode={mode}", uri=True, timeout=busy_timeout_s,
                               isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise SpoolError(f"cannot open {path}: {exc}") from exc
    try:
        if not readonly and conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            conn.execute("PRAGMA journal_mode=WAL")
        configure(conn)
        conn.execute("PRAGMA user_version").fetchone()
    except sqlite3.OperationalError as exc:
        conn.close()
        if is_busy(exc):
            raise SpoolBusy(f"{path} stayed locked by another writer: {exc}") from exc
        raise SpoolError(f"{path} is not a usable spool ({exc}): corrupt or not a SQLite "
                         "database; move it aside to start with an empty spool") from exc
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise SpoolError(f"{path} is not a usable spool ({exc}): corrupt or not a SQLite "
                         "database; move it aside to start with an empty spool") from exc
    return conn


def _check_access(path: Path, readonly: bool, create: bool) -> None:
    """A spool this user may not read or write (``spool import`` run as root leaves one, an
    operator runs the CLI as themselves) is a permission problem, named as such: SQLite's own
    words for it ("attempt to write a readonly database", "unable to open") read like damage and
    steered operators into moving live data aside. Raises SpoolError; also if there is no spool
    (unless ``create``)."""
    uid = os.geteuid()
    hint = "a permission problem, not damage; run as the agent's user (or give the files back to it, chown)"
    try:
        found = {p: p.stat() for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists()}
    except PermissionError as exc:
        raise SpoolError(f"{path.parent} cannot be searched by uid {uid} ({exc.strerror}): {hint}") from exc
    if path not in found and not create:
        raise SpoolError(f"no spool at {path} (the agent creates it when it first starts)")
    want = os.R_OK if readonly else os.R_OK | os.W_OK
    for p, st in found.items():
        if not os.access(p, want):
            raise SpoolError(f"{p} is not {'readable' if readonly else 'readable and writable'} by "
                             f"uid {uid} (it belongs to uid {st.st_uid}, mode "
                             f"{stat.filemode(st.st_mode)}): {hint}")
    # WAL: a writer creates spool.db-wal and -shm beside the file, and so does a reader while no
    # other connection is open (the agent stopped): the directory must be writable then
    if ((not readonly or Path(f"{path}-shm") not in found) and path.parent.is_dir()
            and not os.access(path.parent, os.W_OK | os.X_OK)):
        st = path.parent.stat()
        why = "; reading the spool while the agent is stopped creates spool.db-shm there" if readonly else ""
        raise SpoolError(f"{path.parent} is not writable by uid {uid} (it belongs to uid "
                         f"{st.st_uid}, mode {stat.filemode(st.st_mode)}){why}: {hint}")


def configure(conn: sqlite3.Connection) -> None:
    """Per-connection settings: every commit synced (durability is the product), and a WAL that
    is cut back after a checkpoint instead of staying as large as the biggest backlog."""
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")


def check_schema(conn: sqlite3.Connection, path: Path, *, upgrade: bool) -> bool:
    """Check (and with ``upgrade``, create or upgrade) the schema; False if there is no spool yet.

    Raises SpoolError for a newer version, a corrupt or a foreign file.
    """
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise SpoolError(f"{path} was written by a newer spoolagent (spool schema v{version}; "
                             f"this version knows up to v{SCHEMA_VERSION}): upgrade spoolagent")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if version == SCHEMA_VERSION and not {QUEUE_TABLE, "spool_batches"} <= tables:
            raise SpoolError(f"{path} claims spool schema v{version} but lacks its tables")
        _check_file_size(conn, path)
        if not upgrade or (version == SCHEMA_VERSION and _SCHEMA_OBJECTS <= _objects(conn)):
            return QUEUE_TABLE in tables
        with immediate(conn):
            conn.execute(QUEUE_DDL)
            for stmt in _split_sql(_SCHEMA):
                conn.execute(stmt)
            if version < SCHEMA_VERSION:
                _index_unindexed_rows(conn)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        return True
    except sqlite3.OperationalError as exc:
        if is_busy(exc):
            raise SpoolBusy(f"{path} stayed locked by another writer: {exc}") from exc
        raise SpoolError(f"{path} is corrupt ({exc}); move it aside to start with an empty "
                         "spool") from exc
    except sqlite3.DatabaseError as exc:
        raise SpoolError(f"{path} is corrupt ({exc}); move it aside to start with an empty "
                         "spool") from exc


_SCHEMA_OBJECTS = {"spool_batches", "spool_checkpoints", "spool_q_ready", "spool_q_status",
                   "spool_q_delete"}


def _objects(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}


def _split_sql(script: str) -> list[str]:
    stmts, buf = [], ""
    for line in script.splitlines(keepends=True):
        code = line.split("--", 1)[0]
        buf += code
        if code.rstrip().endswith(";") and sqlite3.complete_statement(buf):
            stmts.append(buf.strip())
            buf = ""
    return stmts


def _index_unindexed_rows(conn: sqlite3.Connection) -> None:
    """Metadata for rows that lack it (a spool written by the bare library): decode each."""
    rows = conn.execute(f"SELECT _id, data FROM `{QUEUE_TABLE}` WHERE _id NOT IN "
                        "(SELECT pqid FROM spool_batches)").fetchall()
    for pqid, data in rows:
        header, _ = decode_row(data, pqid)
        conn.execute(
            "INSERT INTO spool_batches (pqid, batch_id, collector, lines, bytes, prods, created_s)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (pqid, header.batch_id, header.collector, header.lines, len(data),
             json.dumps(header.prods), header.created_s))


def _check_file_size(conn: sqlite3.Connection, path: Path) -> None:
    """A truncated file: without a WAL to fill the gap, the file must hold every page."""
    wal = Path(str(path) + "-wal")
    if wal.exists() and wal.stat().st_size > 0:
        return
    pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
    page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    if os.path.getsize(path) < pages * page_size:
        raise SpoolError(f"{path} is truncated ({os.path.getsize(path)} bytes, its header says "
                         f"{pages * page_size}); move it aside to start with an empty spool")
