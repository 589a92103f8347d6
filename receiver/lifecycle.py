"""Lifecycle: retention and compression of the day files, in the background with bounded I/O.

The day files and their trailer are described in ``receiver.dayfiles``. A compression pass on
``P.dat`` (``P`` = ``{PROD}_{DATE}``, its DATE older than ``compress_after_s``), all-or-nothing:

1. seal: under the file's ``flock`` (the store's lock), with no append intent left on it, rename
   ``P.dat`` to a sealed piece. A late line then makes the store open a new ``P.dat``;
2. merge: write ``P.dat.zst.tmp`` = the old ``P.dat.zst`` (copied, not recompressed) + one frame of
   the piece + a trailer naming it; fsync it; rename it over ``P.dat.zst``; fsync the directory;
3. only then unlink the piece. A crash before 3 leaves the piece: the next pass sees the trailer
   name it (already merged: unlink) or not (merge again, from the old ``P.dat.zst``). Nothing is
   lost or doubled.

Retention deletes every file of a day older than ``retention_s`` (the plain one under its lock),
and ``_rejected/rejected_{DATE}.jsonl`` too. Passes read and write at most ``rate_bytes`` a second
and hold ``.receiver/lifecycle.lock`` so one runner works on a data dir at a time.

Days: a file is older than N days when ``DATE + ceil(N) days < today`` (local date, as the store
files lines). Imports dayfiles, files and errors only (the store's lock and fsync helpers).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import zstandard

from receiver import dayfiles
from receiver.errors import StorageUnavailable
from receiver.files import fsync_dir

log = logging.getLogger(__name__)

LOCK_FILE = ".receiver/lifecycle.lock"
_DAY_RE = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]{0,127})_(\d{4}-\d{2}-\d{2})\.dat(\.zst)?\Z")
_REJECTED_RE = re.compile(r"rejected_(\d{4}-\d{2}-\d{2})\.jsonl\Z")


class _Intent(Protocol):
    @property
    def size_before(self) -> int: ...


class _Intents(Protocol):
    def intents(self, files: Iterable[str] | None = None) -> Sequence[_Intent]: ...


@dataclass
class PassStats:
    deleted: int = 0
    compressed: int = 0
    merged_bytes: int = 0
    skipped: int = 0
    ran: bool = True  # False: another runner held the data dir


class _Stopped(Exception):
    """The runner is stopping: a merge gives up (its temp file goes; the piece stays)."""


class _Throttle:
    """Sleeps (on ``stop``) so that the bytes passed through stay under ``rate`` a second."""

    def __init__(self, rate_bytes: int, stop: threading.Event) -> None:
        self._rate = rate_bytes
        self._stop = stop
        self._start = time.monotonic()
        self._bytes = 0

    def __call__(self, n: int) -> None:
        if self._stop.is_set():
            raise _Stopped
        self._bytes += n
        ahead_s = self._bytes / self._rate - (time.monotonic() - self._start)
        if ahead_s > 0:
            self._stop.wait(ahead_s)


class Lifecycle:
    """Retention and compression of one data dir. ``run_pass`` blocks for a whole pass (bounded
    I/O); ``run`` repeats it every ``interval_s`` until ``stop`` is set (a thread's target). Not
    thread-safe itself; several runners on one dir (processes, hosts) take turns by a lock file.
    ``intents`` is the store's journal (``DedupIndex``): a file with an append intent left on it
    is skipped until the store has rolled it back."""

    def __init__(self, data_dir: Path, *, intents: _Intents, retention_s: float | None = None,
                 compress_after_s: float | None = None, rate_bytes: int = 32 * 1024 * 1024,
                 interval_s: float = 600.0, fsync: bool = True,
                 today: Callable[[], datetime.date] = datetime.date.today,
                 on_pass: Callable[[PassStats | None], None] | None = None) -> None:
        self.data_dir = data_dir
        self._intents = intents
        self._retention_days = None if retention_s is None else math.ceil(retention_s / 86400)
        self._compress_days = None if compress_after_s is None else math.ceil(compress_after_s / 86400)
        self._rate = rate_bytes
        self._interval_s = interval_s
        self._fsync = fsync
        self._today = today
        self._on_pass = on_pass  # metrics: each pass's counts; None for a failed pass
        self.stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self._retention_days is not None or self._compress_days is not None

    def start(self) -> None:
        """Run ``run`` on a daemon thread of its own (``close`` stops and joins it)."""
        self._thread = threading.Thread(target=self.run, name="lifecycle", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the thread (a merge under way gives up; its piece stays for the next pass) and
        wait for it. Blocks for at most one chunk of I/O."""
        self.stop.set()
        if self._thread is not None:
            self._thread.join()

    def run(self) -> None:
        """Pass, wait ``interval_s``, pass ... until ``stop``. Never raises."""
        while not self.stop.is_set():
            stats: PassStats | None = None
            try:
                stats = self.run_pass() or PassStats(ran=False)
                if stats.deleted or stats.compressed or stats.skipped:
                    log.info("lifecycle pass deleted=%d compressed=%d merged_bytes=%d skipped=%d",
                             stats.deleted, stats.compressed, stats.merged_bytes, stats.skipped)
            except _Stopped:
                return
            except Exception as exc:  # the top of a thread: try again next time
                log.warning("lifecycle pass failed err=%s", exc)
            if self._on_pass is not None:
                self._on_pass(stats)
            self.stop.wait(self._interval_s)

    def run_pass(self) -> PassStats | None:
        """One pass; None if another runner holds the data dir. Raises StorageUnavailable/OSError."""
        with self._runner_lock() as held:
            if not held:
                return None
            stats = PassStats()
            throttle = _Throttle(self._rate, self.stop)
            today = self._today()
            for stem, date in sorted(self._days()):
                if self.stop.is_set():
                    break
                age = (today - date).days
                if self._retention_days is not None and age > self._retention_days:
                    stats.deleted += self._delete_day(stem)
                    continue
                for token, piece in dayfiles.pieces(self.data_dir, stem):  # left by a crash: finish them
                    stats.merged_bytes += self._merge(stem, token, piece, throttle)
                if self._compress_days is not None and age > self._compress_days:
                    piece_token = self._seal(stem)
                    if piece_token is None:
                        stats.skipped += 1 if (self.data_dir / f"{stem}.dat").exists() else 0
                        continue
                    stats.merged_bytes += self._merge(stem, piece_token[0], piece_token[1], throttle)
                    stats.compressed += 1
            if self._retention_days is not None:
                stats.deleted += self._expire_rejected(today)
            return stats

    @contextlib.contextmanager
    def _runner_lock(self) -> Iterator[bool]:
        path = self.data_dir / LOCK_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def _days(self) -> set[tuple[str, datetime.date]]:
        days = set()
        for p in self.data_dir.iterdir():
            name = p.name
            if name.startswith(".") and dayfiles.SEALED in name:
                name = name[1:name.index(dayfiles.SEALED)] + ".dat"
            m = _DAY_RE.match(name)
            if m is None:
                continue
            with contextlib.suppress(ValueError):
                days.add((f"{m.group(1)}_{m.group(2)}", datetime.date.fromisoformat(m.group(2))))
        return days

    # -- sealing and merging -------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[int | None]:
        """The store's lock on data file ``name``: the fd, or None if there is no such file or an
        append intent is left on it with bytes after its size (the store rolls them back first).
        An intent at the file's size is a store's standing one (``receiver/append.py``): nothing
        to roll back, and a new ``name`` starts below it, so its next append records a fresh one."""
        path = self.data_dir / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            yield None
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(path)
            except FileNotFoundError:
                yield None
                return
            fst = os.fstat(fd)
            if (current.st_ino, current.st_dev) != (fst.st_ino, fst.st_dev) or any(
                    i.size_before != fst.st_size for i in self._intents.intents([name])):
                yield None
                return
            yield fd
        finally:
            os.close(fd)  # releases the flock

    def _seal(self, stem: str) -> tuple[int, Path] | None:
        """Move ``stem.dat`` out of the store's way; the piece's (token, path), or None."""
        with self._locked(f"{stem}.dat") as fd:
            if fd is None:
                return None
            token = time.time_ns()
            piece = self.data_dir / f".{stem}{dayfiles.SEALED}{token:0{dayfiles.TOKEN_DIGITS}d}"
            os.rename(self.data_dir / f"{stem}.dat", piece)
            if self._fsync:
                fsync_dir(self.data_dir)
            return token, piece

    def _merge(self, stem: str, token: int, piece: Path, throttle: _Throttle) -> int:
        """Make ``stem.dat.zst`` hold ``piece`` (once), then unlink the piece. Bytes written."""
        target = self.data_dir / f"{stem}.dat.zst"
        if dayfiles.last_token(target) >= token:  # merged before a crash: only the unlink was left
            piece.unlink()
            return 0
        tmp = self.data_dir / f".{stem}.dat.zst.tmp"
        written = 0
        try:
            with open(tmp, "wb") as out:
                if target.exists():
                    with open(target, "rb") as old:
                        written += _copy(old, out.write, throttle)
                with open(piece, "rb") as src:
                    writer = zstandard.ZstdCompressor(level=3).stream_writer(out, closefd=False)
                    _copy(src, writer.write, throttle)
                    writer.flush(zstandard.FLUSH_FRAME)
                out.write(dayfiles.trailer(token))
                out.flush()
                written = out.tell()
                if self._fsync:
                    os.fsync(out.fileno())
            # the compressed day is durable before the plain piece may go
            os.replace(tmp, target)
            if self._fsync:
                fsync_dir(self.data_dir)
        except _Stopped:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StorageUnavailable(f"cannot compress {piece.name}: {exc}", retry_after_s=5) from exc
        piece.unlink()
        if self._fsync:
            fsync_dir(self.data_dir)
        return written

    # -- retention -----------------------------------------------------------------------------

    def _delete_day(self, stem: str) -> int:
        deleted = 0
        with self._locked(f"{stem}.dat") as fd:
            if fd is not None:
                os.unlink(self.data_dir / f"{stem}.dat")
                deleted += 1
        for p in [self.data_dir / f"{stem}.dat.zst", self.data_dir / f".{stem}.dat.zst.tmp",
                  *(p for _, p in dayfiles.pieces(self.data_dir, stem))]:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                deleted += 1
        if deleted and self._fsync:
            fsync_dir(self.data_dir)
        return deleted

    def _expire_rejected(self, today: datetime.date) -> int:
        assert self._retention_days is not None
        rejected = self.data_dir / "_rejected"
        deleted = 0
        for p in rejected.glob("rejected_*.jsonl") if rejected.is_dir() else ():
            m = _REJECTED_RE.match(p.name)
            if m is None:
                continue
            with contextlib.suppress(ValueError):
                if (today - datetime.date.fromisoformat(m.group(1))).days <= self._retention_days:
                    continue
                with self._locked(f"_rejected/{p.name}") as fd:
                    if fd is not None:
                        p.unlink()
                        deleted += 1
        return deleted


def _copy(src: BinaryIO, write: Callable[[bytes], object], throttle: _Throttle) -> int:
    total = 0
    while chunk := src.read(dayfiles.CHUNK):
        write(chunk)
        total += len(chunk)
        throttle(2 * len(chunk))  # read and written
    return total
