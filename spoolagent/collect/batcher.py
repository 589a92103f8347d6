"""Batcher: one collector's lines and checkpoints -> batches handed to a ``put`` callable.

Owns the checkpoint rule of DESIGN.md. Lines of a collector that has printed ``!checkpoint`` are
*held* until the next checkpoint; a checkpoint makes the held lines *ready*, and ready lines are
put together with the newest token in one call (one spool transaction), so a committed token always
covers exactly the lines before it. Several checkpoints coalesce into one batch: the newest token
covers every line before it. Lines of a collector that never checkpoints are ready at once.
Ready lines are cut into batches by lines, bytes and age. Held lines are capped at
``max_held_bytes``: past the cap they are put without a token and counted (a restart may repeat them).

Also parses the collector's stdout lines (protocol or raw format) with spoolagent.protocol.
``put`` is a plain callable (agent.py wires it to the spool writer).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from spoolagent import protocol
from spoolagent.errors import InvalidLine
from spoolcore.lines import share_prefix

log = logging.getLogger(__name__)

PutFn = Callable[[str, Sequence[bytes], "str | None"], object]
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
        self._raw_prefix_prod = raw_prod.encode("ascii") if raw_prod is not None else None
        self._raw_prefix = b""
        self._raw_date = b""
        self._lock = threading.Lock()
        self._ready: list[bytes] = []
        self._ready_bytes = 0
        self._ready_since = 0.0
        self._on_pending = on_pending        # told when a new batch is due (its clock started)
        self._token: str | None = None       # newest token covering every ready line
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._held_since = 0.0
        self._checkpointing = checkpointing
        self._seen_checkpoint = False  # a !checkpoint line in this run
        self._untokened = False  # lines were spooled without a token after the last committed one
        # no token of this collector is committed yet: its first one is committed at once, even
        # with no line before it (a start position such as "the end of the file" must survive a
        # crash before the first line, or a restart would start somewhere else)
        self._first_token = not checkpointing
        self._valid_prefixes: set[bytes] = set()
        # counters, read without the lock by stats()
        self.lines_spooled = 0
        self.lines_invalid = 0
        self.lines_unprotected = 0   # held lines spooled without a token (cap reached)
        self.lines_discarded = 0     # held lines dropped at exit: the collector re-reads them
        self.batches_spooled = 0
        self.checkpoints = 0         # !checkpoint lines seen (not records)
        self.lines_read = 0          # records fed (valid or not), checkpoint lines not

    # -- input ---------------------------------------------------------------------------------

    def feed(self, lines: Sequence[bytes]) -> None:
        """Take complete stdout lines (without newline). Blocks while the spool is full."""
        with self._lock:
            self.lines_read += len(lines)  # checkpoint lines are taken off in _take_checkpoint
            if self._raw_prefix_prod is None:
                self._feed_records(lines)
                return
            today = protocol.today()
            if today != self._raw_date:
                self._raw_date = today
                self._raw_prefix = self._raw_prefix_prod + b" " + today + b" "
            records: list[bytes] = []
            for line in lines:
                if line[:12] == protocol.CHECKPOINT_PREFIX:
                    if records:
                        self._add(records)
                        records = []
                    self._take_checkpoint(line)
                    continue
                if len(line) + len(self._raw_prefix) > self.max_line_bytes or b"\x00" in line:
                    self._invalid(line, "NUL byte in line" if b"\x00" in line else
                                  f"line of {len(line)} bytes is over the limit of {self.max_line_bytes}")
                    continue
                records.append(self._raw_prefix + line)
            if records:
                self._add(records)

    def _take_checkpoint(self, line: bytes) -> None:
        self.checkpoints += 1
        self.lines_read -= 1
        token = protocol.checkpoint_token(line)
        if token:
            self._checkpoint(token.decode("utf-8", "replace"))

    def _feed_records(self, lines: Sequence[bytes]) -> None:
        """Protocol-format lines: the checkpoint lines are found with a few searches of the joined
        chunk (a checkpoint is rare, a line is not), and the records between them are checked a
        whole run at a time (see ``_check_run``)."""
        joined = b"\n".join(lines)
        at = joined.find(protocol.CHECKPOINT_PREFIX)
        if at < 0:
            self._check_run(lines, joined)
            return
        start = 0
        while at >= 0:
            if at == 0 or joined[at - 1] == 0x0A:  # only at the start of a line
                i = joined.count(b"\n", 0, at)
                if i > start:
                    self._check_run(lines[start:i], None)
                self._take_checkpoint(lines[i])
                start = i + 1
            at = joined.find(protocol.CHECKPOINT_PREFIX, at + 1)
        if start < len(lines):
            self._check_run(lines[start:], None)

    def _check_run(self, lines: Sequence[bytes], joined: bytes | None) -> None:
        """Check and add a run of record lines. Fast path, with no Python object per line: no NUL
        anywhere, none over the size cap, and every line begins with the first line's (valid,
        cached) ``PROD DATE `` -- counted as occurrences of newline + prefix in the joined run."""
        if joined is None:
            joined = b"\n".join(lines)
        first = lines[0]
        sep = first.find(b" ")
        head = first[: sep + 12] if sep > 0 else b""
        if (len(head) == sep + 12 and head[-1] == 0x20 and head[:-1] in self._valid_prefixes
                and b"\x00" not in joined
                and (len(joined) <= self.max_line_bytes or max(map(len, lines)) <= self.max_line_bytes)
                and share_prefix(joined, head, len(lines))):
            self._add(lines if isinstance(lines, list) else list(lines), len(joined) + 1)
            return
        records = [line for line in lines if self._valid(line)]
        if records:
            self._add(records)

    def _valid(self, line: bytes) -> bool:
        # fast path: a (prod, date) prefix seen before needs no regex or calendar check
        sep = line.find(b" ")
        prefix = line[: sep + 11] if sep > 0 else b""
        if (prefix in self._valid_prefixes and (len(line) == len(prefix) or line[len(prefix)] == 0x20)
                and len(line) <= self.max_line_bytes and b"\x00" not in line):
            return True
        try:
            protocol.validate_record(line, self.max_line_bytes)
        except InvalidLine as exc:
            self._invalid(line, str(exc))
            return False
        if len(self._valid_prefixes) > 10000:
            self._valid_prefixes.clear()
        self._valid_prefixes.add(prefix)
        return True

    def _invalid(self, line: bytes, reason: str) -> None:
        self.lines_invalid += 1
        self._on_invalid(self.collector, line, reason)

    def _add(self, records: list[bytes], size: int = -1) -> None:
        if size < 0:
            size = sum(map(len, records)) + len(records)
        if self._checkpointing:
            if not self._held:
                self._held_since = time.monotonic()
            self._held.extend(records)
            self._held_bytes += size
            if self._held_bytes > self.max_held_bytes:
                # past the cap: spool what is ready (with its token), then the held lines without one
                n = len(self._held)
                self._flush()
                self._ready, self._ready_bytes = self._held, self._held_bytes
                self._mark_pending()
                self._held, self._held_bytes = [], 0
                self.lines_unprotected += n
                log.warning("checkpoint cap reached collector=%s lines=%d cap_bytes=%d: spooled without a "
                            "checkpoint, a restart may repeat them", self.collector, n, self.max_held_bytes)
                self._flush()  # with a pending token that does not cover them, if one was waiting
                self._untokened = True  # no committed token covers them: commit the next at once
            return
        if len(records) > self.max_lines:
            # one large read: cut it into batches of max_lines (no token to keep together here)
            for i in range(0, len(records), self.max_lines):
                self._add(records[i : i + self.max_lines])
            return
        starting = not self._ready
        self._ready.extend(records)
        self._ready_bytes += size
        if len(self._ready) >= self.max_lines or self._ready_bytes >= self.max_bytes:
            self._flush()
        elif starting:
            self._mark_pending()

    def _checkpoint(self, token: str) -> None:
        self._checkpointing = self._seen_checkpoint = True
        if self._held:
            starting = not self._ready
            self._ready.extend(self._held)
            self._ready_bytes += self._held_bytes
            self._held, self._held_bytes = [], 0
            if starting:
                # max_wait counts from when the first of these lines was read, not from the token
                self._mark_pending(self._held_since)
        self._token = token
        if self._first_token and not self._ready:
            self._untokened = True  # nothing committed covers "where to start": commit it now
        if len(self._ready) >= self.max_lines or self._ready_bytes >= self.max_bytes or self._untokened:
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
        self._ready, self._ready_bytes, self._token = [], 0, None

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
                self._held, self._held_bytes = [], 0
            self._flush()
            if self._held:
                self.lines_discarded += len(self._held)
                log.info("collector=%s exited with %d lines after its last checkpoint; they are read "
                         "again from the checkpoint", self.collector, len(self._held))
            self._held, self._held_bytes = [], 0
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
