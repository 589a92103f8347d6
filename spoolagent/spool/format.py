"""The on-disk format of the spool: row codec, batch ids, compression and the SQL schema.

Owns what ``queue`` (the agent's Spool) and ``file`` (the operator's offline and
read-only access) must agree on: the row format, the side tables next to persist-queue's own
``ack_queue_default`` table, the status codes, and how a file is checked and upgraded.

A row (the ``data`` column of persist-queue's table) is ``MAGIC + VERSION + u32 header length +
JSON header + body``; the header carries ``batch_id, collector, lines, encoding, checkpoint,
created_s, prods`` and the body is the lines (each ending in ``\\n``) compressed as ``encoding``.
Never pickle: an operator may copy a spool around.

What it takes from persist-queue (table name, status codes, table definition) comes from
``_pq``. Thread-safe: pure functions, and ``new_batch_id`` serialises its monotonic state with a
lock.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from spoolagent.errors import SpoolBusy, SpoolError
from spoolagent.protocol import Records
from spoolagent.spool._pq import ACK_FAILED, INITED, QUEUE_DDL, QUEUE_TABLE, READY, UNACK
from spoolcore.sqlite import immediate, is_busy

DB_NAME = "spool.db"
LOCK_NAME = "spool.lock"
SCHEMA_VERSION = 1  # PRAGMA user_version of a spool this build writes
ROW_MAGIC = b"SPAB"
ROW_VERSION = 1
WAL_LIMIT_BYTES = 16 * 1024 * 1024
BUSY_TIMEOUT_S = 120.0  # long enough that a VACUUM or purge never fails the agent

STATE_CODES: dict[str, tuple[int, ...]] = {
    "ready": (INITED, READY),
    "inflight": (UNACK,),
    "failed": (ACK_FAILED,),
}
ENCODINGS = {"gzip": "gzip", "zstd": "zstd", "none": "identity"}

_HEAD = struct.Struct(">4sBI")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

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


@dataclass(frozen=True, slots=True)
class SpooledBatch:
    """A batch the live spool handed to a sender (``Spool.get``): row id, header, stored body."""

    pqid: int
    batch_id: str
    collector: str
    lines: int
    body: bytes
    encoding: str
    checkpoint: str | None
    created_s: float
    attempts: int


@dataclass(frozen=True, slots=True)
class RowHeader:
    batch_id: str
    collector: str
    lines: int
    encoding: str
    checkpoint: str | None
    created_s: float
    prods: dict[str, int]


_id_lock = threading.Lock()
_id_last = (0, 0)


# os.urandom taken 256 ids at a time: one call per batch was a syscall, so the spool writer let go
# of the GIL and then waited to get it back from the reader and senders (~5 % of its time in e2e)
_POOL_IDS = 256
_pool = b""
_pool_at = 0


def _random80() -> int:
    """80 random bits from the operating system's CSPRNG (under ``_id_lock``)."""
    global _pool, _pool_at
    if _pool_at >= len(_pool):
        _pool, _pool_at = os.urandom(10 * _POOL_IDS), 0
    _pool_at += 10
    return int.from_bytes(_pool[_pool_at - 10:_pool_at], "big")


def _forget_pool() -> None:
    global _pool, _pool_at
    _pool, _pool_at = b"", 0


# a forked child must not hand out the parent's next ids
os.register_at_fork(after_in_child=_forget_pool)


def new_batch_id() -> str:
    """A ULID: 48-bit ms wall clock + 80 random bits, 26 Crockford base32 characters.

    Sortable by creation (monotonic within this process, ms-ordered across agents), globally
    unique (80 random bits), and matches ``^[A-Za-z0-9_-]{1,64}$``. Thread-safe.
    """
    global _id_last
    with _id_lock:
        ms = time.time_ns() // 1_000_000
        last_ms, last_rand = _id_last
        if ms <= last_ms:  # same ms (or the clock stepped back): keep order by counting up
            ms, rand = last_ms, (last_rand + 1) & ((1 << 80) - 1)
        else:
            rand = _random80()
        _id_last = (ms, rand)
    value = (ms << 80) | rand
    return "".join(_CROCKFORD[(value >> shift) & 31] for shift in range(125, -1, -5))


# zstd level 1, one compressor per thread (a ZstdCompressor is not thread-safe; a new one per
# batch cost ~0.2 ms of setup at level 3). Level 1 against level 3 on the loghub samples: 13.1x
# against 12.5x smaller, and 0.53 against 0.79 ms per 512 KiB batch (issue 17: the spool writer's
# compression was 12 % of the agent's CPU end to end).
ZSTD_LEVEL = 1
_zstd = threading.local()


def _zstd_compressor() -> zstandard.ZstdCompressor:
    c: zstandard.ZstdCompressor | None = getattr(_zstd, "c", None)
    if c is None:
        c = _zstd.c = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
    return c


def compress(raw: bytes, encoding: str) -> bytes:
    """``raw`` compressed as ``encoding`` (one whole frame or member). Thread-safe."""
    return compress_runs([raw], encoding)


