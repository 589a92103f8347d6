"""Ingestor: what happens to a body, whatever carried it (PUT batch, POST /, TCP).

``put_batch``: answer a stored id as a duplicate, else decode (capped), check every line, and hand
the valid lines and the rejected ones to the store as one all-or-nothing batch; the store's round
claims the id, looks again (a concurrent copy may have just been stored) and records it. The answer
is a future that resolves once that round is durable. ``put_lines`` does the same without an id
(no dedup). Rejected lines go to ``_rejected/rejected_{DATE}.jsonl`` (DATE = the
receiver's local date of receipt), one JSON object per line:

``{"received_at": ISO-8601 UTC, "source": "batch"|"post"|"tcp", "batch_id": str|null,
"line_no": n, "reason": str, "length": bytes, "line": text (invalid UTF-8 as \\xNN),
"line_b64": exact bytes, base64, "truncated": bool}``

(a line is kept whole up to 64 KiB; longer ones, over-long lines above all, keep their first
64 KiB and say ``"truncated": true``). Only a bounded sample of a body's invalid lines is written
(see ``validate``: the first 1,000, at most 1 MiB of line bytes); when some are left out, one more
record counts them: ``{"received_at", "source", "batch_id", "omitted": n, "omitted_bytes": b,
"reason": "..."}``. A body of empty lines costs one record per kept line, never one per line.
Thread-safe; decoding blocks: call it from an executor.

Where the lines go is a ``Destination``: ``PartitionedStore`` (the standalone receiver appends to
its files) or ``receiver.cluster.publish.StreamDestination`` (an ingest node publishes to the
stream). Both take the same ``Batch`` and answer the same ``Stored``, so the answers are the same.
Imports body, validate, dedup, store and errors.
"""

from __future__ import annotations

import base64
import datetime
import json
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from receiver import body
from receiver.dedup import StoredBatch
from receiver.errors import Overloaded
from receiver.store import REJECTED_DIR, Batch, Stored
from receiver.validate import MAX_REJECTED_KEPT, MAX_REJECTED_KEPT_BYTES, CheckedBody, LineChecker

# A body this small (compressed) is decoded on the event loop, and its id looked up only by the
# store's round: the hop to a thread and the lookup cost more than decoding it (profiled, issue 13)
SMALL_BODY_BYTES = 16 * 1024


