#!/usr/bin/env python3
"""tail: follow the files matched by globs and print their lines, with exactly-once checkpoints.

A long-running spoolagent collector (interval 0). It owns: finding files (globs, rescanned while
running), following them across rename and copytruncate rotation, cutting their bytes into records
(partial lines, over-long lines, multiline records, dates) and the checkpoint token that says where
to resume. Settings arrive as JSON in SPOOLAGENT_COLLECTOR_CONFIG, the last committed token in
SPOOLAGENT_CHECKPOINT; the reference is docs/collectors.md.

This file owns following files: finding them, rotation (rename and copytruncate) and reading.
Its parts live in ``spoolagent_collectors.lib``: ``tail_settings`` (the settings), ``tail_token``
(the checkpoint token: device, inode, fingerprint and offset per file), ``tail_file`` (one
followed file: its identity, size and token row), ``tail_records`` (cutting bytes into records)
and ``tail_watch`` (its wake-ups between passes; without inotify, an adaptive poll).
Single-threaded; signal handlers only set a flag.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
import stat
import sys
import time

from spoolagent_collectors.lib import tail_token, tail_watch
from spoolagent_collectors.lib.common import Output, err, stop_on_signals
from spoolagent_collectors.lib.tail_file import Tracked
from spoolagent_collectors.lib.tail_records import Buffer, RecordCutter

# SETTINGS: the keys this collector takes and their kinds; `spoolagent check` and every agent start
# or reload check [collectors.tail] against it (spoolagent/collector_settings.py follows this import
# and reads the literal without running anything), so a typo or a bad regex is a config error
from spoolagent_collectors.lib.tail_settings import SETTINGS, ConfigProblem, Settings  # noqa: F401
from spoolagent_collectors.lib.tail_token import fingerprint

from spoolagent import protocol

# at full speed each chunk is read into a new bytes object and replaced into another: at 256 KiB
# they came from fresh memory each time (glibc's mmap and heap trimming: ~70 page faults per
# chunk, most of the tail's CPU); at 128 KiB the freed memory is reused (issue 17)
READ_CHUNK = 128 * 1024
PASS_BUDGET = 8 * 1024 * 1024  # per file per pass, so one busy file cannot starve the others
CP_BYTES = 512 * 1024  # checkpoint at least this often (output bytes) ...
CP_INTERVAL_S = 0.2  # ... and at least this often while busy
MIN_PASS_GAP_S = 0.05  # coalesce wake-ups from a writer that writes line by line
POLL_MIN_S, POLL_MAX_S = 0.05, 1.0
_MAGIC = re.compile(r"[*?[]")


def _err(msg: str) -> None:
    err("tail", msg)


def _rotated_last(f: Tracked) -> bool:
    return not f.detached


class Tailer:
    """Follows files and prints records and checkpoints to stdout. Not thread-safe."""

    def __init__(self, cfg: Settings, token: str) -> None:
        self.cfg = cfg
        self.files: dict[tuple[int, int], Tracked] = {}
        self.out = Output(sys.stdout.fileno())  # flushed once per pass, before the wait
        self.out_bytes = 0  # printed since the last checkpoint
        self.last_token = ""
        self.last_cp = time.monotonic()
        self.state_changed = False
        self.stopping = False
        self.more = False  # a file has more to read than one pass takes
        self.glob_keys = [tail_token.glob_key(p) for p, _ in cfg.specs]
        self.token_prefix = tail_token.prefix(self.glob_keys)
        self.resume: tail_token.Resume = {}
        self.known_globs: set[str] = set()
        self.had_token = bool(token)
        if token:
            self._load_token(token)
        self.cutter = RecordCutter(cfg.date_rx, cfg.ml_rx)
        self.inotify: tail_watch.INotify | None = None
        self.watched: set[str] = set()
        # inotify reports every change the globs and followed files can see: no timed rescan or
        # poll then (a glob with magic in a directory, or a directory that cannot be watched, keeps them)
        self.events_cover = False
        self.file_unwatched = False  # a followed file's directory could not be watched
        if cfg.inotify:
            try:
                self.inotify = tail_watch.INotify()
            except OSError as exc:
                _err(f"inotify unavailable ({exc}); polling")

    # --- token -------------------------------------------------------------------------------
    def _load_token(self, token: str) -> None:
        try:
            self.known_globs, self.resume = tail_token.decode(token)
        except ValueError as exc:
            _err(f"unreadable checkpoint token ({exc}); starting as if there were none")
            self.resume.clear()
            self.had_token = False

    def token(self) -> str:
        return tail_token.finish(self.token_prefix, [f.token_row() for f in self.files.values()])

    def checkpoint(self, force: bool = False) -> None:
        """Print a checkpoint if anything was printed or the state moved since the last one."""
        if self.out_bytes or self.state_changed or force:
            tok = self.token()
            if tok != self.last_token or self.out_bytes:
                self.out.write(protocol.format_checkpoint(tok))
                self.last_token = tok
            self.out_bytes = 0
            self.state_changed = False
        self.last_cp = time.monotonic()

    def _write(self, records: list[Buffer]) -> None:
        for data in records:
            if data:
                self.out.write(data)
                self.out_bytes += len(data)

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
        if prev is not None and fingerprint(fd, prev[0]) == prev[1]:
            offset = prev[2] if prev[2] <= st.st_size else 0  # shorter now: truncated while down
        elif prev is None and first_scan and not rotated and self.cfg.start_at_end and not (
                self.had_token and spec_key in self.known_globs):
            offset = self._last_line_end(fd, st.st_size)
        # else: new to us (appeared while running or while down, or its inode was reused): from 0
        f = Tracked(fd, st, path, prod, limit, offset, now)
        f.detached = rotated
        self.files[key] = f
        self.state_changed = True
        for directory in {os.path.dirname(path), os.path.dirname(os.path.realpath(path))}:
            # the writer's path may be the link's target: its events come from that directory
            if not self._watch(directory):
                self.file_unwatched = True

    @staticmethod
    def _last_line_end(fd: int, size: int) -> int:
        """Offset just past the last newline (start_at = "end" never starts inside a line)."""
        start = max(0, size - 65536)
        tail = os.pread(fd, size - start, start)
        nl = tail.rfind(b"\n")
        return start + nl + 1 if nl >= 0 else size

    def _release(self, f: Tracked) -> None:
        self._write(self.cutter.flush(f, partial=True, multiline=True))
        os.close(f.fd)
        del self.files[(f.dev, f.ino)]
        self.state_changed = True

    def _watch(self, directory: str) -> bool:
        """True if ``directory`` is watched (now or before)."""
        if self.inotify is None:
            return False
        if directory in self.watched:
            return True
        try:
            self.inotify.add_watch(directory, tail_watch.FILE_EVENTS | tail_watch.DIR_EVENTS)
            self.watched.add(directory)
            return True
        except OSError:
            return False  # not there yet, or out of watches: the periodic scan still finds its files

    def scan(self, first_scan: bool = False) -> None:
        """Match the globs: open new files, mark the ones gone from their paths as detached."""
        now = time.monotonic()
        seen: set[tuple[int, int]] = set()
        covered = self.inotify is not None
        for (pattern, prod), key in zip(self.cfg.specs, self.glob_keys, strict=True):
            base = pattern
            while _MAGIC.search(base):
                base = os.path.dirname(base)
            # events of one directory cover a glob whose magic is in its last part only
            watched = self._watch(base if os.path.isdir(base) else os.path.dirname(base))
            covered = covered and watched and not _MAGIC.search(os.path.dirname(pattern))
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
        self.events_cover = covered

    def quiet_until_event(self) -> bool:
        """True if only inotify events (no poll) need to wake the main loop: every glob and
        followed file is covered by a watch and no file drains away from its directory."""
        return (self.events_cover and not self.file_unwatched
                and not any(f.detached for f in self.files.values()))

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
            size, rewritten = f.size()
        except OSError:
            return False
        if size < f.read_off or rewritten:
            # copytruncate (or rewritten in place): what was read before is sent, then from 0
            _err(f"truncated path={f.path} read_to={f.read_off} size={size}: from 0")
            self._write(self.cutter.flush(f, partial=True, multiline=True))
            f.read_off = 0
            f.set_fingerprint(0)
            self.state_changed = True
        if size == f.read_off:
            return False
        got = 0
        while got < PASS_BUDGET and not self.stopping:
            # no more than the size seen: a pass's few KiB are a small allocation, not a whole
            # chunk's buffer mapped, shrunk and unmapped (three syscalls and page faults per pass); what
            # is appended meanwhile raises an event (or the poll finds it) for the next pass
            want = min(READ_CHUNK, size - f.read_off)
            if want <= 0:
                break
            data = os.pread(f.fd, want, f.read_off)
            if not data:
                break
            f.read_off += len(data)
            got += len(data)
            if f.fp_len < tail_token.FP_MAX:
                f.set_fingerprint(min(f.read_off, tail_token.FP_MAX))
            self._write(self.cutter.consume(f, data))
            if self.out_bytes >= CP_BYTES:
                self.checkpoint()
            if len(data) < want:
                break
        if got >= PASS_BUDGET:
            self.more = True  # left data behind for fairness: the next pass starts at once
        if got:
            f.idle_since = now
        return got > 0

    def run_pass(self, now: float) -> tuple[bool, float]:
        """Read every file once; flush what waited long enough. Returns (read anything, next timer)."""
        self.cutter.set_today()
        did = self.more = False
        files = list(self.files.values())  # a copy: _release below removes from self.files
        if len(files) > 1:
            # rotated files first: the old file's last lines go out before the new file's first
            files.sort(key=_rotated_last)
        for f in files:
            if self.stopping:
                break
            did |= self._read(f, now)
        nxt = now + 3600.0
        cfg = self.cfg
        for f in files:
            quiet = now - f.idle_since
            if f.partial:
                if quiet >= cfg.partial_flush_s:
                    self._write(self.cutter.flush(f, partial=True, multiline=False))
                else:
                    nxt = min(nxt, f.idle_since + cfg.partial_flush_s)
            if f.ml_parts:
                if quiet >= cfg.multiline_flush_s:
                    self._write(self.cutter.flush(f, partial=False, multiline=True))
                else:
                    nxt = min(nxt, f.idle_since + cfg.multiline_flush_s)
            if f.detached:
                if quiet >= cfg.rotate_wait_s:
                    self._release(f)
                else:
                    nxt = min(nxt, f.idle_since + cfg.rotate_wait_s)
        return did, nxt


def _load_config() -> Settings:
    try:
        return Settings(protocol.collector_settings(), inotify_available=tail_watch.available())
    except ValueError as exc:
        raise ConfigProblem(str(exc)) from exc


def main() -> int:
    try:
        cfg = _load_config()
    except ConfigProblem as exc:
        _err(f"not starting: {exc}")
        return protocol.EXIT_DO_NOT_RESTART
    tailer = Tailer(cfg, protocol.collector_checkpoint())

    def _stop() -> None:
        tailer.stopping = True

    wake_r = stop_on_signals(_stop, nonblocking_read=True)
    tailer.scan(first_scan=True)
    # where this run starts, before any line: the agent then holds every line until a token
    # covers it, and a first run with start_at = "end" keeps its start position across a crash
    tailer.checkpoint(force=True)
    tailer.out.flush()
    next_scan = time.monotonic() + cfg.glob_interval_s
    poll_s = POLL_MIN_S
    waits = tail_watch.Waits(tailer.inotify, wake_r, MIN_PASS_GAP_S)
    try:
        while not tailer.stopping:
            started = time.monotonic()
            did, next_timer = tailer.run_pass(started)
            now = time.monotonic()
            if tailer.out_bytes and (not did or now - tailer.last_cp >= CP_INTERVAL_S):
                tailer.checkpoint()
            elif tailer.state_changed and not tailer.out_bytes:
                tailer.checkpoint()
            poll_s = POLL_MIN_S if did else min(POLL_MAX_S, poll_s * 1.5)
            timed_scan = not tailer.events_cover
            if tailer.more:  # a file left data behind for fairness: the next pass starts at once
                tailer.out.flush()
                mask = waits.select(0.0)[0]
            elif did and waits.hot:  # the next pass is due at the gap's end: no timer comes first
                tailer.out.flush()
                mask = waits.busy(started)
            else:
                timeout = POLL_MAX_S if tailer.inotify is not None else poll_s
                if tailer.quiet_until_event():
                    timeout = next_timer - now  # idle: asleep until a file event, a signal or a flush
                timeout = min(timeout, next_timer - now, next_scan - now if timed_scan else timeout)
                if tailer.out_bytes:
                    timeout = min(timeout, tailer.last_cp + CP_INTERVAL_S - now)
                tailer.out.flush()  # before sleeping: nothing printed waits in here
                mask = waits.next_pass(started, timeout)
            if tail_watch.rescan(mask, tailer.watched) or (timed_scan and time.monotonic() >= next_scan):
                tailer.scan()
                next_scan = time.monotonic() + cfg.glob_interval_s
        tailer.checkpoint()
        tailer.out.flush()
    except BrokenPipeError:  # the agent is gone: nobody to tell
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
