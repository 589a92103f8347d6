"""Damaged spool files: tell a damaged ``spool.db`` from one that is only unusable right now, move
it aside so the agent starts with an empty spool, and salvage what is still readable from it.

- ``diagnose(path)``: why the file is damaged (not a SQLite file, truncated, failed integrity
  check), or None when it is sound or unusable for a reason that moving it would not cure (locked,
  newer version, disk full, permissions). Decided on SQLite's result codes, never message text.
- ``move_aside(path)``: renames ``spool.db`` and its ``-wal``/``-shm`` to
  ``spool.db.corrupt-<UTC time>`` (+ ``-wal``/``-shm``, so SQLite still pairs them), then syncs
  the directory. Nothing is deleted.
- ``open_moving_damaged`` (the agent's start) and ``fail_unreadable_head`` (a live get that cannot
  read its oldest row: the row goes to failed, the gets move on).
- ``salvage(damaged, into)``: reads the damaged file row by row (row ids gathered from the table,
  both directions, and from each index, each until it hits damage), skips unreadable rows, and
  inserts every readable undelivered batch into a live spool with its ORIGINAL batch id, so the
  receiver answers those it already has as duplicates. Safe while the agent runs: short
  ``BEGIN IMMEDIATE`` transactions through ``format.insert_row``, as ``spool import``.

Checkpoint tokens are not carried over, neither at the move nor by salvage: after the fresh start
every collector was restarted without a token (and re-read from its start policy), so the live
spool's tokens are the truth; a salvaged, older token would win by row id and rewind the
collector at its next restart, storing its lines twice. Salvaged rows are re-encoded without one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from spoolagent.errors import SpoolBusy, SpoolError
from spoolagent.spool._pq import ACK_FAILED, ACKED, QUEUE_TABLE, READY
from spoolagent.spool.db import SCHEMA_VERSION
from spoolagent.spool.file import SpoolFile
from spoolagent.spool.format import (
    DB_NAME,
    RowHeader,
    decode_row,
    decompress,
    encode_row,
    insert_row,
)
from spoolcore.sqlite import immediate

log = logging.getLogger(__name__)
T = TypeVar("T")

CORRUPT_INFIX = ".corrupt-"
_SIDE_FILES = ("-wal", "-shm")
_DAMAGE_CODES = {"SQLITE_CORRUPT", "SQLITE_NOTADB"}  # and their extended codes (SQLITE_CORRUPT_*)
_HEADER = b"SQLite format 3\x00"


def _is_damage(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", "") or ""
    return any(name == c or name.startswith(c + "_") for c in _DAMAGE_CODES)


def diagnose(path: Path) -> str | None:
    """Why ``path`` is a damaged spool, or None. Reads the whole file (quick_check): call it when
    opening failed or after a crash, not on every start. Never raises for a damaged file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(100)
    except OSError:
        return None  # missing or unreadable for the OS: moving it would not help
    if size == 0:
        return None  # an empty file is an empty database to SQLite
    if not head.startswith(_HEADER) or len(head) < 100:
        return f"not a SQLite database (first bytes {head[:16]!r}, {size} bytes)"
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
    except sqlite3.Error as exc:
        return f"cannot be opened: {exc}" if _is_damage(exc) else None
    try:
        if int(conn.execute("PRAGMA user_version").fetchone()[0]) > SCHEMA_VERSION:
            return None  # a newer agent's spool: upgrade, do not move
        problems = [str(r[0]) for r in conn.execute("PRAGMA quick_check(10)").fetchall()]
        if problems != ["ok"]:
            return "integrity check failed: " + "; ".join(problems[:3])
        wal = Path(str(path) + "-wal")
        if not (wal.exists() and wal.stat().st_size > 0):
            pages, page_size = (int(conn.execute(f"PRAGMA {p}").fetchone()[0])
                                for p in ("page_count", "page_size"))
            if size < pages * page_size:
                return f"truncated ({size} bytes, its header says {pages * page_size})"
    except sqlite3.Error as exc:
        return f"unreadable: {exc}" if _is_damage(exc) else None
    finally:
        conn.close()
    return None


