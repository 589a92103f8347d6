"""The data files' table: a bounded LRU of open append descriptors, each with a thread mutex and a
``flock`` (which holds across ``--processes`` and dies with its holder). A file moved or removed
while cached is noticed at lock time and reopened by its path. Imports ``receiver.errors`` only.
"""

from __future__ import annotations

import fcntl
import os
import threading
from collections import OrderedDict
from pathlib import Path

from receiver.errors import StorageUnavailable

RETRY_AFTER_S = 5
_MAX_REOPENS = 8


class OpenFile:
    """One cached descriptor; ``users`` counts checkouts, ``mutex`` excludes threads."""

    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        self.fd = fd
        self.users = 0
        self.stale = False
        self.mutex = threading.Lock()


class FileTable:
    """A bounded LRU of open append descriptors. Only unused entries are ever closed."""

    def __init__(self, data_dir: Path, max_open: int, fsync: bool) -> None:
        self._data_dir = data_dir
        self._max_open = max_open
        self._fsync = fsync
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, OpenFile] = OrderedDict()

    def lock(self, name: str) -> OpenFile:
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
        raise StorageUnavailable(f"{name} keeps being replaced", retry_after_s=RETRY_AFTER_S)

    def unlock(self, entry: OpenFile) -> None:
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

    def _checkout(self, name: str) -> OpenFile:
        path = self._data_dir / name
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.stale:
                created = not path.exists()
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
                if created and self._fsync:  # the new name must survive a power loss too
                    fsync_dir(path.parent)
                entry = self._entries[name] = OpenFile(name, fd)
            self._entries.move_to_end(name)
            entry.users += 1
            self._evict()
            return entry

    def _is_current(self, entry: OpenFile) -> bool:
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


def write_all(fd: int, view: memoryview) -> None:
    while view:
        n = os.write(fd, view)
        view = view[n:]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
