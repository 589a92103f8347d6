"""AgentTable: who ships to this receiver -- per agent id, what it sent and what it last reported.

The agent identifies itself in headers on every PUT and heartbeat (docs/protocol.md):
``Spoolagent-Id``, ``Spoolagent-Version``, ``Spoolagent-Host`` and ``Spoolagent-Spool``
(``lines=N, bytes=N, oldest-s=S, dead=N``). A request without ``Spoolagent-Id`` (an older agent,
``POST /``, TCP) is stored as before and counted nowhere here.

An agent not heard from for ``FORGET_AFTER_S`` (30 days) leaves the table: a fleet of short-lived
hosts or containers would otherwise grow it forever (cluster mode: the bucket's TTL, the same 30
days).

On disk: ``DATA_DIR/.receiver/agents.db`` (SQLite, WAL), one row per agent id. Requests only touch
memory (a dict under a lock); ``flush()`` writes what changed since the last flush in one
transaction, adding counters and keeping the newest report, so several processes (``--processes
N``, or several receivers on one data dir) can share the file. The table is soft state: it is written without
fsync (``synchronous=NORMAL``); a power cut may lose its last second, never the data files.

``read_agents`` and ``listing`` serve ``spoolreceiver agents`` and ``GET /v1/agents`` (the same
JSON) whether or not a receiver runs; ``fleet_summary`` serves the metrics (no label per agent).
Cluster mode keeps the same table elsewhere (``receiver.cluster.agents_kv``: a subclass that
overrides ``_write`` and ``rows``). Imports nothing from the package but ``receiver.errors``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from receiver.errors import StorageUnavailable

log = logging.getLogger(__name__)

DB_NAME = "agents.db"
SORT_KEYS = ("id", "last_seen", "backlog", "lines")
_ID_RE = re.compile(r"[\x21-\x7e]{1,128}\Z")
_TEXT_MAX = 128
SUMMARY_KEYS = {"lines": "backlog_lines", "bytes": "backlog_bytes", "oldest-s": "backlog_oldest_s",
                 "dead": "dead_letters"}
_PARSED_MAX = 4096
_parsed: dict[tuple[str | None, ...], Report | bool] = {}
COUNTERS = ("batches", "lines", "bytes", "duplicates", "rejected", "heartbeats")
FORGET_AFTER_S = 30 * 86400.0
_FORGET_EVERY_S = 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    agent_id TEXT PRIMARY KEY, first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    version TEXT, host TEXT, remote TEXT,
    batches INTEGER NOT NULL DEFAULT 0, lines INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0, duplicates INTEGER NOT NULL DEFAULT 0,
    rejected INTEGER NOT NULL DEFAULT 0, heartbeats INTEGER NOT NULL DEFAULT 0,
    backlog_lines INTEGER, backlog_bytes INTEGER, backlog_oldest_s REAL, dead_letters INTEGER,
    reported_at REAL)
"""
# counters add up; the descriptive fields and the backlog come from the newest report
_UPSERT = f"""
INSERT INTO agents (agent_id, first_seen, last_seen, version, host, remote, {", ".join(COUNTERS)},
                    backlog_lines, backlog_bytes, backlog_oldest_s, dead_letters, reported_at)
VALUES (?, ?, ?, ?, ?, ?, {", ".join("?" for _ in COUNTERS)}, ?, ?, ?, ?, ?)
ON CONFLICT(agent_id) DO UPDATE SET
    first_seen = min(first_seen, excluded.first_seen),
    version = CASE WHEN excluded.last_seen >= last_seen THEN coalesce(excluded.version, version) ELSE version END,
    host = CASE WHEN excluded.last_seen >= last_seen THEN coalesce(excluded.host, host) ELSE host END,
    remote = CASE WHEN excluded.last_seen >= last_seen THEN coalesce(excluded.remote, remote) ELSE remote END,
    {", ".join(f"{c} = {c} + excluded.{c}" for c in COUNTERS)},
    backlog_lines = CASE WHEN excluded.reported_at >= coalesce(reported_at, 0)
                    THEN excluded.backlog_lines ELSE backlog_lines END,
    backlog_bytes = CASE WHEN excluded.reported_at >= coalesce(reported_at, 0)
                    THEN excluded.backlog_bytes ELSE backlog_bytes END,
    backlog_oldest_s = CASE WHEN excluded.reported_at >= coalesce(reported_at, 0)
                       THEN excluded.backlog_oldest_s ELSE backlog_oldest_s END,
    dead_letters = CASE WHEN excluded.reported_at >= coalesce(reported_at, 0)
                   THEN excluded.dead_letters ELSE dead_letters END,
    reported_at = max(coalesce(reported_at, 0), coalesce(excluded.reported_at, 0)),
    last_seen = max(last_seen, excluded.last_seen)
"""


