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
import time

DIR_EVENTS = 0x100 | 0x80 | 0x40 | 0x200 | 0x4000 | 0x400 | 0x800  # create/moved/delete/ovfl/self
FILE_EVENTS = 0x2 | 0x4 | 0x8  # modify/attrib/close_write
IN_IGNORED = 0x8000  # the watch is gone (its directory was removed)


class Waits:
    """The main loop's waits between passes. A pass starts no sooner than ``gap_s`` after the
    last one began (a busy directory or a writer writing line by line: not a pass per event),
    then on a file event, a signal (``wake_r`` readable) or the timeout, whichever comes first.

    Once events come faster than passes (one arrived before the gap ran out) and the passes find
    bytes, the next pass is due when the gap ends whatever happens: :meth:`busy` sleeps the gap
    out, with no select (which would return at once for the events queued during the last gap),
    and takes the queued events only every ``events_every``-th time (their read costs about as
    much as the rest of the wait; only a directory's events matter then, and a new file waits at
    most that many gaps, where a poll waits up to ``glob_interval_s``). A pass that finds nothing
    brings back :meth:`next_pass`. One wait per pass (issue 17); a quiet file still costs one
    wake-up per event."""

    def __init__(self, inotify: INotify | None, wake_r: int, gap_s: float,
                 events_every: int = 4) -> None:
        self.inotify, self.wake_r, self.gap_s = inotify, wake_r, gap_s
        self.events_every = events_every
        self.hot = False  # events come faster than passes: call busy() while passes find bytes
        self._busy_waits = 0

    def busy(self, started: float) -> int:
        """Sleep until the next pass is due (the last began at ``started``); the events' masks
        OR'd, or 0 when they were left queued this time."""
        time.sleep(max(0.0, started + self.gap_s - time.monotonic()))
        self._busy_waits += 1
        if self.inotify is None or self._busy_waits % self.events_every:
            return 0
        return self.inotify.read_mask()

    def next_pass(self, started: float, timeout_s: float) -> int:
        """Wait for the next pass (the last began at ``started``): the events that came as the
        OR of their masks (0: none; see :func:`rescan`)."""
        mask, signalled = self.select(max(0.0, timeout_s))
        gap = started + self.gap_s - time.monotonic()
        self.hot = gap > 0 and mask != 0 and not signalled
        if gap > 0 and not signalled:
            time.sleep(gap)
        return mask

    def select(self, timeout_s: float) -> tuple[int, bool]:
        """Sleep until a file event, a signal or the timeout: (the events' masks OR'd, whether a
        signal came)."""
        inotify, wake_r = self.inotify, self.wake_r
        fds = [wake_r] if inotify is None else [wake_r, inotify.fileno()]
        ready, _, _ = select.select(fds, [], [], timeout_s)
        signalled = wake_r in ready
        if signalled:
            try:
                os.read(wake_r, 4096)
            except BlockingIOError:
                pass
        if inotify is not None and inotify.fileno() in ready:
            return inotify.read_mask(), signalled
        return 0, signalled


def rescan(mask: int, watched: set[str]) -> bool:
    """True if events ``mask`` changed a directory (the globs must be matched again); a
    directory whose watch is gone empties ``watched`` (re-added, where they still exist, by the
    next scan)."""
    if mask & IN_IGNORED:
        watched.clear()
        return True
    return bool(mask & DIR_EVENTS)


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

    def read_mask(self) -> int:
        """The OR of the masks of every queued event (0: none). Never blocks. Only the masks
        matter to the tailer (a pass reads every file), so no tuple or name per event."""
        mask = 0
        unpack_from, size = _EVENT.unpack_from, _EVENT.size
        while True:
            try:
                data = os.read(self._fd, _READ_BYTES)
            except BlockingIOError:
                return mask
            off, end = 0, len(data)
            while off + size <= end:
                _wd, m, _cookie, n = unpack_from(data, off)
                mask |= m
                off += size + n
            if end <= _READ_BYTES - _EVENT_MAX:
                # room for another event was left: the queue was empty (a read that would fail
                # with EAGAIN costs a syscall and an exception per wake-up); later events wake
                # the next select
                return mask

    def close(self) -> None:
        os.close(self._fd)
