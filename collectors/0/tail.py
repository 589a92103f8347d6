#!/usr/bin/env python3
"""tail: follow the files matched by globs and print their lines, with exactly-once checkpoints.

A long-running spoolagent collector (interval 0). It owns: finding files (globs, rescanned while
running), following them across rename and copytruncate rotation, cutting their bytes into records
(partial lines, over-long lines, multiline records, dates) and the checkpoint token that says where
to resume. Settings arrive as JSON in SPOOLAGENT_COLLECTOR_CONFIG, the last committed token in
SPOOLAGENT_CHECKPOINT; the reference is docs/collectors.md.

Token: compact JSON ``{"v":1,"g":[glob keys],"f":[[dev,ino,fp_len,fp,offset,path],...]}``. A file
is named by device, inode and a hash of its first fp_len (<= 1 KiB) bytes (inodes are reused), and
offset is just past the last byte sent, always at a record boundary, so lines before it are never
read again and lines after it always are.

Must not import: anything from the spoolagent package but ``spoolagent.protocol`` (kept cheap to
import); third-party modules but ``inotify_simple`` (optional: without it, an adaptive poll).
Single-threaded; signal handlers only set a flag.
"""

from __future__ import annotations

import datetime
import fnmatch
import glob
import hashlib
import json
import os
import re
import select
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any

try:
    from spoolagent import protocol
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from spoolagent import protocol

try:
    import inotify_simple
except ImportError:  # pragma: no cover - depends on the platform
    inotify_simple = None

EXIT_DONT_RESTART = 13
FP_MAX = 1024  # bytes hashed to tell a file from another that got its inode
READ_CHUNK = 256 * 1024
PASS_BUDGET = 8 * 1024 * 1024  # per file per pass, so one busy file cannot starve the others
CP_BYTES = 512 * 1024  # checkpoint at least this often (output bytes) ...
CP_INTERVAL_S = 0.2  # ... and at least this often while busy
MIN_PASS_GAP_S = 0.05  # coalesce wake-ups from a writer that writes line by line
POLL_MIN_S, POLL_MAX_S = 0.05, 1.0
_DIR_EVENTS = 0x100 | 0x80 | 0x40 | 0x200 | 0x4000 | 0x400 | 0x800  # create/moved/delete/ovfl/self
_IN_IGNORED = 0x8000  # the watch is gone (its directory was removed)
_MAGIC = re.compile(r"[*?[]")
_MONTHS = {m: i for i, m in enumerate(
    (b"jan", b"feb", b"mar", b"apr", b"may", b"jun", b"jul", b"aug", b"sep", b"oct", b"nov",
     b"dec"), 1)}
_KNOWN_KEYS = {"paths", "prod", "start_at", "rotate_wait_s", "partial_flush_s", "max_line_bytes",
               "date_regex", "multiline_start", "multiline_flush_s", "glob_interval_s", "inotify",
               "enabled", "format"}


class ConfigProblem(Exception):
    """The settings cannot work; restarting will not help (exit 13)."""


def _err(msg: str) -> None:
    sys.stderr.write(f"tail: {msg}\n")
    sys.stderr.flush()


