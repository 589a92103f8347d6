"""PartitionedStore: append-only ``DATA_DIR/{PROD}_{DATE}.dat`` files (and ``_rejected/`` files)
with file locks, an intent journal with rollback, fsync, and a bounded cache of open files.

How a batch is appended, all-or-nothing over every file it touches:

1. lock its files in name order (a ``threading.Lock`` per open file, then ``flock`` on the file,
   which holds across ``--processes`` and dies with its holder);
2. roll back whatever a crashed holder left: an intent still recorded for a file means its append
   was never recorded as done, so the file is truncated to the size the intent recorded;
3. record the intents (file, size before) in the journal, durably, *before* appending;
4. append, then fsync every file;
5. commit: the batch id is recorded as stored and the intents cleared in one SQLite transaction.

A failure in 4 or 5 (disk full, read-only, I/O error) truncates the files back and raises
StorageUnavailable; a crash anywhere is rolled back by the next holder of each file's lock, or at
start-up by ``recover``. Names are checked against a strict pattern, so nothing can be written
outside the data dir. Imports ``receiver.dedup`` and ``receiver.errors`` only.

Test-only fault switches (set through the environment by ``config.py``; never in production):
``crash_at`` = ``after_intent`` | ``mid_append`` | ``before_mark`` makes the process SIGKILL itself
at that point; ``fault_enospc_after_bytes`` fails writes with ENOSPC once this process has appended
that many bytes (the write that crosses the limit is left torn, as a real full disk may leave it).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import signal
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

from receiver.dedup import DedupIndex
from receiver.errors import StorageUnavailable

log = logging.getLogger(__name__)

REJECTED_DIR = "_rejected"
_NAME_RE = re.compile(r"(?:_rejected/)?[A-Za-z0-9][A-Za-z0-9._-]{0,200}\Z")
_RETRY_AFTER_S = 5
_MAX_REOPENS = 8


class _OpenFile:
    """One cached descriptor; ``users`` counts checkouts, ``mutex`` excludes threads."""

    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        self.fd = fd
        self.users = 0
        self.stale = False
        self.mutex = threading.Lock()


class _FileTable:
    """A bounded LRU of open append descriptors. Only unused entries are ever closed."""

    def __init__(self, data_dir: Path, max_open: int, fsync: bool) -> None:
        self._data_dir = data_dir
        self._max_open = max_open
        self._fsync = fsync
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _OpenFile] = OrderedDict()

    def lock(self, name: str) -> _OpenFile:
        """Check out ``name`` and hold its thread mutex and its flock. Blocks until both are held."""
        for _ in range(_MAX_REOPENS):
            entry = self._checkout(name)
            entry.mutex.acquire()
            try:
                fcntl.flock(entry.fd, fcntl.LOCK_EX)
                if self._is_current(entry):
                    return entry
                fcntl.flock(entry.fd, fcntl.LOCK_UN)  # moved or removed: reopen the path
                entry.stale = True
            except BaseException:
                self.unlock(entry)
                raise
            self.unlock(entry)
        raise StorageUnavailable(f"{name} keeps being replaced", retry_after_s=_RETRY_AFTER_S)

    def unlock(self, entry: _OpenFile) -> None:
        """Release what ``lock`` took."""
        try:
            fcntl.flock(entry.fd, fcntl.LOCK_UN)
        finally:
            entry.mutex.release()
            with self._lock:
                entry.users -= 1
                if entry.stale and entry.users == 0:
                    if self._entries.get(entry.name) is entry:
                        del self._entries[entry.name]
                    os.close(entry.fd)
                self._evict()

    def close(self) -> None:
        with self._lock:
            for entry in self._entries.values():
                os.close(entry.fd)
            self._entries.clear()

    def _checkout(self, name: str) -> _OpenFile:
        path = self._data_dir / name
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.stale:
                created = not path.exists()
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
                if created and self._fsync:  # the new name must survive a power loss too
                    _fsync_dir(path.parent)
                entry = self._entries[name] = _OpenFile(name, fd)
            self._entries.move_to_end(name)
            entry.users += 1
            self._evict()
            return entry

    def _is_current(self, entry: _OpenFile) -> bool:
        try:
            st = os.stat(self._data_dir / entry.name)
        except FileNotFoundError:
            return False
        fst = os.fstat(entry.fd)
        return (st.st_ino, st.st_dev) == (fst.st_ino, fst.st_dev)

    def _evict(self) -> None:
        # called with self._lock held; the least recently used unused entries go first
        excess = len(self._entries) - self._max_open
        if excess <= 0:
            return
        for name in [n for n, e in self._entries.items() if e.users == 0][:excess]:
            os.close(self._entries.pop(name).fd)


class PartitionedStore:
    """Appends batches to the data dir, exactly once under crashes. Thread-safe; every call blocks
    on file locks and disk I/O, so call it from an executor, never from the event loop."""

    def __init__(self, data_dir: Path, journal: DedupIndex, *, fsync: bool = True,
                 max_open_files: int = 128, crash_at: str | None = None,
                 fault_enospc_after_bytes: int | None = None) -> None:
        self.data_dir = data_dir
        self._journal = journal
        self._fsync = fsync
        self._files = _FileTable(data_dir, max_open_files, fsync)
        self._crash_at = crash_at
        self._enospc_after = fault_enospc_after_bytes
        self._written = 0
        self._written_lock = threading.Lock()

    def create(self) -> None:
        """Create the data dir and ``_rejected/``. Raises StorageUnavailable."""
        try:
            (self.data_dir / REJECTED_DIR).mkdir(parents=True, exist_ok=True)
            if self._fsync:  # the directory entries must survive a power loss like the files
                _fsync_dir(self.data_dir)
        except OSError as exc:
            raise StorageUnavailable(f"cannot create {self.data_dir}: {exc}",
                                     retry_after_s=_RETRY_AFTER_S) from exc

    def recover(self) -> int:
        """Roll back every append left unrecorded by a crash (start-up). Returns how many."""
        rolled = 0
        for intent in self._journal.intents():
            if _NAME_RE.match(intent.file) is None or not (self.data_dir / intent.file).exists():
                self._journal.drop_intents([intent.file])
                continue
            entry = self._lock_files([intent.file])[0]
            try:
                rolled += self._roll_back_left_intents([entry])
                self._journal.drop_intents([intent.file])
            finally:
                self._files.unlock(entry)
        return rolled

    def append(self, batch_id: str | None, parts: Mapping[str, bytes], stored: int,
               rejected: int) -> None:
        """Append every part (file name -> bytes) and record the batch as stored, all or nothing.

        ``batch_id`` None (POST / and TCP lines) skips the dedup record but keeps the atomicity.
        The caller holds the batch's claim. Raises StorageUnavailable with nothing left behind.
        """
        names = sorted(name for name, data in parts.items() if data)
        for name in names:
            if _NAME_RE.match(name) is None:
                raise ValueError(f"refusing to write outside the data dir: {name!r}")
        entries = self._lock_files(names)
        try:
            self._append_locked(batch_id, entries, parts, stored, rejected)
        finally:
            for entry in reversed(entries):
                self._files.unlock(entry)

    def close(self) -> None:
        """Close every cached descriptor. Call once no other thread uses the store."""
        self._files.close()

    # -- internals ----------------------------------------------------------------------------

    def _lock_files(self, names: list[str]) -> list[_OpenFile]:
        entries: list[_OpenFile] = []
        try:
            for name in names:  # sorted: every holder locks in the same order, so no deadlock
                entries.append(self._files.lock(name))
        except OSError as exc:
            for entry in reversed(entries):
                self._files.unlock(entry)
            raise StorageUnavailable(f"cannot open {name}: {exc}",
                                     retry_after_s=_RETRY_AFTER_S) from exc
        except BaseException:
            for entry in reversed(entries):
                self._files.unlock(entry)
            raise
        return entries

    def _append_locked(self, batch_id: str | None, entries: list[_OpenFile],
                       parts: Mapping[str, bytes], stored: int, rejected: int) -> None:
        names = [e.name for e in entries]
        try:
            self._roll_back_left_intents(entries)
            sizes = {e.name: os.fstat(e.fd).st_size for e in entries}
        except OSError as exc:
            raise StorageUnavailable(f"cannot roll back: {exc}", retry_after_s=_RETRY_AFTER_S) from exc
        if entries:
            # the intent is durable before the first byte is appended: a crash from here on is
            # rolled back by the next holder of each file's lock
            self._journal.record_intents(batch_id, sizes)
            self._crash_point("after_intent")
        try:
            for entry in entries:
                self._write(entry, parts[entry.name])
            if self._fsync:
                for entry in entries:
                    os.fsync(entry.fd)
        except OSError as exc:
            self._undo(batch_id, entries, sizes)
            raise StorageUnavailable(f"cannot append: {exc}", retry_after_s=_RETRY_AFTER_S) from exc
        # mark stored only after fsync: a crash in between is rolled back, never half-kept
        self._crash_point("before_mark")
        try:
            self._journal.commit(batch_id, stored, rejected, names)
        except StorageUnavailable:
            self._undo(batch_id, entries, sizes)
            raise

    def _roll_back_left_intents(self, entries: list[_OpenFile]) -> int:
        """Truncate files whose intent is still recorded (the caller holds their locks). The
        intents stay until replaced or dropped: a truncation lost to a power cut is redone."""
        if not entries:
            return 0
        by_name = {e.name: e for e in entries}
        rolled = 0
        for intent in self._journal.intents(by_name):
            entry = by_name[intent.file]
            size = os.fstat(entry.fd).st_size
            if size > intent.size_before:
                os.ftruncate(entry.fd, intent.size_before)
                if self._fsync:
                    os.fsync(entry.fd)
                rolled += 1
                log.warning("rolled back unrecorded append file=%s batch=%s bytes=%d",
                            intent.file, intent.batch_id, size - intent.size_before)
        return rolled

    def _undo(self, batch_id: str | None, entries: list[_OpenFile], sizes: Mapping[str, int]) -> None:
        """Truncate this batch's appends away; whatever cannot be undone now is undone by the next
        holder of the lock, since the intents stay recorded until they are dropped here."""
        try:
            for entry in entries:
                os.ftruncate(entry.fd, sizes[entry.name])
            self._journal.drop_intents(sizes)
        except (OSError, StorageUnavailable) as exc:
            log.warning("rollback deferred to the next writer batch=%s err=%s", batch_id, exc)

    def _write(self, entry: _OpenFile, data: bytes) -> None:
        view = memoryview(data)
        if self._enospc_after is not None:
            view = self._take_budget(view)
        if self._crash_at == "mid_append":
            half = len(view) // 2
            if half > 1 and view[half - 1] == 0x0A:  # make sure the cut tears a line
                half -= 1
            _write_all(entry.fd, view[:half])
            self._crash_point("mid_append")
        _write_all(entry.fd, view)
        if len(view) < len(data):
            raise OSError(errno.ENOSPC, "No space left on device (injected, test-only)")

    def _take_budget(self, view: memoryview) -> memoryview:
        assert self._enospc_after is not None
        with self._written_lock:
            allowed = max(0, min(len(view), self._enospc_after - self._written))
            self._written += allowed
        return view[:allowed]

    def _crash_point(self, point: str) -> None:
        if self._crash_at == point:
            log.warning("test-only crash switch: SIGKILL at %s", point)
            os.kill(os.getpid(), signal.SIGKILL)


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