def move_aside(path: Path) -> Path:
    """Rename ``path`` and its -wal/-shm to ``<path>.corrupt-<UTC time>``; returns the new path.

    The caller holds the spool lock (no agent has the file open). Raises OSError.
    """
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = path.with_name(f"{path.name}{CORRUPT_INFIX}{stamp}")
    n = 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}{CORRUPT_INFIX}{stamp}-{n}")
    # side files first: a crash in between leaves spool.db with no stale WAL beside it
    for suffix in _SIDE_FILES:
        side = Path(str(path) + suffix)
        if side.exists():
            os.replace(side, str(dest) + suffix)
    os.replace(path, dest)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return dest


def corrupt_files(state_dir: Path) -> list[Path]:
    """Damaged spools kept in ``state_dir`` (without their -wal/-shm), oldest first."""
    return sorted(p for p in state_dir.glob(f"{DB_NAME}{CORRUPT_INFIX}*")
                  if not p.name.endswith(_SIDE_FILES))


@dataclass
class SalvageResult:
    rows_seen: int = 0              # row ids found in the damaged file
    unreadable: int = 0             # rows that could not be read or decoded
    delivered: int = 0              # acked rows: the receiver has them, nothing to do
    requeued: int = 0               # inserted as ready (were ready or in flight)
    requeued_failed: int = 0        # inserted as failed (were dead-lettered)
    already_queued: int = 0         # their batch id is in the live spool already
    lines: int = 0                  # lines in the re-queued batches
    skipped: int = 0                # batches of the collectors the operator left out
    # per collector: batches, lines, and how many carried a checkpoint token (a checkpointing
    # collector re-read from its start policy after the fresh start: its lines may come twice)
    collectors: dict[str, dict[str, int]] = field(default_factory=dict)
    batch_ids: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def _ids(conn: sqlite3.Connection) -> set[int]:
    """Row ids from every structure that lists them, each read until it hits damage."""
    q = f"`{QUEUE_TABLE}`"
    # NOT INDEXED: walk the table's own b-tree in row order, streaming (no sort to wait for)
    queries = [f"SELECT _id FROM {q} NOT INDEXED ORDER BY _id",
               f"SELECT _id FROM {q} NOT INDEXED ORDER BY _id DESC",
               f"SELECT _id FROM {q} INDEXED BY spool_q_status WHERE status IS NOT NULL",
               "SELECT pqid FROM spool_batches NOT INDEXED ORDER BY pqid",
               "SELECT pqid FROM spool_batches NOT INDEXED ORDER BY pqid DESC"]
    ids: set[int] = set()
    for sql in queries:
        try:
            cur = conn.execute(sql)
            while rows := cur.fetchmany(1000):
                ids.update(int(r[0]) for r in rows)
        except sqlite3.Error:
            continue  # damaged (or an index the file never had): the other lists may go further
    return ids


def _rows(conn: sqlite3.Connection, result: SalvageResult) -> Iterator[tuple[int, bytes, int]]:
    for pqid in sorted(_ids(conn)):
        result.rows_seen += 1
        try:
            r = conn.execute(f"SELECT data, status FROM `{QUEUE_TABLE}` WHERE _id = ?",
                             (pqid,)).fetchone()
        except sqlite3.Error as exc:
            result.unreadable += 1
            log.warning("salvage: unreadable row pqid=%d err=%s", pqid, exc)
            continue
        if r is None:
            result.rows_seen -= 1  # listed by a damaged index only
            continue
        yield pqid, r[0], int(r[1] if r[1] is not None else READY)