@dataclass(frozen=True)
class Report:
    """What one request said about its agent."""

    agent_id: str
    version: str | None
    host: str | None
    remote: str | None
    backlog: Mapping[str, float] = field(default_factory=dict)  # SUMMARY_KEYS' values


def report_from_headers(headers: Mapping[str, str], remote: str | None) -> Report | None:
    """The Report in a request's headers; None without a (valid) ``Spoolagent-Id``. Never raises:
    a malformed summary is ignored (the counts still go to the agent). Thread-safe."""
    key = (headers.get("Spoolagent-Id"), headers.get("Spoolagent-Version"),
           headers.get("Spoolagent-Host"), headers.get("Spoolagent-Spool"), remote)
    if key[0] is None:
        return None
    # an agent repeats its headers until its spool changes: parse each distinct set once
    report = _parsed.get(key)
    if report is None:
        if len(_parsed) >= _PARSED_MAX:
            _parsed.clear()
        report = _parsed[key] = _parse(*key)
    return report if isinstance(report, Report) else None


def _parse(raw_id: str | None, version: str | None, host: str | None, spool: str | None,
           remote: str | None) -> Report | bool:
    agent_id = (raw_id or "").strip()
    if not _ID_RE.match(agent_id):
        return False
    backlog: dict[str, float] = {}
    for item in (spool or "").split(","):
        key, _, value = item.strip().partition("=")
        column = SUMMARY_KEYS.get(key.strip())
        if column is None:
            continue
        with contextlib.suppress(ValueError):
            number = float(value.strip())
            if number >= 0 and number == number and number != float("inf"):
                backlog[column] = number
    return Report(agent_id, _text(version), _text(host), remote, backlog)


def _text(value: str | None) -> str | None:
    return value.strip()[:_TEXT_MAX] if value and value.strip() else None


@dataclass
class Pending:
    """One agent's changes since the last flush (counters are deltas)."""
    first_seen: float
    last_seen: float
    version: str | None = None
    host: str | None = None
    remote: str | None = None
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    backlog: Mapping[str, float] | None = None
    reported_at: float | None = None


