"""The on-disk format of the spool's rows: row codec, batch ids, compression.

Owns what ``queue`` (the agent's Spool) and ``file`` (the operator's offline and
read-only access) must agree on: the row format, how a row and its metadata go into the side
tables next to persist-queue's own ``ack_queue_default`` table, and the status codes. Opening the
file, its access and its schema are ``db``'s.

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
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import zstandard

from spoolagent.errors import SpoolError
from spoolagent.protocol import Records
from spoolagent.spool._pq import ACK_FAILED, INITED, QUEUE_TABLE, READY, UNACK

DB_NAME = "spool.db"
LOCK_NAME = "spool.lock"
ROW_MAGIC = b"SPAB"
ROW_VERSION = 1
BUSY_TIMEOUT_S = 120.0  # long enough that a VACUUM or purge never fails the agent

STATE_CODES: dict[str, tuple[int, ...]] = {
    "ready": (INITED, READY),
    "inflight": (UNACK,),
    "failed": (ACK_FAILED,),
}
ENCODINGS = {"gzip": "gzip", "zstd": "zstd", "none": "identity"}

_HEAD = struct.Struct(">4sBI")
_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"



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