def salvage(damaged: Path, into: SpoolFile | None, skip: frozenset[str] = frozenset()) -> SalvageResult:
    """Re-queue every readable undelivered batch of ``damaged`` into ``into`` with its batch id,
    but those of the collectors in ``skip``.

    ``into=None`` counts only (a dry run). Raises SpoolError if ``damaged`` cannot be opened at
    all; damaged rows are counted in ``unreadable``, never raised.
    """
    if not damaged.exists():
        raise SpoolError(f"no such file: {damaged}")
    if not damaged.is_file():  # a directory, /dev/zero: no traceback, no "nothing to re-queue"
        raise SpoolError(f"{damaged} is not a regular file: salvage reads a spool file the agent "
                         f"moved aside ({DB_NAME}{CORRUPT_INFIX}*)")
    try:
        with open(damaged, "rb") as f:
            head = f.read(len(_HEADER))
    except OSError as exc:
        raise SpoolError(f"cannot read {damaged}: {exc.strerror or exc}") from exc
    if head != _HEADER and CORRUPT_INFIX not in damaged.name:
        # a file the agent moved aside may be garbage from its first byte (then nothing is
        # readable, and that is the answer); any other file without the header is a mistake
        raise SpoolError(f"{damaged} is not a spool file (no SQLite header): salvage reads a "
                         f"spool file the agent moved aside ({DB_NAME}{CORRUPT_INFIX}*)")
    with _readable(damaged) as path:
        try:
            src = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot open {damaged}: {exc}") from exc
        return _salvage(src, into, skip)