def compress_runs(runs: Sequence[bytes], encoding: str) -> bytes:
    """The bytes of ``runs`` one after the other, compressed as ``encoding`` in one frame or member
    without joining them first (a batch's runs add up to 512 KiB: a join is one more copy of it,
    into memory freshly taken for it). Thread-safe."""
    if encoding == "gzip":
        c = zlib.compressobj(3, zlib.DEFLATED, 31)  # level 3: ~3 ms per MiB of logs, near level 6
        return b"".join([*map(c.compress, runs), c.flush()])
    if encoding == "zstd":
        z = _zstd_compressor().compressobj(size=sum(map(len, runs)))  # the frame says its size
        return b"".join([*map(z.compress, runs), z.flush()])
    if encoding == "identity":
        return b"".join(runs)
    raise ValueError(f"unknown encoding {encoding!r}")


def decompress(body: bytes, encoding: str) -> bytes:
    """The lines of a body; raises SpoolError if it cannot be decoded."""
    try:
        if encoding == "gzip":
            return zlib.decompress(body, 47)
        if encoding == "zstd":
            return zstandard.ZstdDecompressor().decompressobj().decompress(body)
        if encoding == "identity":
            return body
    except (zlib.error, zstandard.ZstdError) as exc:
        raise SpoolError(f"cannot decompress {encoding} body: {exc}") from exc
    raise SpoolError(f"unknown body encoding {encoding!r}")


def encode_row(header: RowHeader, body: bytes) -> bytes:
    head = json.dumps({
        "batch_id": header.batch_id, "collector": header.collector, "lines": header.lines,
        "encoding": header.encoding, "checkpoint": header.checkpoint,
        "created_s": header.created_s, "prods": header.prods,
    }, separators=(",", ":")).encode()
    return _HEAD.pack(ROW_MAGIC, ROW_VERSION, len(head)) + head + body


def decode_row(row: bytes, pqid: int | None = None) -> tuple[RowHeader, bytes]:
    """(header, compressed body) of a stored row. Raises SpoolError naming the row."""
    what = f"spool row {pqid}" if pqid is not None else "spool row"
    if not isinstance(row, bytes | bytearray | memoryview) or len(row) < _HEAD.size:
        raise SpoolError(f"{what} is not a spoolagent batch (too short or not bytes)")
    magic, version, head_len = _HEAD.unpack_from(row)
    if magic != ROW_MAGIC:
        raise SpoolError(f"{what} is not a spoolagent batch (bad magic {bytes(magic)!r})")
    if version > ROW_VERSION:
        raise SpoolError(f"{what} was written in row format v{version} by a newer spoolagent; "
                         f"this version reads up to v{ROW_VERSION}: upgrade spoolagent")
    try:
        h: dict[str, Any] = json.loads(bytes(row[_HEAD.size:_HEAD.size + head_len]))
        header = RowHeader(str(h["batch_id"]), str(h["collector"]), int(h["lines"]),
                           str(h["encoding"]), h["checkpoint"], float(h["created_s"]),
                           {str(k): int(v) for k, v in h.get("prods", {}).items()})
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SpoolError(f"{what} has an undecodable header: {exc!r}") from exc
    return header, bytes(row[_HEAD.size + head_len:])


def make_row(collector: str, lines: Records | Sequence[bytes], encoding: str,
             checkpoint: str | None = None) -> tuple[RowHeader, bytes]:
    """A new batch: (header with a fresh batch id, encoded row). ``Records`` (the batcher's) are
    joined as they are, their lines per PROD already counted; separate lines are counted here."""
    records = lines if isinstance(lines, Records) else Records.of(lines)
    header = RowHeader(new_batch_id(), collector, records.lines, encoding, checkpoint, time.time(),
                       dict(records.prods))
    return header, encode_row(header, compress_runs(records.runs, encoding))


def handed_batch(pqid: int, header: RowHeader, row: bytes) -> SpooledBatch:
    """The SpooledBatch of a row this process just made (``make_row``), without decoding it."""
    head_len = _HEAD.unpack_from(row)[2]
    return SpooledBatch(pqid, header.batch_id, header.collector, header.lines,
                        row[_HEAD.size + head_len:], header.encoding, header.checkpoint,
                        header.created_s, 0)


def insert_row(conn: sqlite3.Connection, header: RowHeader, row: bytes, status: int = INITED) -> int:
    """Insert a row and its metadata (inside the caller's transaction); returns its row id."""
    cur = conn.execute(f"INSERT INTO `{QUEUE_TABLE}` (data, timestamp, status) VALUES (?, ?, ?)",
                       (row, time.time(), status))
    pqid = int(cur.lastrowid or 0)
    conn.execute(
        "INSERT INTO spool_batches (pqid, batch_id, collector, lines, bytes, prods, created_s)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (pqid, header.batch_id, header.collector, header.lines, len(row),
         json.dumps(header.prods, separators=(",", ":")), header.created_s))
    return pqid


def record_checkpoint(conn: sqlite3.Connection, header: RowHeader, pqid: int) -> None:
    """Inside the row's insert transaction: its token (if any) becomes the collector's newest
    committed checkpoint. Newest wins by row id."""
    if header.checkpoint is not None:
        conn.execute(
            "INSERT INTO spool_checkpoints (collector, token, pqid, batch_id, updated_s) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (collector) DO UPDATE SET "
            "token = excluded.token, pqid = excluded.pqid, batch_id = excluded.batch_id, "
            "updated_s = excluded.updated_s WHERE excluded.pqid > spool_checkpoints.pqid",
            (header.collector, header.checkpoint, pqid, header.batch_id, time.time()))


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