class Settings:
    """The validated ``[collectors.tail]`` table."""

    def __init__(self, raw: dict[str, Any]) -> None:
        for key in sorted(set(raw) - _KNOWN_KEYS):
            _err(f"ignoring unknown setting {key!r}")
        prod = str(raw.get("prod", "tail"))
        self.specs: list[tuple[str, bytes]] = []
        paths = raw.get("paths", [])
        if isinstance(paths, str):
            paths = [paths]
        for entry in paths:
            if isinstance(entry, str):
                pattern, p = entry, prod
            elif isinstance(entry, dict) and isinstance(entry.get("glob"), str):
                pattern, p = entry["glob"], str(entry.get("prod", prod))
            else:
                raise ConfigProblem(f"paths entry {entry!r}: a glob string or {{glob=..., prod=...}}")
            if not protocol.is_valid_prod(p.encode("utf-8", "replace")):
                raise ConfigProblem(f"prod {p!r} must match [A-Za-z0-9][A-Za-z0-9._-]{{0,127}}")
            self.specs.append((os.path.abspath(os.path.expanduser(pattern)), p.encode("ascii")))
        if not self.specs:
            raise ConfigProblem("no paths configured (set paths = [...] under [collectors.tail])")
        start_at = raw.get("start_at", "beginning")
        if start_at not in ("beginning", "end"):
            raise ConfigProblem(f"start_at must be 'beginning' or 'end', not {start_at!r}")
        self.start_at_end = start_at == "end"
        self.rotate_wait_s = self._num(raw, "rotate_wait_s", 5.0)
        self.partial_flush_s = self._num(raw, "partial_flush_s", 5.0)
        self.multiline_flush_s = self._num(raw, "multiline_flush_s", 2.0)
        self.glob_interval_s = self._num(raw, "glob_interval_s", 1.0)
        self.max_line_bytes = int(self._num(raw, "max_line_bytes", protocol.DEFAULT_MAX_LINE_BYTES))
        if self.max_line_bytes < 1:
            raise ConfigProblem("max_line_bytes must be at least 1")
        self.date_rx = self._rx(raw, "date_regex")
        self.ml_rx = self._rx(raw, "multiline_start")
        self.inotify = bool(raw.get("inotify", True)) and inotify_simple is not None

    @staticmethod
    def _num(raw: dict[str, Any], key: str, default: float) -> float:
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ConfigProblem(f"{key} must be a non-negative number, not {value!r}")
        return float(value)

    @staticmethod
    def _rx(raw: dict[str, Any], key: str) -> re.Pattern[bytes] | None:
        if not raw.get(key):
            return None
        try:
            return re.compile(str(raw[key]).encode("utf-8"))
        except re.error as exc:
            raise ConfigProblem(f"{key}: bad regular expression: {exc}") from exc


def _fingerprint(fd: int, n: int) -> str | None:
    """Hash of the first ``n`` bytes, or None when the file is now shorter than that."""
    if n == 0:
        return ""
    head = os.pread(fd, n, 0)
    if len(head) < n:
        return None
    return hashlib.blake2b(head, digest_size=8).hexdigest()


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data``, one syscall per pipe-full. Not sys.stdout.buffer: a signal that
    interrupts its write part way has been seen to drop the rest of the chunk."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _glob_key(pattern: str) -> str:
    return hashlib.blake2b(pattern.encode("utf-8", "surrogateescape"), digest_size=4).hexdigest()


class Tracked:
    """One open file: where it is read to, and the bytes read but not sent yet."""

    __slots__ = ("fd", "dev", "ino", "path", "prod", "limit", "read_off", "fp_len", "fp",
                 "partial", "ml_parts", "ml_len", "ml_raw", "idle_since", "detached", "seen")

    def __init__(self, fd: int, st: os.stat_result, path: str, prod: bytes, limit: int,
                 offset: int, now: float) -> None:
        self.fd, self.dev, self.ino, self.path, self.prod = fd, st.st_dev, st.st_ino, path, prod
        self.limit = limit  # DATA bytes per record, so that PROD DATE DATA fits the protocol
        self.read_off = offset
        self.fp_len = min(offset, FP_MAX)
        self.fp = _fingerprint(fd, self.fp_len) or ""
        self.partial = b""  # bytes after the last newline read (an unterminated line)
        self.ml_parts: list[bytes] = []  # the multiline record being gathered
        self.ml_len = 0  # its length once joined
        self.ml_raw = 0  # the file bytes it came from (lines and their newlines)
        self.idle_since = now
        self.detached = False  # no longer at a path the globs match (renamed away or deleted)
        self.seen = (st.st_size, st.st_mtime_ns)

    def sent_off(self) -> int:
        """Offset just past the last record boundary sent: where a restart resumes."""
        return self.read_off - len(self.partial) - self.ml_raw


