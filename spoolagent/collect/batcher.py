"""Batcher: one collector's lines and checkpoints -> batches handed to a ``put`` callable.

Owns the checkpoint rule of DESIGN.md. Lines of a collector that has printed ``!checkpoint`` are
*held* until the next checkpoint; a checkpoint makes the held lines *ready*, and ready lines are
put together with the newest token in one call (one spool transaction), so a committed token always
covers exactly the lines before it. Several checkpoints coalesce into one batch: the newest token
covers every line before it. Lines of a collector that never checkpoints are ready at once.
Ready lines are cut into batches by lines, bytes and age. Held lines are capped at
``max_held_bytes``: past the cap they are put without a token and counted (a restart may repeat them).

Also judges the collector's stdout lines (protocol or raw format; the rules are
``spoolcore.lines``) without a Python object per line: the reader hands over runs of whole lines,
a run whose lines share one valid ``PROD DATE`` is checked whole with a count, and lines travel on
as those runs in ``protocol.Records`` (lines per PROD counted per run), which the spool compresses
as they are. Only a run that fails the check is split and judged line by line. ``put`` is a plain
callable (agent.py wires it to the spool writer).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator

from spoolagent import protocol
from spoolagent.errors import InvalidLine
from spoolagent.protocol import Records
from spoolcore.lines import NUL_BYTE, find_line, line_end, over_limit, share_prefix

log = logging.getLogger(__name__)

PutFn = Callable[[str, Records, "str | None"], object]
InvalidFn = Callable[[str, bytes, str], None]


class Batcher:
    """Cuts one collector's stream into batches. Thread-safe: ``feed`` runs on the collector's
    reader thread, ``flush_due`` on a timer thread; ``put`` is called under a lock, so batches
    (and their tokens) reach the spool in the order they were printed. ``put`` may block
    (a full spool): the reader then stops reading and the collector feels it through its pipe.
    """

    def __init__(self, collector: str, *, put: PutFn, on_invalid: InvalidFn, max_lines: int,
                 max_bytes: int, max_wait_s: float, max_held_bytes: int,
                 max_line_bytes: int = protocol.DEFAULT_MAX_LINE_BYTES,
                 raw_prod: str | None = None, checkpointing: bool = False,
                 on_pending: Callable[[float], None] | None = None) -> None:
        """``checkpointing``: the collector has a committed token (it checkpointed in an earlier
        run), so its lines are held from the first one on: lines batched by time before its first
        checkpoint of this run would be read again from the older token after a crash."""
        self.collector = collector
        self._put = put
        self._on_invalid = on_invalid
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.max_wait_s = max_wait_s
        self.max_held_bytes = max_held_bytes
        self.max_line_bytes = max_line_bytes
        self._raw = raw_prod is not None
        self._raw_prod = raw_prod or ""
        self._raw_prefix = b""
        self._raw_date = b""
        self._lock = threading.Lock()
        self._ready = Records()
        self._ready_since = 0.0
        self._on_pending = on_pending        # told when a new batch is due (its clock started)
        self._token: str | None = None       # newest token covering every ready line
        self._held = Records()
        self._held_since = 0.0
        self._checkpointing = checkpointing
        self._seen_checkpoint = False  # a !checkpoint line in this run
        self._untokened = False  # lines were spooled without a token after the last committed one
        # no token of this collector is committed yet: its first one is committed at once, even
        # with no line before it (a start position such as "the end of the file" must survive a
        # crash before the first line, or a restart would start somewhere else)
        self._first_token = not checkpointing
        self._valid_prefixes: dict[bytes, str] = {}  # b"PROD DATE" judged valid -> PROD
        # counters, read without the lock by stats()
        self.lines_spooled = 0
        self.lines_invalid = 0
        self.lines_unprotected = 0   # held lines spooled without a token (cap reached)
        self.lines_discarded = 0     # held lines dropped at exit: the collector re-reads them
        self.batches_spooled = 0
        self.checkpoints = 0         # !checkpoint lines seen (not records)
        self.lines_read = 0          # records fed (valid or not), checkpoint lines not

    # -- input ---------------------------------------------------------------------------------

    def feed(self, run: bytes, lines: int) -> None:
        """Take ``lines`` complete stdout lines joined in ``run``, each ending in a newline, none
        over ``max_line_bytes`` (``pump_stdout`` hands longer ones to ``on_overlong``). Blocks while
        the spool is full."""
        with self._lock:
            self.lines_read += lines  # checkpoint lines are taken off in _take_checkpoint
            if not self._raw:
                self._feed_records(run, lines)
            else:
                self._feed_raw(run, lines)

    def _take_checkpoint(self, line: bytes) -> None:
        self.checkpoints += 1
        self.lines_read -= 1
        token = protocol.checkpoint_token(line)
        if token:
            self._checkpoint(token.decode("utf-8", "replace"))

    def _take_checkpoints(self, run: bytes, start: int, end: int) -> int:
        """The checkpoint lines in ``run[start:end]``, in order; returns how many."""
        lines = run[start:end - 1].split(b"\n")
        for line in lines:
            self._take_checkpoint(line)
        return len(lines)

    def _stretches(self, run: bytes, n: int) -> Iterator[tuple[int, int, int]]:
        """``(start, end, lines)`` of each stretch of record lines in ``run`` (``n`` lines), in
        order; the checkpoint lines between them are taken as the caller reaches them. They are
        found with memchr (``find_line``): a checkpoint is rare, a line is not."""
        start = 0
        while start < len(run):
            at = find_line(run, protocol.CHECKPOINT_PREFIX, start)
            end = len(run) if at < 0 else at
            if end > start:
                lines = n if at < 0 else _lines_before(run, start, at, n)
                yield start, end, lines
                n -= lines
            if at < 0:
                return
            # this checkpoint line and any that follow it at once
            start = run.index(b"\n", at) + 1
            while run.startswith(protocol.CHECKPOINT_PREFIX, start):
                start = run.index(b"\n", start) + 1
            n -= self._take_checkpoints(run, at, start)

    def _feed_records(self, run: bytes, n: int) -> None:
        """Protocol-format lines: each stretch between checkpoint lines is checked whole
        (``_take_run``); one that fails the check is judged line by line."""
        for start, end, lines in self._stretches(run, n):
            if not self._take_run(run, start, end, lines):
                self._take_lines(run[start:end - 1].split(b"\n"))

    def _take_run(self, run: bytes, start: int, end: int, n: int) -> bool:
        """Add the ``n`` record lines of ``run[start:end]`` if they pass the fast check, with no
        Python object per line: no NUL anywhere and every line begins with the first line's
        (valid, cached) ``PROD DATE `` -- counted as occurrences of newline + prefix in the run
        (``share_prefix``). False (nothing added) if they do not."""
        sep = run.find(b" ", start, start + 130)
        if sep < 0:
            return False
        prod = self._valid_prefixes.get(run[start:sep + 11])
        if (prod is None or run[sep + 11:sep + 12] != b" " or run.find(b"\x00", start, end) >= 0
                or not share_prefix(run, run[start:sep + 12], n, start, end)):
            return False
        self._add(run if start == 0 and end == len(run) else run[start:end], n, prod)
        return True

    def _take_lines(self, lines: list[bytes]) -> None:
        """Judge each line, add the valid ones (runs of one PROD), report the others."""
        good: list[bytes] = []
        good_prod = ""
        for line in lines:
            prod = self._valid(line)
            if prod is None:
                continue
            if good and prod != good_prod:
                self._add(b"\n".join([*good, b""]), len(good), good_prod)
                good = []
            good.append(line)
            good_prod = prod
        if good:
            self._add(b"\n".join([*good, b""]), len(good), good_prod)

    def _feed_raw(self, run: bytes, n: int) -> None:
        """Raw-format lines: each gets the collector's ``PROD`` and today's ``DATE`` in front, in
        one ``replace`` over the run unless it holds a NUL or may hold a line that the prefix
        pushes over the size cap (then line by line)."""
        today = protocol.today()
        if today != self._raw_date:
            self._raw_date = today
            self._raw_prefix = b"%s %s " % (self._raw_prod.encode("ascii"), today)
        prefix, prod = self._raw_prefix, self._raw_prod
        for start, end, lines in self._stretches(run, n):
            if end - start - 1 + len(prefix) <= self.max_line_bytes and run.find(b"\x00", start, end) < 0:
                self._add(prefix + run[start:end - 1].replace(b"\n", b"\n" + prefix) + b"\n", lines, prod)
            else:
                self._take_raw_lines(run[start:end - 1].split(b"\n"), prefix, prod)

    def _take_raw_lines(self, lines: list[bytes], prefix: bytes, prod: str) -> None:
        records = []
        for line in lines:
            if len(line) + len(prefix) > self.max_line_bytes or b"\x00" in line:
                self._invalid(line, NUL_BYTE if b"\x00" in line else over_limit(len(line), self.max_line_bytes))
                continue
            records.append(prefix + line)
        if records:
            self._add(b"\n".join([*records, b""]), len(records), prod)

    def _valid(self, line: bytes) -> str | None:
        """The PROD of a valid record line; None (reported) for an invalid one."""
        # fast path: a (prod, date) prefix seen before needs no regex or calendar check
        sep = line.find(b" ")
        prefix = line[: sep + 11] if sep > 0 else b""
        prod = self._valid_prefixes.get(prefix)
        if (prod is not None and (len(line) == len(prefix) or line[len(prefix)] == 0x20)
                and len(line) <= self.max_line_bytes and b"\x00" not in line):
            return prod
        try:
            protocol.validate_record(line, self.max_line_bytes)
        except InvalidLine as exc:
            self._invalid(line, str(exc))
            return None
        if len(self._valid_prefixes) > 10000:
            self._valid_prefixes.clear()
        prod = self._valid_prefixes[prefix] = line[:sep].decode("ascii")
        return prod

    def _invalid(self, line: bytes, reason: str) -> None:
        self.lines_invalid += 1
        self._on_invalid(self.collector, line, reason)

    def _add(self, run: bytes, n: int, prod: str) -> None:
        """Add ``n`` valid record lines of ``prod`` (``run``: joined, each ending in a newline)."""
        if self._checkpointing:
            if not self._held.lines:
                self._held_since = time.monotonic()
            self._held.add(run, n, prod)
            if self._held.size > self.max_held_bytes:
                # past the cap: spool what is ready (with its token), then the held lines without one
                held = self._held.lines
                self._flush()
                self._ready, self._held = self._held, Records()
                self._mark_pending()
                self.lines_unprotected += held
                log.warning("checkpoint cap reached collector=%s lines=%d cap_bytes=%d: spooled without a "
                            "checkpoint, a restart may repeat them", self.collector, held, self.max_held_bytes)
                self._flush()  # with a pending token that does not cover them, if one was waiting
                self._untokened = True  # no committed token covers them: commit the next at once
            return
        while self._ready.lines + n > self.max_lines:
            # one large read: cut at max_lines (no token to keep together here)
            room = self.max_lines - self._ready.lines
            if room > 0:
                cut = line_end(run, room, n)
                self._ready.add(run[:cut], room, prod)
                run, n = run[cut:], n - room
            self._flush()
        if not n:
            return
        starting = not self._ready.lines
        self._ready.add(run, n, prod)
        if self._ready.lines >= self.max_lines or self._ready.size >= self.max_bytes:
            self._flush()
        elif starting:
            self._mark_pending()

    def _checkpoint(self, token: str) -> None:
        self._checkpointing = self._seen_checkpoint = True
        if self._held:
            starting = not self._ready
            self._ready.extend(self._held)
            self._held = Records()
            if starting:
                # max_wait counts from when the first of these lines was read, not from the token
                self._mark_pending(self._held_since)
        self._token = token
        if self._first_token and not self._ready:
            self._untokened = True  # nothing committed covers "where to start": commit it now
        if self._ready.lines >= self.max_lines or self._ready.size >= self.max_bytes or self._untokened:
            # the last case: the lines this token covers were already spooled without a token
            # (batched by time before the collector's first checkpoint, or past the cap); commit
            # the token now, or a restart resumes from an older one and repeats them
            self._flush()

    # -- output --------------------------------------------------------------------------------

    def _flush(self, put: PutFn | None = None) -> None:
        if not self._ready and not (self._token is not None and self._untokened):
            # a token with no lines since the last committed one needs no row: that one resumes
            # at the same place
            return
        lines, token = self._ready, self._token
        (put or self._put)(self.collector, lines, token)
        if token is not None:
            self._first_token = False
        self._untokened = token is None and (self._untokened or bool(lines))
        self.lines_spooled += len(lines)
        self.batches_spooled += 1
        self._ready, self._token = Records(), None

    def _mark_pending(self, since: float | None = None) -> None:
        """A new batch's lines are ready (called after they are in ``_ready``: the flusher, told
        the batch's due time, may look at once)."""
        self._ready_since = time.monotonic() if since is None else since
        if self._on_pending is not None:
            self._on_pending(self._ready_since + self.max_wait_s)

    def due_at(self) -> float | None:
        """When the ready lines must be put (monotonic), or None if none wait. Lock-free read."""
        return self._ready_since + self.max_wait_s if self._ready else None

    def flush_due(self, now: float | None = None, put: PutFn | None = None) -> bool:
        """Put ready lines older than ``max_wait_s`` (at ``now``), through ``put`` when given
        (the flusher's own). Called by the agent's timer thread; True if it put a batch."""
        if not self._ready:
            return False
        with self._lock:
            if self._ready and (now or time.monotonic()) - self._ready_since >= self.max_wait_s:
                self._flush(put)
                return True
        return False

    def set_limits(self, *, max_lines: int, max_bytes: int, max_wait_s: float) -> None:
        """A reload changed [batch]: the next cut uses these. Thread-safe."""
        with self._lock:
            self.max_lines, self.max_bytes, self.max_wait_s = max_lines, max_bytes, max_wait_s
            self.max_held_bytes = 4 * max_bytes

    def close(self) -> None:
        """The collector exited (or the agent stops): put what is ready, drop held lines.

        Held lines follow the last checkpoint: the collector reads them again from that
        checkpoint when it restarts, so spooling them would store them twice.
        """
        with self._lock:
            if self._held and not self._seen_checkpoint:
                # held only because an earlier run checkpointed; this run printed no token, so it
                # may not resume from one: spool them (a restart may repeat them, never lose them)
                self._ready.extend(self._held)
                self.lines_unprotected += len(self._held)
                self._held = Records()
            self._flush()
            if self._held:
                self.lines_discarded += len(self._held)
                log.info("collector=%s exited with %d lines after its last checkpoint; they are read "
                         "again from the checkpoint", self.collector, len(self._held))
            self._held = Records()
            self._checkpointing = False
            self._token = None

    def stats(self) -> dict[str, int]:
        return {
            "lines_spooled": self.lines_spooled,
            "lines_invalid": self.lines_invalid,
            "lines_unprotected": self.lines_unprotected,
            "lines_discarded": self.lines_discarded,
            "batches_spooled": self.batches_spooled,
            "checkpoints": self.checkpoints,
            "lines_read": self.lines_read,
            "lines_pending": len(self._ready) + len(self._held),
        }


def _lines_before(run: bytes, start: int, at: int, n: int) -> int:
    """The lines of ``run[start:at]``, where ``run[start:]`` holds ``n``: whichever side of ``at``
    is shorter is counted (a checkpoint line usually ends a collector's write)."""
    if at - start <= len(run) - at:
        return run.count(b"\n", start, at)
    return n - run.count(b"\n", at)
