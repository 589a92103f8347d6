"""The tail collector's wake-ups: inotify events of the watched directories, or a signal.

Without inotify (or for what it cannot watch) the tailer polls instead; see ``tail.py``.

The inotify calls are bound with ctypes to the libc already loaded, not through ``inotify_simple``:
importing it loads ``ctypes.util`` and with it subprocess, shutil, tempfile, bz2 and lzma, about
2.5 MiB of a collector's resident memory, to find a libc that ``CDLL(None)`` already names.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct

DIR_EVENTS = 0x100 | 0x80 | 0x40 | 0x200 | 0x4000 | 0x400 | 0x800  # create/moved/delete/ovfl/self
FILE_EVENTS = 0x2 | 0x4 | 0x8  # modify/attrib/close_write
IN_IGNORED = 0x8000  # the watch is gone (its directory was removed)


def wait(inotify: INotify | None, watched: set[str], wake_r: int, timeout_s: float) -> bool:
    """Sleep until a file event, a signal (``wake_r`` readable) or the timeout. True if a
    directory changed (the globs must be matched again); a directory whose watch is gone empties
    ``watched`` (re-added, where they still exist, by the next scan)."""
    fds = [wake_r] + ([inotify.fileno()] if inotify is not None else [])
    ready, _, _ = select.select(fds, [], [], timeout_s)
    rescan = False
    if wake_r in ready:
        try:
            os.read(wake_r, 4096)
        except BlockingIOError:
            pass
    if inotify is not None and inotify.fileno() in ready:
        for _wd, mask, _cookie, _name in inotify.read():
            if mask & DIR_EVENTS:
                rescan = True
            if mask & IN_IGNORED:
                watched.clear()
                rescan = True
    return rescan


_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)
_EVENT_MAX = _EVENT.size + 255 + 1  # the largest event: NAME_MAX and a NUL
_READ_BYTES = 65536


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.inotify_init1  # noqa: B018 (AttributeError where the platform has no inotify)
        return libc
    except (OSError, AttributeError):
        return None


def available() -> bool:
    return _libc() is not None


def _raise() -> None:
    e = ctypes.get_errno()
    raise OSError(e, os.strerror(e))


class INotify:
    """An inotify instance (non-blocking, close-on-exec). Raises OSError if the kernel refuses
    one (out of instances) or the platform has none."""

    def __init__(self) -> None:
        libc = _libc()
        if libc is None:
            raise OSError("inotify is not available on this platform")
        self._add = libc.inotify_add_watch
        self._add.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        fd = int(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
        if fd < 0:
            _raise()
        self._fd = fd

    def fileno(self) -> int:
        return self._fd

    def add_watch(self, path: str, mask: int) -> int:
        """Watch ``path``; returns the watch descriptor. Raises OSError (missing, out of watches)."""
        wd = int(self._add(self._fd, os.fsencode(path), mask))
        if wd < 0:
            _raise()
        return wd

    def read(self) -> list[tuple[int, int, int, bytes]]:
        """Every queued event as (wd, mask, cookie, name); [] when none. Never blocks."""
        events: list[tuple[int, int, int, bytes]] = []
        while True:
            try:
                data = os.read(self._fd, _READ_BYTES)
            except BlockingIOError:
                return events
            off = 0
            while off + _EVENT.size <= len(data):
                wd, mask, cookie, n = _EVENT.unpack_from(data, off)
                start = off + _EVENT.size
                events.append((wd, mask, cookie, data[start:start + n].rstrip(b"\0")))
                off = start + n
            if len(data) <= _READ_BYTES - _EVENT_MAX:
                # room for another event was left: the queue was empty (a read that would fail
                # with EAGAIN costs a syscall and an exception per wake-up); later events wake
                # the next select
                return events

    def close(self) -> None:
        os.close(self._fd)
