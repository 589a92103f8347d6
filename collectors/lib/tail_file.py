"""One file the tail collector follows: its descriptor and identity (device, inode, fingerprint,
path), how far it is read, whether it was truncated, and its row of the checkpoint token.

Reading and rotation are ``tail.py``'s; the bytes read but not sent yet are
:class:`~spoolagent_collectors.lib.tail_records.Pending`'s, which this extends.
"""

from __future__ import annotations

import os

from spoolagent_collectors.lib import tail_token
from spoolagent_collectors.lib.tail_records import Pending
from spoolagent_collectors.lib.tail_token import FP_MAX


class Tracked(Pending):
    """One open file: where it is read to (and, as Pending, the bytes read but not sent yet)."""

    __slots__ = ("fd", "dev", "ino", "path", "read_off", "fp_len", "fp", "fp_head", "idle_since",
                 "detached", "seen_size", "seen_mtime", "row_key", "row")

    def __init__(self, fd: int, st: os.stat_result, path: str, prod: bytes, limit: int,
                 offset: int, now: float) -> None:
        super().__init__(prod, limit)
        self.fd, self.dev, self.ino, self.path = fd, st.st_dev, st.st_ino, path
        self.read_off = offset
        self.fp_len = 0
        self.fp_head = b""  # the first fp_len bytes: a pass compares them, hashing only for tokens
        self.fp = ""
        self.set_fingerprint(min(offset, FP_MAX))
        self.idle_since = now
        self.detached = False  # no longer at a path the globs match (renamed away or deleted)
        self.seen_size, self.seen_mtime = st.st_size, st.st_mtime_ns
        self.row_key: tuple[int, str, str] = (-1, "", "")
        self.row = ("", "")  # its token row around the offset, for row_key's (fp_len, fp, path)

    def set_fingerprint(self, n: int) -> None:
        """Fingerprint the first ``n`` bytes. A file already shorter than that (truncated
        meanwhile) gets an empty one, which the next pass finds changed."""
        first = tail_token.head(self.fd, n)
        self.fp_len, self.fp_head = n, first or b""
        self.fp = "" if first is None else tail_token.digest(first)

    def size(self) -> tuple[int, bool]:
        """(The size now, whether the first bytes changed: truncated and written again, or
        rewritten in place, since the last call.) Raises OSError.

        While the file grows, its size alone (lseek: one int, not fstat's twenty fields); the
        mtime only when it did not grow, for a rewrite in place to the same size. The first
        bytes are compared as they are (a pread of <= 1 KiB), not hashed, on every change."""
        size = os.lseek(self.fd, 0, os.SEEK_END)
        if size != self.seen_size:
            changed, self.seen_size, self.seen_mtime = True, size, -1
        else:
            st = os.fstat(self.fd)
            size = st.st_size
            changed = (size, st.st_mtime_ns) != (self.seen_size, self.seen_mtime)
            self.seen_size, self.seen_mtime = size, st.st_mtime_ns
        return size, bool(changed and self.fp_len and tail_token.head(self.fd, self.fp_len) != self.fp_head)

    def sent_off(self) -> int:
        """Offset just past the last record boundary sent: where a restart resumes."""
        return self.read_off - len(self.partial) - self.ml_raw

    def token_row(self) -> str:
        """This file's row of the checkpoint token."""
        key = (self.fp_len, self.fp, self.path)
        if key != self.row_key:
            self.row_key, self.row = key, tail_token.row_parts(self.dev, self.ino, *key)
        return f"{self.row[0]}{self.sent_off()}{self.row[1]}"
