"""The tail collector's wake-ups: inotify events of the watched directories, or a signal.

Without inotify (or for what it cannot watch) the tailer polls instead; see ``tail.py``.
"""

from __future__ import annotations

import os
import select
from typing import Any

DIR_EVENTS = 0x100 | 0x80 | 0x40 | 0x200 | 0x4000 | 0x400 | 0x800  # create/moved/delete/ovfl/self
FILE_EVENTS = 0x2 | 0x4 | 0x8  # modify/attrib/close_write
IN_IGNORED = 0x8000  # the watch is gone (its directory was removed)


def wait(inotify: Any, watched: set[str], wake_r: int, timeout_s: float) -> bool:
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
        for event in inotify.read(timeout=0):
            if event.mask & DIR_EVENTS:
                rescan = True
            if event.mask & IN_IGNORED:
                watched.clear()
                rescan = True
    return rescan