class AgentTable:
    """The agent table of one process. ``seen``/``count`` touch memory only (thread-safe, never
    block on disk); ``flush`` writes (blocks; call it off the event loop, e.g. once a second or
    once per commit round). Raises StorageUnavailable from ``create`` and ``flush``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / DB_NAME
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._pending: dict[str, Pending] = {}
        self._db: sqlite3.Connection | None = None
        self._forgotten_at = 0.0  # the last pass that dropped agents long gone (0: at the first flush)

    def create(self) -> None:
        """Create the file and its table if missing. Blocks; call once before serving."""
        with self._connection():
            pass

    def seen(self, report: Report, *, now: float | None = None, **counts: int) -> None:
        """Note a request from ``report.agent_id``: last seen, version, host, address, backlog;
        and add ``counts`` (``count``'s keywords) to its counters."""
        now = time.time() if now is None else now
        with self._lock:
            p = self._entry(report.agent_id, now)
            for key, n in counts.items():
                p.counts[key.rstrip("_")] += n
            p.last_seen = max(p.last_seen, now)
            p.version = report.version or p.version
            p.host = report.host or p.host
            p.remote = report.remote or p.remote
            if report.backlog:
                p.backlog = report.backlog
                p.reported_at = now

    def count(self, agent_id: str, *, batches: int = 0, lines: int = 0, bytes_: int = 0,
              duplicates: int = 0, rejected: int = 0, heartbeats: int = 0) -> None:
        """Add to an agent's counters (call ``seen`` for it first, or the row has no address)."""
        now = time.time()
        with self._lock:
            c = self._entry(agent_id, now).counts
            c["batches"] += batches
            c["lines"] += lines
            c["bytes"] += bytes_
            c["duplicates"] += duplicates
            c["rejected"] += rejected
            c["heartbeats"] += heartbeats

    def _entry(self, agent_id: str, now: float) -> Pending:
        p = self._pending.get(agent_id)
        if p is None:
            p = self._pending[agent_id] = Pending(first_seen=now, last_seen=now)
        return p

    def flush(self) -> int:
        """Write what changed since the last flush in one transaction; the number of agents.
        Blocks. On failure the changes are kept for the next flush and StorageUnavailable raised."""
        with self._flush_lock:
            with self._lock:
                pending, self._pending = self._pending, {}
            if not pending:
                return 0
            try:
                self._write(pending)
            except StorageUnavailable:
                with self._lock:  # nothing is lost: merge back under what came in since
                    for agent_id, p in pending.items():
                        self._merge_back(agent_id, p)
                raise
            return len(pending)

    def _write(self, pending: Mapping[str, Pending]) -> None:
        """Persist the changes (a subclass may keep them elsewhere). Raises StorageUnavailable."""
        rows = [(agent_id, p.first_seen, p.last_seen, p.version, p.host, p.remote,
                 *(p.counts[c] for c in COUNTERS),
                 *((p.backlog or {}).get(k) for k in SUMMARY_KEYS.values()), p.reported_at)
                for agent_id, p in pending.items()]
        now = time.time()
        forget = now - self._forgotten_at >= _FORGET_EVERY_S
        with self._connection() as db, db:
            db.executemany(_UPSERT, rows)
            gone = db.execute("DELETE FROM agents WHERE last_seen < ?",
                              (now - FORGET_AFTER_S,)).rowcount if forget else 0
        if forget:
            self._forgotten_at = now
        if gone:
            log.info("agents forgotten count=%d silent_for_days=%d", gone, FORGET_AFTER_S // 86400)

    def _merge_back(self, agent_id: str, old: Pending) -> None:
        new = self._pending.get(agent_id)
        if new is None:
            self._pending[agent_id] = old
            return
        new.first_seen = min(new.first_seen, old.first_seen)
        for c in COUNTERS:
            new.counts[c] += old.counts[c]
        if new.backlog is None:
            new.backlog, new.reported_at = old.backlog, old.reported_at
        new.version, new.host, new.remote = (new.version or old.version, new.host or old.host,
                                             new.remote or old.remote)

    @contextlib.contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        try:
            if self._db is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path, timeout=10.0, check_same_thread=False,
                                     isolation_level="DEFERRED")
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")  # soft state: see the module docstring
                db.execute(_SCHEMA)
                self._db = db
            yield self._db
        except sqlite3.Error as exc:
            raise StorageUnavailable(f"agent table {self.path}: {exc}", retry_after_s=5) from exc

    def flush_quietly(self) -> None:
        """``flush``, logging instead of raising (the changes wait for the next one). For a timer:
        a tick while a flush still runs (a slow disk or cluster) does nothing, so ticks never pile
        up on the executor's threads."""
        if self._flush_lock.locked():
            return
        try:
            self.flush()
        except Exception as exc:  # the top of a periodic job
            log.warning("agent table flush failed err=%s", exc)

    def rows(self) -> list[dict[str, object]]:
        """Every agent's row (``read_agents``' form), this process's last changes included.
        Blocks; raises StorageUnavailable."""
        self.flush()
        return read_agents(self.path.parent)

    def summary(self, windows_s: Sequence[float]) -> FleetSummary:
        """The fleet gauges at scrape time: this process's changes, then the whole table."""
        try:
            rows = self.rows()
        except StorageUnavailable as exc:
            log.warning("agent table unreadable for metrics err=%s", exc)
            rows = []
        return fleet_summary(rows, now=time.time(), windows_s=windows_s)

    def close(self) -> None:
        """Flush (best effort) and close. Idempotent."""
        try:
            self.flush()
        except StorageUnavailable as exc:
            log.warning("agent table not flushed at close err=%s", exc)
        if self._db is not None:
            self._db.close()
            self._db = None


def read_agents(state_dir: Path) -> list[dict[str, object]]:
    """Every row of the table at ``state_dir`` (empty if there is none). Never writes. Blocks;
    raises StorageUnavailable."""
    path = state_dir / DB_NAME
    if not path.exists():
        return []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
        try:
            db.row_factory = sqlite3.Row
            return [dict(r) for r in db.execute("SELECT * FROM agents")]
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise StorageUnavailable(f"agent table {path}: {exc}", retry_after_s=5) from exc


def listing(rows: Sequence[Mapping[str, object]], *, now: float, silent_for_s: float | None = None,
            sort: str = "id") -> list[dict[str, object]]:
    """The JSON of ``spoolreceiver agents`` and ``GET /v1/agents``: one object per agent, only
    those silent for at least ``silent_for_s`` when given, sorted by ``sort`` (SORT_KEYS;
    backlog, last_seen and lines: largest first)."""
    out = []
    for r in rows:
        silent_s = max(0.0, now - num(r["last_seen"]))
        if silent_for_s is not None and silent_s < silent_for_s:
            continue
        out.append({
            "id": r["agent_id"], "version": r["version"], "host": r["host"], "remote": r["remote"],
            "first_seen": r["first_seen"], "last_seen": r["last_seen"], "silent_s": round(silent_s, 3),
            **{c: r[c] for c in COUNTERS},
            "backlog": {"lines": r["backlog_lines"], "bytes": r["backlog_bytes"],
                        "oldest_s": r["backlog_oldest_s"], "dead_letters": r["dead_letters"],
                        "reported_at": r["reported_at"]},
        })
    keys = {"id": lambda a: (str(a["id"]),),
            "last_seen": lambda a: (-num(a["last_seen"]), str(a["id"])),
            "lines": lambda a: (-num(a["lines"]), str(a["id"])),
            "backlog": lambda a: (-num(_backlog(a, "lines")), -num(_backlog(a, "bytes")), str(a["id"]))}
    out.sort(key=keys[sort])
    return out


def _backlog(agent: Mapping[str, object], key: str) -> object:
    backlog = agent["backlog"]
    return backlog.get(key) if isinstance(backlog, dict) else None


def num(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


@dataclass(frozen=True)
class FleetSummary:
    """The metrics' view of the table: no label per agent."""

    known: int
    active: Mapping[float, int]  # window in seconds -> agents seen within it
    backlog_max_lines: int
    backlog_max_bytes: int
    backlog_max_oldest_s: float
    with_dead_letters: int


def fleet_summary(rows: Sequence[Mapping[str, object]], *, now: float,
                  windows_s: Sequence[float]) -> FleetSummary:
    """Counts over ``rows`` (``read_agents``) for the metrics."""
    return FleetSummary(
        known=len(rows),
        active={w: sum(1 for r in rows if now - num(r["last_seen"]) <= w) for w in windows_s},
        backlog_max_lines=int(max((num(r["backlog_lines"]) for r in rows), default=0)),
        backlog_max_bytes=int(max((num(r["backlog_bytes"]) for r in rows), default=0)),
        backlog_max_oldest_s=max((num(r["backlog_oldest_s"]) for r in rows), default=0.0),
        with_dead_letters=sum(1 for r in rows if num(r["dead_letters"]) > 0),
    )