class BodyBudget:
    """Bytes of request bodies this process holds now (received, and decoded so far), across
    requests, against ``limit``. Thread-safe. One request is always let in when nothing else is
    held, so a single body at the cap never waits forever.

    Only new bytes *received* can be refused (``Charge.take``; a declared ``Content-Length`` is
    taken whole before the body is read, so a refused request costs nothing and an admitted one is
    never refused half-way: ten 60 MiB uploads against 256 MiB are four admitted, six 503s, not ten
    503s each after 25 MiB). Decoded bytes are counted (``Charge.add``) but never refused: that
    keeps new requests out while decoding runs, and its own excess is bounded by the decoding
    threads times ``max_body``."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def charge(self) -> Charge:
        """A charge for one request, to close when the request is done."""
        return Charge(self)

    def _take(self, n: int, held: int, *, force: bool = False) -> bool:
        with self._lock:
            if not force and self.used > held and self.used + n > self.limit:
                return False
            self.used += n
            return True

    def _give(self, n: int) -> None:
        with self._lock:
            self.used -= n


class Charge:
    """What one request holds of a BodyBudget. ``take``/``add`` from any thread; ``close`` gives it
    all back (once: later ones are not counted, the request is over)."""

    def __init__(self, budget: BodyBudget) -> None:
        self._budget = budget
        self._held = 0
        self._closed = False
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        """Hold ``n`` more bytes. Raises Overloaded (503) past the budget."""
        with self._lock:
            if self._closed:
                return
            if not self._budget._take(n, self._held):
                raise Overloaded(f"bodies in memory are at the cap of {self._budget.limit} bytes",
                                 retry_after_s=1)
            self._held += n

    def add(self, n: int) -> None:
        """Hold ``n`` more bytes (decoded ones), past the budget if need be: never raises."""
        with self._lock:
            if not self._closed:
                self._budget._take(n, self._held, force=True)
                self._held += n

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                self._budget._give(self._held)
                self._held = 0


@dataclass(frozen=True)
class Outcome:
    """The answer to one body: line counts, whether it was a duplicate, bytes appended."""

    batch_id: str | None
    stored: int
    rejected: int
    duplicate: bool
    bytes_stored: int = 0

    def as_json(self) -> dict[str, object]:
        return {"batch_id": self.batch_id, "stored": self.stored, "rejected": self.rejected,
                "duplicate": self.duplicate}


class Destination(Protocol):
    """Where checked batches go. Both calls are thread-safe; ``submit`` never blocks."""

    def lookup(self, batch_id: str) -> StoredBatch | None:
        """The counts of ``batch_id`` if it is known to be stored (a cheap early answer)."""
        ...

    def submit(self, batch: Batch) -> Future[Stored]:
        """Store ``batch``; the future resolves once it is durable, or fails with a
        RetryableError (nothing to keep: the sender resends with the same id)."""
        ...


class Ingestor:
    """Decodes, checks and deduplicates bodies, and hands them to the store. Thread-safe; the
    ``put_*`` calls block on decoding (run them on an executor unless the body is under
    SMALL_BODY_BYTES) and return a future that resolves once the store's round covering the body
    is durable."""

    def __init__(self, destination: Destination, *, max_body_bytes: int,
                 max_line_bytes: int) -> None:
        self._store = destination
        self._checker = LineChecker(max_line_bytes)
        self._max_body_bytes = max_body_bytes

    def put_batch(self, batch_id: str, encoding: str | None, raw: bytes, *, max_bytes: int | None = None,
                  charge: Callable[[int], None] | None = None) -> Future[Outcome]:
        """Store batch ``batch_id`` exactly once. ``max_bytes`` lowers the decoded cap (an attempt
        on the event loop); ``charge(n)`` is called for every n decoded bytes. Raises BadRequest,
        BodyTooLarge (or what ``charge`` raises); the future
        fails with BatchInProgress (the same id is being stored by another process and did not
        finish within the claim wait) or StorageUnavailable (nothing of the batch left behind)."""
        if len(raw) > SMALL_BODY_BYTES:  # a big resend: one lookup saves decoding it
            prior = self._store.lookup(batch_id)
            if prior is not None:
                return _done(Outcome(batch_id, prior.stored, prior.rejected, duplicate=True))
        checked = self._checker.check_chunks(self._decode(raw, encoding, max_bytes, charge))
        return self._submit(batch_id, "batch", checked)

    def put_lines(self, source: str, encoding: str | None, raw: bytes, *, max_bytes: int | None = None,
                  charge: Callable[[int], None] | None = None,
                  keep_rejected: int = MAX_REJECTED_KEPT) -> Future[Outcome]:
        """Store lines without dedup (POST / and TCP: ``keep_rejected`` is what is left of the
        connection's sample). Raises as ``put_batch`` does."""
        checked = self._checker.check_chunks(self._decode(raw, encoding, max_bytes, charge),
                                             keep_rejected)
        return self._submit(None, source, checked)

    def _decode(self, raw: bytes, encoding: str | None, max_bytes: int | None,
                charge: Callable[[int], None] | None) -> Iterable[bytes]:
        chunks = body.decode_chunks(raw, encoding, max_bytes or self._max_body_bytes)
        return chunks if charge is None else _charged(chunks, charge)

    def _submit(self, batch_id: str | None, source: str, checked: CheckedBody) -> Future[Outcome]:
        parts = checked.parts
        if checked.rejected_count:
            now = datetime.datetime.now()
            name = f"{REJECTED_DIR}/rejected_{now.date().isoformat()}.jsonl"
            parts = dict(parts)
            parts[name] = _rejected_records(now, source, batch_id, checked)
        bytes_stored = sum(len(d) for d in checked.parts.values())
        stored = self._store.submit(Batch(batch_id, parts, checked.stored, checked.rejected_count))
        outcome: Future[Outcome] = Future()
        outcome.set_running_or_notify_cancel()

        def done(f: Future[Stored]) -> None:
            exc = f.exception()
            if exc is not None:
                outcome.set_exception(exc)
                return
            r = f.result()
            outcome.set_result(Outcome(batch_id, r.stored, r.rejected, r.duplicate,
                                       0 if r.duplicate else bytes_stored))

        stored.add_done_callback(done)
        return outcome


def _charged(chunks: Iterator[bytes], charge: Callable[[int], None]) -> Iterator[bytes]:
    for chunk in chunks:
        charge(len(chunk))  # before the chunk is kept: past the budget it is refused, not held
        yield chunk


def _done(outcome: Outcome) -> Future[Outcome]:
    f: Future[Outcome] = Future()
    f.set_result(outcome)
    return f


def _rejected_records(now: datetime.datetime, source: str, batch_id: str | None,
                      checked: CheckedBody) -> bytes:
    received_at = now.astimezone(datetime.UTC).isoformat(timespec="milliseconds")
    out = []
    for r in checked.rejected:
        out.append(json.dumps({
            "received_at": received_at, "source": source, "batch_id": batch_id,
            "line_no": r.line_no, "reason": r.reason, "length": r.length,
            "line": r.raw.decode("utf-8", "backslashreplace"),
            "line_b64": base64.b64encode(r.raw).decode("ascii"),
            "truncated": len(r.raw) < r.length,
        }, ensure_ascii=False).encode("utf-8"))
    if checked.omitted:
        out.append(json.dumps({
            "received_at": received_at, "source": source, "batch_id": batch_id,
            "omitted": checked.omitted, "omitted_bytes": checked.omitted_bytes,
            "reason": f"more rejected lines than the {MAX_REJECTED_KEPT} (or "
                      f"{MAX_REJECTED_KEPT_BYTES} bytes) kept per body",
        }).encode("utf-8"))
    return b"\n".join(out) + b"\n"