class Tailer:
    """Follows files and prints records and checkpoints to stdout. Not thread-safe."""

    def __init__(self, cfg: Settings, token: str) -> None:
        self.cfg = cfg
        self.files: dict[tuple[int, int], Tracked] = {}
        self.out_fd = sys.stdout.fileno()
        self.out_bytes = 0  # printed since the last checkpoint
        self.last_token = ""
        self.last_cp = time.monotonic()
        self.state_changed = False
        self.stopping = False
        self.more = False  # a file has more to read than one pass takes
        self.glob_keys = [_glob_key(p) for p, _ in cfg.specs]
        self.resume: dict[tuple[int, int], list[Any]] = {}
        self.known_globs: set[str] = set()
        self.had_token = bool(token)
        if token:
            self._load_token(token)
        self.today = b""
        self.prefixes: dict[bytes, tuple[bytes, bytes]] = {}
        self._set_today()
        self.inotify: Any = None
        self.watched: set[str] = set()
        if cfg.inotify:
            try:
                self.inotify = inotify_simple.INotify()
            except OSError as exc:
                _err(f"inotify unavailable ({exc}); polling")

    # --- token -------------------------------------------------------------------------------
    def _load_token(self, token: str) -> None:
        try:
            data = json.loads(token)
            self.known_globs = set(data.get("g", []))
            for dev, ino, fp_len, fp, off, path in data["f"]:
                self.resume[(int(dev), int(ino))] = [int(fp_len), str(fp), int(off), str(path)]
        except (ValueError, KeyError, TypeError) as exc:
            _err(f"unreadable checkpoint token ({exc}); starting as if there were none")
            self.resume.clear()
            self.had_token = False

    def token(self) -> str:
        files = [[f.dev, f.ino, f.fp_len, f.fp, f.sent_off(), f.path] for f in self.files.values()]
        return json.dumps({"v": 1, "g": self.glob_keys, "f": files}, separators=(",", ":"))

    def checkpoint(self, force: bool = False) -> None:
        """Print a checkpoint if anything was printed or the state moved since the last one."""
        if self.out_bytes or self.state_changed or force:
            tok = self.token()
            if tok != self.last_token or self.out_bytes:
                _write_all(self.out_fd, protocol.format_checkpoint(tok))
                self.last_token = tok
            self.out_bytes = 0
            self.state_changed = False
        self.last_cp = time.monotonic()

    def _write(self, data: bytes) -> None:
        if data:
            _write_all(self.out_fd, data)
            self.out_bytes += len(data)

    # --- records -----------------------------------------------------------------------------
    def _set_today(self) -> None:
        today = protocol.today()
        if today != self.today:
            self.today = today
            self.prefixes.clear()

    def _prefix(self, prod: bytes) -> tuple[bytes, bytes]:
        pre = self.prefixes.get(prod)
        if pre is None:
            head = protocol.format_record(prod, self.today, b"")[:-1]
            pre = self.prefixes[prod] = (head, b"\n" + head)
        return pre

    def _date(self, data: bytes) -> bytes:
        rx = self.cfg.date_rx
        m = rx.search(data) if rx is not None else None
        if m is None:
            return self.today
        groups = m.groupdict()
        if groups.get("month") and groups.get("day"):
            mon = groups["month"]
            month = _MONTHS.get(mon[:3].lower()) if mon[:1].isalpha() else int(mon)
            year = groups.get("year")
            try:
                if year:
                    y = int(year) + (2000 if len(year) == 2 else 0)
                    date = datetime.date(y, month or 0, int(groups["day"]))
                else:  # syslog style: no year; the newest date not past tomorrow
                    now = datetime.date.today()
                    date = datetime.date(now.year, month or 0, int(groups["day"]))
                    if date > now + datetime.timedelta(days=1):
                        date = date.replace(year=now.year - 1)
            except (ValueError, TypeError):
                return self.today
            return date.isoformat().encode("ascii")
        raw = groups.get("date") or (m.group(1) if rx is not None and rx.groups else m.group(0))
        digits = re.sub(rb"[^0-9]", b"", raw or b"")
        if len(digits) == 8:
            cand = b"%s-%s-%s" % (digits[:4], digits[4:6], digits[6:])
            if protocol.is_valid_date(cand):
                return cand
        return self.today

    def _rec(self, f: Tracked, data: bytes) -> bytes:
        if self.cfg.date_rx is not None:
            return protocol.format_record(f.prod, self._date(data), data)
        return self._prefix(f.prod)[0] + data + b"\n"

    def _chunks(self, f: Tracked, data: bytes, recs: list[bytes]) -> None:
        for i in range(0, len(data), f.limit):
            recs.append(self._rec(f, data[i : i + f.limit]))

    def _ml_emit(self, f: Tracked, recs: list[bytes]) -> None:
        if f.ml_parts:
            recs.append(self._rec(f, b"\\n".join(f.ml_parts)))
            f.ml_parts, f.ml_len, f.ml_raw = [], 0, 0

    def _line(self, f: Tracked, line: bytes, recs: list[bytes]) -> None:
        rx, lim = self.cfg.ml_rx, f.limit
        if rx is None:
            if len(line) > lim:
                self._chunks(f, line, recs)
            else:
                recs.append(self._rec(f, line))
            return
        # a new record starts at a matching line; one that would not fit is cut at a line boundary
        if f.ml_parts and (rx.search(line) is not None or f.ml_len + 2 + len(line) > lim):
            self._ml_emit(f, recs)
        if len(line) > lim:
            self._chunks(f, line, recs)
            return
        if f.ml_parts:
            f.ml_parts.append(line)
            f.ml_len += 2 + len(line)
        else:
            f.ml_parts, f.ml_len = [line], len(line)
        f.ml_raw += len(line) + 1

    def _consume(self, f: Tracked, data: bytes) -> None:
        buf = f.partial + data if f.partial else data
        nl = buf.rfind(b"\n")
        recs: list[bytes] = []
        if nl >= 0:
            f.partial = buf[nl + 1 :]
            lines = buf[:nl].split(b"\n")
            fast = self.cfg.ml_rx is None and self.cfg.date_rx is None
            if fast and (nl <= f.limit or max(map(len, lines)) <= f.limit):
                head, sep = self._prefix(f.prod)
                recs.append(head + sep.join(lines) + b"\n")
            else:
                for line in lines:
                    self._line(f, line, recs)
        else:
            f.partial = buf
        if len(f.partial) > f.limit:  # an over-long line: send it in chunks as it arrives
            self._ml_emit(f, recs)
            cut = len(f.partial) // f.limit * f.limit
            self._chunks(f, f.partial[:cut], recs)
            f.partial = f.partial[cut:]
        self._write(b"".join(recs))

    def _flush_pending(self, f: Tracked, partial: bool, multiline: bool) -> None:
        recs: list[bytes] = []
        if multiline or (partial and f.partial):
            self._ml_emit(f, recs)
        if partial and f.partial:
            recs.append(self._rec(f, f.partial))
            f.partial = b""
        self._write(b"".join(recs))

    # --- files -------------------------------------------------------------------------------
    def _open(self, path: str, prod: bytes, first_scan: bool, spec_key: str, now: float,
              rotated: bool = False) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            _err(f"cannot open path={path} err={exc}")
            return
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        if key in self.files or not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return
        limit = max(1, min(self.cfg.max_line_bytes, protocol.DEFAULT_MAX_LINE_BYTES - len(prod) - 12))
        prev = self.resume.pop(key, None)
        offset = 0
        if prev is not None and _fingerprint(fd, prev[0]) == prev[1]:
            offset = prev[2] if prev[2] <= st.st_size else 0  # shorter now: truncated while down
        elif prev is None and first_scan and not rotated and self.cfg.start_at_end and not (
                self.had_token and spec_key in self.known_globs):
            offset = self._last_line_end(fd, st.st_size)
        # else: new to us (appeared while running or while down, or its inode was reused): from 0
        f = Tracked(fd, st, path, prod, limit, offset, now)
        f.detached = rotated
        self.files[key] = f
        self.state_changed = True
        self._watch(os.path.dirname(path))

    @staticmethod
    def _last_line_end(fd: int, size: int) -> int:
        """Offset just past the last newline (start_at = "end" never starts inside a line)."""
        start = max(0, size - 65536)
        tail = os.pread(fd, size - start, start)
        nl = tail.rfind(b"\n")
        return start + nl + 1 if nl >= 0 else size

    def _release(self, f: Tracked) -> None:
        self._flush_pending(f, partial=True, multiline=True)
        os.close(f.fd)
        del self.files[(f.dev, f.ino)]
        self.state_changed = True

    def _watch(self, directory: str) -> None:
        if self.inotify is None or directory in self.watched:
            return
        try:
            self.inotify.add_watch(directory, 0x2 | 0x4 | 0x8 | _DIR_EVENTS)  # +modify/attrib/close
            self.watched.add(directory)
        except OSError:
            pass  # not there yet, or out of watches: the periodic scan still finds its files

    def scan(self, first_scan: bool = False) -> None:
        """Match the globs: open new files, mark the ones gone from their paths as detached."""
        now = time.monotonic()
        seen: set[tuple[int, int]] = set()
        for (pattern, prod), key in zip(self.cfg.specs, self.glob_keys, strict=True):
            base = pattern
            while _MAGIC.search(base):
                base = os.path.dirname(base)
            self._watch(base if os.path.isdir(base) else os.path.dirname(base))
            for path in sorted(glob.glob(pattern, recursive=True)):
                try:
                    st = os.stat(path)
                except OSError:
                    continue
                ident = (st.st_dev, st.st_ino)
                if not stat.S_ISREG(st.st_mode) or ident in seen:
                    continue
                seen.add(ident)
                f = self.files.get(ident)
                if f is None:
                    self._open(path, prod, first_scan, key, now)
                elif f.path != path or f.detached:
                    f.path, f.detached = path, False
                    self.state_changed = True
        for ident, f in self.files.items():
            if ident not in seen and not f.detached:
                f.detached, f.idle_since = True, now  # renamed away or deleted: drain, then release
        if first_scan:
            self._find_rotated(now)

    def _find_rotated(self, now: float) -> None:
        """Token files no glob matches any more were rotated while we were down: find them by
        inode in their old directory, so the lines after the offset are not lost."""
        for (dev, ino), (_fp_len, _fp, _off, path) in list(self.resume.items()):
            try:
                with os.scandir(os.path.dirname(path) or ".") as it:
                    for entry in it:
                        if entry.inode() == ino and entry.stat(follow_symlinks=False).st_dev == dev:
                            prod = next((p for g, p in self.cfg.specs
                                         if fnmatch.fnmatchcase(path, g)), self.cfg.specs[0][1])
                            self._open(entry.path, prod, True, "", now, rotated=True)
                            break
            except OSError:
                pass
        for (_dev, _ino), (_fp_len, _fp, off, path) in self.resume.items():
            _err(f"checkpointed file gone path={path} offset={off}: lines after it are lost")
        self.resume.clear()

    def _read(self, f: Tracked, now: float) -> bool:
        """Read what the file has past read_off (up to PASS_BUDGET); True if anything came."""
        try:
            st = os.fstat(f.fd)
        except OSError:
            return False
        changed = (st.st_size, st.st_mtime_ns) != f.seen
        f.seen = (st.st_size, st.st_mtime_ns)
        if st.st_size < f.read_off or (changed and f.fp_len and _fingerprint(f.fd, f.fp_len) != f.fp):
            # copytruncate (or rewritten in place): what was read before is sent, then from 0
            _err(f"truncated path={f.path} read_to={f.read_off} size={st.st_size}: from 0")
            self._flush_pending(f, partial=True, multiline=True)
            f.read_off, f.fp_len, f.fp = 0, 0, ""
            self.state_changed = True
        if st.st_size == f.read_off:
            return False
        got = 0
        while got < PASS_BUDGET and not self.stopping:
            data = os.pread(f.fd, READ_CHUNK, f.read_off)
            if not data:
                break
            f.read_off += len(data)
            got += len(data)
            if f.fp_len < FP_MAX:
                f.fp_len = min(f.read_off, FP_MAX)
                f.fp = _fingerprint(f.fd, f.fp_len) or ""
            self._consume(f, data)
            if self.out_bytes >= CP_BYTES:
                self.checkpoint()
            if len(data) < READ_CHUNK:
                break
        if got >= PASS_BUDGET:
            self.more = True  # left data behind for fairness: the next pass starts at once
        if got:
            f.idle_since = now
        return got > 0

    def run_pass(self) -> tuple[bool, float]:
        """Read every file once; flush what waited long enough. Returns (read anything, next timer)."""
        now = time.monotonic()
        self._set_today()
        did = self.more = False
        # rotated files first: the old file's last lines go out before the new file's first
        for f in sorted(self.files.values(), key=lambda x: not x.detached):
            if self.stopping:
                break
            did |= self._read(f, now)
        nxt = now + 3600.0
        cfg = self.cfg
        for f in list(self.files.values()):
            quiet = now - f.idle_since
            if f.partial:
                if quiet >= cfg.partial_flush_s:
                    self._flush_pending(f, partial=True, multiline=False)
                else:
                    nxt = min(nxt, f.idle_since + cfg.partial_flush_s)
            if f.ml_parts:
                if quiet >= cfg.multiline_flush_s:
                    self._flush_pending(f, partial=False, multiline=True)
                else:
                    nxt = min(nxt, f.idle_since + cfg.multiline_flush_s)
            if f.detached:
                if quiet >= cfg.rotate_wait_s:
                    self._release(f)
                else:
                    nxt = min(nxt, f.idle_since + cfg.rotate_wait_s)
        return did, nxt


