"""Appender: the crash-safe append of one commit round to a set of data files, all or nothing.

``append(ids, parts)`` appends ``parts`` (file name -> bytes) and records ``ids`` as stored:

1. lock the files in name order (a thread mutex per open file, then ``flock`` on the file, which
   holds across ``--processes`` and dies with its holder);
2. roll back whatever a crashed holder left: an intent still recorded for a file means its append
   was never recorded as done, so the file is truncated to the size the intent recorded;
3. record the intents (file, size before) durably, *before* appending -- unless the file's intent
   is there already with its size now (recorded by the previous round's commit, step 5): then this
   step costs no SQLite transaction;
4. append, then fsync every file (at once: the filesystem joins concurrent fsyncs);
5. commit: the ids recorded as stored and the intents cleared in one SQLite transaction; a file
   named by ``next_files`` keeps an intent, recorded anew from its new size, so that the next
   round appending to it skips step 3: the store keeps one on every file of its rounds and clears
   it only once the file has been idle for a while (``settle``), since a round often finds the
   next batch not queued yet at its commit (issue 17: 198 of 437 rounds of an e2e run paid an
   intent transaction, a third fsync). Such a *standing* intent is harmless: it names the file's
   size now, so rolling back to it truncates nothing, and it is replaced by the next commit.

A failure in 4 or 5 truncates the files back (and removes those it created) and raises
StorageUnavailable; a crash is rolled back by the next holder of each file's lock or by
``recover`` at start-up. A round touching more files than the open-file budget is done in groups
of files within the budget (steps 1-4 per group, 5 once at the end) while this process holds
``wide.lock`` exclusively: every ordinary round holds it shared, so no other writer touches a file
between two groups, and the intents of every group stay until the one commit.

Test-only fault switches (set through the environment by ``config.py``; never in production):
``crash_at`` = ``after_intent`` | ``mid_append`` | ``before_mark`` makes the process SIGKILL itself
at that point; ``fault_enospc_after_bytes`` fails writes with ENOSPC once this process has appended
that many bytes (the write that crosses the limit is left torn, as a real full disk may leave it).
Not thread-safe beyond ``recover`` before use: one committer thread appends. Imports dedup, files
and errors.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from receiver.dedup import DedupIndex
from receiver.errors import StorageUnavailable
from receiver.files import RETRY_AFTER_S, FileTable, OpenFile, write_all

log = logging.getLogger(__name__)

_FSYNC_THREADS = 8


class Appender:
    """Appends rounds to the files of ``data_dir``; see the module docstring."""

    def __init__(self, data_dir: Path, journal: DedupIndex, *, fsync: bool, max_open_files: int,
                 crash_at: str | None = None,
                 fault_enospc_after_bytes: int | None = None) -> None:
        self.data_dir = data_dir
        self._journal = journal
        self._fsync = fsync
        self._max_open = max_open_files
        self._files = FileTable(data_dir, max_open_files, fsync)
        self._crash_at = crash_at
        self._enospc_after = fault_enospc_after_bytes
        self._written = 0
        self._fsync_pool: ThreadPoolExecutor | None = None
        self._wide_fd = -1
        # files this process left a standing intent on -> when (monotonic) the last round did
        self._standing: dict[str, float] = {}

    def start(self) -> None:
        """Before the first append, after any fork: the fsync threads."""
        if self._fsync and self._fsync_pool is None:
            self._fsync_pool = ThreadPoolExecutor(_FSYNC_THREADS, thread_name_prefix="fsync")

    def close(self) -> None:
        if self._fsync_pool is not None:
            self._fsync_pool.shutdown()
            self._fsync_pool = None
        if self._wide_fd >= 0:
            os.close(self._wide_fd)
            self._wide_fd = -1
        self._files.close()

    def recover(self, names: list[str]) -> int:
        """Roll back the unrecorded appends left on ``names`` and drop their intents."""
        rolled = 0
        for name in names:
            entries = self._lock([name])
            try:
                rolled += self._roll_back_left_intents(entries)
                self._journal.drop_intents([name])
            finally:
                self._unlock(entries)
        return rolled

    def append(self, ids: list[tuple[str, int, int]], parts: Mapping[str, bytes],
               next_files: Callable[[], Collection[str]] | None = None) -> int:
        """Append ``parts`` and record ``ids`` (id, stored, rejected), all or nothing. Returns the
        fsyncs done. Raises StorageUnavailable with nothing left behind. ``next_files``: the files
        the next round is known to append to, asked just before the commit (step 5)."""
        names = sorted(parts)
        label = ids[0][0] if ids else None
        groups = [names[i:i + self._max_open] for i in range(0, len(names), self._max_open)]
        wide = len(groups) > 1
        with self._wide(exclusive=wide):
            sizes: dict[str, int] = {}
            held: list[OpenFile] = []
            try:
                for group in groups:
                    held = self._lock(group)
                    self._append_group(label, held, parts, sizes)
                    if wide:  # no other writer runs while this holds wide.lock exclusively
                        self._unlock(held)
                        held = []
                # mark stored only after fsync: a crash in between is rolled back, never kept;
                # the files stay locked until here, or their intents would look abandoned
                self._crash_point("before_mark")
                # the next round's intents, while this one holds the locks: a wide round holds
                # none any more, and leaves them to the next round
                later = set(next_files()) if next_files is not None and not wide else set()
                self._journal.commit(ids, names, {n: sizes[n] + len(parts[n])
                                                  for n in names if n in later})
            except StorageUnavailable:
                for name in sizes:  # dropped by the undo, or left to the next holder to roll back
                    self._standing.pop(name, None)
                self._undo(label, held, sizes)
                raise
            finally:
                self._unlock(held)
        now = time.monotonic()
        for name in names:
            if name in later:
                self._standing[name] = now
            else:
                self._standing.pop(name, None)
        return len(names) if self._fsync else 0

    def settle_due(self, idle_s: float) -> float | None:
        """Seconds until the oldest standing intent has been idle for ``idle_s`` (0 if one has),
        None if this process left none."""
        if not self._standing:
            return None
        return max(0.0, min(self._standing.values()) + idle_s - time.monotonic())

    def settle(self, idle_s: float) -> int:
        """Clear the standing intents of the files no round appended to for ``idle_s`` seconds
        (all of them with 0), under the files' locks: a file idle that long has nothing in
        progress, and an intent left for it would keep the lifecycle from sealing it and the
        start-up scan busy. What a crashed holder appended after the intent is rolled back first,
        as the next round would. Returns how many were cleared; on a failure (logged) they stay,
        to be tried again."""
        cutoff = time.monotonic() - idle_s
        names = sorted(n for n, at in self._standing.items() if at <= cutoff)
        done = 0
        try:
            with self._wide(exclusive=False):  # a wide round's intents stay until its one commit
                for i in range(0, len(names), self._max_open):
                    group = [n for n in names[i:i + self._max_open] if (self.data_dir / n).exists()]
                    entries = self._lock(group)
                    try:
                        self._roll_back_left_intents(entries)
                        self._journal.drop_intents(names[i:i + self._max_open])
                    finally:
                        self._unlock(entries)
                    for name in names[i:i + self._max_open]:
                        del self._standing[name]
                        done += 1
        except (OSError, StorageUnavailable) as exc:
            log.warning("standing intents left for later files=%d err=%s", len(names) - done, exc)
            now = time.monotonic()
            for name in names:  # tried again once idle as long again, not in a busy loop
                if name in self._standing:
                    self._standing[name] = now
        return done

    # -- internals ----------------------------------------------------------------------------

    def _append_group(self, label: str | None, entries: list[OpenFile],
                      parts: Mapping[str, bytes], sizes: dict[str, int]) -> None:
        """Steps 2-4 for the locked files of one group; their sizes before go into ``sizes``
        once their intents are durable."""
        standing: dict[str, int] = {}
        try:
            self._roll_back_left_intents(entries, standing)
            before = {e.name: os.fstat(e.fd).st_size for e in entries}
        except OSError as exc:
            raise StorageUnavailable(f"cannot roll back: {exc}",
                                     retry_after_s=RETRY_AFTER_S) from exc
        if not entries:
            return
        # the intent is durable before the first byte is appended: a crash from here on is
        # rolled back by the next holder of each file's lock. One left at the size the file has
        # now (the previous round's commit recorded it, or a crashed append was just rolled back
        # to it) says the same thing already.
        fresh = {name: size for name, size in before.items() if standing.get(name) != size}
        if fresh:
            self._journal.record_intents(label, fresh)
        sizes.update(before)
        self._crash_point("after_intent")
        try:
            for entry in entries:
                self._write(entry, parts[entry.name])
            if self._fsync:
                self._fsync_all(entries)
        except OSError as exc:
            raise StorageUnavailable(f"cannot append: {exc}",
                                     retry_after_s=RETRY_AFTER_S) from exc

    @contextlib.contextmanager
    def _wide(self, exclusive: bool) -> Iterator[None]:
        if self._wide_fd < 0:
            path = self._journal.state_dir / "wide.lock"
            try:
                self._wide_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise StorageUnavailable(f"cannot open {path}: {exc}",
                                         retry_after_s=RETRY_AFTER_S) from exc
        fcntl.flock(self._wide_fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(self._wide_fd, fcntl.LOCK_UN)

    def _lock(self, names: list[str]) -> list[OpenFile]:
        entries: list[OpenFile] = []
        try:
            for name in names:  # sorted: every holder locks in the same order, so no deadlock
                entries.append(self._files.lock(name))
        except OSError as exc:
            self._unlock(entries)
            raise StorageUnavailable(f"cannot open {name}: {exc}",
                                     retry_after_s=RETRY_AFTER_S) from exc
        except BaseException:
            self._unlock(entries)
            raise
        return entries

    def _unlock(self, entries: list[OpenFile]) -> None:
        for entry in reversed(entries):
            self._files.unlock(entry)

    def _fsync_all(self, entries: list[OpenFile]) -> None:
        """fsync every file, concurrently: the filesystem joins concurrent fsyncs into one journal
        commit (8 files of a round: 9-11 ms one after the other, 0.7-1.1 ms at once, ext4)."""
        if len(entries) == 1 or self._fsync_pool is None:
            for entry in entries:
                os.fsync(entry.fd)
            return
        for _ in self._fsync_pool.map(os.fsync, [e.fd for e in entries]):
            pass  # map re-raises the first OSError here

    def _roll_back_left_intents(self, entries: list[OpenFile],
                                standing: dict[str, int] | None = None) -> int:
        """Truncate files whose intent is still recorded (the caller holds their locks); the size
        each intent names goes into ``standing``. The intents stay until replaced or dropped: a
        truncation lost to a power cut is redone."""
        if not entries:
            return 0
        by_name = {e.name: e for e in entries}
        rolled = 0
        for intent in self._journal.intents(by_name):
            entry = by_name[intent.file]
            size = os.fstat(entry.fd).st_size
            if standing is not None:
                standing[intent.file] = intent.size_before
            if size > intent.size_before:
                os.ftruncate(entry.fd, intent.size_before)
                if self._fsync:
                    os.fsync(entry.fd)
                rolled += 1
                log.warning("rolled back unrecorded append file=%s batch=%s bytes=%d",
                            intent.file, intent.batch_id, size - intent.size_before)
        return rolled

    def _undo(self, label: str | None, held: list[OpenFile], sizes: Mapping[str, int]) -> None:
        """Truncate this round's appends away (the files in ``held`` are locked by the caller, the
        others are locked here, a budget at a time) and remove the files it created; whatever
        cannot be undone now is undone by the next holder of the lock, since the intents stay
        recorded until they are dropped here."""
        try:
            self._truncate([e for e in held if e.name in sizes], sizes)
            rest = sorted(set(sizes) - {e.name for e in held})
            for i in range(0, len(rest), self._max_open):
                entries = self._lock(rest[i:i + self._max_open])
                try:
                    self._truncate(entries, sizes)
                finally:
                    self._unlock(entries)
            self._journal.drop_intents(sizes)
        except (OSError, StorageUnavailable) as exc:
            log.warning("rollback deferred to the next writer batch=%s err=%s", label, exc)

    def _truncate(self, entries: list[OpenFile], sizes: Mapping[str, int]) -> None:
        for entry in entries:
            os.ftruncate(entry.fd, sizes[entry.name])
            if sizes[entry.name] == 0:  # no empty file left by a refused round
                os.unlink(self.data_dir / entry.name)
                entry.stale = True

    def _write(self, entry: OpenFile, data: bytes) -> None:
        view = memoryview(data)
        if self._enospc_after is not None:
            allowed = max(0, min(len(view), self._enospc_after - self._written))
            self._written += allowed  # only the committer thread writes
            view = view[:allowed]
        if self._crash_at == "mid_append":
            half = len(view) // 2
            if half > 1 and view[half - 1] == 0x0A:  # make sure the cut tears a line
                half -= 1
            write_all(entry.fd, view[:half])
            self._crash_point("mid_append")
        write_all(entry.fd, view)
        if len(view) < len(data):
            raise OSError(errno.ENOSPC, "No space left on device (injected, test-only)")

    def _crash_point(self, point: str) -> None:
        if self._crash_at == point:
            log.warning("test-only crash switch: SIGKILL at %s", point)
            os.kill(os.getpid(), signal.SIGKILL)