@contextlib.contextmanager
def _readable(damaged: Path) -> Iterator[Path]:
    """``damaged``, or when it is shorter than its header says (truncated), a copy padded with
    zeros to that size: SQLite refuses every query on a short file, but reads the pages that are
    there once it has its full length. The damaged file itself is never written."""
    with open(damaged, "rb") as f:
        head = f.read(100)
    size = damaged.stat().st_size
    if len(head) < 100 or not head.startswith(_HEADER):
        yield damaged
        return
    page_size = int.from_bytes(head[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    want = page_size * int.from_bytes(head[28:32], "big")
    if size >= want:
        yield damaged
        return
    with tempfile.TemporaryDirectory(prefix=".salvage-", dir=damaged.parent) as tmp:
        copy = Path(tmp) / damaged.name
        shutil.copyfile(damaged, copy)
        wal = Path(str(damaged) + "-wal")
        if wal.exists():
            shutil.copyfile(wal, str(copy) + "-wal")
        with open(copy, "r+b") as f:
            f.truncate(want)
        log.warning("salvage: %s is truncated (%d of %d bytes); reading a padded copy", damaged,
                    size, want)
        yield copy


def _salvage(src: sqlite3.Connection, into: SpoolFile | None, skip: frozenset[str]) -> SalvageResult:
    result = SalvageResult()
    try:
        for pqid, data, status in _rows(src, result):
            if status == ACKED:
                result.delivered += 1
                continue
            try:
                header, body = decode_row(data, pqid)
                decompress(body, header.encoding)  # a torn body is unreadable, not re-queued
            except SpoolError as exc:
                result.unreadable += 1
                log.warning("salvage: undecodable row pqid=%d err=%s", pqid, exc)
                continue
            if header.collector in skip:
                result.skipped += 1
                continue
            if into is None:
                _count(result, header, status)
                continue
            # the token stays behind (see the module docstring); id, lines and body are kept
            row = encode_row(replace(header, checkpoint=None), body)
            if _insert(into, header, row, ACK_FAILED if status == ACK_FAILED else READY):
                _count(result, header, status)
            else:
                result.already_queued += 1
    finally:
        src.close()
    return result


def _count(result: SalvageResult, header: RowHeader, status: int) -> None:
    if status == ACK_FAILED:
        result.requeued_failed += 1
    else:
        result.requeued += 1
    result.lines += header.lines
    result.batch_ids.append(header.batch_id)
    c = result.collectors.setdefault(header.collector, {"batches": 0, "lines": 0, "checkpointed": 0})
    c["batches"] += 1
    c["lines"] += header.lines
    c["checkpointed"] += header.checkpoint is not None


def _insert(into: SpoolFile, header: RowHeader, row: bytes, status: int) -> bool:
    conn = into.conn
    try:
        with immediate(conn):
            if conn.execute("SELECT 1 FROM spool_batches WHERE batch_id = ?",
                            (header.batch_id,)).fetchone():
                return False  # already there (an earlier salvage): the empty commit is harmless
            pqid = insert_row(conn, header, row, status)
            if status == ACK_FAILED:
                conn.execute("UPDATE spool_batches SET http_status = 0, reason = ?, "
                             "last_error = ?, failed_s = ? WHERE pqid = ?",
                             ("salvaged_failed", "failed before; salvaged from a damaged spool",
                              time.time(), pqid))
    except sqlite3.Error as exc:
        raise SpoolError(f"cannot re-queue into {into.path}: {exc}") from exc
    into.exists = True
    return True


def move_if_damaged(path: Path, exc: BaseException | None) -> Path | None:
    """Under the spool lock, at start-up: if ``path`` is damaged (``diagnose``), move it aside and
    return where it went (logged at ERROR: its batches wait for ``spool salvage``); else None."""
    damage = diagnose(path)
    if damage is None:
        return None
    try:
        moved = move_aside(path)
    except OSError as err:
        log.error("spool file is damaged but cannot be moved aside path=%s reason=%s err=%s",
                  path, damage, err)
        return None
    # data at risk: the batches in it are not sent until an operator salvages them
    log.error("spool file is damaged; moved aside, starting an empty spool path=%s moved_to=%s "
              "reason=%s open_error=%s; its batches are NOT sent: re-queue what is readable "
              "with: spoolagent spool salvage %s", path, moved, damage, exc, moved)
    return moved


def open_moving_damaged(path: Path, open_spool: Callable[[], T],
                        move_corrupt_aside: bool) -> tuple[T, Path | None]:
    """Under the spool lock, at start-up: ``open_spool()``, and with ``move_corrupt_aside`` a
    damaged ``path`` is moved aside first (or when opening it fails) and an empty spool opened in
    its place. Returns (what ``open_spool`` returned, where the damaged file went or None). Raises
    what ``open_spool`` raises when the file is not damaged, or could not be moved."""
    moved = None
    if move_corrupt_aside and path.exists():
        # a torn page deep in the file would pass the open and stop every get later: SQLite's
        # quick_check reads the whole file (~0.1 s per 200 MB when cached)
        moved = move_if_damaged(path, None)
    try:
        return open_spool(), moved
    except (SpoolError, sqlite3.DatabaseError) as exc:
        if isinstance(exc, SpoolBusy) or not move_corrupt_aside:
            raise
        moved = move_if_damaged(path, exc)
        if moved is None:
            raise
        return open_spool(), moved


def fail_unreadable_head(db: sqlite3.Connection, exc: Exception) -> str | None:
    """The live spool could not read its oldest ready row: move it to failed (reason
    ``unreadable_row``), so gets move on; returns the reason kept, or None if no row is ready."""
    r = db.execute(f"SELECT _id FROM `{QUEUE_TABLE}` WHERE status < 2 "
                   "ORDER BY _id LIMIT 1").fetchone()
    if r is None:
        return None
    reason = f"spool row {r[0]} is unreadable: {exc}"
    db.execute("UPDATE spool_batches SET http_status = 0, reason = ?, last_error = ?, "
               "failed_s = ? WHERE pqid = ?", ("unreadable_row", reason, time.time(), r[0]))
    db.execute(f"UPDATE `{QUEUE_TABLE}` SET status = {ACK_FAILED} WHERE _id = ?", (r[0],))
    log.error("unreadable spool row moved to failed pqid=%d err=%s", r[0], exc)
    return reason