def _load_config() -> Settings:
    raw = os.environ.get("SPOOLAGENT_COLLECTOR_CONFIG", "") or "{}"
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ConfigProblem(f"SPOOLAGENT_COLLECTOR_CONFIG is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigProblem("SPOOLAGENT_COLLECTOR_CONFIG must be a JSON object")
    return Settings(data)


def main() -> int:
    try:
        cfg = _load_config()
    except ConfigProblem as exc:
        _err(f"not starting: {exc}")
        return EXIT_DONT_RESTART
    tailer = Tailer(cfg, os.environ.get("SPOOLAGENT_CHECKPOINT", "").strip())
    wake_r, wake_w = os.pipe()
    for fd in (wake_r, wake_w):
        os.set_blocking(fd, False)
    signal.set_wakeup_fd(wake_w)

    def _stop(_signum: int, _frame: object) -> None:
        tailer.stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    tailer.scan(first_scan=True)
    # where this run starts, before any line: the agent then holds every line until a token
    # covers it, and a first run with start_at = "end" keeps its start position across a crash
    tailer.checkpoint(force=True)
    next_scan = time.monotonic() + cfg.glob_interval_s
    poll_s = POLL_MIN_S
    started = 0.0
    try:
        while not tailer.stopping:
            gap = started + MIN_PASS_GAP_S - time.monotonic()
            if gap > 0 and not tailer.more:  # a busy directory or a writer writing line by line: not a pass per event
                time.sleep(gap)
            started = time.monotonic()
            did, next_timer = tailer.run_pass()
            now = time.monotonic()
            if tailer.out_bytes and (not did or now - tailer.last_cp >= CP_INTERVAL_S):
                tailer.checkpoint()
            elif tailer.state_changed and not tailer.out_bytes:
                tailer.checkpoint()
            poll_s = POLL_MIN_S if did else min(POLL_MAX_S, poll_s * 1.5)
            timeout = POLL_MAX_S if tailer.inotify is not None else poll_s
            timeout = min(timeout, next_timer - now, next_scan - now)
            if tailer.out_bytes:
                timeout = min(timeout, tailer.last_cp + CP_INTERVAL_S - now)
            if tailer.more:
                timeout = 0.0
            rescan = _wait(tailer, wake_r, max(0.0, timeout))
            if rescan or time.monotonic() >= next_scan:
                tailer.scan()
                next_scan = time.monotonic() + cfg.glob_interval_s
        tailer.checkpoint()
    except BrokenPipeError:  # the agent is gone: nobody to tell
        return 1
    return 0


def _wait(tailer: Tailer, wake_r: int, timeout_s: float) -> bool:
    """Sleep until a file event, a signal or the timeout. True if a directory changed."""
    fds = [wake_r] + ([tailer.inotify.fileno()] if tailer.inotify is not None else [])
    ready, _, _ = select.select(fds, [], [], timeout_s)
    rescan = False
    if wake_r in ready:
        try:
            os.read(wake_r, 4096)
        except BlockingIOError:
            pass
    if tailer.inotify is not None and tailer.inotify.fileno() in ready:
        for event in tailer.inotify.read(timeout=0):
            if event.mask & _DIR_EVENTS:
                rescan = True
            if event.mask & _IN_IGNORED:
                tailer.watched.clear()  # re-added (where they still exist) by the next scan
                rescan = True
    return rescan


if __name__ == "__main__":
    sys.exit(main())
