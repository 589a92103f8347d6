"""PartitionedStore: append-only ``DATA_DIR/{PROD}_{DATE}.dat`` files (and ``_rejected/`` files),
exactly once under crashes, with group commit.

The API is source-agnostic (HTTP, TCP, a queue consumer feed it alike) and thread-safe:

- ``Batch(batch_id, parts, stored, rejected)``: ``parts`` maps a file name (``{PROD}_{DATE}.dat``
  or ``_rejected/...``) to the bytes to append, whole lines; ``batch_id`` None means no dedup.
- ``submit(batch) -> concurrent.futures.Future[Stored]``: queue it, never blocks. The future is
  resolved only once the round that covers the batch is fsynced and recorded: ``Stored(stored,
  rejected, duplicate)``; or it fails with StorageUnavailable (nothing of the batch left behind) or
  BatchInProgress (the same id is being stored by another process for longer than the claim wait).
  From asyncio: ``await asyncio.wrap_future(store.submit(batch))``.
- ``commit(batch) -> Stored``: the blocking form; ``append(...)`` a shorthand of it.
- ``start()`` (after any fork) runs the committer thread; ``queued()`` says how much waits.

Group commit: one committer thread per store takes every batch queued while the previous round ran
(up to ``max_round_bytes`` and the open-file budget), and for the round, all-or-nothing:

1. claims each id (a byte-range lock, without waiting: a claim another process holds puts the
   batch off to the next round) and answers the ids already stored, or seen earlier in the round,
   as duplicates (stored once);
2. hands the round's parts, joined per file (one write each), and its ids to ``Appender``
   (``receiver/append.py``): files locked in name order, what a crashed holder left rolled back,
   intents recorded durably, appended, every file fsynced once, then every id recorded and the
   intents cleared in one SQLite transaction -- all or nothing, in groups within the open-file
   budget when a round touches more files (a file the next queued batch appends to keeps an
   intent from its new size, so a steady stream commits once per round);
3. answers every request of the round.

A failure (disk full, read-only, I/O error) leaves nothing of the round behind and fails every
batch in it with StorageUnavailable; a crash anywhere is rolled back by the next holder of each
file's lock, or at start-up by ``recover``. Names are checked against a strict pattern, so nothing
can be written outside the data dir. The test-only fault switches (``crash_at``,
``fault_enospc_after_bytes``) are passed on to the Appender. Imports append, dedup, files, errors.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from receiver.append import Appender
from receiver.dedup import Claims, DedupIndex, StoredBatch
from receiver.errors import BatchInProgress, StorageUnavailable
from receiver.files import RETRY_AFTER_S, fsync_dir

log = logging.getLogger(__name__)

REJECTED_DIR = "_rejected"
_NAME_RE = re.compile(r"(?:_rejected/)?[A-Za-z0-9][A-Za-z0-9._-]{0,200}\Z")
_DEFAULT_ROUND_BYTES = 32 * 1024 * 1024
_FSYNC_THREADS = 8
_PUT_OFF_PAUSE_S = 0.005  # a round made only of put-off batches waits this long before the next
# a file's standing intent is cleared once no round appended to it for this long (append.py)
SETTLE_AFTER_S = 10.0


@dataclass(frozen=True)
class Batch:
    """What to store: the bytes per file, the line counts to record, the id (None: no dedup)."""

    batch_id: str | None
    parts: Mapping[str, bytes]
    stored: int
    rejected: int

    @property
    def size(self) -> int:
        return sum(len(d) for d in self.parts.values())


@dataclass(frozen=True)
class Stored:
    """The answer for a batch: its counts (the first copy's, for a duplicate)."""

    stored: int
    rejected: int
    duplicate: bool


@dataclass(frozen=True)
class RoundStats:
    """One finished (or failed) round, for metrics."""

    batches: int
    files: int
    fsyncs: int
    seconds: float
    failed: bool


@dataclass
class _Request:
    batch: Batch
    future: Future[Stored]
    deadline: float
    size: int = field(default=0)


class PartitionedStore:
    """Appends batches to the data dir, exactly once under crashes, in group-committed rounds.
    ``submit`` and ``queued`` never block; ``commit``, ``recover`` and ``close`` do."""

    def __init__(self, data_dir: Path, journal: DedupIndex, *, fsync: bool = True,
                 max_open_files: int = 128, claim_wait_s: float = 30.0,
                 max_round_bytes: int = _DEFAULT_ROUND_BYTES,
                 settle_after_s: float = SETTLE_AFTER_S,
                 on_round: Callable[[RoundStats], None] | None = None,
                 crash_at: str | None = None,
                 fault_enospc_after_bytes: int | None = None) -> None:
        self.data_dir = data_dir
        self._journal = journal
        self._fsync = fsync
        self._max_open = max_open_files
        self._appender = Appender(data_dir, journal, fsync=fsync, max_open_files=max_open_files,
                                  crash_at=crash_at, fault_enospc_after_bytes=fault_enospc_after_bytes)
        self._claim_wait_s = claim_wait_s
        self._max_round_bytes = max_round_bytes
        self._settle_after_s = settle_after_s
        self._on_round = on_round
        self._cond = threading.Condition()
        self._queue: deque[_Request] = deque()
        self._queued_bytes = 0
        self._thread: threading.Thread | None = None
        self._closing = False

    def create(self) -> None:
        """Create the data dir and ``_rejected/``. Raises StorageUnavailable."""
        try:
            (self.data_dir / REJECTED_DIR).mkdir(parents=True, exist_ok=True)
            if self._fsync:  # the directory entries must survive a power loss like the files
                fsync_dir(self.data_dir)
        except OSError as exc:
            raise StorageUnavailable(f"cannot create {self.data_dir}: {exc}",
                                     retry_after_s=RETRY_AFTER_S) from exc

    def recover(self) -> int:
        """Roll back every append left unrecorded by a crash (start-up). Returns how many."""
        rolled = 0
        for intent in self._journal.intents():
            if _NAME_RE.match(intent.file) is None or not (self.data_dir / intent.file).exists():
                self._journal.drop_intents([intent.file])
                continue
            rolled += self._appender.recover([intent.file])
        return rolled

    def start(self) -> None:
        """Start the committer thread (idempotent). Call it after any fork."""
        with self._cond:
            if self._thread is None and not self._closing:
                self._appender.start()
                self._thread = threading.Thread(target=self._run, name="store-commit", daemon=True)
                self._thread.start()

    def submit(self, batch: Batch) -> Future[Stored]:
        """Queue ``batch`` for the next round; the future resolves once it is durably stored.
        Raises ValueError for a file name outside the data dir."""
        for name in batch.parts:
            if _NAME_RE.match(name) is None:
                raise ValueError(f"refusing to write outside the data dir: {name!r}")
        request = _Request(batch, Future(), time.monotonic() + self._claim_wait_s, batch.size)
        request.future.set_running_or_notify_cancel()  # a waiter gone away cannot cancel it
        with self._cond:
            if self._closing:
                raise StorageUnavailable("the store is closing", retry_after_s=RETRY_AFTER_S)
            self._queue.append(request)
            self._queued_bytes += request.size
            self._cond.notify()
        return request.future

    def commit(self, batch: Batch) -> Stored:
        """Store ``batch`` and wait for its round. Raises as the future of ``submit`` does."""
        self.start()
        return self.submit(batch).result()

    def append(self, batch_id: str | None, parts: Mapping[str, bytes], stored: int,
               rejected: int) -> Stored:
        """``commit(Batch(batch_id, parts, stored, rejected))``."""
        return self.commit(Batch(batch_id, parts, stored, rejected))

    def lookup(self, batch_id: str) -> StoredBatch | None:
        """The counts of ``batch_id`` if it is stored (the common resend, answered early)."""
        return self._journal.lookup(batch_id)

    def queued(self) -> tuple[int, int]:
        """(batches, bytes) waiting for a round, the running round not included."""
        with self._cond:
            return len(self._queue), self._queued_bytes

    def close(self) -> None:
        """Fail what is still queued, stop the committer after its round, close the files."""
        with self._cond:
            self._closing = True
            left = list(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
            self._cond.notify_all()
            thread = self._thread
        for request in left:
            _fail(request, StorageUnavailable("the receiver is stopping",
                                              retry_after_s=RETRY_AFTER_S))
        if thread is not None:
            thread.join()
        self._appender.close()

    # -- the committer ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    due = self._appender.settle_due(self._settle_after_s)
                    if due is not None and due <= 0:
                        break
                    self._cond.wait(due)
                closing = self._closing
                taken = [] if closing else self._take_round()
            if closing:
                self._appender.settle(0)  # a clean stop leaves no intent behind
                return
            due = self._appender.settle_due(self._settle_after_s)
            if due is not None and due <= 0:  # between rounds: the files idle that long
                self._appender.settle(self._settle_after_s)
            if not taken:
                continue
            try:
                put_off = self._round(taken)
            except Exception as exc:  # a bug must fail its round, never stop the committer
                log.exception("commit round failed batches=%d", len(taken))
                error = StorageUnavailable(f"commit round failed: {type(exc).__name__}",
                                           retry_after_s=RETRY_AFTER_S)
                for request in taken:
                    _fail(request, error)
                continue
            if put_off:
                with self._cond:
                    self._queue.extendleft(reversed(put_off))
                    self._queued_bytes += sum(r.size for r in put_off)
                if len(put_off) == len(taken):  # another process holds them: let it finish
                    time.sleep(_PUT_OFF_PAUSE_S)

    def _take_round(self) -> list[_Request]:
        """Pop the queued requests of the next round (called with the condition held): at least
        one, then as many as fit in the byte and open-file budgets."""
        taken: list[_Request] = []
        names: set[str] = set()
        size = 0
        while self._queue:
            request = self._queue[0]
            new = names.union(request.batch.parts)
            if taken and (size + request.size > self._max_round_bytes or len(new) > self._max_open):
                break
            self._queue.popleft()
            self._queued_bytes -= request.size
            taken.append(request)
            names, size = new, size + request.size
        return taken

    def _round(self, taken: list[_Request]) -> list[_Request]:
        """Store one round; answer its requests; return those put off to the next round."""
        started = time.monotonic()
        claims = self._journal.claims()
        try:
            todo, followers, put_off = self._claim(taken, claims)
            if not todo:
                for request, first in followers:
                    _copy(request, first)
                return put_off
            names = sorted({n for r in todo for n, d in r.batch.parts.items() if d})
            try:
                fsyncs = self._store_round(todo, names)
            except BaseException as exc:
                stats = RoundStats(len(todo), len(names), 0, time.monotonic() - started, True)
                self._report(stats)
                error = exc if isinstance(exc, StorageUnavailable) else StorageUnavailable(
                    f"commit round failed: {type(exc).__name__}: {exc}", retry_after_s=RETRY_AFTER_S)
                for request in todo:
                    _fail(request, error)
                for request, _ in followers:
                    _fail(request, error)
                if not isinstance(exc, Exception):
                    raise
                return put_off
            self._report(RoundStats(len(todo), len(names), fsyncs,
                                    time.monotonic() - started, False))
            for request in todo:
                b = request.batch
                request.future.set_result(Stored(b.stored, b.rejected, duplicate=False))
            for request, first in followers:
                _copy(request, first)
            return put_off
        finally:
            claims.release()

    def _claim(self, taken: list[_Request], claims: Claims
               ) -> tuple[list[_Request], list[tuple[_Request, _Request]], list[_Request]]:
        """Split a round: (to store, (duplicate in the round, its first copy), put off). Ids
        already stored are answered here. Raises StorageUnavailable (the whole round fails)."""
        todo: list[_Request] = []
        followers: list[tuple[_Request, _Request]] = []
        put_off: list[_Request] = []
        first_of: dict[str, _Request] = {}
        now = time.monotonic()
        try:
            for request in taken:
                batch_id = request.batch.batch_id
                if batch_id is None:
                    todo.append(request)
                elif batch_id in first_of:
                    followers.append((request, first_of[batch_id]))
                elif claims.try_claim(batch_id):
                    first_of[batch_id] = request
                    todo.append(request)
                elif now > request.deadline:
                    _fail(request, BatchInProgress(
                        f"batch {batch_id} is being stored by another process", retry_after_s=1))
                else:
                    put_off.append(request)
            stored = self._journal.lookup_many(first_of)
        except StorageUnavailable as exc:
            for request in taken:
                _fail(request, exc)
            return [], [], []
        for batch_id, counts in stored.items():
            request = first_of[batch_id]
            todo.remove(request)
            request.future.set_result(Stored(counts.stored, counts.rejected, duplicate=True))
        return todo, followers, put_off

    def _store_round(self, todo: list[_Request], names: list[str]) -> int:
        """Append the round's batches (steps 2-6); returns the fsyncs done. Raises
        StorageUnavailable with nothing left behind."""
        joined = {name: b"".join(r.batch.parts.get(name, b"") for r in todo) for name in names}
        ids: list[tuple[str, int, int]] = []
        for request in todo:
            b = request.batch
            if b.batch_id is not None:
                ids.append((b.batch_id, b.stored, b.rejected))
        # every file of the round keeps a standing intent (``append.py``), settled once idle
        return self._appender.append(ids, joined, joined.keys)

    def _report(self, stats: RoundStats) -> None:
        if self._on_round is not None:
            try:
                self._on_round(stats)
            except Exception:  # metrics must never fail a round
                log.exception("round callback failed")


def _fail(request: _Request, error: BaseException) -> None:
    if not request.future.done():
        request.future.set_exception(error)


def _copy(request: _Request, first: _Request) -> None:
    """Answer a second copy of an id in one round as the first copy was answered."""
    try:
        result = first.future.result(timeout=0)
    except BaseException as exc:  # the first copy failed: so does this one
        _fail(request, exc)
        return
    request.future.set_result(Stored(result.stored, result.rejected, duplicate=True))
