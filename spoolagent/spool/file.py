"""Access to spool.db without persist-queue: the queries behind ``stats`` and the operator's
commands, safe while the agent runs.

Why not the library: opening a live spool through ``SQLiteAckQueue`` from a second process (with
auto_resume) turns the agent's in-flight rows back to ready, so they are sent twice. Here reads use
a read-only connection; mutations are short ``BEGIN IMMEDIATE`` transactions with a long busy
timeout that never touch in-flight (status 2) rows, so the agent's Spool stays correct (it
re-reads its byte total from SQL every few seconds and polls for new ready rows).

Never goes through persistqueue. Not thread-safe: one SpoolFile per thread.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spoolagent.errors import SpoolBusy, SpoolError
from spoolagent.spool._pq import ACK_FAILED, ACKED, QUEUE_TABLE, READY, UNACK
from spoolagent.spool.db import check_schema, connect
from spoolagent.spool.format import (
    BUSY_TIMEOUT_S,
    DB_NAME,
    STATE_CODES,
    decode_row,
    decompress,
    insert_row,
    make_row,
)
from spoolcore.sqlite import immediate, is_busy

Q = f"`{QUEUE_TABLE}`"
# Scan the covering status index, then look metadata up by key: never read the rows' blobs
# (status is stored after the blob, so reading it from the table walks every overflow page).
_JOIN = f"{Q} AS q INDEXED BY spool_q_status CROSS JOIN spool_batches AS m ON m.pqid = q._id"
_STATE_OF = {0: "ready", 1: "ready", 2: "inflight", 9: "failed"}


def state_name(status: int) -> str:
    return _STATE_OF.get(status, f"status{status}")


def query_stats(conn: sqlite3.Connection, *, breakdown: bool = False) -> dict[str, Any]:
    """The ``spool stats --json`` object: counts per state, bytes, oldest ready age.

    ``bytes`` is the length of the stored rows not yet acked (what ``max_bytes`` bounds);
    ``file_bytes`` is spool.db plus its WAL on disk. With ``breakdown``: ``collectors`` and
    ``prods``, each {name: {ready_batches, ready_lines, ...}}.
    """
    out: dict[str, Any] = {f"{s}_{k}": 0 for s in STATE_CODES for k in ("batches", "lines")}
    out.update(bytes=0, oldest_age_s=None)
    oldest: float | None = None
    now = time.time()
    for status, n, lines, size, first in conn.execute(
            f"SELECT q.status, count(*), total(m.lines), total(m.bytes), min(m.created_s) "
            f"FROM {_JOIN} WHERE q.status != {ACKED} GROUP BY q.status"):
        state = state_name(status)
        if state in STATE_CODES:
            out[f"{state}_batches"] += n
            out[f"{state}_lines"] += int(lines)
        out["bytes"] += int(size)
        if status < UNACK and first is not None:
            oldest = first if oldest is None else min(oldest, first)
    out["oldest_age_s"] = None if oldest is None else round(max(0.0, now - oldest), 3)
    if breakdown:
        out["collectors"] = _breakdown(conn, "m.collector, count(*), total(m.lines)", "")
        out["prods"] = _breakdown(conn, "j.key, NULL, total(j.value)", ", json_each(m.prods) AS j")
    return out


def discount_delivered(conn: sqlite3.Connection, out: dict[str, Any], pqids: Sequence[int]) -> None:
    """Take the batches ``pqids`` out of ``query_stats``' in-flight counts and bytes: delivered,
    their delete still pending (``acks``: it rides in the next commit), so neither in flight nor
    waiting any more."""
    if not pqids:
        return
    marks = ",".join("?" * len(pqids))
    n, lines, size = conn.execute(
        f"SELECT count(*), total(m.lines), total(m.bytes) FROM {_JOIN} "
        f"WHERE q.status = {UNACK} AND q._id IN ({marks})", list(pqids)).fetchone()
    out["inflight_batches"] -= n
    out["inflight_lines"] -= int(lines)
    out["bytes"] -= int(size)


def _breakdown(conn: sqlite3.Connection, cols: str, extra: str) -> dict[str, dict[str, int]]:
    res: dict[str, dict[str, int]] = {}
    for status, name, n, lines in conn.execute(
            f"SELECT q.status, {cols} FROM {_JOIN}{extra} WHERE q.status != {ACKED} "
            "GROUP BY 1, 2"):
        state = state_name(status)
        if state not in STATE_CODES:
            continue
        keys = ("batches", "lines") if n is not None else ("lines",)
        d = res.setdefault(name, {f"{s}_{k}": 0 for s in STATE_CODES for k in keys})
        if n is not None:
            d[f"{state}_batches"] += n
        d[f"{state}_lines"] += int(lines)
    return res


def file_bytes(db_path: Path) -> int:
    total = 0
    for suffix in ("", "-wal"):
        try:
            total += Path(str(db_path) + suffix).stat().st_size
        except FileNotFoundError:
            pass
    return total


@dataclass(frozen=True, slots=True)
class BatchInfo:
    pqid: int
    batch_id: str
    state: str
    collector: str
    lines: int
    bytes: int
    created_s: float
    attempts: int
    last_error: str | None
    http_status: int | None
    reason: str | None
    prods: str

    def as_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__slots__}
        d["prods"] = json.loads(self.prods)
        d["age_s"] = round(max(0.0, time.time() - self.created_s), 3)
        return d


_INFO_COLS = ("q._id, m.batch_id, q.status, m.collector, m.lines, m.bytes, m.created_s, "
              "m.attempts, m.last_error, m.http_status, m.reason, m.prods")


def _info(r: Sequence[Any]) -> BatchInfo:
    return BatchInfo(r[0], r[1], state_name(r[2]), *r[3:])


class SpoolFile:
    """spool.db opened directly: read-only for inspection, read-write for the operator's repairs.

    Raises SpoolError when the file is missing (unless ``create``), corrupt or from a newer
    version. Blocking calls wait up to the busy timeout for the agent's write transactions.
    """

    def __init__(self, state_dir: Path, *, readonly: bool = True, create: bool = False,
                 busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self.path = state_dir / DB_NAME
        if create:
            state_dir.mkdir(parents=True, exist_ok=True)
        self.conn = connect(self.path, readonly=readonly, create=create,
                            busy_timeout_s=busy_timeout_s)
        try:
            self.exists = check_schema(self.conn, self.path, upgrade=not readonly)
        except BaseException:
            self.conn.close()
            raise

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> SpoolFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _translated(self) -> Iterator[None]:
        """SQLite's errors as the spool's: busy or locked -> SpoolBusy, the rest -> SpoolError."""
        try:
            yield
        except sqlite3.OperationalError as exc:
            if is_busy(exc):
                raise SpoolBusy(f"{self.path} stayed locked: {exc}") from exc
            raise SpoolError(f"{self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            raise SpoolError(f"{self.path} is corrupt ({exc})") from exc

    def _execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        with self._translated():
            return self.conn.execute(sql, args)

    def stats(self) -> dict[str, Any]:
        if not self.exists:
            return query_stats_empty()
        try:
            out = query_stats(self.conn, breakdown=True)
        except sqlite3.DatabaseError as exc:
            raise SpoolError(f"{self.path} is corrupt ({exc})") from exc
        out["file_bytes"] = file_bytes(self.path)
        return out

    def batches(self, states: Iterable[str] = ("ready", "inflight", "failed"),
                collector: str | None = None, limit: int | None = None) -> list[BatchInfo]:
        if not self.exists:
            return []
        codes = sorted(c for s in states for c in STATE_CODES[s])
        sql = (f"SELECT {_INFO_COLS} FROM {_JOIN} WHERE q.status IN "
               f"({','.join(map(str, codes))})")
        args: list[Any] = []
        if collector is not None:
            sql += " AND m.collector = ?"
            args.append(collector)
        sql += " ORDER BY q._id"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [_info(r) for r in self._execute(sql, args)]

    def find(self, batch_id: str) -> BatchInfo:
        """The batch with this id (or row id); raises SpoolError if there is none."""
        if self.exists:
            r = self._execute(f"SELECT {_INFO_COLS} FROM spool_batches AS m JOIN {Q} AS q "
                              "ON q._id = m.pqid WHERE m.batch_id = ? OR CAST(q._id AS TEXT) = ?",
                              (batch_id, batch_id)).fetchone()
            if r is not None and r[2] != ACKED:
                return _info(r)
        raise SpoolError(f"no batch {batch_id!r} in {self.path}")

    def lines(self, pqid: int) -> bytes:
        """The decompressed lines of one batch, as they will be sent (each ends in newline)."""
        r = self._execute(f"SELECT data FROM {Q} WHERE _id = ?", (pqid,)).fetchone()
        if r is None:
            raise SpoolError(f"row {pqid} is gone from {self.path}")
        header, body = decode_row(r[0], pqid)
        return decompress(body, header.encoding)

    def iter_lines(self, infos: Sequence[BatchInfo]) -> Iterator[tuple[BatchInfo, bytes]]:
        for info in infos:
            try:
                yield info, self.lines(info.pqid)
            except SpoolError:
                if info.state == "ready":  # sent and acked meanwhile: skip, not an error
                    continue
                raise

    # -- mutations: short transactions; never a row in flight (status 2) -------------------------

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        """One write transaction, with SQLite's errors translated as ``_execute`` does."""
        with self._translated(), immediate(self.conn):
            yield

    def _write(self, sql: str, args: Sequence[Any] = ()) -> int:
        with self._transaction():
            return self.conn.execute(sql, args).rowcount

    def retry_failed(self, pqids: Sequence[int] | None = None) -> int:
        """Failed batches (all, or these) back to ready, keeping their ids; returns how many."""
        where = f"status = {ACK_FAILED}"
        if pqids is not None:
            where += f" AND _id IN ({','.join(str(int(p)) for p in pqids)})"
        return self._write(f"UPDATE {Q} SET status = {READY} WHERE {where}")

    def delete(self, pqids: Sequence[int]) -> int:
        """Delete these rows unless they went in flight meanwhile; returns how many went."""
        n = 0
        for i in range(0, len(pqids), 500):
            chunk = ",".join(str(int(p)) for p in pqids[i:i + 500])
            n += self._write(f"DELETE FROM {Q} WHERE _id IN ({chunk}) AND status != {UNACK}")
        return n

    def move_out(self, states: Iterable[str], collector: str | None,
                 write: Callable[[BatchInfo, bytes], None], sync: Callable[[], None],
                 chunk: int = 100) -> list[BatchInfo]:
        """Export and delete in one step (``spool export --move``); returns what moved.

        Per chunk of batches (oldest first), one write transaction selects them, hands each
        batch's lines to ``write``, calls ``sync`` (the output is durable), then deletes them and
        commits. While it holds the write lock no batch can go in flight (the agent needs the
        lock for that), so a batch ends up either in the output or, if anything fails before the
        commit, still in the spool (then perhaps in the output as well: a duplicate after import,
        never a loss). In-flight batches are never taken. Blocks the agent's spool writes for one
        chunk at a time. Raises SpoolError/SpoolBusy, or what ``write``/``sync`` raise.
        """
        if not self.exists:
            return []
        codes = sorted(c for s in states if s != "inflight" for c in STATE_CODES[s])
        sql = (f"SELECT {_INFO_COLS} FROM {_JOIN} WHERE q.status IN ({','.join(map(str, codes))}) "
               "AND q._id > ?" + (" AND m.collector = ?" if collector is not None else "")
               + " ORDER BY q._id LIMIT ?")
        moved: list[BatchInfo] = []
        after = 0
        while codes:
            with self._transaction():
                args: list[Any] = [after] + ([collector] if collector is not None else [])
                rows = [_info(r) for r in self.conn.execute(sql, [*args, chunk])]
                if not rows:
                    break
                for info in rows:
                    write(info, self.lines(info.pqid))
                sync()  # the output first: a crash now leaves the batches in both places
                self.conn.execute(f"DELETE FROM {Q} WHERE _id IN "
                                  f"({','.join(str(r.pqid) for r in rows)})")
            moved.extend(rows)
            after = rows[-1].pqid
        return moved

    def import_lines(self, collector: str, lines: Sequence[bytes], encoding: str) -> str:
        """One new ready batch (status 0, a new batch id); returns its batch id."""
        header, row = make_row(collector, lines, encoding)
        with self._transaction():
            insert_row(self.conn, header, row)
        self.exists = True
        return header.batch_id

    def compact(self, on_progress: Callable[[int, int], None] | None = None) -> tuple[int, int]:
        """VACUUM in place, then cut the WAL back; returns (file bytes before, after).

        Safe while the agent runs: VACUUM is one write transaction (the agent's writes wait on
        the busy timeout, its reads go on) and keeps every row id (INTEGER PRIMARY KEYs), so the
        agent's in-flight row ids stay valid. Never ``VACUUM INTO`` + rename while the agent holds
        the file open: it would go on writing to the replaced inode and lose those batches.
        ``on_progress(done, total)`` follows the bytes written to the WAL.
        """
        page_size, pages, free = (int(self._execute(f"PRAGMA {p}").fetchone()[0])
                                  for p in ("page_size", "page_count", "freelist_count"))
        total = max(1, (pages - free) * page_size)
        before = file_bytes(self.path)
        wal = Path(str(self.path) + "-wal")
        wal_start = wal.stat().st_size if wal.exists() else 0

        def tick() -> int:
            if on_progress is not None:
                done = (wal.stat().st_size if wal.exists() else 0) - wal_start
                on_progress(min(max(done, 0), total), total)
            return 0

        self.conn.set_progress_handler(tick, 50_000)
        try:
            self._execute("VACUUM")
        finally:
            self.conn.set_progress_handler(None, 0)
        # TRUNCATE waits (busy timeout) for the agent's readers; if they keep it busy the WAL
        # is cut back at the next checkpoint instead (journal_size_limit)
        self._execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if on_progress is not None:
            on_progress(total, total)
        return before, file_bytes(self.path)


def query_stats_empty() -> dict[str, Any]:
    out: dict[str, Any] = {f"{s}_{k}": 0 for s in STATE_CODES for k in ("batches", "lines")}
    out.update(bytes=0, oldest_age_s=None, collectors={}, prods={}, file_bytes=0)
    return out
